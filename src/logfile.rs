//! drover's own log: the log file (the `log_file` setting), reopened on
//! SIGUSR1 so that logrotate can move it away, or standard error, written
//! without ever blocking the master.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The log file, shared by the tracing writer and the master (which reopens it).
#[derive(Clone)]
pub struct LogFile {
    path: PathBuf,
    sink: Arc<Mutex<Sink>>,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    pub fn open(path: &Path) -> io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_path_buf(),
            sink: Arc::new(Mutex::new(Sink {
                file: open(path)?,
                lost: 0,
                why: String::new(),
                cut: false,
            })),
        })
    }

    /// Opens the path again: after a rotation, a new file at the same name.
    pub fn reopen(&self) -> io::Result<()> {
        let fresh = open(&self.path)?;
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        sink.file = fresh;
        // A line cut short in the old file does not continue in the new one.
        sink.cut = false;
        Ok(())
    }
}

/// The file, and what could not be written to it (a full disk): the lines
/// lost are counted and said with the first line that gets through, and a
/// line cut short (part of it fitted) is ended before the next, so that
/// two lines are never run together.
struct Sink {
    file: File,
    lost: u64,
    /// The error that lost the last line.
    why: String,
    /// The file ends in the middle of a line.
    cut: bool,
}

impl Sink {
    /// Writes all of `bytes`, or says why not (and whether part of it went).
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < bytes.len() {
            match self.file.write(&bytes[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.cut |= done > 0;
                    return Err(e);
                }
            }
        }
        self.cut = false;
        Ok(())
    }

    /// One log line: never an error for tracing (which would report it on
    /// standard error), counted as lost instead.
    fn line(&mut self, buf: &[u8]) {
        if self.cut && self.put(b"\n").is_err() {
            self.lose(None);
            return;
        }
        if self.lost > 0 {
            let note = note_line(&format!("{} log line(s) lost: {}", self.lost, self.why));
            if let Err(e) = self.put(note.as_bytes()) {
                self.lose(Some(e));
                return;
            }
            self.lost = 0;
        }
        if let Err(e) = self.put(buf) {
            self.lose(Some(e));
        }
    }

    fn lose(&mut self, why: Option<io::Error>) {
        self.lost += 1;
        if let Some(e) = why {
            self.why = e.to_string();
        }
    }
}

/// A warning line drover writes itself (not through tracing), in the log's
/// format: `TS  WARN msg`, or a JSON object with a JSON log.
fn note_line(msg: &str) -> String {
    let now = std::time::SystemTime::now();
    if crate::logformat::is_json() {
        let line = serde_json::json!({
            "ts": humantime::format_rfc3339_millis(now).to_string(),
            "level": "warn",
            "msg": msg,
        });
        format!("{line}\n")
    } else {
        format!("{}  WARN {msg}\n", humantime::format_rfc3339_micros(now))
    }
}

/// One log line's writer.
pub struct Line(Arc<Mutex<Sink>>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).line(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line(self.sink.clone())
    }
}

/// Standard error, written without blocking: when nobody reads the pipe (or
/// socket) behind it and it is full, a line is dropped and counted rather
/// than stopping the master's loop, and the count is logged with the next
/// line that gets through.
///
/// The master gets its own open file description of a pipe or terminal
/// (through `/proc/self/fd/2`), made non-blocking: setting `O_NONBLOCK` on
/// the one it inherited would change it for the workers and the parent that
/// share it. A pipe is widened to 1 MiB so that a reader that is only slow
/// loses nothing. A socket (systemd's journal) is written with
/// `MSG_DONTWAIT`.
#[derive(Clone)]
pub struct Stderr(Arc<StderrInner>);

struct StderrInner {
    how: How,
    dropped: std::sync::atomic::AtomicU64,
}

enum How {
    Own(File),
    Socket,
    /// A regular file, or what could not be reopened: plain writes.
    Plain,
}

impl Stderr {
    pub fn open() -> Stderr {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let fd2 = std::path::Path::new("/proc/self/fd/2");
        let how = match std::fs::metadata(fd2).map(|m| m.file_type()) {
            Ok(t) if t.is_socket() => How::Socket,
            Ok(t) if t.is_fifo() || t.is_char_device() => OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(fd2)
                .map_or(How::Plain, |f| {
                    if t.is_fifo() {
                        widen(&f);
                    }
                    How::Own(f)
                }),
            _ => How::Plain,
        };
        Stderr(Arc::new(StderrInner {
            how,
            dropped: Default::default(),
        }))
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A pipe's capacity raised (best effort) to what an unprivileged process
/// may set, 1 MiB by default instead of 64 KiB: a burst of log lines (the
/// start-up of a thousand workers) then waits there for a reader that is
/// only slow, rather than being dropped.
fn widen(pipe: &File) {
    use std::os::fd::AsRawFd;
    let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_int>().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    // SAFETY: fcntl on a pipe we hold; failure leaves it as it was.
    unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, max) };
}

impl StderrInner {
    /// One write that never waits: Ok(false) when it would have.
    fn try_write(&self, buf: &[u8]) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: writing from a valid buffer to a descriptor we hold.
            let n = unsafe {
                match &self.how {
                    How::Own(f) => libc::write(f.as_raw_fd(), buf.as_ptr().cast(), buf.len()),
                    How::Socket => libc::send(
                        2,
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    ),
                    How::Plain => libc::write(2, buf.as_ptr().cast(), buf.len()),
                }
            };
            if n >= 0 {
                // A line over the pipe's atomic size may go out in part; the
                // rest is dropped with it (the next line starts on its own).
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(false),
                _ => return Err(e),
            }
        }
    }

    fn line(&self, buf: &[u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        let dropped = self.dropped.load(Relaxed);
        if dropped > 0 {
            let note = note_line(&format!(
                "{dropped} log line(s) dropped: standard error was full (nobody reading it)"
            ));
            match self.try_write(note.as_bytes()) {
                Ok(true) => {
                    self.dropped.fetch_sub(dropped, Relaxed);
                }
                _ => {
                    self.dropped.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
        if !matches!(self.try_write(buf), Ok(true)) {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
}

/// One log line's writer on standard error.
pub struct StderrLine(Arc<StderrInner>);

impl Write for StderrLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.line(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = StderrLine;
    fn make_writer(&'a self) -> StderrLine {
        StderrLine(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A line cut short (the disk filled up in the middle of it) is ended
    /// before the next line, and the lines lost are counted on the first
    /// line that gets through. A full non-blocking pipe stands for the
    /// full disk: it takes part of a long line, then nothing.
    #[test]
    fn a_cut_line_is_ended_and_lost_lines_are_counted() {
        let (mut reader, writer) = std::io::pipe().unwrap();
        let writer = File::from(std::os::fd::OwnedFd::from(writer));
        nix::fcntl::fcntl(
            &writer,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let mut sink = Sink {
            file: writer,
            lost: 0,
            why: String::new(),
            cut: false,
        };
        let long = vec![b'x'; 1 << 20];
        sink.line(&long);
        sink.line(b"lost too\n");
        assert!(sink.cut && sink.lost == 2, "{} {}", sink.cut, sink.lost);
        // Room again: read what the pipe holds, then the next line.
        let mut got = vec![0u8; 1 << 20];
        let n = reader.read(&mut got).unwrap();
        assert!(n > 0 && n < long.len() && got[..n].iter().all(|b| *b == b'x'));
        sink.line(b"next\n");
        let mut rest = vec![0u8; 4096];
        let n = reader.read(&mut rest).unwrap();
        let text = String::from_utf8_lossy(&rest[..n]);
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[0], "", "the cut line is ended first: {text:?}");
        assert!(
            lines[1].ends_with(
                "WARN 2 log line(s) lost: Resource temporarily unavailable (os error 11)"
            ),
            "{text:?}"
        );
        assert_eq!(&lines[2..], ["next", ""], "{text:?}");
        assert!(!sink.cut && sink.lost == 0);
    }
}

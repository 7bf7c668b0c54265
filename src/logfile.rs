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
    file: Arc<Mutex<File>>,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    pub fn open(path: &Path) -> io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(open(path)?)),
        })
    }

    /// Opens the path again: after a rotation, a new file at the same name.
    pub fn reopen(&self) -> io::Result<()> {
        let fresh = open(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

/// One log line's writer.
pub struct Line(Arc<Mutex<File>>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogFile {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line(self.file.clone())
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
            let note = format!(
                "WARN drover: {dropped} log line(s) dropped: standard error was full (nobody reading it)\n"
            );
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

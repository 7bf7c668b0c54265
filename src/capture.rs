//! `capture_output`: the workers' standard output and error go through pipes
//! into drover's log, line by line, tagged with the worker's slot and pid.
//!
//! Bounded so that a chatty worker can neither block nor flood the master:
//! every pipe is read without blocking, at most [`READ_BUDGET`] bytes per pipe
//! per read; a line longer than [`MAX_LINE`] is cut; lines beyond a rate
//! ([`PIPE_RATE`] per pipe, [`TOTAL_RATE`] for all standard outputs and as
//! much for all standard errors, each with a burst) are
//! dropped and counted (a dropped line is only counted, never copied), and
//! the count is logged when lines flow again, at most once per
//! [`DROPPED_EVERY`], and when the pipe closes. drover's own lines are never
//! dropped. All pipes sit behind one epoll descriptor, so the loop waits on
//! one descriptor and reads only the pipes that have data.
//!
//! The pipes are read at most once per [`READ_INTERVAL`]: output that comes
//! sooner waits in its pipe (the loop does not wait on the pipes meanwhile;
//! signals, the control socket and the rest are served as ever). A worker
//! that writes as fast as it can costs the master one read per pipe per
//! interval, not one turn of the loop per write; past a pipe's capacity
//! (64 KiB) per interval, its writes wait for the next read, as they would
//! on a terminal. (Measured: a `yes` worker took 70-90% of a CPU of the
//! master before, reading every write at once; see docs/benchmarks.md.)

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// The longest line logged; the rest of a longer one is dropped.
pub const MAX_LINE: usize = 4096;
/// The most bytes read from one pipe per turn of the loop.
pub const READ_BUDGET: usize = 256 * 1024;
/// The pipes are read at most this often.
pub const READ_INTERVAL: Duration = Duration::from_millis(10);
/// The most pipes read per read of the pipes (one `epoll_wait`).
const EVENTS: usize = 64;
/// A pipe's count of dropped lines is logged at most this often (and when
/// it closes): under a steady flood lines flow again at every read, and a
/// count each time was one warning of drover's own per 10 ms per pipe.
pub const DROPPED_EVERY: Duration = Duration::from_secs(1);
/// Lines per second logged from one pipe (and the burst above it).
pub const PIPE_RATE: (f64, f64) = (200.0, 1000.0);
/// Lines per second logged from all the workers' standard outputs together
/// (and the burst), and as many from all their standard errors: a flood on
/// one stream, say an access log on standard output under a flood of
/// requests or of garbage, must not drop the other's lines (the tracebacks).
pub const TOTAL_RATE: (f64, f64) = (2000.0, 5000.0);

/// Which of a worker's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// Its index in [`Capture::total`].
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// What the log gets from a worker's pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<'a> {
    Line {
        slot: u32,
        pid: Pid,
        stream: Stream,
        text: &'a str,
    },
    /// Lines dropped over the rate since the last line logged.
    Dropped {
        slot: u32,
        pid: Pid,
        stream: Stream,
        lines: u64,
    },
}

/// Logs one [`Output`] through tracing (the master's sink). The fields
/// (slot, pid, stream) are for the JSON log; the text log has them in words.
pub fn log(out: Output<'_>) {
    let json = crate::logformat::is_json();
    match out {
        Output::Line {
            slot,
            pid,
            stream,
            text,
        } => {
            let stream = stream.as_str();
            if json {
                tracing::info!(target: "drover::output", slot, pid = pid.as_raw(), stream, line = text);
            } else {
                tracing::info!(target: "drover::output", "worker {slot} (pid {pid}) {stream}: {text}");
            }
        }
        Output::Dropped {
            slot,
            pid,
            stream,
            lines,
        } => {
            let stream = stream.as_str();
            let msg = format!(
                "worker {slot} (pid {pid}) {stream}: {lines} lines dropped (over the capture_output rate)"
            );
            if json {
                tracing::warn!(target: "drover::output", slot, pid = pid.as_raw(), stream, dropped = lines, "{msg}");
            } else {
                tracing::warn!(target: "drover::output", "{msg}");
            }
        }
    }
}

/// A pipe for one stream: (read end for drover, non-blocking; write end for
/// the worker). Both close-on-exec: the spawn `dup2`s the write end to 1 or 2.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors, owned from here on.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(r.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(r.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok((r, w))
}

/// A token bucket: `rate` per second, at most `burst` saved.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    fn new((rate, burst): (f64, f64), now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            rate,
            burst,
            last: now,
        }
    }
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }
}

struct Pipe {
    fd: OwnedFd,
    slot: u32,
    pid: Pid,
    stream: Stream,
    partial: Vec<u8>,
    /// Inside a line already cut at MAX_LINE: skip to its end.
    skipping: bool,
    dropped: u64,
    /// When `dropped` was last logged.
    reported: Option<Instant>,
    bucket: Bucket,
}

/// Every capture pipe, behind one epoll descriptor.
pub struct Capture {
    epoll: OwnedFd,
    pipes: HashMap<u64, Pipe>,
    next: u64,
    /// The rate of each stream of all workers together (by [`Stream::index`]).
    total: [Bucket; 2],
    /// The read buffer, allocated at the first read.
    buf: Vec<u8>,
    /// When the pipes were last read, and when they may be read next if
    /// output came sooner than [`READ_INTERVAL`] after that.
    last_read: Option<Instant>,
    held_until: Option<Instant>,
}

impl Capture {
    pub fn new() -> io::Result<Capture> {
        // SAFETY: a plain epoll_create1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Capture {
            // SAFETY: a fresh descriptor, owned from here on.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            pipes: HashMap::new(),
            next: 0,
            total: [
                Bucket::new(TOTAL_RATE, Instant::now()),
                Bucket::new(TOTAL_RATE, Instant::now()),
            ],
            buf: Vec::new(),
            last_read: None,
            held_until: None,
        })
    }

    /// Whether the loop should wait on [`Capture::as_fd`]: some pipe is
    /// open, and it is not held until [`Capture::next_deadline`].
    pub fn wants_poll(&self) -> bool {
        self.pipes() > 0 && self.held_until.is_none()
    }

    /// When held output is to be read.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held_until
    }

    /// Readable when some pipe has data (or was closed).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    /// Pipes still open (a worker's, or its children's that kept them).
    pub fn pipes(&self) -> usize {
        self.pipes.len()
    }

    /// Reads `read` (a [`pipe`]'s read end) for the worker `pid` of `slot`.
    pub fn add(&mut self, slot: u32, pid: Pid, stream: Stream, read: OwnedFd) -> io::Result<()> {
        let token = self.next;
        self.next += 1;
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: registers a descriptor we own; `ev` is valid.
        if unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                read.as_raw_fd(),
                &mut ev,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        self.pipes.insert(
            token,
            Pipe {
                fd: read,
                slot,
                pid,
                stream,
                partial: Vec::new(),
                skipping: false,
                dropped: 0,
                reported: None,
                bucket: Bucket::new(PIPE_RATE, Instant::now()),
            },
        );
        Ok(())
    }

    /// At exit: what the pipes hold is read now, held or not (the last
    /// lines of workers that exited since the last read).
    pub fn flush(&mut self, now: Instant, sink: &mut dyn FnMut(Output<'_>)) {
        // One read reports at most EVENTS pipes; the kernel hands the rest
        // out first on the next (ready pipes rotate), so enough reads see
        // every pipe: at exit, every worker's pipe may hold its last lines.
        for _ in 0..=self.pipes.len() / EVENTS {
            self.held_until = None;
            self.last_read = None;
            self.on_ready(now, sink);
        }
    }

    /// Reads the pipes that have data (each at most [`READ_BUDGET`] bytes)
    /// and hands every whole line to `sink`, at most once per
    /// [`READ_INTERVAL`]: output that came sooner is held until then. Never
    /// blocks.
    pub fn on_ready(&mut self, now: Instant, sink: &mut dyn FnMut(Output<'_>)) {
        if self.held_until.is_some_and(|t| now < t) {
            return;
        }
        self.held_until = None;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        // SAFETY: epoll_wait writes at most events.len() entries.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                0,
            )
        };
        if n <= 0 {
            return;
        }
        if let Some(due) = self.last_read.map(|t| t + READ_INTERVAL) {
            if now < due {
                self.held_until = Some(due);
                return;
            }
        }
        self.last_read = Some(now);
        // Only once a pipe has had data.
        if self.buf.is_empty() {
            self.buf = vec![0u8; 64 * 1024];
        }
        let buf = &mut self.buf;
        for total in &mut self.total {
            total.refill(now);
        }
        for ev in events.iter().take(n.max(0) as usize) {
            let token = ev.u64;
            let Some(p) = self.pipes.get_mut(&token) else {
                continue;
            };
            p.bucket.refill(now);
            let mut budget = READ_BUDGET;
            let mut closed = false;
            while budget > 0 {
                // SAFETY: reads into our buffer from a descriptor we own.
                let r = unsafe {
                    libc::read(
                        p.fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len().min(budget),
                    )
                };
                if r > 0 {
                    let r = r as usize;
                    budget -= r;
                    feed(p, &mut self.total[p.stream.index()], &buf[..r], sink);
                    continue;
                }
                let err = io::Error::last_os_error();
                if r < 0 && err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                closed = r == 0 || err.kind() != io::ErrorKind::WouldBlock;
                break;
            }
            if closed {
                if let Some(mut p) = self.pipes.remove(&token) {
                    if !p.partial.is_empty() && !p.skipping {
                        let total = &mut self.total[p.stream.index()];
                        emit_partial(&mut p, total, sink);
                    }
                    report_dropped(&mut p, sink);
                    // Closing the descriptor removes it from the epoll set.
                }
            }
        }
    }
}

/// Splits `data` into lines; each whole line goes to `emit`. Once no line
/// can be logged (over a rate), the whole lines left are only counted.
fn feed(p: &mut Pipe, total: &mut Bucket, data: &[u8], sink: &mut dyn FnMut(Output<'_>)) {
    let mut rest = data;
    while !rest.is_empty() {
        let dropping = p.bucket.tokens < 1.0 || total.tokens < 1.0;
        if dropping && p.partial.is_empty() && !p.skipping {
            if let Some(last) = rest.iter().rposition(|b| *b == b'\n') {
                p.dropped += count_newlines(&rest[..=last]);
                rest = &rest[last + 1..];
                continue;
            }
        }
        let nl = rest.iter().position(|b| *b == b'\n');
        let (segment, more) = match nl {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        if !p.skipping {
            let room = MAX_LINE - p.partial.len();
            p.partial
                .extend_from_slice(&segment[..segment.len().min(room)]);
            if segment.len() > room {
                p.partial
                    .extend_from_slice(" [cut at 4096 bytes]".as_bytes());
                emit_partial(p, total, sink);
                p.skipping = true;
            }
        }
        if nl.is_some() {
            if !p.skipping {
                emit_partial(p, total, sink);
            }
            p.skipping = false;
        }
        rest = more;
    }
}

/// The line gathered in `p.partial` goes to `emit`; the buffer is kept for
/// the next one.
fn emit_partial(p: &mut Pipe, total: &mut Bucket, sink: &mut dyn FnMut(Output<'_>)) {
    let mut line = std::mem::take(&mut p.partial);
    emit(p, total, &line, sink);
    line.clear();
    p.partial = line;
}

/// The number of `\n` in `data`, eight bytes at a time: a flood is only
/// counted, and this is all the master does with most of it.
fn count_newlines(data: &[u8]) -> u64 {
    const ONES: u64 = u64::from_ne_bytes([0x7f; 8]);
    const NL: u64 = u64::from_ne_bytes([b'\n'; 8]);
    let mut chunks = data.chunks_exact(8);
    let mut n = 0;
    for c in chunks.by_ref() {
        let v = u64::from_ne_bytes(c.try_into().unwrap_or_default()) ^ NL;
        // A byte's high bit is set in `t` exactly when the byte of `v` is 0.
        let t = !(((v & ONES).wrapping_add(ONES)) | v | ONES);
        n += u64::from(t.count_ones());
    }
    n + chunks.remainder().iter().filter(|b| **b == b'\n').count() as u64
}

fn emit(p: &mut Pipe, total: &mut Bucket, line: &[u8], sink: &mut dyn FnMut(Output<'_>)) {
    if p.bucket.tokens < 1.0 || total.tokens < 1.0 {
        p.dropped += 1;
        return;
    }
    p.bucket.tokens -= 1.0;
    total.tokens -= 1.0;
    // The bucket was refilled at this read: its time is now.
    let now = p.bucket.last;
    if p.reported
        .is_none_or(|t| now.saturating_duration_since(t) >= DROPPED_EVERY)
    {
        report_dropped(p, sink);
    }
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    sink(Output::Line {
        slot: p.slot,
        pid: p.pid,
        stream: p.stream,
        text,
    });
}

fn report_dropped(p: &mut Pipe, sink: &mut dyn FnMut(Output<'_>)) {
    if p.dropped > 0 {
        p.reported = Some(p.bucket.last);
        sink(Output::Dropped {
            slot: p.slot,
            pid: p.pid,
            stream: p.stream,
            lines: p.dropped,
        });
        p.dropped = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[derive(Debug, PartialEq)]
    enum Got {
        Line(String),
        Dropped(u64),
    }

    fn collect(c: &mut Capture, now: Instant) -> Vec<Got> {
        let mut got = Vec::new();
        c.on_ready(now, &mut |o| {
            got.push(match o {
                Output::Line { text, slot, .. } => {
                    assert_eq!(slot, 2);
                    Got::Line(text.to_string())
                }
                Output::Dropped { lines, .. } => Got::Dropped(lines),
            })
        });
        got
    }

    #[test]
    fn lines_are_split_cut_and_the_last_one_flushed_at_the_end() {
        let mut c = Capture::new().unwrap();
        let (r, w) = pipe().unwrap();
        c.add(2, Pid::from_raw(9), Stream::Stdout, r).unwrap();
        let mut w = std::fs::File::from(w);
        w.write_all(b"one\r\ntw").unwrap();
        let now = Instant::now();
        assert_eq!(collect(&mut c, now), vec![Got::Line("one".into())]);
        let long = vec![b'x'; MAX_LINE + 10];
        w.write_all(b"o\n").unwrap();
        w.write_all(&long).unwrap();
        w.write_all(b"\nlast").unwrap();
        drop(w);
        // Sooner than READ_INTERVAL after the last read: held until then,
        // or until drover exits (flush).
        assert_eq!(collect(&mut c, now + READ_INTERVAL / 2), vec![]);
        assert!(!c.wants_poll());
        assert_eq!(c.next_deadline(), Some(now + READ_INTERVAL));
        let mut got = Vec::new();
        c.flush(now + READ_INTERVAL / 2, &mut |o| {
            if let Output::Line { text, .. } = o {
                got.push(Got::Line(text.to_string()));
            }
        });
        assert_eq!(got[0], Got::Line("two".into()));
        let Got::Line(cut) = &got[1] else { panic!() };
        assert!(cut.ends_with("[cut at 4096 bytes]") && cut.len() < MAX_LINE + 30);
        assert_eq!(got[2], Got::Line("last".into()));
        assert_eq!(got.len(), 3);
        assert_eq!(c.pipes(), 0, "closed pipe forgotten");
    }

    #[test]
    fn a_flood_is_read_in_bounded_turns_and_rate_limited() {
        let mut c = Capture::new().unwrap();
        let (r, w) = pipe().unwrap();
        c.add(2, Pid::from_raw(9), Stream::Stderr, r).unwrap();
        // 100 MB of short lines, from another thread (the worker).
        let writer = std::thread::spawn(move || {
            let mut w = std::fs::File::from(w);
            let chunk = b"spam spam spam\n".repeat(4096);
            let mut sent = 0;
            while sent < 100 << 20 {
                w.write_all(&chunk).unwrap();
                sent += chunk.len();
            }
        });
        let start = Instant::now();
        let (mut lines, mut dropped) = (0u64, 0u64);
        while c.pipes() > 0 {
            assert!(start.elapsed() < Duration::from_secs(60), "stuck");
            let mut fds = [nix::poll::PollFd::new(
                c.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u8));
            for g in collect(&mut c, Instant::now()) {
                match g {
                    Got::Line(_) => lines += 1,
                    Got::Dropped(n) => dropped += n,
                }
            }
        }
        writer.join().unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert!(
            lines as f64 <= PIPE_RATE.1 + PIPE_RATE.0 * secs + 1.0,
            "{lines} lines in {secs} s"
        );
        assert_eq!(lines + dropped, (100u64 << 20).div_ceil(15 * 4096) * 4096);
    }

    #[test]
    fn one_turn_reads_at_most_the_read_budget() {
        let mut c = Capture::new().unwrap();
        let (r, w) = pipe().unwrap();
        // A pipe holding four budgets' worth, written before any read (as a
        // worker that wrote faster than the loop turned).
        let size = 4 * READ_BUDGET;
        // SAFETY: fcntl on a pipe we own.
        let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        assert!(got >= size as libc::c_int, "F_SETPIPE_SZ: {got}");
        let mut w = std::fs::File::from(w);
        let line = b"spam spam spam\n";
        let mut data = line.repeat(size / line.len());
        data.truncate(size);
        w.write_all(&data).unwrap();
        let r_fd = r.as_raw_fd();
        c.add(2, Pid::from_raw(9), Stream::Stderr, r).unwrap();
        collect(&mut c, Instant::now());
        let mut left: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        assert_eq!(unsafe { libc::ioctl(r_fd, libc::FIONREAD, &mut left) }, 0);
        assert_eq!(
            left as usize,
            data.len() - READ_BUDGET,
            "one turn, one budget"
        );
        drop(w);
    }

    /// At exit every worker's pipe may hold its last line (held by
    /// READ_INTERVAL): more pipes than one epoll_wait reports are all read.
    #[test]
    fn the_flush_at_exit_reads_every_pipe() {
        let mut c = Capture::new().unwrap();
        let n = 2 * EVENTS + 7;
        for i in 0..n {
            let (r, w) = pipe().unwrap();
            c.add(2, Pid::from_raw(9), Stream::Stdout, r).unwrap();
            let mut w = std::fs::File::from(w);
            writeln!(w, "bye {i}").unwrap();
        }
        let mut got = 0;
        c.flush(Instant::now(), &mut |o| {
            if let Output::Line { .. } = o {
                got += 1;
            }
        });
        assert_eq!(got, n, "the last line of every worker");
        assert_eq!(c.pipes(), 0, "every closed pipe read to its end");
    }

    #[test]
    fn newlines_are_counted_whatever_their_place() {
        for len in 0..40 {
            for nl in 0..len {
                let mut data = vec![b'x'; len];
                data[nl] = b'\n';
                data[len - 1 - nl / 2] = b'\n';
                let want = data.iter().filter(|b| **b == b'\n').count() as u64;
                assert_eq!(count_newlines(&data), want, "{data:?}");
            }
        }
        assert_eq!(count_newlines(&[b'\n'; 17]), 17);
        assert_eq!(
            count_newlines(&[0x8a, 0x0b, 0x09, 0xff, 0, 0x0a, 0x8a, 0x0a, 1]),
            2
        );
    }

    #[test]
    fn a_flood_over_the_rate_is_counted_to_the_line() {
        let mut c = Capture::new().unwrap();
        let (r, w) = pipe().unwrap();
        c.add(2, Pid::from_raw(9), Stream::Stdout, r).unwrap();
        let mut w = std::fs::File::from(w);
        // Past the burst, a line cut in two reads, a long one, and the end.
        let lines = "spam\n".repeat(PIPE_RATE.1 as usize + 100);
        w.write_all(lines.as_bytes()).unwrap();
        w.write_all(b"sp").unwrap();
        let now = Instant::now();
        let got = collect(&mut c, now);
        assert_eq!(got.len(), PIPE_RATE.1 as usize);
        w.write_all(b"am\n").unwrap();
        w.write_all(&vec![b'x'; 3 * MAX_LINE]).unwrap();
        w.write_all(b"\nend\n").unwrap();
        drop(w);
        // The bucket has refilled by 2 lines (200 a second): the line
        // completed ("spam") and the long one are logged, "end" is dropped.
        let got = collect(&mut c, now + READ_INTERVAL);
        let dropped: u64 = got
            .iter()
            .map(|g| match g {
                Got::Dropped(n) => *n,
                Got::Line(_) => 0,
            })
            .sum();
        assert_eq!(got[0], Got::Dropped(100));
        assert_eq!(got[1], Got::Line("spam".into()));
        assert!(matches!(&got[2], Got::Line(l) if l.ends_with("[cut at 4096 bytes]")));
        assert_eq!(got[3], Got::Dropped(1));
        assert_eq!(dropped, 101);
    }

    /// A steady flood over the rate: its count is logged once a second (and
    /// at the end), not at each read; every line is still logged or counted.
    /// It was logged at each read that let lines through: every 10 ms.
    #[test]
    fn a_steady_flood_is_counted_once_a_second() {
        let mut c = Capture::new().unwrap();
        let (r, w) = pipe().unwrap();
        c.add(2, Pid::from_raw(9), Stream::Stdout, r).unwrap();
        let mut w = std::fs::File::from(w);
        let now = Instant::now();
        let mut written = PIPE_RATE.1 as u64 + 100;
        w.write_all("spam\n".repeat(written as usize).as_bytes())
            .unwrap();
        let mut got = collect(&mut c, now);
        // Half a second of reads, each letting 2 lines through.
        for i in 1..=50 {
            w.write_all("spam\n".repeat(10).as_bytes()).unwrap();
            written += 10;
            got.extend(collect(&mut c, now + READ_INTERVAL * i));
        }
        drop(w);
        got.extend(collect(&mut c, now + READ_INTERVAL * 51));
        let counts: Vec<u64> = got
            .iter()
            .filter_map(|g| match g {
                Got::Dropped(n) => Some(*n),
                Got::Line(_) => None,
            })
            .collect();
        let lines = got.len() as u64 - counts.len() as u64;
        assert_eq!(
            counts.len(),
            2,
            "once in the half second, once at the end: {counts:?}"
        );
        assert_eq!(lines + counts.iter().sum::<u64>(), written);
    }

    /// Workers' standard outputs flooding past the rate of all pipes (an
    /// access log under a flood of garbage requests) leave their standard
    /// errors' lines alone. They shared one rate: the traceback was dropped.
    #[test]
    fn a_flood_on_the_standard_outputs_drops_no_line_of_a_standard_error() {
        let mut c = Capture::new().unwrap();
        let pid = Pid::from_raw(9);
        let mut outs = Vec::new();
        let floods = TOTAL_RATE.1 as usize / PIPE_RATE.1 as usize + 1;
        for _ in 0..floods {
            let (r, w) = pipe().unwrap();
            c.add(2, pid, Stream::Stdout, r).unwrap();
            outs.push(std::fs::File::from(w));
        }
        let (r, err) = pipe().unwrap();
        c.add(2, pid, Stream::Stderr, r).unwrap();
        // Each stdout up to its own burst: together past the total's.
        let lines = "\"-\" 400 -\n".repeat(PIPE_RATE.1 as usize);
        for w in &mut outs {
            w.write_all(lines.as_bytes()).unwrap();
        }
        std::fs::File::from(err)
            .write_all(b"Traceback (most recent call last):\n")
            .unwrap();
        let mut logged = Vec::new();
        c.on_ready(Instant::now(), &mut |o| {
            if let Output::Line { stream, text, .. } = o {
                logged.push((stream, text.to_string()));
            }
        });
        let out = logged.iter().filter(|(s, _)| *s == Stream::Stdout).count();
        assert_eq!(out, TOTAL_RATE.1 as usize, "the stdouts' total rate holds");
        assert!(
            logged.contains(&(Stream::Stderr, "Traceback (most recent call last):".into())),
            "the traceback is logged"
        );
    }
}

//! One client connection, served on its own thread: requests one after the
//! other (keep-alive), until the client closes, the connection idles out, or
//! the worker stops.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use drover_worker::{cleanup, StopState, Stream};

use crate::http::{self, Framing, Parse, Route, MAX_HEAD};
use crate::Shared;

/// How long an idle keep-alive connection is kept open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the rest of a request (or for the client to take a response).
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// After a stop, how long a connection may take to send its next request
/// (its first, or the next one on a kept-alive connection).
const STOP_GRACE: Duration = Duration::from_secs(1);
/// After the last response, how long to read and discard what the client still
/// sends, so that closing does not reset the connection under the response.
const LINGER: Duration = Duration::from_secs(1);

/// Serves `stream` until it is done; never panics on I/O errors (the client
/// went away: nothing to do but close).
pub fn serve(stream: Stream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut conn = Conn {
        stream,
        buf: vec![0; MAX_HEAD],
        len: 0,
        out: Vec::with_capacity(256),
    };
    if conn.run(shared).is_ok() {
        conn.linger();
    }
}

struct Conn {
    stream: Stream,
    /// Received bytes not yet consumed: `buf[..len]`.
    buf: Vec<u8>,
    len: usize,
    /// The response being built (reused across requests).
    out: Vec<u8>,
}

/// Why a connection ended without a final response: just close.
struct Closed;

/// What came of waiting for a request.
enum Wait {
    /// It is here (at least its first bytes).
    Request,
    /// None came in time after a stop: close, gracefully.
    Stopped,
}

impl Conn {
    /// Returns `Ok` when the connection is to be closed gracefully (after a
    /// response with `Connection: close`, or when a stop found it idle):
    /// then the caller lingers. `Err(Closed)` when it simply ends.
    fn run(&mut self, shared: &Shared) -> Result<(), Closed> {
        let mut first = true;
        loop {
            if self.len == 0 {
                if let Wait::Stopped = self.wait_for_request(shared, first)? {
                    return Ok(());
                }
            }
            first = false;
            let request = match self.read_head()? {
                Ok(request) => request,
                Err(status) => {
                    let body = format!("{}\n", http::reason(status).to_lowercase());
                    let framing = Framing {
                        keep_alive: false,
                        http10: false,
                        head_only: false,
                    };
                    self.respond(status, body.as_bytes(), &shared.pid, framing)?;
                    return Ok(());
                }
            };
            // In progress from its head to its response (counted when dropped).
            let _counted = shared.scoreboard.as_ref().map(|b| b.begin());
            self.consume(request.head_len, request.content_length)?;

            let (status, body) = handle(&request.route);
            // A request that was in progress when the stop came is answered,
            // then the connection is closed; so is one during drover's
            // pre-stop delay, so that no idle connection is left for the stop.
            let keep_alive = request.keep_alive
                && !shared.stop.is_stopping()
                && !drover_worker::prestop::noticed();
            let framing = Framing {
                keep_alive,
                http10: request.http10,
                head_only: request.head_only,
            };
            self.respond(status, body.as_bytes(), &shared.pid, framing)?;
            if !keep_alive {
                return Ok(());
            }
        }
    }

    /// Between requests: waits for the client's next request, or for a
    /// stop. After a stop a connection still gets [`STOP_GRACE`] (never past
    /// the drain deadline) to send its request, which is served and
    /// answered with `Connection: close`. A new connection was accepted, so
    /// its client expects an answer; a kept-alive client sends its next
    /// request the moment it has the last response, and closing under it
    /// would fail that request (the close crosses it on the wire). Only a
    /// quick stop closes an idle kept-alive connection at once. Either way
    /// the close is graceful ([`Wait::Stopped`]: the caller lingers).
    fn wait_for_request(&self, shared: &Shared, first: bool) -> Result<Wait, Closed> {
        let idle_until = Instant::now() + IDLE_TIMEOUT;
        let mut grace_until: Option<Instant> = None;
        loop {
            if grace_until.is_none() && shared.stop.is_stopping() {
                let quick = shared.stop.state() == StopState::Quick;
                if quick && !first {
                    return Ok(Wait::Stopped);
                }
                grace_until = Some((Instant::now() + STOP_GRACE).min(cleanup::drain_deadline()));
            }
            let until = grace_until.unwrap_or(idle_until).min(idle_until);
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return match grace_until {
                    Some(_) => Ok(Wait::Stopped),
                    None => Err(Closed),
                };
            }
            // Once stopping, the stop fd stays readable: only the client counts.
            let stop_fd = if grace_until.is_some() {
                -1
            } else {
                shared.stop.fd()
            };
            match poll2(self.stream.as_raw_fd(), stop_fd, left) {
                Ready::First => return Ok(Wait::Request),
                Ready::Second | Ready::Nothing => {}
            }
        }
    }

    /// Reads until a whole request head is in the buffer.
    /// `Ok(Err(status))`: the request is malformed or too large.
    fn read_head(&mut self) -> Result<Result<http::Request, u16>, Closed> {
        loop {
            match http::parse(&self.buf[..self.len]) {
                Parse::Complete(request) => return Ok(Ok(request)),
                Parse::Error(status) => return Ok(Err(status)),
                Parse::Incomplete if self.len == MAX_HEAD => return Ok(Err(431)),
                Parse::Incomplete => {}
            }
            match read(&mut self.stream, &mut self.buf[self.len..]) {
                Ok(0) | Err(_) => return Err(Closed),
                Ok(n) => self.len += n,
            }
        }
    }

    /// Drops the head and the body of the request just parsed from the
    /// buffer, reading and discarding the part of the body not yet received.
    /// What follows (a pipelined request) stays in the buffer.
    fn consume(&mut self, head_len: usize, content_length: u64) -> Result<(), Closed> {
        let buffered_body = ((self.len - head_len) as u64).min(content_length) as usize;
        let used = head_len + buffered_body;
        self.buf.copy_within(used..self.len, 0);
        self.len -= used;
        let mut left = content_length - buffered_body as u64;
        while left > 0 {
            let chunk = left.min(self.buf.len() as u64) as usize;
            match read(&mut self.stream, &mut self.buf[..chunk]) {
                Ok(0) | Err(_) => return Err(Closed),
                Ok(n) => left -= n as u64,
            }
        }
        Ok(())
    }

    fn respond(
        &mut self,
        status: u16,
        body: &[u8],
        pid: &str,
        framing: Framing,
    ) -> Result<(), Closed> {
        self.out.clear();
        http::response(&mut self.out, status, body, pid, framing);
        self.stream.write_all(&self.out).map_err(|_| Closed)
    }

    /// Closes after a final response without risking a reset: half-close,
    /// then read (and drop) whatever the client still sends, for a short while.
    fn linger(mut self) {
        if self.stream.shutdown(Shutdown::Write).is_err() {
            return;
        }
        let deadline = Instant::now() + LINGER;
        let mut budget = 256 * 1024;
        while budget > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stream.set_read_timeout(Some(left)).is_err() {
                return;
            }
            match read(&mut self.stream, &mut self.buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => budget -= n.min(budget),
            }
        }
    }
}

/// Runs a route; `/crash` and `/hang` do not return.
fn handle(route: &Route) -> (u16, String) {
    match route {
        Route::Root => (200, format!("hello from pid {}\n", std::process::id())),
        Route::Sleep(ms) => {
            std::thread::sleep(Duration::from_millis(*ms));
            (200, format!("slept {ms} ms\n"))
        }
        Route::Cpu(ms) => {
            let end = Instant::now() + Duration::from_millis(*ms);
            let mut spins: u64 = 0;
            while Instant::now() < end {
                for _ in 0..1000 {
                    spins = std::hint::black_box(spins.wrapping_add(1));
                }
            }
            (200, format!("burned {ms} ms of cpu\n"))
        }
        // Simulates a worker dying mid-request: no response, no cleanup.
        Route::Crash => std::process::exit(1),
        // Simulates a wedged worker: the request never ends, stops are
        // ignored, and heartbeats stop (the heartbeat thread needs the lock
        // this holds forever), so drover's heartbeat timeout catches it.
        Route::Hang => {
            let _wedged = crate::WEDGE.lock();
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Route::NotFound => (404, "not found\n".to_owned()),
        Route::BadQuery(why) => (400, format!("bad query: {why}\n")),
    }
}

fn read(stream: &mut Stream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub enum Ready {
    First,
    Second,
    Nothing,
}

/// Waits until `first` or `second` is readable (or `timeout` passes; `None`:
/// forever). `first` wins when both are (including hang-up and errors, which
/// the next read reports).
pub fn poll2(first: RawFd, second: RawFd, timeout: impl Into<Option<Duration>>) -> Ready {
    let ms = match timeout.into() {
        None => -1,
        Some(t) => t.as_millis().clamp(1, i32::MAX as u128) as libc::c_int,
    };
    let mut fds = [
        libc::pollfd {
            fd: first,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: second,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: poll on a local array of two pollfds.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    if n <= 0 {
        return Ready::Nothing; // timeout or EINTR: the caller loops
    }
    if fds[0].revents != 0 {
        Ready::First
    } else if fds[1].revents != 0 {
        Ready::Second
    } else {
        Ready::Nothing
    }
}

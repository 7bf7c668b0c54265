//! The admin endpoint (`admin_bind`): plain HTTP/1.1 served by the master's
//! own loop, never blocking it. `/livez`, `/readyz`, `/metrics`.
//!
//! The loop waits on [`Admin::poll_fds`], calls [`Admin::on_ready`] after
//! each wait (with a read-only view of itself) and includes
//! [`Admin::next_deadline`] in its timeout. Bounds: at most
//! [`MAX_CONNECTIONS`] at once (more wait in the kernel's queue), requests of
//! at most [`MAX_REQUEST`] bytes, and [`EXCHANGE_TIME`] for a whole exchange;
//! one request per connection. Idle, it has no deadline: it adds no wake-up.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};

use crate::readiness::NotReady;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// The most bytes of a request (line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
/// The most time from accept to the last byte of the answer.
pub const EXCHANGE_TIME: Duration = Duration::from_secs(5);

/// What the admin endpoint asks of the master, only when a request needs it.
pub trait Observe {
    /// The readiness decision (see `crate::readiness`).
    fn readiness(&self) -> Result<(), NotReady>;
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
}

/// Where the admin endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            AdminAddr::Tcp(a) => write!(f, "{a}"),
            AdminAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
}

struct Conn {
    stream: Stream,
    /// The request read so far.
    request: Vec<u8>,
    /// The answer, once decided; `sent` bytes of it are written.
    answer: Option<Vec<u8>>,
    sent: usize,
    deadline: Instant,
}

/// The admin endpoint.
pub struct Admin {
    listener: Listener,
    conns: Vec<Conn>,
    /// Whether new connections are taken. Not in the new master of an
    /// upgrade until it is ready: the old master answers on the same socket
    /// meanwhile (a probe then hears that it serves, not that this one boots).
    accepting: bool,
    /// The socket file is the new master's now: not removed at drop.
    keep_file: bool,
}

impl Admin {
    /// Binds `addr` (a stale Unix socket file is replaced, a live one
    /// refused; the file gets mode 0660).
    pub fn bind(addr: &AdminAddr) -> io::Result<Admin> {
        let listener = match addr {
            AdminAddr::Tcp(a) => {
                let l = TcpListener::bind(a)?;
                l.set_nonblocking(true)?;
                Listener::Tcp(l)
            }
            AdminAddr::Unix(path) => {
                crate::listen::remove_stale(path).map_err(io::Error::other)?;
                let l = UnixListener::bind(path).map_err(|e| crate::hint::at_path(path, e))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                l.set_nonblocking(true)?;
                Listener::Unix(l, path.clone())
            }
        };
        Ok(Admin {
            listener,
            conns: Vec::new(),
            accepting: true,
            keep_file: false,
        })
    }

    /// Takes over the admin socket the old master of an upgrade passed on,
    /// if it listens on `addr` (port 0: any port of the same address). It
    /// takes no connection before [`Admin::start_accepting`].
    pub fn adopt(fd: OwnedFd, addr: &AdminAddr) -> Option<Admin> {
        let listener = match addr {
            AdminAddr::Tcp(want) => {
                let l = TcpListener::from(fd);
                let have = l.local_addr().ok()?;
                let port_ok = want.port() == 0 || want.port() == have.port();
                (have.ip() == want.ip() && port_ok).then_some(())?;
                Listener::Tcp(l)
            }
            AdminAddr::Unix(path) => {
                let l = UnixListener::from(fd);
                let have = l.local_addr().ok()?;
                (have.as_pathname()? == path.as_path()).then_some(())?;
                Listener::Unix(l, path.clone())
            }
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true).ok()?,
            Listener::Unix(l, _) => l.set_nonblocking(true).ok()?,
        }
        Some(Admin {
            listener,
            conns: Vec::new(),
            accepting: false,
            // The old master's until we are ready: if we fail, it answers on.
            keep_file: true,
        })
    }

    /// The listening socket, to pass on to the new master of an upgrade.
    pub fn listener_fd(&self) -> BorrowedFd<'_> {
        match &self.listener {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }

    /// The new master of an upgrade is ready: it answers from now on.
    pub fn start_accepting(&mut self) {
        self.accepting = true;
        self.keep_file = false;
    }

    /// Leaves the socket to the new master of an upgrade: no new
    /// connection is taken here (those in progress are answered), and the
    /// socket file stays.
    pub fn hand_over(&mut self) {
        self.accepting = false;
        self.keep_file = true;
    }

    /// The bound TCP address (for an ephemeral port).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// What to wait on: the listener while there is room for a connection
    /// (or one still waiting for its request, whose place a new one takes),
    /// each connection for its next step.
    pub fn poll_fds(&self) -> Vec<PollFd<'_>> {
        let mut fds = Vec::with_capacity(self.conns.len() + 1);
        let room =
            self.conns.len() < MAX_CONNECTIONS || self.conns.iter().any(|c| c.answer.is_none());
        if self.accepting && room {
            fds.push(PollFd::new(self.listener_fd(), PollFlags::POLLIN));
        }
        for c in &self.conns {
            let flags = if c.answer.is_some() {
                PollFlags::POLLOUT
            } else {
                PollFlags::POLLIN
            };
            fds.push(PollFd::new(c.stream.as_fd(), flags));
        }
        fds
    }

    /// The earliest connection deadline; none when no one is connected.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().map(|c| c.deadline).min()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// After a wait (or at a deadline): accepts, reads, answers, writes, and
    /// drops connections that are done or out of time. Never blocks.
    pub fn on_ready(&mut self, now: Instant, master: &dyn Observe) {
        if self.accepting {
            self.accept(now);
        }
        self.conns.retain_mut(|c| {
            if c.answer.is_none() {
                match read_request(c) {
                    Progress::More => {}
                    Progress::Gone => return false,
                    Progress::Complete(answer) => c.answer = Some(answer(master)),
                }
            }
            if let Some(answer) = &c.answer {
                match write_some(&mut c.stream, &answer[c.sent..]) {
                    Ok(n) => c.sent += n,
                    Err(_) => return false,
                }
                if c.sent == answer.len() {
                    return false;
                }
            }
            c.deadline > now
        });
    }

    /// Takes pending connections. When all places are taken, a new one
    /// takes the place of the connection that has waited longest for its
    /// request (accepted before this turn): silent clients must not keep a
    /// probe waiting in the kernel's queue until their deadlines.
    fn accept(&mut self, now: Instant) {
        loop {
            let evict = if self.conns.len() < MAX_CONNECTIONS {
                None
            } else {
                let oldest = self
                    .conns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.answer.is_none() && c.deadline < now + EXCHANGE_TIME)
                    .min_by_key(|(_, c)| c.deadline);
                let Some((i, _)) = oldest else { break };
                Some(i)
            };
            let stream = match &self.listener {
                Listener::Tcp(l) => l
                    .accept()
                    .and_then(|(s, _)| s.set_nonblocking(true).map(|_| Stream::Tcp(s))),
                Listener::Unix(l, _) => l
                    .accept()
                    .and_then(|(s, _)| s.set_nonblocking(true).map(|_| Stream::Unix(s))),
            };
            match stream {
                Ok(stream) => {
                    if let Some(i) = evict {
                        self.conns.swap_remove(i);
                    }
                    self.conns.push(Conn {
                        stream,
                        request: Vec::new(),
                        answer: None,
                        sent: 0,
                        deadline: now + EXCHANGE_TIME,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock: nothing more; anything else (ECONNABORTED,
                // EMFILE): try again at the next wake-up.
                Err(_) => break,
            }
        }
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        if let (Listener::Unix(_, path), false) = (&self.listener, self.keep_file) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A request that is whole: what it asks for, to be answered.
type Answerer = Box<dyn FnOnce(&dyn Observe) -> Vec<u8>>;

enum Progress {
    More,
    Gone,
    Complete(Answerer),
}

fn read_request(c: &mut Conn) -> Progress {
    let mut chunk = [0u8; 2048];
    // Past the bound, a little more is read and thrown away, so that the
    // close after the answer does not reset the connection (unread data
    // makes the kernel send RST) before the client reads the 431.
    let mut discard: usize = 64 * 1024;
    loop {
        match c.stream.read(&mut chunk) {
            Ok(0) => return Progress::Gone,
            Ok(n) if c.request.len() > MAX_REQUEST => discard = discard.saturating_sub(n),
            Ok(n) => c.request.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => return Progress::Gone,
        }
        if discard == 0 {
            break;
        }
    }
    if c.request.len() > MAX_REQUEST {
        return Progress::Complete(Box::new(|_| {
            response(431, "text/plain", b"request too large\n", true)
        }));
    }
    let Some(end) = find(&c.request, b"\r\n\r\n").or_else(|| find(&c.request, b"\n\n")) else {
        return Progress::More;
    };
    let head = String::from_utf8_lossy(&c.request[..end]).into_owned();
    Progress::Complete(Box::new(move |m| route(&head, m)))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The answer to one request head.
fn route(head: &str, m: &dyn Observe) -> Vec<u8> {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return response(400, "text/plain", b"bad request\n", true);
    }
    let body = method == "GET";
    if !body && method != "HEAD" {
        return response(405, "text/plain", b"only GET and HEAD\n", true);
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/livez" => response(200, "text/plain", b"ok\n", body),
        "/readyz" => match m.readiness() {
            Ok(()) => response(200, "text/plain", b"ready\n", body),
            Err(why) => response(503, "text/plain", format!("{why}\n").as_bytes(), body),
        },
        "/metrics" => response(
            200,
            crate::metrics::CONTENT_TYPE,
            m.metrics().as_bytes(),
            body,
        ),
        _ => response(
            404,
            "text/plain",
            b"not found: try /livez, /readyz or /metrics\n",
            body,
        ),
    }
}

fn response(status: u16, content_type: &str, body: &[u8], with_body: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body);
    }
    out
}

/// Writes what the socket takes now. Ok(0) when it takes nothing.
fn write_some(s: &mut Stream, buf: &[u8]) -> io::Result<usize> {
    loop {
        match s.write(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
    }
}

/// Parses `admin_bind`: `HOST:PORT`, `[V6]:PORT` or `unix:PATH`.
pub fn parse_addr(s: &str) -> Result<AdminAddr, String> {
    match s.parse::<crate::config::Address>()? {
        crate::config::Address::Tcp(a) => Ok(AdminAddr::Tcp(a)),
        crate::config::Address::Unix(p) => Ok(AdminAddr::Unix(p)),
        crate::config::Address::Fd(_) => Err(format!(
            "{s:?}: the admin endpoint takes HOST:PORT or unix:PATH, not fd://N"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readiness::NotReady;
    use std::cell::Cell;

    struct Fake {
        ready: Result<(), NotReady>,
        scrapes: Cell<u32>,
    }

    impl Observe for Fake {
        fn readiness(&self) -> Result<(), NotReady> {
            self.ready
        }
        fn metrics(&self) -> String {
            self.scrapes.set(self.scrapes.get() + 1);
            "# TYPE x gauge\nx 1\n".into()
        }
    }

    fn fake(ready: Result<(), NotReady>) -> Fake {
        Fake {
            ready,
            scrapes: Cell::new(0),
        }
    }

    /// Serves `admin` until `client` (a thread) is done.
    fn serve<T: Send + 'static>(
        admin: &mut Admin,
        master: &dyn Observe,
        client: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let handle = std::thread::spawn(client);
        let start = Instant::now();
        while !handle.is_finished() {
            assert!(start.elapsed() < Duration::from_secs(10), "client stuck");
            let mut fds = admin.poll_fds();
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10u8));
            drop(fds);
            admin.on_ready(Instant::now(), master);
        }
        handle.join().unwrap()
    }

    fn get(addr: SocketAddr, request: &'static str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn tcp() -> (Admin, SocketAddr) {
        let admin = Admin::bind(&AdminAddr::Tcp("127.0.0.1:0".parse().unwrap())).unwrap();
        let addr = admin.local_addr().unwrap();
        (admin, addr)
    }

    #[test]
    fn livez_readyz_and_metrics() {
        let (mut admin, addr) = tcp();
        let m = fake(Ok(()));
        let out = serve(&mut admin, &m, move || {
            get(addr, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        });
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nok\n"));
        let out = serve(&mut admin, &m, move || {
            get(addr, "GET /readyz HTTP/1.0\r\n\r\n")
        });
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        let out = serve(&mut admin, &m, move || {
            get(addr, "GET /metrics?x=1 HTTP/1.1\r\n\r\n")
        });
        assert!(out.contains("Content-Type: text/plain; version=0.0.4"));
        assert!(out.ends_with("x 1\n"));
        assert_eq!(m.scrapes.get(), 1);
        let out = serve(&mut admin, &m, move || {
            get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n")
        });
        assert!(out.ends_with("Connection: close\r\n\r\n"), "{out}");
        assert_eq!(admin.connections(), 0);
        assert_eq!(admin.next_deadline(), None, "idle: no deadline");
    }

    #[test]
    fn not_ready_is_503_with_the_reason() {
        let (mut admin, addr) = tcp();
        let m = fake(Err(NotReady::Paused));
        let out = serve(&mut admin, &m, move || {
            get(addr, "GET /readyz HTTP/1.1\r\n\r\n")
        });
        assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
        assert!(out.ends_with("\r\n\r\npaused: workers stopped (SIGWINCH)\n"));
    }

    #[test]
    fn bad_requests_get_a_clear_status() {
        let (mut admin, addr) = tcp();
        let m = fake(Ok(()));
        for (req, status) in [
            ("GET /nope HTTP/1.1\r\n\r\n", "404"),
            ("POST /livez HTTP/1.1\r\n\r\n", "405"),
            ("hello\r\n\r\n", "400"),
        ] {
            let out = serve(&mut admin, &m, move || get(addr, req));
            assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
        }
        let out = serve(&mut admin, &m, move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&vec![b'a'; MAX_REQUEST + 10]);
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        });
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        assert_eq!(m.scrapes.get(), 0);
    }

    /// Turns until the endpoint holds as many connections as it may.
    fn fill(admin: &mut Admin, m: &Fake) {
        let start = Instant::now();
        while admin.connections() < MAX_CONNECTIONS {
            assert!(start.elapsed() < Duration::from_secs(5));
            admin.on_ready(Instant::now(), m);
        }
    }

    #[test]
    fn silent_clients_are_dropped_at_their_deadline_and_bounded() {
        let (mut admin, addr) = tcp();
        let m = fake(Ok(()));
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS + 4)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        fill(&mut admin, &m);
        // A later turn: the 4 still queued take the places of the 4 that
        // waited longest; never more than the bound.
        admin.on_ready(Instant::now() + Duration::from_millis(1), &m);
        assert_eq!(
            admin.connections(),
            MAX_CONNECTIONS,
            "no more than the bound"
        );
        // Still waited on: a new connection would take a silent one's place.
        assert_eq!(admin.poll_fds().len(), MAX_CONNECTIONS + 1);
        let deadline = admin.next_deadline().unwrap();
        assert!(deadline <= Instant::now() + EXCHANGE_TIME);
        let late = Instant::now() + EXCHANGE_TIME + Duration::from_millis(10);
        admin.on_ready(late, &m);
        assert_eq!(admin.connections(), 0, "out of time: dropped");
        drop(idle);
    }

    #[test]
    fn a_request_is_answered_while_silent_clients_hold_every_place() {
        let (mut admin, addr) = tcp();
        let m = fake(Ok(()));
        let _idle: Vec<TcpStream> = (0..MAX_CONNECTIONS * 3)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        fill(&mut admin, &m);
        // Before, this waited in the kernel's queue behind the silent ones
        // until their deadlines: 5 s for each 16.
        let t = Instant::now();
        let out = serve(&mut admin, &m, move || {
            get(addr, "GET /livez HTTP/1.1\r\n\r\n")
        });
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(admin.connections() <= MAX_CONNECTIONS);
    }

    #[test]
    fn a_unix_socket_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let mut admin = Admin::bind(&AdminAddr::Unix(path.clone())).unwrap();
        let m = fake(Ok(()));
        let p = path.clone();
        let out = serve(&mut admin, &m, move || {
            let mut s = UnixStream::connect(p).unwrap();
            s.write_all(b"GET /livez HTTP/1.1\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        });
        assert!(out.starts_with("HTTP/1.1 200 OK"));
        drop(admin);
        assert!(!path.exists(), "the socket file is removed");
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            parse_addr("127.0.0.1:9100"),
            Ok(AdminAddr::Tcp("127.0.0.1:9100".parse().unwrap()))
        );
        assert_eq!(
            parse_addr("unix:/run/a.sock"),
            Ok(AdminAddr::Unix("/run/a.sock".into()))
        );
        assert!(parse_addr("fd://3").unwrap_err().contains("not fd://N"));
        assert!(parse_addr("nonsense").is_err());
    }
}

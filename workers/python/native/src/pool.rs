//! The pool: threads sharing one epoll set, connections parked in it between
//! requests, the timers of parked connections, and the stop.
//!
//! One thread at a time waits in `epoll_wait` (poller.rs), for up to BATCH
//! events, and handles them itself, in order: a listener event is one
//! `accept`, a connection event is the next request on it; then it polls
//! again, and the others sleep, unless it is busy for long (a slow app),
//! when another takes over (and serves the events left).
//! The listeners are level-triggered and EPOLLEXCLUSIVE (a new connection
//! wakes one worker process); connections are registered with EPOLLONESHOT,
//! and are in the epoll set only while parked (idle between requests, or
//! lingering before their close). A thread serves a connection's requests
//! one after the other, pipelined ones included, and parks it once nothing
//! is left to read. A busy thread does not poll: a pool whose threads are
//! all busy accepts nothing, and what is queued stays for the other
//! workers. Nothing is handed between threads per request.
//!
//! A whole response made while more events of the same epoll_wait wait to
//! be served is held, and the held ones are sent together once the batch is
//! served (the thread polls again, another took over from a slow app, or,
//! when none can, the timer thread sends them: `flush_held`): a client
//! woken once per burst, not once per response, costs the kernel (on
//! loopback, the sender runs the client's wake-up) about a third less per
//! request under load. A response waits at most as long as the batch's
//! events wait for a thread (HANDOFF, poller.rs); a lone request is
//! answered at once.

// A connection is boxed once and moves, as a pointer, between the threads,
// the parked slots and the stop's queues.
#![allow(clippy::vec_box)]

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use drover_worker::scoreboard::Scoreboard;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::exchange::{self, After, BodyPlan, ConnView, Line};
use crate::poller::Next;
use crate::sock::{self, Gone};
use crate::util::{error_body_size, error_response, log};

/// After a final response on a connection we close, what the client still
/// sends is read and dropped for at most this long (no reset).
pub const LINGER: Duration = Duration::from_secs(1);
/// On a graceful stop, how long a connection taken from the queue may take
/// to send its request.
pub const FIRST_BYTE_GRACE: Duration = Duration::from_secs(1);
/// A Content-Length body up to this size is read before the app is called,
/// without the GIL (unless the client waits for 100 Continue).
pub const SMALL_BODY: u64 = 64 * 1024;

const TAG_LISTENER: u64 = 1 << 63;
/// Events taken by one epoll_wait (served in order before the next one).
const BATCH: usize = 32;
const TAG_STOP: u64 = 1 << 62;

pub const RUNNING: u8 = 0;
pub const STOPPING: u8 = 1;
pub const DRAINED: u8 = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StopKind {
    None,
    Graceful,
    Quick,
    Recycle,
}

pub struct Settings {
    pub threads: usize,
    pub keepalive: Duration,
    pub io_timeout: Duration,
    pub header_timeout: Option<Duration>,
    pub body_timeout: Option<Duration>,
    pub body_min_rate: u64,
    pub max_requests: u64,
    /// The most requests on one connection (0: no limit): the last one's
    /// response says `Connection: close`, and the client's next connection
    /// goes to whichever worker accepts it first.
    pub keepalive_requests: u64,
    pub limits: drover_h1::Limits,
}

pub struct Listener {
    pub fd: RawFd,
    pub name: String,
    pub unix: bool,
    pub base: Py<PyDict>,
}

/// Which peers may set the secure scheme and forwarder headers
/// (proxy.py's Proxy.trusts, computed without Python).
pub struct Trust {
    pub everyone: bool,
    pub nets: Vec<(Vec<u8>, u8)>,
}

impl Trust {
    fn trusts(&self, peer: &Peer) -> bool {
        let Peer::Inet(addr, _) = peer else {
            return true;
        };
        if self.everyone {
            return true;
        }
        let bytes: Vec<u8> = match addr {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.octets().to_vec(),
                None => v6.octets().to_vec(),
            },
        };
        self.nets
            .iter()
            .any(|(net, prefix)| net.len() == bytes.len() && same_prefix(net, &bytes, *prefix))
    }
}

fn same_prefix(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = (prefix / 8) as usize;
    if a[..full] != b[..full] {
        return false;
    }
    let rest = prefix % 8;
    rest == 0 || (a[full] ^ b[full]) >> (8 - rest) == 0
}

/// What Python does for the pool (see drover_wsgi/native.py).
pub struct Hooks {
    pub app: Py<PyAny>,
    /// failed(error, method, uri) -> (status, why): logs, classifies.
    pub failed: Py<PyAny>,
    /// scheme(environ) -> "https" | "http" | None, may raise HTTPError.
    pub scheme: Py<PyAny>,
    /// forwarded(environ, fields, path): the forwarder headers of a trusted peer.
    pub forwarded: Py<PyAny>,
    /// access(environ, status, sent, headers, seconds), when the access log is on.
    pub access: Option<Py<PyAny>>,
    /// head_refused(addr, port, status, reason, seconds, sent): a request head
    /// refused before there is a request (drover_wsgi.server.HeadRefusals).
    pub head_refused: Py<PyAny>,
    /// The environ keys of the secure scheme headers.
    pub secure_keys: Vec<Py<PyString>>,
}

pub enum Peer {
    Inet(std::net::IpAddr, u16),
    Unix(Vec<u8>),
}

/// One client connection and the bytes received but not yet consumed.
pub struct Conn {
    pub fd: RawFd,
    pub listener: usize,
    pub peer: Peer,
    pub trusted: bool,
    pub buf: Vec<u8>,
    pub requests: u64,
    /// Lingering: when to give up; at a stop: until when a first request may come.
    pub deadline: Instant,
    pub lingering: bool,
    registered: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        sock::close(self.fd);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fresh = 0,
    Idle = 1,
    Linger = 2,
}

struct Slot {
    conn: Box<Conn>,
    gen: u32,
    kind: Kind,
}

/// The parked connections, by descriptor, and their deadlines: one queue per
/// kind of timeout, in deadline order (each kind has one timeout). Entries of
/// connections taken meanwhile are skipped by their generation.
struct Parked {
    slots: Vec<Option<Slot>>,
    queues: [VecDeque<(Instant, RawFd, u32)>; 3],
    gen: u32,
}

pub struct Shared {
    pub set: Settings,
    pub hooks: Hooks,
    pub listeners: Vec<Listener>,
    trust: Trust,
    epfd: RawFd,
    stopfd: RawFd,
    ctrl_w: RawFd,
    parked: Mutex<Parked>,
    state: AtomicU8,
    stop_seen: AtomicBool,
    kind: Mutex<StopKind>,
    quick: AtomicBool,
    pub recycling: AtomicBool,
    pub winding_down: AtomicBool,
    counter: AtomicU64,
    pending: Mutex<VecDeque<Box<Conn>>>,
    stop_lingering: Mutex<Vec<Box<Conn>>>,
    draining: AtomicBool,
    drain: Mutex<Drain>,
    first_byte_deadline: Mutex<Instant>,
    /// Whether the listeners are open; accepting threads hold it for reading.
    open: RwLock<bool>,
    pub busy: Vec<AtomicBool>,
    pub done: Vec<AtomicU64>,
    alive: Mutex<usize>,
    alive_cv: Condvar,
    service_time: AtomicU64,
    swept_out: AtomicBool,
    accept_pause: Mutex<AcceptPause>,
    /// Header name (lower case) -> its environ key (HTTP_...), interned.
    pub keys: Mutex<HashMap<Vec<u8>, Py<PyString>>>,
    pub scoreboard: Option<Scoreboard>,
    turns: crate::turn::Turns,
    poller: crate::poller::Poller,
    held: Mutex<Held>,
}

/// A held response: its connection, its bytes, how many of them were sent,
/// and its access log line.
type HeldResponse = (Box<Conn>, Vec<u8>, usize, Option<Line>);

/// Whole responses held until the end of their batch (see the module's
/// note), with the thread that holds them.
#[derive(Default)]
struct Held {
    by: usize,
    /// Each connection, its response, how much of it the timer thread
    /// sent already (`flush_held`), and its access log line.
    responses: Vec<HeldResponse>,
    /// The lines of the responses the timer thread finished (sent, or the
    /// client left), with the bytes sent: written by the next `send_held`,
    /// as the timer thread does not wait for the GIL.
    lines: Vec<(Line, usize)>,
}

struct Drain {
    taken: usize,
    deadline: Instant,
    /// Per listener, how many connections its queue held at the stop, less
    /// those taken since (None: the kernel did not say). A stopping worker
    /// serves what was queued when its stop came, not what comes after: in a
    /// reload the queue fills on, for the new workers, and an old worker
    /// that took from it until its drain deadline (a loaded CI run: 22 s)
    /// abandoned the requests it was in at that deadline (truncated
    /// responses). At a shutdown, behind drover's filter, no limit: nothing
    /// new is queued but handshakes that were under way (stage 1).
    left: Vec<Option<u32>>,
}

/// When accept fails (EMFILE: out of file descriptors), the listeners leave
/// the epoll set for ACCEPT_PAUSE: a level-triggered listener would be ready
/// at every poll, and a thread that slept in place held up the requests of
/// connections already accepted (100 ms each time). The sweeper puts them
/// back. The failures are logged at most once per ACCEPT_LOG_EVERY.
#[derive(Default)]
struct AcceptPause {
    resume: Option<Instant>,
    failures: u64,
    logged: Option<Instant>,
}

const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

const NO_TIME: u64 = u64::MAX;

impl Shared {
    pub fn new(
        set: Settings,
        hooks: Hooks,
        listeners: Vec<Listener>,
        trust: Trust,
        ctrl_w: RawFd,
    ) -> std::io::Result<Shared> {
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stopfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stopfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = set.threads;
        Ok(Shared {
            set,
            hooks,
            listeners,
            trust,
            epfd,
            stopfd,
            ctrl_w,
            parked: Mutex::new(Parked {
                slots: Vec::new(),
                queues: Default::default(),
                gen: 0,
            }),
            state: AtomicU8::new(RUNNING),
            stop_seen: AtomicBool::new(false),
            kind: Mutex::new(StopKind::None),
            quick: AtomicBool::new(false),
            recycling: AtomicBool::new(false),
            winding_down: AtomicBool::new(false),
            counter: AtomicU64::new(0),
            pending: Mutex::new(VecDeque::new()),
            stop_lingering: Mutex::new(Vec::new()),
            draining: AtomicBool::new(false),
            drain: Mutex::new(Drain {
                taken: 0,
                deadline: Instant::now(),
                left: Vec::new(),
            }),
            first_byte_deadline: Mutex::new(Instant::now()),
            open: RwLock::new(true),
            busy: (0..n).map(|_| AtomicBool::new(false)).collect(),
            done: (0..n).map(|_| AtomicU64::new(0)).collect(),
            alive: Mutex::new(0),
            alive_cv: Condvar::new(),
            service_time: AtomicU64::new(NO_TIME),
            swept_out: AtomicBool::new(false),
            accept_pause: Mutex::new(AcceptPause::default()),
            keys: Mutex::new(HashMap::new()),
            scoreboard: Scoreboard::from_env(),
            turns: Default::default(),
            poller: Default::default(),
            held: Default::default(),
        })
    }

    pub fn state(&self) -> u8 {
        self.state.load(Acquire)
    }

    /// The listeners into the epoll set: level-triggered (one thread polls at
    /// a time: poller.rs), and exclusive: a new connection wakes one worker
    /// process, not all.
    fn watch_listeners(&self) {
        for (i, l) in self.listeners.iter().enumerate() {
            self.epoll(
                libc::EPOLL_CTL_ADD,
                l.fd,
                (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
                TAG_LISTENER | i as u64,
            );
        }
    }

    /// Accept failed (not EAGAIN): the listeners out of the epoll set for
    /// ACCEPT_PAUSE (see AcceptPause).
    fn pause_accepting(&self, i: usize, e: &std::io::Error) {
        let now = Instant::now();
        let mut pause = self.accept_pause.lock().unwrap();
        pause.failures += 1;
        if pause.resume.is_none() {
            pause.resume = Some(now + ACCEPT_PAUSE);
            for l in &self.listeners {
                self.epoll(libc::EPOLL_CTL_DEL, l.fd, 0, 0);
            }
        }
        if pause.logged.is_none_or(|t| now >= t + ACCEPT_LOG_EVERY) {
            log(&format!(
                "accept on {}: {} ({} time(s) since the last such line): not accepting for {:.1}s each time",
                self.listeners[i].name,
                e,
                pause.failures,
                ACCEPT_PAUSE.as_secs_f64()
            ));
            pause.failures = 0;
            pause.logged = Some(now);
        }
    }

    /// The sweeper: the listeners back after an accept pause, unless the
    /// stop or a recycle took them (the open lock: not once they are closed,
    /// when their fd numbers may be another socket's). Returns when to look
    /// again, during a pause.
    fn resume_accepting(&self, now: Instant) -> Option<Instant> {
        let mut pause = self.accept_pause.lock().unwrap();
        let resume = pause.resume?;
        if now < resume {
            return Some(resume);
        }
        pause.resume = None;
        let open = self.open.read().unwrap();
        if *open
            && self.state() == RUNNING
            && !self.stop_seen.load(Acquire)
            && !self.recycling.load(Relaxed)
        {
            self.watch_listeners();
        }
        None
    }

    /// Whether a response may keep its connection: the server runs on
    /// (not stopping, not recycling, not winding down).
    pub fn keeps_connections(&self) -> bool {
        self.state() == RUNNING && !self.recycling.load(Relaxed) && !self.winding_down.load(Relaxed)
    }

    fn epoll(&self, op: i32, fd: RawFd, events: u32, data: u64) -> bool {
        let mut ev = libc::epoll_event { events, u64: data };
        unsafe { libc::epoll_ctl(self.epfd, op, fd, &mut ev) == 0 }
    }

    /// Registers the listeners and the stop event, and starts the threads.
    pub fn start(self: &Arc<Self>) {
        for l in &self.listeners {
            unsafe {
                let flags = libc::fcntl(l.fd, libc::F_GETFL);
                libc::fcntl(l.fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
            if !l.unix {
                sock::tune_listener(l.fd);
            }
        }
        self.watch_listeners();
        self.epoll(
            libc::EPOLL_CTL_ADD,
            self.stopfd,
            libc::EPOLLIN as u32,
            TAG_STOP,
        );
        *self.alive.lock().unwrap() = self.set.threads;
        for i in 0..self.set.threads {
            let sh = self.clone();
            std::thread::Builder::new()
                .name(format!("drover-wsgi-{}", i + 1))
                .spawn(move || thread_main(sh, i))
                .expect("a thread for the pool");
        }
        let sh = self.clone();
        std::thread::Builder::new()
            .name("drover-wsgi-timers".into())
            .spawn(move || sweeper(sh))
            .expect("the timer thread");
    }

    /// The service time's moving average (what the drain admits by).
    pub fn note_service_time(&self, took: f64) {
        let old = self.service_time.load(Relaxed);
        let new = if old == NO_TIME {
            took
        } else {
            f64::from_bits(old) + 0.2 * (took - f64::from_bits(old))
        };
        self.service_time.store(new.to_bits(), Relaxed);
    }

    fn usual_service_time(&self) -> f64 {
        let v = self.service_time.load(Relaxed);
        if v == NO_TIME {
            0.0
        } else {
            f64::from_bits(v)
        }
    }

    /// Counts a request; the one that reaches max_requests starts the recycle.
    pub fn count_request(&self) {
        let n = self.counter.fetch_add(1, Relaxed) + 1;
        let max = self.set.max_requests;
        if max > 0 && n >= max && !self.recycling.swap(true, AcqRel) {
            unsafe { libc::write(self.ctrl_w, b"r".as_ptr().cast(), 1) };
        }
    }

    // -- parking ------------------------------------------------------------

    /// Puts a connection in the epoll set until it is readable (or its
    /// deadline). Gives it back when the server is stopping (the caller
    /// decides) or it cannot be registered (closed).
    fn park(&self, mut conn: Box<Conn>, kind: Kind) -> Result<(), Option<Box<Conn>>> {
        let mut p = self.parked.lock().unwrap();
        if self.state() != RUNNING {
            return Err(Some(conn));
        }
        let deadline = match kind {
            Kind::Fresh => Instant::now() + self.set.io_timeout,
            Kind::Idle => Instant::now() + self.set.keepalive,
            Kind::Linger => conn.deadline,
        };
        p.gen = p.gen.wrapping_add(1);
        let gen = p.gen;
        let fd = conn.fd;
        let op = if conn.registered {
            libc::EPOLL_CTL_MOD
        } else {
            libc::EPOLL_CTL_ADD
        };
        let events = (libc::EPOLLIN | libc::EPOLLONESHOT | libc::EPOLLRDHUP) as u32;
        if !self.epoll(op, fd, events, (u64::from(gen) << 32) | fd as u32 as u64) {
            return Err(None); // dropped: closed
        }
        conn.registered = true;
        let idx = fd as usize;
        if p.slots.len() <= idx {
            p.slots.resize_with(idx + 1, || None);
        }
        p.slots[idx] = Some(Slot { conn, gen, kind });
        p.queues[kind as usize].push_back((deadline, fd, gen));
        Ok(())
    }

    fn unpark(&self, fd: RawFd, gen: u32) -> Option<Box<Conn>> {
        let mut p = self.parked.lock().unwrap();
        let slot = p.slots.get_mut(fd as usize)?;
        if slot.as_ref().is_some_and(|s| s.gen == gen) {
            return slot.take().map(|s| s.conn);
        }
        None
    }

    /// The parked connections whose deadline passed, and when the next one is due.
    fn expired(&self, now: Instant) -> (Vec<Box<Conn>>, Option<Instant>) {
        let mut p = self.parked.lock().unwrap();
        let mut out = Vec::new();
        let mut next: Option<Instant> = None;
        let Parked { slots, queues, .. } = &mut *p;
        for q in queues.iter_mut() {
            while let Some(&(deadline, fd, gen)) = q.front() {
                if deadline > now {
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                    break;
                }
                q.pop_front();
                let slot = &mut slots[fd as usize];
                if slot.as_ref().is_some_and(|s| s.gen == gen) {
                    out.push(slot.take().unwrap().conn);
                }
            }
        }
        (out, next)
    }

    /// Half-closes now, then reads and drops what the client still sends
    /// for a short while (LINGER), then closes: a close without a reset.
    pub fn start_linger(&self, mut conn: Box<Conn>) {
        if !sock::shutdown_write(conn.fd) {
            return; // dropped: closed
        }
        conn.lingering = true;
        conn.deadline = Instant::now() + LINGER;
        self.repark_lingering(conn);
    }

    fn repark_lingering(&self, conn: Box<Conn>) {
        if let Err(Some(conn)) = self.park(conn, Kind::Linger) {
            self.stop_lingering.lock().unwrap().push(conn);
        }
    }

    fn linger_read(&self, mut conn: Box<Conn>) {
        for _ in 0..4 {
            conn.buf.clear();
            match sock::recv_nowait(conn.fd, &mut conn.buf) {
                Ok(None) => break,
                Ok(Some(0)) | Err(_) => return, // EOF: closed
                Ok(Some(_)) => {}
            }
        }
        conn.buf = Vec::new();
        self.repark_lingering(conn);
    }

    // -- the stop ------------------------------------------------------------

    /// The stop procedure (called by the main thread): stop accepting new work
    /// (on a graceful stop the threads then take from the listen queue by the
    /// rule of drover_wsgi/server.py), then drain. Returns the number of
    /// parked connections it found, and at a graceful stop the listeners
    /// (name, is_unix) whose queue's length could not be read (taken from by
    /// the older rule: the stop's log line says so).
    pub fn stop(
        &self,
        kind: StopKind,
        first_byte_grace: Duration,
        drain_left: Duration,
    ) -> (usize, Vec<(String, bool)>) {
        let now = Instant::now();
        *self.kind.lock().unwrap() = kind;
        if kind == StopKind::Quick {
            self.quick.store(true, Release);
        }
        *self.first_byte_deadline.lock().unwrap() = now + first_byte_grace;
        let mut unmeasured = Vec::new();
        {
            let mut drain = self.drain.lock().unwrap();
            drain.deadline = now + drain_left;
            // Behind drover's filter (a shutdown) nothing new can come but a
            // handshake that was under way: that one is served too.
            drain.left = self
                .listeners
                .iter()
                .map(|l| {
                    if sock::filtered(l.fd) {
                        return None;
                    }
                    let left = sock::queued(l.fd, l.unix);
                    if left.is_none() && kind == StopKind::Graceful {
                        unmeasured.push((l.name.clone(), l.unix));
                    }
                    left
                })
                .collect();
        }
        let mut taken = Vec::new();
        {
            let mut p = self.parked.lock().unwrap();
            self.state.store(STOPPING, Release);
            for slot in p.slots.iter_mut() {
                if slot.as_ref().is_some_and(|s| s.kind != Kind::Linger) {
                    taken.push(slot.take().unwrap().conn);
                }
            }
            p.queues[Kind::Fresh as usize].clear();
            p.queues[Kind::Idle as usize].clear();
        }
        for l in &self.listeners {
            self.epoll(libc::EPOLL_CTL_DEL, l.fd, 0, 0);
        }
        let found = taken.len();
        let first_byte = now + first_byte_grace;
        for mut conn in taken {
            self.epoll(libc::EPOLL_CTL_DEL, conn.fd, 0, 0);
            conn.registered = false;
            conn.deadline = first_byte;
            if kind == StopKind::Quick {
                self.start_linger(conn);
            } else {
                // A request is here (serve it, then close), or may be on its
                // way: a client of a kept-alive connection may send its next
                // one as the stop comes (wrk does, at every reload).
                self.pending.lock().unwrap().push_back(conn);
            }
        }
        if kind == StopKind::Graceful {
            self.draining.store(true, Release);
        } else {
            let _lock = self.drain.lock().unwrap();
            self.close_listeners(kind, &format!("{} stop", kind_name(kind)), 0);
        }
        self.stop_seen.store(true, Release);
        self.poller.close();
        let one: u64 = 1;
        unsafe { libc::write(self.stopfd, (&one as *const u64).cast(), 8) };
        (found, unmeasured)
    }

    /// The stop became quick (a SIGQUIT after the SIGTERM): no more from the
    /// queue, no new request on an old connection; the new drain deadline.
    pub fn escalate(&self, drain_left: Duration) {
        self.quick.store(true, Release);
        *self.kind.lock().unwrap() = StopKind::Quick;
        self.drain.lock().unwrap().deadline = Instant::now() + drain_left;
    }

    /// Closes our copies of the listeners (with the drain lock held): what is
    /// still queued is the other workers'. The pool ends once idle.
    fn close_listeners(&self, kind: StopKind, why: &str, taken: usize) {
        self.draining.store(false, Release);
        {
            let mut open = self.open.write().unwrap();
            if *open {
                for l in &self.listeners {
                    sock::close(l.fd);
                }
                *open = false;
            }
        }
        self.state.store(DRAINED, Release);
        if kind == StopKind::Graceful {
            log(&format!(
                "listeners closed ({why}): {taken} queued connection(s) taken"
            ));
        }
    }

    /// During a graceful stop (drain lock held): the next connection from the
    /// listen queues, if a request of the usual duration would end before the
    /// drain deadline and its queue has not given what it held at the stop
    /// (Drain::left); None once the listeners are closed.
    fn take_queued(&self, drain: &mut Drain) -> Option<Box<Conn>> {
        let kind = *self.kind.lock().unwrap();
        if self.quick.load(Acquire) {
            self.close_listeners(kind, "quick stop", drain.taken);
            return None;
        }
        let now = Instant::now();
        let usual = self.usual_service_time();
        let left = drain.deadline.saturating_duration_since(now).as_secs_f64();
        if usual > left {
            let why =
                format!("a request takes {usual:.2}s, {left:.2}s left before the drain deadline");
            self.close_listeners(kind, &why, drain.taken);
            return None;
        }
        let mut spent = false;
        for i in 0..self.listeners.len() {
            if drain.left[i] == Some(0) {
                spent = true;
                continue;
            }
            loop {
                match self.accept(i) {
                    Ok(Some(mut conn)) => {
                        drain.taken += 1;
                        if let Some(left) = drain.left[i].as_mut() {
                            *left -= 1;
                        }
                        conn.deadline = now + FIRST_BYTE_GRACE;
                        return Some(conn);
                    }
                    Ok(None) => break,
                    Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                    Err(e) => {
                        log(&format!("accept on {}: {}", self.listeners[i].name, e));
                        break;
                    }
                }
            }
        }
        // Only a queue found empty is said to be: one whose budget was spent
        // (also a budget of 0, nothing queued at the stop) may hold more.
        let why = if spent {
            "what was queued at the stop is taken"
        } else {
            "the queue is empty"
        };
        self.close_listeners(kind, why, drain.taken);
        None
    }

    /// One connection from listener `i`: None when the queue is empty (or
    /// the listeners are closed).
    fn accept(&self, i: usize) -> std::io::Result<Option<Box<Conn>>> {
        let open = self.open.read().unwrap();
        if !*open {
            return Ok(None);
        }
        let l = &self.listeners[i];
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let fd = unsafe {
            libc::accept4(
                l.fd,
                (&mut addr as *mut libc::sockaddr_storage).cast(),
                &mut len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        drop(open);
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        let peer = peer_of(&addr, len);
        let trusted = self.trust.trusts(&peer);
        Ok(Some(Box::new(Conn {
            fd,
            listener: i,
            peer,
            trusted,
            buf: Vec::new(),
            requests: 0,
            deadline: Instant::now(),
            lingering: false,
            registered: false,
        })))
    }

    /// Waits (GIL released by the caller) until every thread ended or
    /// `timeout`; returns how many still run.
    pub fn join(&self, timeout: Duration) -> usize {
        let alive = self.alive.lock().unwrap();
        let (alive, _) = self
            .alive_cv
            .wait_timeout_while(alive, timeout, |n| *n > 0)
            .unwrap();
        *alive
    }

    /// Finishes the lingering closes (main thread, after the pool stopped),
    /// within `budget`.
    pub fn linger_leftovers(&self, budget: Duration) {
        let mut conns: Vec<Box<Conn>> = std::mem::take(&mut *self.stop_lingering.lock().unwrap());
        {
            let mut p = self.parked.lock().unwrap();
            for slot in p.slots.iter_mut() {
                if slot.is_some() {
                    conns.push(slot.take().unwrap().conn);
                }
            }
            for q in p.queues.iter_mut() {
                q.clear();
            }
        }
        self.swept_out.store(true, Release);
        let deadline = Instant::now() + LINGER.min(budget);
        while !conns.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut fds: Vec<libc::pollfd> = conns
                .iter()
                .map(|c| libc::pollfd {
                    fd: c.fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let n = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    left.as_millis().max(1) as i32,
                )
            };
            if n < 0 {
                break;
            }
            let mut keep = Vec::new();
            for (conn, p) in conns.into_iter().zip(fds) {
                let mut conn = conn;
                if p.revents != 0 {
                    conn.buf.clear();
                    match sock::recv_nowait(conn.fd, &mut conn.buf) {
                        Ok(Some(0)) | Err(_) => continue, // EOF: closed
                        _ => {}
                    }
                }
                keep.push(conn);
            }
            conns = keep;
        }
    }
}

fn kind_name(kind: StopKind) -> &'static str {
    match kind {
        StopKind::Graceful => "graceful",
        StopKind::Quick => "quick",
        StopKind::Recycle => "recycle",
        StopKind::None => "no",
    }
}

fn peer_of(addr: &libc::sockaddr_storage, len: libc::socklen_t) -> Peer {
    match addr.ss_family as i32 {
        libc::AF_INET => {
            let a: &libc::sockaddr_in = unsafe { &*(addr as *const libc::sockaddr_storage).cast() };
            Peer::Inet(
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            )
        }
        libc::AF_INET6 => {
            let a: &libc::sockaddr_in6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast() };
            Peer::Inet(
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            )
        }
        _ => {
            let a: &libc::sockaddr_un = unsafe { &*(addr as *const libc::sockaddr_storage).cast() };
            let n = (len as usize)
                .saturating_sub(std::mem::size_of::<libc::sa_family_t>())
                .min(a.sun_path.len());
            let path: Vec<u8> = a.sun_path[..n]
                .iter()
                .map(|&c| c as u8)
                .take_while(|&c| c != 0)
                .collect();
            Peer::Unix(path)
        }
    }
}

// -- the threads ---------------------------------------------------------------

thread_local! {
    /// A pool thread's signal mask before `block_signals`.
    static MASK_BEFORE: std::cell::Cell<Option<libc::sigset_t>> =
        const { std::cell::Cell::new(None) };
}

/// The pool's threads leave signals to Python's main thread (its handlers run
/// there, and a signal taken by another thread would not wake it).
fn block_signals() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL] {
            libc::sigdelset(&mut set, sig);
        }
        let mut before: libc::sigset_t = std::mem::zeroed();
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut before) == 0 {
            MASK_BEFORE.with(|m| m.set(Some(before)));
        }
    }
}

/// In the child of an app's fork from a pool thread (multiprocessing's fork
/// start method, `os.fork()`): the mask the thread had before the pool
/// blocked every signal. Inherited, it made the child deaf to `SIGTERM`
/// (`Process.terminate()`), `SIGINT` and `SIGALRM`. The stop signals stay
/// held until the SDK's fork hook has given the child its own handlers back
/// (it unblocks them). Runs in a fork handler: a thread-local read and a
/// system call.
pub fn unblock_signals_in_child() {
    if let Some(mut mask) = MASK_BEFORE.with(|m| m.get()) {
        unsafe {
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT] {
                libc::sigaddset(&mut mask, sig);
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
        }
    }
}

fn thread_main(sh: Arc<Shared>, index: usize) {
    block_signals();
    // Attached for the thread's life (its Python thread state is made once),
    // detached except while it runs Python.
    Python::attach(|py| py.detach(|| run(&sh, index)));
    let mut alive = sh.alive.lock().unwrap();
    *alive -= 1;
    sh.alive_cv.notify_all();
}

fn run(sh: &Arc<Shared>, index: usize) {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
    let tid = unsafe { libc::gettid() };
    while !sh.stop_seen.load(Acquire) {
        let data = match sh.poller.next(index, tid) {
            Next::Stop => break,
            Next::Event(data) => {
                send_held(sh, Some(index)); // the holder's, if we took over
                data
            }
            Next::Poll => {
                send_held(sh, None); // the batch is served
                let n = unsafe { libc::epoll_wait(sh.epfd, evs.as_mut_ptr(), BATCH as i32, -1) };
                if n <= 0 {
                    continue;
                }
                let taken = &evs[..n as usize];
                sh.poller.took(index, taken[1..].iter().map(|e| e.u64));
                taken[0].u64
            }
        };
        if data == TAG_STOP {
            sh.poller.idle(index);
            continue;
        }
        sh.busy[index].store(true, Relaxed);
        if data & TAG_LISTENER != 0 {
            accept_and_serve(sh, (data & 0xffff) as usize);
        } else if let Some(conn) = sh.unpark(data as u32 as RawFd, (data >> 32) as u32) {
            if conn.lingering {
                sh.linger_read(conn);
            } else {
                serve_from(sh, conn, false, Some(index));
            }
        }
        sh.busy[index].store(false, Relaxed);
        sh.done[index].fetch_add(1, Relaxed);
        sh.poller.idle(index);
    }
    send_held(sh, None);
    // Stopping: serve what the stop left to serve, take from the queue.
    loop {
        let next = sh.pending.lock().unwrap().pop_front();
        let conn = match next {
            Some(conn) => Some(conn),
            None if sh.state() == DRAINED => return,
            None if sh.draining.load(Acquire) => {
                let mut drain = sh.drain.lock().unwrap();
                if sh.draining.load(Acquire) {
                    sh.take_queued(&mut drain)
                } else {
                    None
                }
            }
            None => {
                std::thread::sleep(Duration::from_millis(5));
                None
            }
        };
        if let Some(conn) = conn {
            sh.busy[index].store(true, Relaxed);
            serve(sh, conn);
            sh.busy[index].store(false, Relaxed);
            sh.done[index].fetch_add(1, Relaxed);
        }
    }
}

fn accept_and_serve(sh: &Arc<Shared>, i: usize) {
    if sh.recycling.load(Relaxed) || sh.stop_seen.load(Acquire) {
        // Recycling: queued connections are for the other workers (and a
        // level-triggered listener would be reported again and again).
        sh.epoll(libc::EPOLL_CTL_DEL, sh.listeners[i].fd, 0, 0);
        return;
    }
    match sh.accept(i) {
        Ok(Some(conn)) => serve(sh, conn),
        Ok(None) => {}
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
        Err(e) => {
            if sh.state() == RUNNING {
                sh.pause_accepting(i, &e); // EMFILE and friends
            }
        }
    }
}

fn sweeper(sh: Arc<Shared>) {
    block_signals();
    while !sh.swept_out.load(Acquire) {
        let now = Instant::now();
        let (expired, next) = sh.expired(now);
        for conn in expired {
            if !conn.lingering {
                sh.start_linger(conn);
            } // a lingering one is dropped: closed
        }
        let next = match (next, sh.resume_accepting(Instant::now())) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let wait = next.map_or(Duration::from_millis(100), |n| {
            n.saturating_duration_since(Instant::now())
        });
        let wait = wait.clamp(Duration::from_millis(1), Duration::from_millis(100));
        if sh.stop_seen.load(Acquire) {
            // The stop woke the other threads, but a lone one may be stuck
            // in a request past the grace: what it holds goes out now.
            flush_held(&sh);
            std::thread::sleep(wait);
        } else {
            // Hands the right to poll over, or says nobody can take it.
            let holds = !sh.held.lock().unwrap().responses.is_empty();
            if sh.poller.watch(wait, holds) {
                flush_held(&sh);
            }
        }
    }
}

// -- one connection --------------------------------------------------------------

/// Serves requests on `conn` until it is parked, closed or lingering.
fn serve(sh: &Arc<Shared>, conn: Box<Conn>) {
    serve_from(sh, conn, false, None)
}

/// `serve`, for a connection that was `served` a response already (it is
/// parked, or served on if a stop came), by the poller thread `holder`, which
/// may hold a whole response until the end of its batch.
fn serve_from(sh: &Arc<Shared>, mut conn: Box<Conn>, served: bool, holder: Option<usize>) {
    // After a response, a connection with nothing buffered is parked without
    // a read: its next request is queued behind the events already ready
    // (other connections'), so a client that answers fast cannot keep the
    // thread to itself. A pipelined request already read is served at once.
    let mut served = served;
    loop {
        if conn.buf.is_empty() {
            let got = if served {
                Ok(None)
            } else {
                sock::recv_nowait(conn.fd, &mut conn.buf)
            };
            match got {
                Ok(Some(0)) | Err(_) => return, // closed by the client
                Ok(Some(_)) => {
                    if sh.state() != RUNNING && sh.quick.load(Acquire) && conn.requests > 0 {
                        return sh.start_linger(conn); // quick stop: no new request on an old connection
                    }
                }
                Ok(None) => {
                    let kind = if conn.requests > 0 {
                        Kind::Idle
                    } else {
                        Kind::Fresh
                    };
                    match sh.park(conn, kind) {
                        Ok(()) | Err(None) => return,
                        Err(Some(back)) => conn = back,
                    }
                    // Stopping: a request already here is served (then the
                    // connection closes); else see wait_while_stopping.
                    match sock::recv_nowait(conn.fd, &mut conn.buf) {
                        Ok(Some(0)) | Err(_) => return,
                        Ok(Some(_)) if sh.quick.load(Acquire) && conn.requests > 0 => {
                            return sh.start_linger(conn)
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            if !wait_while_stopping(sh, &mut conn) {
                                return sh.start_linger(conn);
                            }
                            if conn.buf.is_empty() {
                                return; // closed by the client
                            }
                        }
                    }
                }
            }
        }
        // The head, within the header timeout from its first byte (counted
        // from the first read that did not bring all of it: a whole head
        // needs no clock).
        let mut until = None;
        // When the first read that did not bring the whole head ended (a
        // refused head's time in the access log; no clock for a whole head).
        let mut began = None;
        let mut more = false;
        // Parsed once: the head borrows conn.buf (which keeps its bytes until
        // the exchange is over), the bytes after it are copied to `rest`.
        let (head, used) = loop {
            if more {
                if began.is_none() {
                    let now = Instant::now();
                    began = Some(now);
                    until = sh.set.header_timeout.map(|t| now + t);
                }
                match sock::recv_blocking(conn.fd, &mut conn.buf, until, sh.set.io_timeout) {
                    Ok(_) => {}
                    Err(Gone::Timeout(_)) => {
                        // A slow client (slowloris): it does not keep a thread.
                        let why = "the request head did not arrive in time";
                        return refuse(sh, conn, 408, why, began);
                    }
                    Err(Gone::Closed(_)) => return,
                }
            }
            match drover_h1::parse_head(&conn.buf, &sh.set.limits) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) => more = true,
                Err(e) => return refuse(sh, conn, e.status, &e.detail, began),
            }
        };
        conn.requests += 1;
        let mut rest = conn.buf[used..].to_vec();
        let plan = match body_plan(sh, &conn, &head, &mut rest) {
            Ok(plan) => plan,
            Err(()) => return, // the client left
        };
        let _board = sh.scoreboard.as_ref().map(|b| b.begin());
        let view = ConnView {
            fd: conn.fd,
            listener: conn.listener,
            peer: &conn.peer,
            trusted: conn.trusted,
            // Counted from 1, so a limit of 0 never matches.
            last: conn.requests == sh.set.keepalive_requests,
        };
        sh.turns.wait();
        let outcome = Python::attach(|py| {
            sh.turns.pass();
            exchange::handle(py, sh, &view, &head, &mut rest, plan)
        });
        drop(head);
        if let Some(me) = holder {
            if rest.is_empty()
                && !outcome.out.is_empty()
                && matches!(outcome.after, After::Continue)
                && sh.poller.holds_ready(me)
            {
                conn.buf.clear();
                let mut held = sh.held.lock().unwrap();
                held.by = me;
                held.responses.push((conn, outcome.out, 0, outcome.line));
                return;
            }
        }
        let (n, sent) = sock::send_all_counted(conn.fd, &outcome.out, sh.set.io_timeout);
        if let Some(line) = outcome.line {
            write_lines(sh, vec![(line, n)]);
        }
        if sent.is_err() {
            return; // the client left
        }
        drop(_board);
        if rest.is_empty() {
            conn.buf.clear();
        } else {
            conn.buf = rest;
        }
        match outcome.after {
            After::Continue => {
                served = true;
                continue;
            }
            After::Close => return,
            After::Linger => return sh.start_linger(conn),
        }
    }
}

/// Sends the held responses, then parks their connections; unless thread
/// `except` holds them (it serves their batch on).
fn send_held(sh: &Arc<Shared>, except: Option<usize>) {
    let (responses, mut lines) = {
        let mut held = sh.held.lock().unwrap();
        if (held.responses.is_empty() && held.lines.is_empty()) || except == Some(held.by) {
            return;
        }
        let held = &mut *held;
        (
            std::mem::take(&mut held.responses),
            std::mem::take(&mut held.lines),
        )
    };
    let mut sent_whole = Vec::with_capacity(responses.len());
    for (conn, out, sent, line) in responses {
        let (n, done) = sock::send_all_counted(conn.fd, &out[sent..], sh.set.io_timeout);
        if let Some(line) = line {
            lines.push((line, sent + n));
        }
        if done.is_ok() {
            sent_whole.push(conn);
        }
    }
    write_lines(sh, lines); // once the batch went out: one turn for the GIL
    for conn in sent_whole {
        serve_from(sh, conn, true, None);
    }
}

/// Writes access log lines, each with the bytes of its response sent.
fn write_lines(sh: &Shared, lines: Vec<(Line, usize)>) {
    if lines.is_empty() {
        return;
    }
    sh.turns.wait();
    Python::attach(|py| {
        sh.turns.pass();
        for (line, n) in lines {
            line.write(py, sh, n);
        }
    });
}

/// The poller is stuck in a slow request and no thread can take over (a
/// pool of one thread, or all busy): its held responses are sent from here,
/// so that a fast response never waits for a slow one. The timer thread does
/// not wait for a client: what a socket does not take at once stays held for
/// the poller (the lock, kept meanwhile, makes the poller find it before it
/// next polls), where it is, counted as sent so far: not copied at each look
/// (8 MB a client did not read cost the timer thread 0.27 s of CPU in 2 s).
/// A stop that came meanwhile gets the connection to serve.
fn flush_held(sh: &Arc<Shared>) {
    let mut held = sh.held.lock().unwrap();
    let mut left = Vec::new();
    for (conn, out, sent, line) in std::mem::take(&mut held.responses) {
        match sock::send_nowait(conn.fd, &out[sent..]) {
            Ok(n) if sent + n == out.len() => {
                if let Some(line) = line {
                    held.lines.push((line, out.len()));
                }
                match sh.park(conn, Kind::Idle) {
                    Ok(()) | Err(None) => {}
                    Err(Some(conn)) => sh.pending.lock().unwrap().push_back(conn),
                }
            }
            Ok(n) => left.push((conn, out, sent + n, line)),
            Err(_) => {
                // The client left: dropped, closed.
                if let Some(line) = line {
                    held.lines.push((line, sent));
                }
            }
        }
    }
    held.responses = left;
}

/// How the request body reaches the app: a small Content-Length body is read
/// here, without the GIL; a large, chunked or 100-continue one is read by
/// wsgi.input as the app reads. Err: the client left.
fn body_plan(
    sh: &Shared,
    conn: &Conn,
    head: &drover_h1::Head<'_>,
    rest: &mut Vec<u8>,
) -> Result<BodyPlan, ()> {
    match head.framing {
        drover_h1::Framing::None | drover_h1::Framing::Length(0) => Ok(BodyPlan::Empty),
        drover_h1::Framing::Length(n) if n <= SMALL_BODY && !head.expect_continue => {
            let until = sh.set.body_timeout.map(|t| Instant::now() + t);
            let mut until = until;
            while (rest.len() as u64) < n {
                let before = rest.len();
                match sock::recv_blocking(conn.fd, rest, until, sh.set.io_timeout) {
                    Ok(_) => {
                        if let (Some(u), rate) = (until.as_mut(), sh.set.body_min_rate) {
                            if rate > 0 {
                                *u += Duration::from_secs_f64(
                                    (rest.len() - before) as f64 / rate as f64,
                                );
                            }
                        }
                    }
                    Err(Gone::Timeout(_)) => return Ok(BodyPlan::TimedOut),
                    Err(Gone::Closed(_)) => return Err(()),
                }
            }
            let body = rest[..n as usize].to_vec();
            rest.drain(..n as usize);
            Ok(BodyPlan::InMemory(body))
        }
        _ => Ok(BodyPlan::Stream),
    }
}

/// During a stop, a connection with nothing to read yet waits until the
/// first-byte deadline (one just accepted is owed an answer; on a kept-alive
/// one the next request may be on its way); false on a quick stop (to be
/// closed) or when nothing came. True with bytes in `conn.buf`, or with none
/// at EOF.
fn wait_while_stopping(sh: &Shared, conn: &mut Conn) -> bool {
    if sh.quick.load(Acquire) {
        return false;
    }
    let first_byte = *sh.first_byte_deadline.lock().unwrap();
    let left = conn
        .deadline
        .max(first_byte)
        .saturating_duration_since(Instant::now());
    if left.is_zero() || !sock::wait(conn.fd, libc::POLLIN, left).unwrap_or(true) {
        return false;
    }
    let _ = sock::recv_nowait(conn.fd, &mut conn.buf);
    true
}

/// Answers a request head the server refuses (a bad head, a slow client),
/// then closes without a reset. Python's HeadRefusals logs it (its access log
/// line, the line that says why), as for the pure-Python core; `began`: when
/// the head's first read ended, if it took more than one.
fn refuse(sh: &Shared, conn: Box<Conn>, status: u16, detail: &str, began: Option<Instant>) {
    let response = error_response(status, detail);
    // The body's bytes once it is sent (the access log's `b`, as nginx logs
    // its error page's size), None if it could not be.
    let sent = sock::send_all(conn.fd, &response, sh.set.io_timeout)
        .is_ok()
        .then(|| error_body_size(&response));
    let seconds = began.map_or(0.0, |b| b.elapsed().as_secs_f64());
    sh.turns.wait();
    Python::attach(|py| {
        sh.turns.pass();
        exchange::head_refused(py, sh, &conn.peer, status, detail, seconds, sent);
    });
    if sent.is_some() {
        sh.start_linger(conn);
    }
}

//! `hello`: drover's reference worker, a small HTTP/1.1 server on the Rust SDK.
//!
//! It is what the default config serves, what the integration tests drive and
//! what the benchmarks measure, so it does everything a well-behaved worker
//! does: takes its listeners from drover (`LISTEN_FDS`), says `READY=1` once it
//! accepts, heartbeats when asked to (`WATCHDOG_USEC`), and on SIGTERM/SIGINT
//! takes what is already queued on its listeners, stops accepting, finishes
//! in-flight requests until the SDK's drain deadline (4/5 of the grace budget;
//! the rest is the cleanup's), runs its cleanup registry and exits 0. Every
//! answer from the stop on says `Connection: close`; a connection idle at the
//! stop (kept alive, or new) gets 1 s more to send its request, which is
//! served, and is then closed without a reset (half-close, then read and
//! drop), so that a client that sends its next request as the stop comes is
//! answered rather than cut off. On
//! SIGQUIT it stops accepting and waits at most about a second (and never past
//! the drain deadline) before cleanup and exit.
//!
//! Routes (any method; HEAD gets headers only):
//!   GET /               200 `hello from pid <pid>`
//!   GET /sleep?ms=N     sleeps N ms, then 200 `slept N ms`
//!   GET /cpu?ms=N       busy-loops N ms, then 200
//!   GET /crash          exits with status 1 at once, without answering
//!   GET /hang           never answers, even when asked to stop, and wedges
//!                       the worker: no more heartbeats (drover's heartbeat
//!                       timeout or its SIGKILL at the end of the grace period
//!                       ends it)
//!   anything else       404; a bad `ms` is a 400
//! Every response has `Content-Length`, `Content-Type: text/plain` and
//! `X-Worker-Pid`. Connections are kept alive per HTTP/1.1 (one thread each).
//!
//! Exit status: 0 after a stop, 1 from `/crash`, 3 when it cannot boot (not
//! started by drover, or unusable sockets).
//!
//! Environment knobs:
//!   HELLO_CLEANUP_FILE  if set, the cleanup appends `cleanup pid=<pid>` to
//!                       this file (the tests use it to see that cleanup ran).
//!   HELLO_CLEANUP_SLEEP_MS  if set, one more cleanup function (registered
//!                       first, so it runs last) sleeps that long: a cleanup
//!                       that outlives its budget, for the tests.
//! and those of the worker contract (LISTEN_*, NOTIFY_SOCKET, WATCHDOG_*,
//! DROVER_GRACEFUL_TIMEOUT, DROVER_QUICK_TIMEOUT), read by the SDK.

mod conn;
mod http;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use drover_worker::{cleanup, Listener, Stop, StopState, Stream};

use conn::{poll2, Ready};

/// On a quick stop, the longest wait for in-flight requests.
const QUICK_DRAIN: Duration = Duration::from_secs(1);
/// At most this many queued connections are taken per listener on a graceful
/// stop (more than any accept queue holds), so that a flood cannot delay it.
const MAX_DRAIN_ACCEPTS: usize = 65_536;
/// Connections accepted per wake-up before looking at the stop fd again.
const ACCEPT_BATCH: usize = 64;
/// Stack for connection threads: they keep their buffers on the heap.
const CONN_STACK: usize = 256 * 1024;

/// Held forever by `/hang`; the heartbeat thread takes it before each
/// `WATCHDOG=1`, so a wedged worker stops sending heartbeats.
pub static WEDGE: Mutex<()> = Mutex::new(());

/// State shared by the acceptors and the connection threads.
pub struct Shared {
    pub stop: Stop,
    /// Our pid as text, for the `X-Worker-Pid` header.
    pub pid: String,
    /// drover's scoreboard record, when drover gave one: requests counted.
    pub scoreboard: Option<drover_worker::Scoreboard>,
    /// Number of open connections, and a signal when it changes.
    open: Mutex<usize>,
    changed: Condvar,
}

/// Log line on stderr, prefixed `hello[<pid>]:`, written in one call.
macro_rules! say {
    ($($arg:tt)*) => {{
        let line = format!("hello[{}]: {}\n", std::process::id(), format_args!($($arg)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

fn main() {
    let stop = Stop::install();
    // drover forwards SIGUSR1 ("reopen your log files") to workers; hello only
    // logs to stderr, so there is nothing to reopen, and the default action
    // (terminate) would be wrong.
    // SAFETY: setting a signal to SIG_IGN.
    unsafe { libc::signal(libc::SIGUSR1, libc::SIG_IGN) };
    // drover's pre-stop delay: serve on, but end keep-alive.
    drover_worker::prestop::watch();

    let listeners = match drover_worker::listeners() {
        Ok(listeners) if listeners.is_empty() => cannot_boot("no listening sockets (LISTEN_FDS=0)"),
        Ok(listeners) => listeners,
        Err(e) => cannot_boot(&e.to_string()),
    };
    for listener in &listeners {
        // Non-blocking: poll, then accept until WouldBlock, since other
        // workers accept from the same socket.
        if let Err(e) = listener.set_nonblocking(true) {
            cannot_boot(&format!("{listener}: {e}"));
        }
    }

    let sleep_ms = std::env::var("HELLO_CLEANUP_SLEEP_MS").ok();
    if let Some(ms) = sleep_ms.and_then(|ms| ms.parse().ok()) {
        cleanup::register("hello-slow-cleanup", move || {
            thread::sleep(Duration::from_millis(ms));
            Ok(())
        });
    }
    let cleanup_file = std::env::var_os("HELLO_CLEANUP_FILE");
    cleanup::register("hello-cleanup", move || {
        if let Some(path) = cleanup_file {
            let mut file = OpenOptions::new().create(true).append(true).open(path)?;
            file.write_all(format!("cleanup pid={}\n", std::process::id()).as_bytes())?;
        }
        let _ = std::io::stderr().write_all(b"hello: cleanup ran\n");
        Ok(())
    });
    cleanup::install_panic_hook();

    let shared = Arc::new(Shared {
        stop: stop.clone(),
        pid: std::process::id().to_string(),
        scoreboard: drover_worker::Scoreboard::from_env(),
        open: Mutex::new(0),
        changed: Condvar::new(),
    });
    let names: Vec<String> = listeners.iter().map(|l| l.to_string()).collect();
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("accept {}", listener.name()))
                .spawn(move || accept_loop(listener, &shared))
                .unwrap_or_else(|e| cannot_boot(&format!("cannot start a thread: {e}")))
        })
        .collect();
    if let Some(interval) = drover_worker::watchdog_interval() {
        start_heartbeat(interval);
    }
    if let Err(e) = drover_worker::ready() {
        say!("cannot send READY=1: {e}");
    }
    say!("ready, serving {}", names.join(", "));

    stop.wait();
    for acceptor in acceptors {
        let _ = acceptor.join();
    }
    // Listeners are closed: the acceptors dropped them.
    let kind = match stop.state() {
        StopState::Quick => "quick",
        _ => "graceful",
    };
    say!(
        "stopping ({kind}), open connections: {}",
        open_connections(&shared)
    );
    let _ = drover_worker::stopping();
    let left = drain(&shared);
    if left > 0 {
        say!("abandoning open connections: {left}");
    }
    cleanup::run();
    say!("stopped");
    std::process::exit(0);
}

/// Exit status 3 tells drover that the worker cannot boot, so that it does
/// not respawn it in a loop.
fn cannot_boot(why: &str) -> ! {
    say!("cannot boot: {why}");
    std::process::exit(3)
}

/// Accepts connections until a stop. On a graceful stop it first takes every
/// connection already queued on the socket (they were promised service), then
/// closes its copy of the listener by dropping it.
fn accept_loop(listener: Listener, shared: &Arc<Shared>) {
    loop {
        match poll2(shared.stop.fd(), listener.as_raw_fd(), None) {
            Ready::First => break,
            Ready::Second => accept_ready(&listener, shared, ACCEPT_BATCH),
            Ready::Nothing => {}
        }
    }
    if shared.stop.state() == StopState::Graceful {
        accept_ready(&listener, shared, MAX_DRAIN_ACCEPTS);
    }
}

/// Accepts until the queue is empty (`WouldBlock`) or `limit` connections,
/// and gives each connection its thread.
fn accept_ready(listener: &Listener, shared: &Arc<Shared>, limit: usize) {
    for _ in 0..limit {
        match listener.accept() {
            Ok(stream) => spawn_connection(stream, shared),
            Err(e) => match e.kind() {
                std::io::ErrorKind::WouldBlock => return,
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted => {}
                _ => {
                    // EMFILE and friends: back off instead of spinning, since
                    // the connection stays queued and poll says readable.
                    say!("accept on {listener}: {e}");
                    thread::sleep(Duration::from_millis(100));
                    return;
                }
            },
        }
    }
}

fn spawn_connection(stream: Stream, shared: &Arc<Shared>) {
    *shared.open.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    let guard = OpenGuard(Arc::clone(shared));
    let spawned = thread::Builder::new()
        .stack_size(CONN_STACK)
        .spawn(move || {
            let guard = guard;
            conn::serve(stream, &guard.0);
        });
    if let Err(e) = spawned {
        // The closure (stream and guard) was dropped: connection closed, count fixed.
        say!("cannot start a connection thread: {e}");
    }
}

/// Counts a connection as open until dropped (also when its thread panics).
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|e| e.into_inner());
        *open -= 1;
        if *open == 0 {
            self.0.changed.notify_all();
        }
    }
}

fn open_connections(shared: &Shared) -> usize {
    *shared.open.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits for the open connections to finish, until the SDK's drain deadline
/// (4/5 of the grace budget, leaving the rest to the cleanup registry, which
/// drover's SIGKILL would otherwise cut short) or, from the moment the stop
/// is (or becomes) quick, at most [`QUICK_DRAIN`]. Returns how many are still
/// open: those are abandoned.
fn drain(shared: &Shared) -> usize {
    let mut quick_deadline: Option<Instant> = None;
    let mut open = shared.open.lock().unwrap_or_else(|e| e.into_inner());
    while *open > 0 {
        if quick_deadline.is_none() && shared.stop.state() == StopState::Quick {
            quick_deadline = Some(Instant::now() + QUICK_DRAIN);
        }
        // Asked each time: an escalation to quick brings it forward.
        let mut deadline = cleanup::drain_deadline();
        if let Some(quick) = quick_deadline {
            deadline = deadline.min(quick);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // Wake up now and then to notice an escalation to quick.
        open = shared
            .changed
            .wait_timeout(open, left.min(Duration::from_millis(100)))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    *open
}

/// Sends `WATCHDOG=1` at half the interval drover expects, for the life of the
/// process (a worker that drains is still alive).
fn start_heartbeat(interval: Duration) {
    let period = (interval / 2).max(Duration::from_millis(10));
    let spawned = thread::Builder::new()
        .name("heartbeat".to_owned())
        .spawn(move || loop {
            drop(WEDGE.lock());
            if let Err(e) = drover_worker::heartbeat() {
                say!("cannot send WATCHDOG=1: {e}");
            }
            thread::sleep(period);
        });
    if let Err(e) = spawned {
        cannot_boot(&format!("cannot start the heartbeat thread: {e}"));
    }
}

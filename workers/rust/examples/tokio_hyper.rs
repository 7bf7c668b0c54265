//! A drover worker on tokio and hyper 1.x, with the SDK's async stop.
//!
//!     cargo build --release -p drover-worker --example tokio_hyper
//!     drover -w 2 -b 127.0.0.1:8000 -- target/release/examples/tokio_hyper
//!
//! It serves on the sockets drover passes (TCP and Unix), sends READY=1 once
//! they are handed to tokio, sends heartbeats when drover expects them,
//! drains on SIGTERM without closing a kept-alive connection under a client
//! (so a reload under keep-alive load loses no request), stops at once on
//! SIGQUIT, runs its cleanup and exits 0. workers/rust/README.md explains
//! each step.
//!
//! Routes (any method): / -> "hello from pid N"; /sleep?ms=N -> sleeps N ms
//! (a timer), then "slept N ms"; /blocking?ms=N -> the same on tokio's
//! blocking pool (spawn_blocking); /panic -> the handler panics (the
//! connection is closed unanswered; the worker serves on); anything else
//! 404. Every response has X-Worker-Pid.
//! Cleanup: with EXAMPLE_CLEANUP_FILE set, appends "cleanup pid=N" to it.
//! EXAMPLE_BOOT_MS=N: a slow start (loading, connecting to a database): N ms
//! before it serves.

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use drover_worker::{cleanup, Listener, Stop, StopState};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a kept-alive connection may stay idle once the stop began: time
/// for a client that is about to reuse it to send its request (answered with
/// `Connection: close`) instead of finding it closed under it.
const IDLE_GRACE: Duration = Duration::from_secs(1);
const MAX_MS: u64 = 3_600_000;

/// What the acceptors and the connections share.
struct Shared {
    stop: Stop,
    pid: String,
    /// drover's scoreboard record, when drover gave one: requests counted
    /// for its /metrics.
    scoreboard: Option<drover_worker::Scoreboard>,
    /// Connections open now (the sender is the count).
    open: watch::Sender<usize>,
    /// Set when the idle connections are to be closed (hyper's graceful
    /// shutdown: an idle connection closes, a busy one after its response).
    close_idle: watch::Sender<bool>,
}

fn main() {
    // Before the runtime starts its threads: listeners() edits the environment.
    let stop = Stop::install();
    // drover's pre-stop delay (SIGWINCH): serve on, but end keep-alive.
    drover_worker::prestop::watch();
    // drover forwards SIGUSR1 ("reopen your log files"); this worker logs to
    // stderr only, and the default action would end it.
    // SAFETY: setting a signal to SIG_IGN.
    unsafe { libc::signal(libc::SIGUSR1, libc::SIG_IGN) };
    let listeners = match drover_worker::listeners() {
        Ok(listeners) if listeners.is_empty() => cannot_boot("no listening sockets (LISTEN_FDS=0)"),
        Ok(listeners) => listeners,
        Err(e) => cannot_boot(&e.to_string()),
    };
    // With ready = "auto" (the default), drover then waits for READY=1
    // however long the start takes.
    let _ = drover_worker::notify("X_DROVER_WILL_NOTIFY=1");
    if let Some(path) = std::env::var_os("EXAMPLE_CLEANUP_FILE") {
        cleanup::register("example-cleanup", move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            // One write: with O_APPEND it lands whole, however many
            // workers append at once (writeln! makes several).
            let line = format!("cleanup pid={}\n", std::process::id());
            file.write_all(line.as_bytes())?;
            Ok(())
        });
    }
    // One thread per worker process: drover runs one process per core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| cannot_boot(&format!("cannot start tokio: {e}")));
    rt.block_on(serve(listeners, stop));
    // Dropping a runtime waits for its spawn_blocking tasks without limit
    // (and drover's SIGKILL would come first, with no cleanup): give them
    // what is left of the drain, and leave the rest to the exit.
    let drain_left = cleanup::drain_deadline().saturating_duration_since(std::time::Instant::now());
    rt.shutdown_timeout(drain_left);
    drover_worker::exit(0); // runs the cleanup registry, then exits
}

/// Exit status 3 tells drover that the worker cannot boot, so that it does
/// not respawn it in a loop.
fn cannot_boot(why: &str) -> ! {
    eprintln!("tokio_hyper[{}]: cannot boot: {why}", std::process::id());
    std::process::exit(3)
}

async fn serve(listeners: Vec<Listener>, stop: Stop) {
    let shared = Arc::new(Shared {
        stop: stop.clone(),
        pid: std::process::id().to_string(),
        scoreboard: drover_worker::Scoreboard::from_env(),
        open: watch::Sender::new(0),
        close_idle: watch::Sender::new(false),
    });
    let boot_ms = std::env::var("EXAMPLE_BOOT_MS")
        .ok()
        .and_then(|v| v.parse().ok());
    tokio::time::sleep(Duration::from_millis(boot_ms.unwrap_or(0))).await;

    let mut acceptors = tokio::task::JoinSet::new();
    for listener in listeners {
        let shared = Arc::clone(&shared);
        // from_std requires non-blocking sockets (which all workers share).
        if let Err(e) = listener.set_nonblocking(true) {
            cannot_boot(&format!("{listener}: {e}"));
        }
        let acceptor = match listener {
            Listener::Tcp(l, _) => tokio::net::TcpListener::from_std(l).map(Acceptor::Tcp),
            Listener::Unix(l, _) => tokio::net::UnixListener::from_std(l).map(Acceptor::Unix),
        };
        let acceptor = acceptor.unwrap_or_else(|e| cannot_boot(&e.to_string()));
        acceptors.spawn(accept_loop(shared, acceptor));
    }
    if let Some(interval) = drover_worker::watchdog_interval() {
        tokio::spawn(heartbeats(interval / 2));
    }
    let _ = drover_worker::notify("READY=1\nSTATUS=serving");

    let state = stop.stopped().await;
    // The acceptors end (dropping this process's copy of each listening
    // socket): the other workers, and drover outside a shutdown, take what
    // is queued. From now on every response says Connection: close.
    while acceptors.join_next().await.is_some() {}
    let _ = drover_worker::stopping();
    if state == StopState::Quick {
        return; // connections still open are dropped with the runtime
    }
    let deadline = Instant::from_std(cleanup::drain_deadline());
    // The grace, then close the idle connections and wait for the busy ones
    // until the drain deadline (or a quick stop, drover's escalation).
    let grace_end = (Instant::now() + IDLE_GRACE).min(deadline);
    let mut open = shared.open.subscribe();
    let quick = stop.reached(StopState::Quick);
    tokio::pin!(quick);
    tokio::select! {
        _ = tokio::time::timeout_at(grace_end, open.wait_for(|&n| n == 0)) => {}
        _ = &mut quick => return,
    }
    shared.close_idle.send_replace(true);
    tokio::select! {
        _ = tokio::time::timeout_at(deadline, open.wait_for(|&n| n == 0)) => {}
        _ = &mut quick => {}
    }
}

/// A listening socket in tokio's hands.
enum Acceptor {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Acceptor {
    /// Accepts one connection and serves it on a task of its own.
    async fn accept(&self, shared: &Arc<Shared>) -> std::io::Result<()> {
        let shared = Arc::clone(shared);
        match self {
            Acceptor::Tcp(l) => drop(tokio::spawn(connection(shared, l.accept().await?.0))),
            Acceptor::Unix(l) => drop(tokio::spawn(connection(shared, l.accept().await?.0))),
        }
        Ok(())
    }
}

/// Accepts until a stop; returning drops the socket.
async fn accept_loop(shared: Arc<Shared>, acceptor: Acceptor) {
    let stopped = shared.stop.stopped();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => return,
            accepted = acceptor.accept(&shared) => if let Err(e) = accepted {
                // Out of fds, say: not a reason to stop serving.
                eprintln!("tokio_hyper[{}]: accept: {e}", shared.pid);
                tokio::time::sleep(Duration::from_millis(10)).await;
            },
        }
    }
}

/// Counts a connection as open until dropped (also when its task panics).
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.send_modify(|n| *n -= 1);
    }
}

async fn connection<S>(shared: Arc<Shared>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    shared.open.send_modify(|n| *n += 1);
    let _open = Open(Arc::clone(&shared));
    let service = {
        let shared = Arc::clone(&shared);
        service_fn(move |req| respond(Arc::clone(&shared), req))
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new()) // hyper's timeouts need it (else a panic)
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut close_idle = shared.close_idle.subscribe();
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = close_idle.wait_for(|&close| close) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

async fn respond(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let ms = || {
        req.uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&ms| ms <= MAX_MS)
    };
    // In progress until dropped, then counted with its latency.
    let _counted = shared.scoreboard.as_ref().map(|board| board.begin());
    let (status, body) = match req.uri().path() {
        "/" => (StatusCode::OK, format!("hello from pid {}\n", shared.pid)),
        "/sleep" | "/blocking" => match ms() {
            None => (
                StatusCode::BAD_REQUEST,
                format!("ms must be a number of milliseconds up to {MAX_MS}\n"),
            ),
            Some(ms) if req.uri().path() == "/sleep" => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                (StatusCode::OK, format!("slept {ms} ms\n"))
            }
            Some(ms) => {
                let _ = tokio::task::spawn_blocking(move || {
                    std::thread::sleep(Duration::from_millis(ms))
                })
                .await;
                (StatusCode::OK, format!("slept {ms} ms\n"))
            }
        },
        "/panic" => panic!("a bug in a handler"),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("text/plain"));
    if let Ok(pid) = HeaderValue::from_str(&shared.pid) {
        headers.insert("x-worker-pid", pid);
    }
    // Stopping (or drover's pre-stop delay): hyper closes the connection
    // after this response, and the client opens its next one elsewhere.
    if shared.stop.is_stopping() || drover_worker::prestop::noticed() {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// WATCHDOG=1 from a timer of the runtime: a handler that blocks the thread
/// also stops the heartbeats, and drover replaces the worker.
async fn heartbeats(every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let _ = drover_worker::heartbeat();
    }
}

//! A drover worker on axum 0.8, the recipe of workers/rust/README.md.
//!
//!     cargo build --release -p drover-worker --example axum
//!     drover -w 2 -b 127.0.0.1:8000 -- target/release/examples/axum
//!
//! axum's `with_graceful_shutdown` alone closes idle kept-alive connections
//! at once, under clients about to send their next request on them: this
//! worker stops accepting at the stop, answers `Connection: close` from then
//! on and gives kept-alive connections a grace of 1 s before axum closes the
//! idle ones, so a reload under keep-alive load loses no request.
//!
//! Routes: / -> "hello from pid N"; /sleep?ms=N -> sleeps N ms, then
//! "slept N ms". Every response has X-Worker-Pid. Cleanup: with
//! EXAMPLE_CLEANUP_FILE set, appends "cleanup pid=N" to it.
//! EXAMPLE_BOOT_MS=N: a slow start of N ms. TCP sockets only.

use std::io::Write;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::Listener;
use axum::Router;
use drover_worker::{cleanup, Stop, StopState, Stopped};

/// How long kept-alive connections get, once the stop began, to send their
/// next request before axum closes the idle ones.
const IDLE_GRACE: Duration = Duration::from_secs(1);
const MAX_MS: u64 = 3_600_000;

/// Accepts until the stop; then never again (the other workers take what is
/// queued), while axum serves on the connections it has.
struct UntilStop {
    inner: tokio::net::TcpListener,
    stopped: Stopped,
}

impl Listener for UntilStop {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                _ = &mut self.stopped => std::future::pending::<()>().await,
                accepted = self.inner.accept() => match accepted {
                    Ok(conn) => return conn,
                    // Out of fds, say: not a reason to stop serving.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn main() {
    // Before the runtime starts its threads: listeners() edits the environment.
    let stop = Stop::install();
    // drover forwards SIGUSR1 ("reopen your log files"); the default action
    // would end the worker.
    // SAFETY: setting a signal to SIG_IGN.
    unsafe { libc::signal(libc::SIGUSR1, libc::SIG_IGN) };
    let listener = match drover_worker::listeners().map(|l| l.into_iter().next()) {
        Ok(Some(drover_worker::Listener::Tcp(l, _))) => l,
        Ok(_) => cannot_boot("no TCP socket from drover"),
        Err(e) => cannot_boot(&e.to_string()),
    };
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| cannot_boot(&format!("cannot start tokio: {e}")));
    rt.block_on(serve(listener, stop));
    // Dropping a runtime waits for spawn_blocking tasks without limit.
    rt.shutdown_timeout(
        cleanup::drain_deadline().saturating_duration_since(std::time::Instant::now()),
    );
    drover_worker::exit(0);
}

fn cannot_boot(why: &str) -> ! {
    eprintln!("axum example[{}]: cannot boot: {why}", std::process::id());
    std::process::exit(3)
}

async fn serve(listener: std::net::TcpListener, stop: Stop) {
    let boot_ms = std::env::var("EXAMPLE_BOOT_MS")
        .ok()
        .and_then(|v| v.parse().ok());
    tokio::time::sleep(Duration::from_millis(boot_ms.unwrap_or(0))).await;
    // from_std requires a non-blocking socket (which all workers share).
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
        .unwrap_or_else(|e| cannot_boot(&e.to_string()));

    let pid = HeaderValue::from(std::process::id());
    let close = {
        let stop = stop.clone();
        axum::middleware::map_response(move |mut res: Response| {
            let stopping = stop.is_stopping();
            let pid = pid.clone();
            async move {
                res.headers_mut().insert("x-worker-pid", pid);
                if stopping {
                    res.headers_mut()
                        .insert("connection", HeaderValue::from_static("close"));
                }
                res
            }
        })
    };
    let app = Router::new()
        .route(
            "/",
            get(|| async { format!("hello from pid {}\n", std::process::id()) }),
        )
        .route("/sleep", get(sleep))
        .layer(close);
    let listener = UntilStop {
        inner: listener,
        stopped: stop.stopped(),
    };
    let shutdown = {
        let stop = stop.clone();
        async move {
            stop.stopped().await;
            let _ = drover_worker::stopping();
            tokio::time::sleep(IDLE_GRACE).await;
        }
    };
    let deadline = async {
        stop.stopped().await;
        tokio::time::sleep_until(cleanup::drain_deadline().into()).await;
    };
    if let Some(interval) = drover_worker::watchdog_interval() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                let _ = drover_worker::heartbeat();
            }
        });
    }
    let _ = drover_worker::notify("READY=1\nSTATUS=serving");
    tokio::select! {
        _ = axum::serve(listener, app).with_graceful_shutdown(shutdown) => {}
        _ = deadline => {}                       // abandon what is still running
        _ = stop.reached(StopState::Quick) => {} // drover's SIGQUIT
    }
}

async fn sleep(req: Request) -> impl IntoResponse {
    let ms = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms <= MAX_MS);
    match ms {
        Some(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (StatusCode::OK, format!("slept {ms} ms\n"))
        }
        None => (
            StatusCode::BAD_REQUEST,
            format!("ms must be a number of milliseconds up to {MAX_MS}\n"),
        ),
    }
}

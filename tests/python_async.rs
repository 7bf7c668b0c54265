//! Real asyncio frameworks as drover workers, from the tests' venv: an
//! aiohttp app with its own signal handlers (chained by the SDK's
//! `install_asyncio()`), and FastAPI under the SDK's uvicorn launcher.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn integration_app(name: &str) -> String {
    repo()
        .join("workers/python/tests/integration")
        .join(name)
        .display()
        .to_string()
}

fn lines(path: &std::path::Path) -> Vec<String> {
    read_file(path).lines().map(str::to_string).collect()
}

/// The bug of issue 13: aiohttp's `run_app` installs its SIGTERM handler
/// with `loop.add_signal_handler`, and `install_asyncio()` replaced it, so
/// the app never got its GracefulExit: drover's SIGKILL ended it at the
/// deadline with no cleanup. Now both handlers run: the in-flight request is
/// answered, aiohttp's on_cleanup and the SDK's registry run, every worker
/// exits 0 well before the deadline.
#[test]
fn aiohttp_stops_gracefully_with_its_own_signal_handlers_chained() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cleanup");
    let mut start = Start::args(&[
        "-w",
        "2",
        "-b",
        "127.0.0.1:0",
        "--set",
        "ready=notify",
        "--set",
        "graceful_timeout=10s",
        "--",
        &python::python(),
        &integration_app("aiohttp_app.py"),
    ]);
    start.env = vec![("APP_CLEANUP_FILE".into(), file.display().to_string())];
    let mut d = start.run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let addr = d.tcp_addr();
    let r = get_ok(addr, "/");
    assert!(r.body.starts_with("hello from pid "), "{}", r.body);
    let slow = get_in_flight(addr, "/sleep?s=1.5");
    let began = Instant::now();
    d.signal(Signal::SIGTERM);
    let resp = slow
        .join()
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!((resp.status, resp.body.as_str()), (200, "slept\n"));
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("(0 killed)"), "{log}");
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "stopped by itself, not at the deadline: {:?}",
        began.elapsed()
    );
    let mut cleanup = lines(&file);
    cleanup.sort();
    let mut expected: Vec<String> = workers
        .iter()
        .flat_map(|w| {
            [
                format!("aiohttp on_cleanup pid={w}"),
                format!("registry pid={w}"),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(cleanup, expected, "{log}");
}

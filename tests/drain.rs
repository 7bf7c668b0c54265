//! Drain without resets: under a steady stream of new connections, a graceful
//! shutdown leaves every attempt either fully answered or refused at connect
//! time — for the Rust reference worker and for the Python WSGI worker.

mod common;

use common::*;

/// Three shutdowns per worker kind: the race this guards against (a handshake
/// completing between a worker's last accept and its close) is narrow.
const ROUNDS: usize = 3;

#[test]
fn rust_worker_graceful_shutdown_under_load_resets_nothing() {
    let command = format!("[\"{}\"]", hello_bin());
    for _ in 0..ROUNDS {
        shutdown_under_load(&command, "/sleep?ms=5", 1000);
    }
}

#[test]
fn python_worker_graceful_shutdown_under_load_resets_nothing() {
    let command = format!(
        "[{:?}, \"--threads\", \"8\", \"example_app:app\"]",
        python::script("drover-wsgi")
    );
    for _ in 0..ROUNDS {
        shutdown_under_load(&command, "/", 300);
    }
}

fn shutdown_under_load(command: &str, path: &str, before: u64) {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = {command}\nworkers = 2\nready = \"notify\"\nchdir = \"{}\"\n",
        python::examples_dir()
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let load = Load::start(addr, 50, path);
    // A steady state first.
    wait_answered(&load, before);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    // Every client makes at least one attempt after the exit.
    wait_for("refusals after exit", LIMIT, || {
        get(addr, "/").is_err().then_some(())
    });
    let o = load.finish();
    eprintln!("outcomes: {o:?}");
    assert!(
        o.refused > 0,
        "connections were refused after the shutdown: {o:?}"
    );
    assert_eq!((o.reset, o.truncated, o.other), (0, 0, 0), "{o:?}");
}

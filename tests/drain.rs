//! Drain without resets: under a steady stream of new connections, a graceful
//! shutdown leaves every attempt either fully answered or refused at connect
//! time.

mod common;

use common::*;

#[test]
fn graceful_shutdown_under_load_resets_nothing() {
    // The race this guards against (a handshake completing between a worker's
    // last accept and its close) is narrow: three shutdowns per run.
    for _ in 0..3 {
        shutdown_under_load();
    }
}

fn shutdown_under_load() {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"{}\"]\nworkers = 2\nready = \"notify\"\n",
        hello_bin()
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let load = Load::start(addr, 50, "/sleep?ms=5");
    // A steady state first: a thousand answered requests.
    wait_answered(&load, 1000);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    // Every client makes at least one attempt after the exit.
    wait_for("refusals after exit", LIMIT, || get(addr, "/").is_err().then_some(()));
    let o = load.finish();
    eprintln!("outcomes: {o:?}");
    assert!(o.ok > 50, "the load was served before the shutdown: {o:?}");
    assert!(o.refused > 0, "connections were refused after the shutdown: {o:?}");
    assert_eq!((o.reset, o.truncated, o.other), (0, 0, 0), "{o:?}");
}

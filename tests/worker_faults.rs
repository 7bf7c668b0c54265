//! Faults of the fault trial "faults2": workers that lie or die, and an
//! environment that fails (descriptors, a master that is not running), as
//! an operator meets them with the release binary.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// `workers` reference workers on an ephemeral loopback port, `extra`
/// appended.
fn hello(workers: u32, extra: &str) -> String {
    format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = {workers}\nready = \"notify\"\n\
         command = [\"{}\"]\n{extra}\n",
        hello_bin()
    )
}

/// At start-up, a worker that cannot even be forked (no descriptor left for
/// its exec report: `ulimit -n` too low) stops drover with status 3 at once.
/// The code before logged the shutdown and then waited for an event that
/// never came (no worker was left to exit): drover hung until a signal.
#[test]
fn out_of_descriptors_before_the_first_fork_drover_exits_3_at_once() {
    // How many descriptors drover needs before its first fork depends on
    // what it opens; try limits until one leaves it short at that step.
    let mut hit = None;
    for limit in 8..=48 {
        let mut d = Start {
            nofile: Some(limit),
            ..Start::config(&hello(2, ""))
        }
        .run();
        let began = Instant::now();
        let status = d.wait_exit(LIMIT);
        let log = d.log();
        if log.contains("cannot prepare to fork") {
            assert_eq!(status.code(), Some(3), "ulimit -n {limit}:\n{log}");
            assert!(
                began.elapsed() < Duration::from_secs(5),
                "ulimit -n {limit}: took {:?}:\n{log}",
                began.elapsed()
            );
            assert!(log.contains("raise it (`ulimit -n`"), "{log}");
            hit = Some(limit);
            break;
        }
        if status.code() == Some(0) || log.contains("all 2 workers ready") {
            break; // enough descriptors from here on
        }
    }
    assert!(
        hit.is_some(),
        "no limit stopped drover at its first fork's preparation"
    );
}

/// drover and its workers frozen together for longer than the heartbeat
/// timeout (a cgroup freezer, `docker pause`, a checkpoint), then thawed in
/// any order: no worker is blamed for the time nobody ran. Here the master
/// runs again 0.3 s before its workers, as a thaw may order them; the code
/// before found every heartbeat overdue at once and aborted both workers
/// (with 40 workers and a notify queue of 10 datagrams, a SIGSTOP of the
/// master alone did the same to 26 of them: their heartbeats waited in
/// blocked senders).
#[test]
fn a_master_frozen_with_its_workers_blames_no_worker_for_it() {
    let mut d = Start::config(&hello(2, "timeout = \"1s\"")).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let workers = d.wait_workers(2);
    let all: Vec<_> = std::iter::once(d.pid()).chain(workers.clone()).collect();
    for p in &all {
        nix::sys::signal::kill(*p, Signal::SIGSTOP).unwrap();
    }
    std::thread::sleep(Duration::from_secs(3));
    nix::sys::signal::kill(d.pid(), Signal::SIGCONT).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for p in &workers {
        nix::sys::signal::kill(*p, Signal::SIGCONT).unwrap();
    }
    d.wait_log("past its deadline (stopped, frozen or starved of CPU)");
    // Two heartbeat periods after the thaw, the same workers serve.
    std::thread::sleep(Duration::from_secs(2));
    let log = d.log();
    assert!(!log.contains("missed its heartbeat"), "{log}");
    assert_eq!(d.children(), workers, "{log}");
    assert_eq!(get_ok(addr, "/").status, 200);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
}

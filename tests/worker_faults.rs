//! Faults of the fault trial "faults2": workers that lie or die, and an
//! environment that fails (descriptors, a master that is not running), as
//! an operator meets them with the release binary.

mod common;

use std::time::{Duration, Instant};

use common::*;

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

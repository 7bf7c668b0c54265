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
/// its exec report: `ulimit -n` too low) stops drover with status 3 at once;
/// a listener that cannot be made for the same reason says which limit to
/// raise, as the fork does (it said only `Too many open files` before).
/// The code before logged the shutdown and then waited for an event that
/// never came (no worker was left to exit): drover hung until a signal.
#[test]
fn out_of_descriptors_before_the_first_fork_drover_exits_3_at_once() {
    // How many descriptors drover needs before its first fork depends on
    // what it opens; try limits until one leaves it short at that step.
    let (mut hit, mut listen_hit) = (None, false);
    for limit in 4..=48 {
        let mut d = Start {
            nofile: Some(limit),
            ..Start::config(&hello(2, ""))
        }
        .run();
        let began = Instant::now();
        let status = d.wait_exit(LIMIT);
        let log = d.log();
        if log.contains("cannot listen on") {
            // Short before even its listener: the same advice.
            assert!(log.contains("Too many open files"), "{log}");
            assert!(log.contains("raise it (`ulimit -n`"), "{log}");
            listen_hit = true;
        }
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
    assert!(listen_hit, "no limit stopped drover at its listener");
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

/// What a stopped worker left in its process group (a helper that ignores
/// SIGTERM) is killed with the group, so it does not outlive drover and is
/// not reported as if it did. The code before scanned for escapees a moment
/// after that SIGKILL, found the helper still in /proc, and warned
/// `1 process(es) started by workers outlive drover (pid N)` about a
/// process that was gone a millisecond later (4 starts in 5 on a 2-core
/// machine).
#[test]
fn a_helper_killed_with_its_workers_group_is_not_reported_as_outliving_drover() {
    let worker = "sh -c 'trap \\\"\\\" TERM; while :; do sleep 1; done' & \
                  trap 'exit 0' TERM; while :; do sleep 0.05; done";
    for _ in 0..4 {
        let mut d = Start::config(&format!(
            "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"spawn\"\n\
             command = [\"sh\", \"-c\", \"{worker}\"]\n"
        ))
        .run();
        d.wait_log("all 1 workers ready");
        let w = d.wait_workers(1)[0];
        // The helper and its sleep run in the worker's group.
        wait_for("the helper", LIMIT, || {
            (group_members(w).len() >= 3).then_some(())
        });
        d.signal(Signal::SIGTERM);
        assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
        let log = d.log();
        assert!(
            log.contains("left processes in its process group: sent them SIGKILL"),
            "{log}"
        );
        assert!(!log.contains("outlive drover"), "{log}");
        wait_for("the worker's group to be gone", LIMIT, || {
            group_members(w).is_empty().then_some(())
        });
    }
}

/// The live processes of process group `pgid`.
fn group_members(pgid: nix::unistd::Pid) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                let after = s.rfind(')').map_or("", |i| &s[i + 2..]);
                let f: Vec<&str> = after.split(' ').collect();
                f.first() != Some(&"Z") && f.get(2) == Some(&pgid.as_raw().to_string().as_str())
            })
        })
        .collect()
}

/// A worker (or anything) that signals drover is named in the log, before
/// what the signal does: a stop nobody asked for is traced to its sender.
/// The code before said only `SIGTERM: graceful shutdown`.
#[test]
fn a_stop_signal_is_traced_to_its_sender() {
    // Worker 1 waits until the test has sent its SIGHUP, then sends drover
    // SIGTERM; the other one serves.
    let mut d = Start::config(
        "bind = [\"127.0.0.1:0\"]\nworkers = 2\nready = \"spawn\"\n\
         command = [\"sh\", \"-c\", \"trap 'exit 0' TERM; \
         while [ $DROVER_WORKER_ID = 1 ] && [ ! -e $DIR/go ]; do sleep 0.05; done; \
         [ $DROVER_WORKER_ID = 1 ] && kill -TERM $PPID; \
         while :; do sleep 0.05; done\"]\n",
    )
    .run();
    d.wait_log("all 2 workers ready");
    d.signal(Signal::SIGHUP);
    let me = std::process::id();
    d.wait_log(&format!("SIGHUP sent by pid {me} ("));
    d.wait_log("reload applied");
    std::fs::write(d.dir.path().join("go"), "").unwrap();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("SIGTERM sent by pid"))
        .unwrap_or_else(|| panic!("no sender named:\n{log}"));
    assert!(line.ends_with("): worker 1"), "{line}");
    assert!(line.contains("(sh -c trap"), "{line}");
    // Named before the shutdown it began.
    let named = log.find("SIGTERM sent by pid").unwrap();
    assert!(
        named < log.find("SIGTERM: graceful shutdown").unwrap(),
        "{log}"
    );
}

/// A stop sent from outside drover's PID namespace (a container runtime or
/// the kubelet stopping a drover that is PID 1 of its container) has no
/// sender pid in drover's namespace: the log says where it came from. The
/// code before said `SIGTERM sent by the kernel (a terminal's key, or a
/// hang-up)` for every such stop.
#[test]
fn a_stop_from_outside_drovers_pid_namespace_is_named_so() {
    if !nix::unistd::getuid().is_root()
        || std::process::Command::new("unshare")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("skipped: needs root and unshare(1)");
        return;
    }
    let mut d = Start {
        program: Some("unshare".into()),
        args: [
            "--pid",
            "--fork",
            "--mount-proc",
            drover_bin(),
            "-b",
            "127.0.0.1:0",
            "-w",
            "1",
        ]
        .into_iter()
        .map(String::from)
        .chain(["--".to_string(), hello_bin().to_string()])
        .collect(),
        ..Start::default()
    }
    .run();
    d.wait_log("all 1 workers ready");
    // drover is the child of unshare, and PID 1 of the new namespace.
    let drover = wait_for("drover under unshare", LIMIT, || {
        children_of(d.pid()).first().copied()
    });
    nix::sys::signal::kill(drover, Signal::SIGTERM).unwrap();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains(
            "SIGTERM sent by a process outside drover's PID namespace \
             (a container runtime: docker stop, the kubelet)"
        ),
        "{log}"
    );
}

/// A worker that stopped itself (SIGSTOP) misses its heartbeat: the log
/// says it is stopped, which explains why the SIGABRT does nothing and the
/// SIGKILL comes `abort_grace` later; its slot is refilled at once and the
/// other worker serves meanwhile. The code before said only that it missed
/// its heartbeat.
#[test]
fn a_worker_that_stopped_itself_is_said_to_be_stopped() {
    let mut d = Start::config(&hello(2, "timeout = \"1s\"\nabort_grace = \"1s\"")).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let workers = d.wait_workers(2);
    nix::sys::signal::kill(workers[0], Signal::SIGSTOP).unwrap();
    let log = d.wait_log(&format!("(pid {}) is stopped (SIGSTOP", workers[0]));
    assert!(log.contains("missed its heartbeat"), "{log}");
    d.wait_log(&format!("(pid {}) killed by SIGKILL", workers[0]));
    assert_eq!(get_ok(addr, "/").status, 200);
    d.wait_workers(2);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
}

/// A slot that failed and has its next worker up is degraded until that
/// worker has served `respawn_reset_after`; meanwhile the status does not
/// promise a "next try": the code before said `next try in 0 ms` (and
/// `respawn_in_ms: 0`) about a slot whose worker was serving.
#[test]
fn a_degraded_slot_whose_next_worker_serves_promises_no_next_try() {
    // Each worker of slot 1 exits 1 at once, the fourth on serves.
    let worker = format!(
        "n=$(cat $DIR/n 2>/dev/null || echo 0); echo $((n+1)) > $DIR/n; \
         [ $n -lt 3 ] && exit 1; exec {}",
        hello_bin()
    );
    let d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\n\
         command = [\"sh\", \"-c\", \"{worker}\"]\ncontrol_socket = \"$DIR/ctl.sock\"\n\
         respawn_delay = \"10ms\"\nrespawn_max_delay = \"40ms\"\ndegraded_after = 3\n\
         respawn_reset_after = \"60s\"\n"
    ))
    .run();
    d.wait_log("slot 1 is degraded: 3 failures in a row");
    d.wait_log("all 1 workers ready");
    let (code, text) = d.ctl(&["status"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("slot 1 is degraded: 3 failures in a row, its next worker is on trial"),
        "{text}"
    );
    let (_, json) = d.ctl(&["--json", "status"]);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let slot = &status["status"]["slots"][0];
    assert_eq!(slot["degraded"], true, "{json}");
    assert!(slot["respawn_in_ms"].is_null(), "{json}");
    assert_eq!(get_ok(d.tcp_addr(), "/").status, 200);
}

/// A slot whose program is gone counts each failed start among its
/// `restarts`, as a crash: an operator watching restarts for a crash loop
/// sees it. The code before counted the crash that began it and none of
/// the failed `execve`s after it (restarts 1 with 5 failures in a row).
#[test]
fn a_start_that_fails_counts_as_a_restart() {
    let bin = tempfile::tempdir().unwrap();
    let program = bin.path().join("worker");
    let install = || {
        std::fs::write(
            &program,
            format!("#!/bin/sh\nexec {} \"$@\"\n", hello_bin()),
        )
        .unwrap();
        std::fs::set_permissions(
            &program,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
    };
    install();
    let d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\n\
         command = [{program:?}]\ncontrol_socket = \"$DIR/ctl.sock\"\n\
         admin_bind = \"unix:$DIR/admin.sock\"\n\
         respawn_delay = \"10ms\"\nrespawn_max_delay = \"40ms\"\n"
    ))
    .run();
    // Ready first: a worker that dies before any was ready is a start-up
    // failure, and drover exits 3 (a CI run killed it 1.8 ms after its spawn).
    d.wait_log("all 1 workers ready");
    let pids = d.wait_workers(1);
    std::fs::remove_file(&program).unwrap();
    nix::sys::signal::kill(pids[0], Signal::SIGKILL).unwrap();
    d.wait_log_count("worker 1 cannot be spawned", 4);
    let (_, json) = d.ctl(&["--json", "status"]);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let slot = &status["status"]["slots"][0];
    let (restarts, failures) = (
        slot["restarts"].as_u64(),
        slot["failures_in_a_row"].as_u64(),
    );
    // The crash and every failed start since: one restart per failure.
    assert!(restarts >= Some(5), "{json}");
    assert_eq!(restarts, failures, "{json}");
    // Back in place: the slot serves again, the count stays.
    install();
    wait_for("the slot to serve again", LIMIT, || {
        (d.admin("/readyz").status == 200).then_some(())
    });
}

/// A worker that floods the notify socket (`WATCHDOG=1` in a loop) cannot
/// take the master's time: the flood is logged, the master's CPU stays
/// bounded, a signal is acted on, another worker's `READY=1` is seen, and
/// a worker's `STOPPING=1` before its exit is heard (a planned exit, not a
/// crash). The code before read the socket until it was empty, at the
/// flood's pace (half a core at 137k datagrams a second), and said nothing.
#[test]
fn a_worker_that_floods_the_notify_socket_costs_the_master_little() {
    let worker = "import os, socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
        p = os.environ['NOTIFY_SOCKET']\n\
        s.sendto(b'READY=1', p)\n\
        if os.environ['DROVER_WORKER_ID'] == '1':\n    \
            while True:\n        s.sendto(b'WATCHDOG=1', p)\n\
        while True:\n    \
            time.sleep(0.05)\n    \
            if os.environ['DROVER_WORKER_ID'] == '2' and os.path.exists(sys.argv[1]):\n        \
                os.remove(sys.argv[1])\n        \
                s.sendto(b'STOPPING=1', p)\n        \
                sys.exit(0)\n";
    let mut d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 2\nready = \"notify\"\n\
         command = [\"python3\", \"-c\", {}, \"$DIR/leave\"]\n",
        toml_string(worker)
    ))
    .run();
    d.wait_log("all 2 workers ready");
    d.wait_log("the notify socket is flooded");
    // The master's CPU over a second of the flood (utime + stime).
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", d.pid())).unwrap();
        let f: Vec<u64> = stat[stat.rfind(')').unwrap() + 2..]
            .split(' ')
            .skip(11)
            .take(2)
            .map(|n| n.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as f64;
    let (before, began) = (ticks(), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let share = (ticks() - before) as f64 / hz / began.elapsed().as_secs_f64();
    assert!(
        share < 0.4,
        "the master used {share:.2} of a core: {}",
        d.log()
    );
    d.signal(Signal::SIGTTIN);
    d.wait_log("SIGTTIN: 2 -> 3 workers");
    d.wait_log("worker 3 (pid");
    wait_for("worker 3's READY=1", LIMIT, || {
        d.log()
            .lines()
            .any(|l| l.contains("worker 3 (pid") && l.contains(") ready in"))
            .then_some(())
    });
    std::fs::write(d.dir.path().join("leave"), "").unwrap();
    d.wait_log("as it announced (STOPPING=1); respawning now");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

/// A worker drover asked to stop that dies of something else (the OOM
/// killer's SIGKILL, a segfault as it drains) is logged as a warning and
/// counted by its cause; one that dies of the signal drover sent it is
/// logged at info level and is a clean exit. The code before logged every
/// end of a stop at info level and counted both deaths as `clean`.
#[test]
fn a_death_during_a_stop_that_drover_did_not_cause_is_a_warning() {
    // Slots 2 and 3 ignore SIGTERM, so that they are still stopping when
    // the test kills them.
    let worker = "import os, signal, socket, time\n\
        if os.environ['DROVER_WORKER_ID'] != '1':\n    \
            signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n\
        while True:\n    time.sleep(1)\n";
    let mut d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 3\nready = \"notify\"\n\
         command = [\"python3\", \"-c\", {}]\nadmin_bind = \"unix:$DIR/admin.sock\"\n",
        toml_string(worker)
    ))
    .run();
    d.wait_log("all 3 workers ready");
    let line = |d: &Drover, needle: &str| -> String {
        d.wait_log(needle);
        d.log()
            .lines()
            .find(|l| l.contains(needle))
            .unwrap()
            .to_string()
    };
    // The pid of the worker of `slot` (one each: none is replaced here).
    let pid_of = |d: &Drover, slot: u32| -> nix::unistd::Pid {
        pid_after(&line(d, &format!("worker {slot} (pid ")), "(pid ")
    };
    for (slot, signal, how) in [
        (3, Signal::SIGKILL, "killed by SIGKILL (not sent by drover"),
        (2, Signal::SIGSEGV, "killed by SIGSEGV"),
    ] {
        let pid = pid_of(&d, slot);
        d.signal(Signal::SIGTTOU);
        line(
            &d,
            &format!("worker {slot} (pid {pid}) retired: sending SIGTERM"),
        );
        nix::sys::signal::kill(pid, signal).unwrap();
        let exit = line(&d, &format!("worker {slot} (pid {pid}) {how}"));
        assert!(exit.contains(" WARN "), "{exit}");
    }
    let metrics = d.admin("/metrics").body;
    assert!(
        metrics.contains("drover_worker_exits_total{cause=\"signal\"} 2\n")
            && metrics.contains("drover_worker_exits_total{cause=\"clean\"} 0\n"),
        "{metrics}"
    );
    // Slot 1 dies of the SIGTERM of the shutdown: as asked.
    let first = pid_of(&d, 1);
    d.signal(Signal::SIGTERM);
    let exit = line(&d, &format!("worker 1 (pid {first}) killed by SIGTERM"));
    assert!(exit.contains(" INFO "), "{exit}");
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

/// A master stalled (here SIGSTOPped) while a worker boots, its notify
/// queue full (heartbeats and statuses of other workers fill its 10
/// datagrams): the worker's READY=1 waits until the master reads again, and
/// the worker counts as ready then. The SDK before gave READY=1 up after
/// 1 s (`cannot send READY=1: the notify socket's queue stayed full`): the
/// worker served, but drover, resumed, killed it at boot_timeout.
#[test]
fn a_ready_1_sent_while_the_master_is_stalled_is_taken_when_it_runs_again() {
    // The worker sends READY=1 1.5 s after its start: the master is
    // stopped by then.
    let mut d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\nboot_timeout = \"8s\"\n\
         command = [\"sh\", \"-c\", \"sleep 1.5; exec {}\"]\n",
        hello_bin()
    ))
    .run();
    let w = d.wait_workers(1)[0];
    let notify = notify_socket_of(w);
    nix::sys::signal::kill(d.pid(), Signal::SIGSTOP).unwrap();
    let stalled = Resume(d.pid());
    fill_notify_queue(&notify);
    // The stall: longer than the 1 s the SDK gave READY=1 before.
    std::thread::sleep(Duration::from_secs(4));
    drop(stalled);
    let log = wait_for("the worker's ready or its boot timeout", LIMIT, || {
        let log = d.log();
        (log.contains(&format!("worker 1 (pid {w}) ready in"))
            || log.contains("within boot_timeout"))
        .then_some(log)
    });
    assert!(!log.contains("cannot send READY=1"), "{log}");
    assert!(!log.contains("within boot_timeout"), "{log}");
    assert_eq!(get_ok(d.tcp_addr(), "/").status, 200);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

/// `workers` workers running the Python `script` (system python3, raw
/// notify protocol), on an ephemeral loopback port.
fn python_workers(workers: u32, script: &str) -> String {
    format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = {workers}\nready = \"notify\"\n\
         graceful_timeout = \"2s\"\ncommand = [\"/usr/bin/python3\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    )
}

const SEND_READY: &str = "import os, socket, time\n\
    def ready():\n    \
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n    \
        s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n";

/// A worker that reports ready without the sockets drover passed it (it
/// closed or replaced fd 3) is named: its slot counts as serving, yet it
/// accepts nothing. A worker whose child holds the sockets (a shell, a
/// server's own processes) is not. The code before said nothing: `ctl
/// status` showed 2/2 ready while every connection waited in the queue.
/// Nor is one whose STOPPING=1 was read with its READY=1 (worker 3: a
/// --max-requests recycle done before drover read its READY=1 has rightly
/// closed its sockets; it was named too).
#[test]
fn a_worker_ready_without_its_sockets_is_named() {
    let script = format!(
        "{SEND_READY}\
         if os.environ['DROVER_WORKER_ID'] == '1':\n    \
             os.close(3)\n    ready()\n    time.sleep(60)\n\
         if os.environ['DROVER_WORKER_ID'] == '3':\n    \
             os.close(3)\n    \
             s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n    \
             s.sendto(b'READY=1\\nSTOPPING=1', os.environ['NOTIFY_SOCKET'])\n    \
             time.sleep(60)\n\
         if os.fork() == 0:\n    \
             time.sleep(0.3)\n    ready()\n    time.sleep(60)\n\
         os.close(3)\n\
         os.wait()\n"
    );
    let mut d = Start::config(&python_workers(3, &script)).run();
    d.wait_log("all 3 workers ready");
    d.wait_log("reported ready, but neither it nor a process it started holds");
    d.signal(Signal::SIGTERM);
    d.wait_exit(LIMIT);
    let log = d.log();
    let named: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("reported ready, but"))
        .collect();
    assert_eq!(named.len(), 1, "{log}");
    assert!(named[0].contains("WARN worker 1 (pid "), "{log}");
    assert!(
        named[0].contains("holds any of the 1 listening socket(s) drover passed it"),
        "{log}"
    );
}

/// A worker that forks into the background (daemonizes) and exits: the
/// daemon's `READY=1` comes from a process no running worker started, and
/// the log says what it is and for which worker, instead of ignoring it at
/// debug level (the log showed only workers exiting with status 0 while an
/// unsupervised daemon served their socket).
#[test]
fn a_ready_from_a_daemonized_worker_says_so() {
    let script = format!(
        "{SEND_READY}\
         if os.fork():\n    os._exit(0)\n\
         os.setsid()\n\
         if os.fork():\n    os._exit(0)\n\
         time.sleep(0.3)\n\
         ready()\n\
         time.sleep(5)\n"
    );
    let mut d = Start::config(&python_workers(1, &script)).run();
    let log = d.wait_log("READY=1 from pid ");
    let line = log
        .lines()
        .find(|l| l.contains("READY=1 from pid "))
        .unwrap();
    let daemon: i32 = line
        .split("READY=1 from pid ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), Signal::SIGKILL);
    assert!(
        line.contains(", started for worker 1), which is neither a worker"),
        "{line}"
    );
    assert!(
        line.contains("forks into the background (daemonizes)"),
        "{line}"
    );
    d.signal(Signal::SIGTERM);
    d.wait_exit(LIMIT);
}

/// A worker that left the process group drover gave it (`setpgid`, here
/// into its child's group) and outlives its stop deadline is killed, and
/// the log says so: the line before said "sending SIGKILL to its process
/// group" and nothing more (the failed killpg was a debug line), while its
/// child in the other group lived on. Here a first child stays in the
/// group the worker left: the killpg then succeeded, the worker was not
/// killed at all, and the stop never ended.
#[test]
fn a_worker_that_left_its_process_group_is_named_when_killed() {
    let script = format!(
        "{SEND_READY}\
         import signal\n\
         signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
         stay = os.fork()\n\
         if stay == 0:\n    time.sleep(3)\n    os._exit(0)\n\
         child = os.fork()\n\
         if child == 0:\n    \
             os.setpgid(0, 0)\n    time.sleep(3)\n    os._exit(0)\n\
         while os.getpgid(child) != child:\n    time.sleep(0.01)\n\
         os.setpgid(0, child)\n\
         open(os.environ['CHILD_FILE'], 'w').write(str(child))\n\
         ready()\n\
         time.sleep(60)\n"
    );
    let config = format!(
        "{}graceful_timeout = \"500ms\"\n[env]\nCHILD_FILE = \"$DIR/child\"\n",
        python_workers(1, &script).replace("graceful_timeout = \"2s\"\n", "")
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let child: i32 = read_file(&d.dir.path().join("child"))
        .trim()
        .parse()
        .unwrap();
    d.signal(Signal::SIGTERM);
    // The child holds drover's output: end it once the line is there.
    let found = wait_for("the worker killed", LIMIT, || {
        let log = d.log();
        log.contains("killed by SIGKILL").then_some(log)
    });
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), Signal::SIGKILL);
    assert!(
        found.contains("left its process group (setpgid): SIGKILL to it and to that group"),
        "{found}"
    );
    assert_eq!(d.wait_exit(LIMIT).code(), Some(4), "{}", d.log());
}

/// A stop while paused (SIGWINCH: no worker runs, the sockets stay open)
/// resets the connections that waited in the queue for workers to come
/// back; the log says how many. The code before said "0 killed" and exit
/// status 0, and nothing of the clients that got a reset.
#[test]
fn a_stop_while_paused_counts_the_queued_connections_it_resets() {
    let mut d = Start::config(&hello(1, "")).run();
    d.wait_log("all 1 workers ready");
    let addr = d.tcp_addr();
    d.signal(Signal::SIGWINCH);
    d.wait_log("exited with status 0");
    // The kernel completes their handshakes; they wait for a worker.
    let waiting: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    let log = d.log();
    assert!(
        log.contains("3 connection(s) waiting in the listeners' queues had no worker to take them"),
        "{log}"
    );
    drop(waiting);
}

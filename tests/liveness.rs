//! Liveness and limits: heartbeats, recycling, the pidfile, privileges and
//! PID 1 duties, with the real binary.

mod common;

use common::*;
use std::time::{Duration, Instant};

fn hello(extra: &str) -> String {
    format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"{}\"]\nready = \"notify\"\n{extra}\n",
        hello_bin()
    )
}

#[test]
fn a_wedged_worker_is_aborted_at_its_heartbeat_deadline_and_replaced() {
    // A 3 s timeout (a heartbeat every 1.5 s), not 1 s (every 500 ms): at
    // load 6-11 on 2 CPUs a heartbeat was missed before the /hang was read,
    // and a worker that was not wedged was aborted.
    let d = Start::config(&hello(
        "workers = 1\ntimeout = \"3s\"\nabort_grace = \"2s\"",
    ))
    .run();
    d.wait_log("all 1 workers ready");
    let addr = d.tcp_addr();
    let first = get_ok(addr, "/").worker_pid();
    // /hang wedges the worker: its heartbeats stop.
    d.wait_workers(1);
    let _hung = get_in_flight(addr, "/hang");
    let log =
        d.wait_log("missed its heartbeat (no WATCHDOG=1 for 3s): SIGABRT, then SIGKILL in 2s");
    assert!(
        log.contains(&format!("worker 1 (pid {first}) missed its heartbeat")),
        "{log}"
    );
    let second = wait_for("a replacement to answer", LIMIT, || {
        get(addr, "/")
            .ok()
            .map(|r| r.worker_pid())
            .filter(|p| *p != first)
    });
    assert_ne!(first, second);
    let log = d.wait_log("(heartbeat timeout: SIGABRT)");
    assert!(
        log.contains(&format!("worker 1 (pid {first}) killed by SIGABRT")),
        "{log}"
    );
}

#[test]
fn a_worker_that_survives_sigabrt_is_killed_after_abort_grace() {
    // A shell worker that ignores SIGABRT and never sends a heartbeat.
    let config = "bind = [\"127.0.0.1:0\"]\ncommand = [\"sh\", \"-c\", \"trap '' ABRT; while :; do sleep 1; done\"]\n\
                  timeout = \"500ms\"\nabort_grace = \"500ms\"\nlog_level = \"debug\"";
    let d = Start::config(config).run();
    d.wait_log("missed its heartbeat");
    let log = d.wait_log("killed by SIGKILL (heartbeat timeout)");
    assert!(log.contains("still running at its stop deadline"), "{log}");
    // The slot was refilled as soon as the worker stopped serving.
    d.wait_log_count("spawned", 2);
}

#[test]
fn extend_timeout_pushes_the_boot_deadline() {
    // Asks for 10 s more at once, then reports ready after 3.5 s: past the
    // 3 s boot_timeout, within the extension. (3 s, not less: python3's own
    // start on a loaded machine took over 1 s in a CI run.)
    let script = "import os,socket,time\n\
                  s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\n\
                  s.sendto(b'EXTEND_TIMEOUT_USEC=10000000',os.environ['NOTIFY_SOCKET'])\n\
                  time.sleep(3.5)\n\
                  s.sendto(b'READY=1',os.environ['NOTIFY_SOCKET'])\n\
                  time.sleep(60)";
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"python3\", \"-I\", \"-S\", \"-c\", {script:?}]\nready = \"notify\"\nboot_timeout = \"3s\""
    );
    let d = Start::config(&config).run();
    let log = d.wait_log("all 1 workers ready");
    assert!(!log.contains("did not report READY=1"), "{log}");
}

fn recycle_under_load(extra: &str, marker: &str) {
    let d = Start::config(&hello(&format!("workers = 2\n{extra}"))).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let load = Load::start(addr, 20, "/sleep?ms=2");
    // Several generations of replacements while the load runs.
    d.wait_log_count(marker, 4);
    d.wait_log_count("replaced by pid", 4);
    wait_answered(&load, 200);
    let o = load.finish();
    eprintln!("outcomes: {o:?}");
    assert_eq!(
        (o.refused, o.reset, o.truncated, o.other),
        (0, 0, 0, 0),
        "{o:?}"
    );
    let log = d.log();
    assert!(
        !log.contains("respawning"),
        "recycling is not a crash: {log}"
    );
}

#[test]
fn max_age_recycles_without_a_failed_request() {
    recycle_under_load(
        "max_age = \"700ms\"\nmax_age_jitter = \"200ms\"",
        "reached max_age after",
    );
}

#[test]
fn max_memory_recycles_without_a_failed_request() {
    // Every worker is over 1 byte: each check replaces them all.
    recycle_under_load(
        "max_memory = \"1\"\nmemory_check_interval = \"300ms\"",
        "over max_memory",
    );
}

#[test]
fn a_failing_slot_is_reported_as_degraded() {
    let d = Start::args(&[
        "-b",
        "127.0.0.1:0",
        "--set",
        "respawn_delay=10ms",
        "--set",
        "respawn_max_delay=40ms",
        "--set",
        "degraded_after=3",
        "--set",
        "control_socket=$DIR/ctl.sock",
        "--",
        "false",
    ])
    .run();
    d.wait_log("slot 1 is degraded: 3 failures in a row; retrying every 40.0 ms at most");
    // The slot has no worker most of the time; the status still shows it.
    let ctl = |json: bool| {
        let mut cmd = std::process::Command::new(drover_bin());
        cmd.arg("ctl")
            .arg("--socket")
            .arg(d.dir.path().join("ctl.sock"));
        if json {
            cmd.arg("--json");
        }
        String::from_utf8(cmd.arg("status").output().unwrap().stdout).unwrap()
    };
    let json = ctl(true);
    assert!(
        json.contains("\"slots\":[{") && json.contains("\"degraded\":true"),
        "{json}"
    );
    assert!(ctl(false).contains("slot 1 is degraded:"), "{}", ctl(false));
}

#[test]
fn a_second_drover_on_the_same_pidfile_refuses_to_start() {
    let config = hello("pidfile = \"$DIR/../drover-shared.pid\"");
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("drover.pid");
    let config = config.replace("$DIR/../drover-shared.pid", &pidfile.display().to_string());
    let first = Start::config(&config).run();
    first.wait_log("all 1 workers ready");
    // The same address too: the pidfile must refuse before the bind would.
    let same_bind = config.replace("127.0.0.1:0", &first.tcp_addr().to_string());
    let mut second = Start::config(&same_bind).run();
    assert_eq!(second.wait_exit(LIMIT).code(), Some(1));
    let expected = format!(
        "another drover (pid {}) is running and holds its lock",
        first.pid()
    );
    assert!(second.log().contains(&expected), "{}", second.log());
    assert_eq!(
        read_file(&pidfile).trim(),
        first.pid().to_string(),
        "the first one's pidfile is untouched"
    );
}

#[test]
fn a_stale_pidfile_does_not_block_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("drover.pid");
    // A pid that exists (our own) but holds no lock: a reused pid.
    std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
    let config = hello(&format!("pidfile = \"{}\"", pidfile.display()));
    let mut d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    assert_eq!(read_file(&pidfile).trim(), d.pid().to_string());
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    assert!(!pidfile.exists());
}

#[test]
fn workers_run_as_an_unprivileged_user() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let config = format!(
        // The system's python3: a per-user install (pyenv) may be unreadable to nobody.
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"/usr/bin/python3\", \"{}\", \"--notify\"]\nready = \"notify\"\n\
         user = \"nobody\"\numask = \"027\"\nchdir = \"/\"\n",
        probe_py()
    );
    let d = Start::config(&config).run();
    // READY=1 arrived: the notify socket is reachable by the workers' user.
    d.wait_log("all 1 workers ready");
    let body = get_ok(d.tcp_addr(), "/probe").body;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert!(body.contains(&format!("\"uid\": {}", nobody.uid)), "{body}");
    assert!(body.contains(&format!("\"gid\": {}", nobody.gid)), "{body}");
    assert!(
        body.contains(&format!("\"groups\": \"{}\"", nobody.gid)),
        "supplementary groups are nobody's: {body}"
    );
    assert!(body.contains("\"umask\": \"0o27\""), "{body}");
    assert!(body.contains("\"cwd\": \"/\""), "{body}");
    // The notify directory belongs to the workers' user and is closed to others.
    let socket = body
        .split("\"NOTIFY_SOCKET\": \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let dir = std::path::Path::new(socket).parent().unwrap();
    let meta = std::fs::metadata(dir).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (nobody.uid.as_raw(), 0o700)
    );
}

#[test]
fn as_pid_1_in_a_fresh_namespace_no_orphan_stays_a_zombie() {
    if !nix::unistd::getuid().is_root()
        || std::process::Command::new("unshare")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("skipped: needs root and unshare(1)");
        return;
    }
    let start = Start {
        args: vec![
            "--pid".into(),
            "--fork".into(),
            "--mount-proc".into(),
            drover_bin().into(),
            "-b".into(),
            "127.0.0.1:0".into(),
            "-w".into(),
            "2".into(),
            "--".into(),
            "python3".into(),
            probe_py(),
        ],
        program: Some("unshare".into()),
        ..Start::default()
    };
    let mut d = start.run();
    let addr = d.tcp_addr();
    // drover is the child of unshare, and PID 1 of the new namespace.
    let drover = wait_for("drover under unshare", LIMIT, || {
        children_of(d.pid()).first().copied()
    });
    let r = get_ok(addr, "/orphans?n=500");
    assert_eq!(r.body, "orphaned 500\n");
    let r = get_ok(addr, "/orphans?n=500");
    assert_eq!(r.body, "orphaned 500\n");
    // Every grandchild was re-parented to drover and reaped: only the two
    // workers remain as its children, and no zombie.
    wait_for("no zombie under drover", LIMIT, || {
        (zombies_of(drover).is_empty() && children_of(drover).len() == 2).then_some(())
    });
    nix::sys::signal::kill(drover, Signal::SIGTERM).unwrap();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
}

#[test]
fn the_master_binds_a_privileged_port_then_runs_as_the_workers_user() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    // Port 980 needs root to bind; 127.0.0.2 is loopback and rarely used.
    let config = format!(
        "bind = [\"127.0.0.2:980\"]\ncommand = [\"/usr/bin/python3\", \"{}\", \"--notify\"]\nready = \"notify\"\n\
         user = \"nobody\"\nmaster_as_user = true\n",
        probe_py()
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let status = read_file(std::path::Path::new(&format!("/proc/{}/status", d.pid())));
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    assert_eq!(
        uid_line.split_whitespace().nth(1),
        Some(nobody.uid.to_string().as_str()),
        "{uid_line}"
    );
    assert!(d
        .log()
        .contains(&format!("drover now runs as uid {}", nobody.uid)));
    let body = get_ok("127.0.0.2:980".parse().unwrap(), "/probe").body;
    assert!(body.contains(&format!("\"uid\": {}", nobody.uid)), "{body}");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
}

#[test]
fn of_two_drovers_started_at_once_on_one_pidfile_exactly_one_runs() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("drover.pid");
    let config = hello(&format!("pidfile = \"{}\"", pidfile.display()));
    for round in 0..8 {
        let mut pair = [Start::config(&config).run(), Start::config(&config).run()];
        let loser = wait_for("one of the two to give up", LIMIT, || {
            pair.iter_mut()
                .position(|d| d.child.try_wait().unwrap().is_some())
        });
        let winner = 1 - loser;
        assert_eq!(
            pair[loser].wait_exit(LIMIT).code(),
            Some(1),
            "round {round}"
        );
        let log = pair[loser].log();
        assert!(
            log.contains("is running and holds its lock"),
            "round {round}: {log}"
        );
        pair[winner].wait_log("all 1 workers ready");
        assert_eq!(
            read_file(&pidfile).trim(),
            pair[winner].pid().to_string(),
            "round {round}"
        );
        pair[winner].signal(Signal::SIGTERM);
        assert_eq!(
            pair[winner].wait_exit(LIMIT).code(),
            Some(0),
            "round {round}"
        );
        assert!(!pidfile.exists(), "round {round}: removed at exit");
    }
}

#[test]
fn a_master_as_user_removes_its_files_at_exit_and_upgrades() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    // A run directory that belongs to the user, as systemd's RuntimeDirectory=.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    nix::unistd::chown(&run, Some(nobody.uid), Some(nobody.gid)).unwrap();
    let (pidfile, socket) = (run.join("drover.pid"), run.join("ctl.sock"));
    // Settings on the command line: the new master, running as nobody, could
    // not read a config file in the harness's private directory.
    let mut d = Start::args(&[
        "-b",
        "127.0.0.1:0",
        "-w",
        "1",
        "--pidfile",
        &pidfile.display().to_string(),
        "--set",
        &format!("control_socket={}", socket.display()),
        "--set",
        "user=nobody",
        "--set",
        "master_as_user=true",
        "--set",
        "ready=notify",
        "--",
        hello_bin(),
    ])
    .run();
    d.wait_log("all 1 workers ready");
    let addr = d.tcp_addr();
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(drover_bin())
            .arg("ctl")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), text)
    };
    let (code, out) = ctl(&["upgrade"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(d.wait_exit_only(LIMIT).code(), Some(0));
    let new = wait_for("the pidfile to name the new master", LIMIT, || {
        read_file(&pidfile)
            .trim()
            .parse()
            .ok()
            .map(nix::unistd::Pid::from_raw)
            .filter(|p| *p != d.pid())
    });
    struct KillOnDrop(nix::unistd::Pid);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, Signal::SIGKILL);
        }
    }
    let _guard = KillOnDrop(new);
    assert_eq!(get_ok(addr, "/").status, 200);
    let (code, out) = ctl(&["status"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("master pid {new}")), "{out}");
    nix::sys::signal::kill(new, Signal::SIGTERM).unwrap();
    wait_for("the new master to exit", LIMIT, || {
        (!alive(new)).then_some(())
    });
    assert!(!pidfile.exists(), "pidfile left behind");
    assert!(!socket.exists(), "control socket left behind");
}

/// A worker that says `STOPPING=1` (as one recycling itself does) and then
/// hangs instead of exiting: killed `graceful_timeout` after it said so, and
/// replaced. Before, it kept its slot, serving nothing, until drover stopped.
#[test]
fn a_worker_that_says_stopping_and_never_exits_is_killed_after_graceful_timeout() {
    let worker = r#"
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
with open(sys.argv[1], "a") as f:
    f.write("%d\n" % os.getpid())
with open(sys.argv[1]) as f:
    first = len(f.read().split()) == 1
if first:
    time.sleep(0.2)
    s.sendto(b"STOPPING=1", os.environ["NOTIFY_SOCKET"])
while True:
    time.sleep(1)
"#;
    let d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\ngraceful_timeout = \"1s\"\n\
         command = [\"python3\", \"-c\", {worker:?}, \"$DIR/pids\"]\n"
    ))
    .run();
    d.wait_log("all 1 workers ready");
    let first = d.wait_log("is stopping");
    let log = d.wait_log("said STOPPING=1 1s ago and is still running");
    assert!(first.contains("worker 1 (pid"), "{log}");
    // Its replacement: a second pid in the file, ready.
    let pids = wait_for("the replacement", LIMIT, || {
        let text = std::fs::read_to_string(d.dir.path().join("pids")).unwrap_or_default();
        let pids: Vec<i32> = text.lines().filter_map(|l| l.parse().ok()).collect();
        (pids.len() >= 2).then_some(pids)
    });
    d.wait_log(&format!("(pid {}) ready", pids[1]));
    assert!(
        !alive(nix::unistd::Pid::from_raw(pids[0])),
        "the worker that hung is gone: {}",
        d.log()
    );
}

/// A worker that says `STOPPING=1` twice before it exits (drover-uvicorn's
/// `--limit-max-requests` recycle did: once as uvicorn shuts down, once as
/// the launcher ends) is logged as stopping once. Before, the log said
/// `worker 1 (pid P) is stopping` for each datagram.
#[test]
fn a_worker_that_says_stopping_twice_is_logged_stopping_once() {
    let worker = r#"
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
with open(sys.argv[1], "a") as f:
    f.write("%d\n" % os.getpid())
with open(sys.argv[1]) as f:
    first = len(f.read().split()) == 1
if first:
    time.sleep(0.2)
    s.sendto(b"STOPPING=1", os.environ["NOTIFY_SOCKET"])
    time.sleep(0.2)
    s.sendto(b"STOPPING=1", os.environ["NOTIFY_SOCKET"])
    time.sleep(0.2)
    sys.exit(0)
while True:
    time.sleep(1)
"#;
    let d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\n\
         command = [\"python3\", \"-c\", {worker:?}, \"$DIR/pids\"]\n"
    ))
    .run();
    d.wait_log("all 1 workers ready");
    let log = d.wait_log("as it announced (STOPPING=1); respawning now");
    let pid = std::fs::read_to_string(d.dir.path().join("pids")).unwrap();
    let line = format!("worker 1 (pid {}) is stopping", pid.lines().next().unwrap());
    assert_eq!(log.matches(&line).count(), 1, "{log}");
}

/// A worker still booting at its `boot_timeout` gets SIGABRT first: a
/// Python worker with `faulthandler` on (the SDK turns it on) prints where
/// it hangs, here in the function its import called.
#[test]
fn a_worker_hung_at_boot_is_sent_sigabrt_and_python_says_where() {
    let worker = "import faulthandler, time\nfaulthandler.enable()\n\
                  def stuck_in_the_import():\n    time.sleep(1000)\nstuck_in_the_import()\n";
    // 3 s: Python must have started and turned faulthandler on by then,
    // which a loaded machine can take more than a second to do.
    let d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\nboot_timeout = \"3s\"\n\
         respawn_delay = \"10s\"\ncommand = [\"python3\", \"-c\", {worker:?}]\n"
    ))
    .run();
    d.wait_log("did not report READY=1 within boot_timeout (3s); SIGABRT");
    let log = d.wait_log("(boot timeout)");
    assert!(log.contains("killed by SIGABRT"), "{log}");
    assert!(
        log.contains("in stuck_in_the_import"),
        "faulthandler's traceback names the function it hangs in: {log}"
    );
}

/// One worker that ignores SIGABRT and never sends READY=1, with
/// `boot_timeout = "1s"` and `settings`, once drover has sent it SIGABRT.
/// The shell ignores SIGABRT at once (and sleep inherits that), where
/// Python took its start-up first: past the 1 s boot_timeout on a loaded
/// machine, it died of the SIGABRT and a test waited in vain.
fn aborted_at_boot(settings: &str) -> Drover {
    let worker = "trap '' ABRT; exec sleep 1000";
    let d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\nboot_timeout = \"1s\"\n\
         respawn_delay = \"10s\"\ncommand = [\"sh\", \"-c\", {worker:?}]\n{settings}\n"
    ))
    .run();
    d.wait_log("within boot_timeout (1s); SIGABRT");
    d
}

/// One that ignores SIGABRT is killed (its process group) `abort_grace`
/// after it.
#[test]
fn a_worker_hung_at_boot_that_ignores_sigabrt_is_killed_after_abort_grace() {
    let d = aborted_at_boot("abort_grace = \"1s\"");
    d.wait_log("still running 1s after its SIGABRT; sending SIGKILL to its process group");
    d.wait_log("killed by SIGKILL (boot timeout)");
}

/// A quick stop hurries a worker aborted at its boot deadline too: its
/// SIGKILL comes at the quick stop's deadline (quick_timeout) if that is
/// earlier than its abort_grace, as for every stopping worker
/// (docs/signals.md, stage 2). The code before left its SIGKILL at
/// abort_grace (30 s here), and drover's quick stop waited for it.
#[test]
fn a_quick_stop_hurries_a_worker_aborted_at_boot() {
    let mut d = aborted_at_boot("abort_grace = \"30s\"\nquick_timeout = \"1s\"");
    d.signal(Signal::SIGQUIT);
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert!(log.contains("killed by SIGKILL (boot timeout)"), "{log}");
    assert!(log.contains("(1 killed)"), "{log}");
    assert_eq!(status.code(), Some(4), "{log}");
}

/// A worker aborted at its boot deadline before a shutdown, and killed at
/// its abort_grace during it, was killed by the shutdown as much as one
/// killed at the shutdown's deadline: it counts in `killed`, and drover
/// exits with status 4 (docs/signals.md, exit statuses). The code before
/// counted only the workers stopping or booting at their deadline: this
/// stop said "(0 killed)" and exited with 0.
#[test]
fn a_worker_aborted_at_boot_and_killed_during_the_shutdown_counts_as_killed() {
    let mut d = aborted_at_boot("abort_grace = \"2s\"\ngraceful_timeout = \"30s\"");
    d.signal(Signal::SIGTERM);
    d.wait_log("graceful shutdown");
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert!(
        log.contains("still running 2s after its SIGABRT; sending SIGKILL"),
        "{log}"
    );
    assert!(log.contains("(1 killed)"), "{log}");
    assert_eq!(status.code(), Some(4), "{log}");
}

/// A worker that becomes ready during a graceful shutdown and does not
/// stop is killed at the shutdown's deadline, `graceful_timeout` after the
/// signal, not `graceful_timeout` after its own SIGTERM (here 1.5 s later):
/// the whole stop ends within `graceful_timeout` (docs/signals.md, stage 2).
#[test]
fn a_worker_ready_during_the_shutdown_is_killed_at_the_shutdowns_deadline() {
    let worker = "import os, signal, socket, sys, time\n\
                  signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
                  open(sys.argv[1] + '/up', 'w').close()\n\
                  while not os.path.exists(sys.argv[1] + '/go'):\n    time.sleep(0.01)\n\
                  socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n\
                  time.sleep(60)\n";
    let mut d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\n\
         graceful_timeout = \"4s\"\ncommand = [\"python3\", \"-c\", {}, \"$DIR\"]\n",
        toml_string(worker)
    ))
    .run();
    let up = d.dir.path().join("up");
    wait_for("the worker to run", LIMIT, || up.exists().then_some(()));
    d.signal(Signal::SIGTERM);
    d.wait_log("still booting: it gets SIGTERM once ready");
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(d.dir.path().join("go"), "").unwrap();
    d.wait_log("ready during the shutdown: sending SIGTERM");
    assert_eq!(d.wait_exit(LIMIT).code(), Some(4), "{}", d.log());
    let took = stop_took(&d.log());
    assert!((4000.0..5000.0).contains(&took), "{}", d.log());
}

/// How long the shutdown took, in ms, as the log's stage 3 line says.
fn stop_took(log: &str) -> f64 {
    log.split("all workers stopped ")
        .nth(1)
        .and_then(|rest| rest.split(" ms after the shutdown began").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stage 3 line: {log}"))
}

/// A graceful shutdown ends by its deadline, `graceful_timeout` after the
/// signal (docs/signals.md, stage 2), with a worker aborted at its
/// boot_timeout before it too: that one's SIGKILL comes at the shutdown's
/// deadline when its abort_grace would end later. The code before kept its
/// SIGKILL at abort_grace (60 s here): drover outlived its grace period by
/// 58 s, and this test timed out waiting for it.
#[test]
fn a_graceful_shutdown_kills_a_worker_aborted_at_boot_by_its_deadline() {
    let mut d = aborted_at_boot("abort_grace = \"60s\"\ngraceful_timeout = \"2s\"");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert!(
        log.contains("still running at the shutdown's deadline after its SIGABRT"),
        "{log}"
    );
    assert!(log.contains("killed by SIGKILL (boot timeout)"), "{log}");
    assert!(log.contains("(1 killed)"), "{log}");
    assert_eq!(status.code(), Some(4), "{log}");
    assert!((2000.0..10000.0).contains(&stop_took(&log)), "{log}");
}

/// A worker that ignores SIGTERM and SIGABRT, once READY=1 sent: with a
/// `timeout`, it misses its heartbeat and gets SIGABRT and abort_grace.
const STUBBORN: &str = "import os, signal, socket, time\n\
                        for s in (signal.SIGABRT, signal.SIGTERM):\n    signal.signal(s, signal.SIG_IGN)\n\
                        p = os.environ['NOTIFY_SOCKET']\n\
                        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', '\\0' + p[1:] if p.startswith('@') else p)\n\
                        time.sleep(1000)\n";

/// So with one aborted for a missed heartbeat before the shutdown: its
/// SIGKILL comes at the shutdown's deadline, not at its abort_grace (60 s
/// here), as the code before did (this test timed out waiting for drover).
#[test]
fn a_graceful_shutdown_kills_a_worker_aborted_for_its_heartbeat_by_its_deadline() {
    let mut d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\ntimeout = \"1s\"\n\
         abort_grace = \"60s\"\ngraceful_timeout = \"2s\"\nrespawn_delay = \"10s\"\n\
         command = [\"python3\", \"-c\", {}]\n",
        toml_string(STUBBORN)
    ))
    .run();
    d.wait_log("missed its heartbeat (no WATCHDOG=1 for 1s): SIGABRT, then SIGKILL in 1m");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert!(
        log.contains("killed by SIGKILL (heartbeat timeout)"),
        "{log}"
    );
    assert_eq!(status.code(), Some(4), "{log}");
    assert!((2000.0..10000.0).contains(&stop_took(&log)), "{log}");
}

/// So with one retired by a reload that shortened graceful_timeout (60 s
/// to 2 s) and still stopping: the shutdown's deadline, by the
/// configuration in force, bounds its stop too. The code before kept its
/// own 60 s: drover logged "up to 2s" and took a minute (this test timed
/// out waiting for it).
#[test]
fn a_graceful_shutdown_kills_a_worker_retired_with_a_longer_graceful_timeout_by_its_deadline() {
    let config = |grace: &str| {
        format!(
            "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\n\
             graceful_timeout = \"{grace}\"\ncommand = [\"python3\", \"-c\", {}]\n",
            toml_string(STUBBORN)
        )
    };
    let mut d = Start::config(&config("60s")).run();
    d.wait_log("all 1 workers ready");
    std::fs::write(d.dir.path().join("config.toml"), config("2s")).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log("(reload): sending SIGTERM");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert!(
        log.contains("SIGTERM to 1 worker(s), up to 2s; 1 already stopping"),
        "{log}"
    );
    assert!(log.contains("(2 killed)"), "{log}");
    assert_eq!(status.code(), Some(4), "{log}");
    assert!((2000.0..10000.0).contains(&stop_took(&log)), "{log}");
}

/// A worker still booting when a graceful shutdown begins with no worker
/// serving is held to the shutdown's deadline in place of its
/// `boot_timeout` (docs/signals.md, stage 2), as the workers stopped at once
/// are: past its boot_timeout it may still become ready and get its stop
/// (and drain the connections queued), and only one still booting at the
/// shutdown's deadline gets SIGKILL. The code before capped its boot
/// deadline to the shutdown's and sent SIGKILL at whichever came first,
/// logged as "at the shutdown's deadline" (here 3 s after the spawn, with
/// 7 s left): drover then exited with status 4, one worker killed.
#[test]
fn a_worker_booting_at_the_shutdown_is_held_to_the_shutdowns_deadline_not_its_boot_timeout() {
    // The worker reports ready once the test creates $DIR/go, which it does
    // 4 s after it saw the worker spawned (so at least 1 s past its 3 s
    // boot_timeout on drover's clock). It used to sleep 3 s itself: at load
    // 6-11 on 2 CPUs Python took 3.5 s more to start, and the READY=1 came
    // 6.5 s after the spawn, past the shutdown's (then 6 s) deadline.
    // os._exit: a SystemExit raised by the handler while the socket below is
    // being finalised is ignored (Python prints "Exception ignored"), and the
    // worker would sleep on (1 in 3 runs).
    let worker = "import os, signal, socket, sys, time\n\
                  signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n\
                  while not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\n\
                  p = os.environ['NOTIFY_SOCKET']\n\
                  socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', '\\0' + p[1:] if p.startswith('@') else p)\n\
                  time.sleep(60)\n";
    let mut d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\nboot_timeout = \"3s\"\n\
         graceful_timeout = \"10s\"\ncommand = [\"python3\", \"-c\", {}, \"$DIR/go\"]\n",
        toml_string(worker)
    ))
    .run();
    // The SIGTERM must come while the worker boots, before its boot_timeout
    // (3 s: 1 s was a narrow window on a loaded machine).
    d.wait_log("worker 1 (pid");
    let spawned = Instant::now();
    d.signal(Signal::SIGTERM);
    d.wait_log("still booting: it gets SIGTERM once ready");
    // Past its boot_timeout (by at least 1 s), still booting.
    std::thread::sleep(
        (spawned + Duration::from_secs(4)).saturating_duration_since(Instant::now()),
    );
    std::fs::write(d.dir.path().join("go"), "").unwrap();
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert!(!log.contains("SIGKILL to its process group"), "{log}");
    assert!(!log.contains("SIGABRT"), "{log}");
    assert!(
        log.contains("ready during the shutdown: sending SIGTERM"),
        "{log}"
    );
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains(
            "still booting: it gets SIGTERM once ready, within the shutdown's 10s \
             (which replaces its boot_timeout), else SIGKILL then"
        ),
        "{log}"
    );
}

//! The core master, end to end: the real binary, real sockets, real signals.

mod common;

use std::os::unix::process::ExitStatusExt;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, killpg};

/// The reference worker behind drover, with a cleanup file, a pidfile and an
/// on_exit hook that records the outcome. `extra` is TOML for top-level keys;
/// a key it sets replaces the default below.
fn hello(extra: &str) -> String {
    let defaults = [
        "bind = [\"127.0.0.1:0\"]".to_string(),
        format!("command = [\"{}\"]", hello_bin()),
        "workers = 2".into(),
        "ready = \"notify\"".into(),
        "graceful_timeout = \"10s\"".into(),
        "pidfile = \"$DIR/drover.pid\"".into(),
        r#"on_exit = ["sh", "-c", "echo \"$DROVER_EXIT_STATUS $DROVER_SHUTDOWN $DROVER_KILLED $DROVER_CAUSE\" > $DIR/on_exit"]"#.into(),
    ];
    let set: Vec<&str> = extra
        .lines()
        .filter_map(|l| l.split('=').next())
        .map(str::trim)
        .collect();
    let kept: Vec<&String> = defaults
        .iter()
        .filter(|d| !set.contains(&d.split('=').next().unwrap().trim()))
        .collect();
    format!(
        "{}\n{extra}\n\n[env]\nHELLO_CLEANUP_FILE = \"$DIR/cleanup\"\n",
        kept.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    )
}

fn cleanup_lines(d: &Drover) -> usize {
    read_file(&d.dir.path().join("cleanup")).lines().count()
}

/// A shutdown with a slow request in flight, plus what the reference worker
/// and the master's options show: cleanup, pidfile, on_exit hook.
fn graceful_with_request_in_flight(start: Start, stop: impl FnOnce(&Drover)) {
    let (d, _) = stop_with_request_in_flight(start, |d| {
        let pidfile = d.dir.path().join("drover.pid");
        assert_eq!(
            read_file(&pidfile).trim(),
            d.pid().to_string(),
            "pidfile names the master"
        );
        stop(d)
    });
    assert_eq!(cleanup_lines(&d), 2, "each worker ran its cleanup registry");
    assert!(!d.dir.path().join("drover.pid").exists(), "pidfile removed");
    let hook = read_file(&d.dir.path().join("on_exit"));
    assert!(
        hook.starts_with("0 graceful 0 SIG"),
        "on_exit saw the outcome: {hook:?}"
    );
    assert!(
        d.log().contains("stage 2, drain: SIGTERM to 2 worker(s)"),
        "{}",
        d.log()
    );
}

#[test]
fn sigterm_drains_an_in_flight_request_runs_cleanup_and_exits_0() {
    graceful_with_request_in_flight(Start::config(&hello("")), |d| d.signal(Signal::SIGTERM));
}

#[test]
fn ctrl_c_to_the_process_group_reaches_only_the_master() {
    let start = Start {
        own_group: true,
        ..Start::config(&hello(""))
    };
    // As a terminal does on Ctrl+C: SIGINT to the whole foreground group.
    graceful_with_request_in_flight(start, |d| killpg(d.pid(), Signal::SIGINT).unwrap());
}

#[test]
fn sigquit_is_a_quick_shutdown() {
    let mut d = Start::config(&hello("quick_timeout = \"5s\"")).run();
    d.wait_log("all 2 workers ready");
    d.signal(Signal::SIGQUIT);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    let log = d.log();
    assert!(log.contains("SIGQUIT: quick shutdown"), "{log}");
    assert!(log.contains("SIGQUIT to 2 worker(s), up to 5s"), "{log}");
    assert_eq!(cleanup_lines(&d), 2, "quick stop still runs the cleanup");
    assert!(read_file(&d.dir.path().join("on_exit")).starts_with("0 quick 0 SIGQUIT"));
}

#[test]
fn a_second_sigterm_escalates_to_quick() {
    let mut d = Start::config(&hello("graceful_timeout = \"60s\"\nquick_timeout = \"3s\"")).run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    // A request that would hold a graceful stop for a minute.
    let _hang = get_in_flight(d.tcp_addr(), "/sleep?ms=60000");
    let began = Instant::now();
    d.signal(Signal::SIGTERM);
    d.wait_log("stage 2, drain");
    // A deliberate second one: after the 1 s in which a repeat is taken as
    // the same request (tests/faults.rs).
    std::thread::sleep(Duration::from_millis(1100));
    d.signal(Signal::SIGTERM);
    d.wait_log("shutdown escalated to quick");
    let status = d.wait_exit(LIMIT);
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "did not wait for the graceful timeout"
    );
    assert!(
        status.code() == Some(0) || status.code() == Some(4),
        "{status:?}"
    );
    for w in workers {
        assert!(!alive(w));
    }
}

#[test]
fn a_worker_that_ignores_sigterm_is_killed_at_the_deadline() {
    let config = format!(
        r#"
bind = ["127.0.0.1:0"]
command = ["python3", "{probe}", "--ignore-term", "--notify"]
workers = 1
ready = "notify"
graceful_timeout = "1s"
"#,
        probe = probe_py()
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let worker = d.wait_workers(1)[0];
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(LIMIT);
    assert_eq!(
        status.code(),
        Some(4),
        "4 means some workers had to be killed"
    );
    let log = d.log();
    assert!(
        log.contains(&format!(
            "worker 1 (pid {worker}) still running at its stop deadline; sending SIGKILL"
        )),
        "{log}"
    );
    assert!(
        log.contains("killed by SIGKILL (grace period expired)"),
        "{log}"
    );
    assert!(!alive(worker));
}

/// The summary lines of a pause and of a shutdown count the workers they
/// signal, apart from those already stopping (retired by SIGTTOU, then
/// stopped by the pause), which keep their own signal. The code before said
/// "stopping all 3 worker(s)" and "SIGTERM to 3 worker(s)" with one, then
/// all three, already stopping, and "SIGQUIT to the workers".
#[test]
fn stop_summaries_count_only_the_workers_they_signal() {
    let config = format!(
        r#"
bind = ["127.0.0.1:0"]
command = ["python3", "{probe}", "--ignore-term", "--notify"]
workers = 3
ready = "notify"
graceful_timeout = "30s"
quick_timeout = "5s"
"#,
        probe = probe_py()
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 3 workers ready");
    d.signal(Signal::SIGTTOU);
    d.wait_log("retired: sending SIGTERM");
    d.signal(Signal::SIGWINCH);
    d.wait_log(
        "SIGWINCH: stopping 2 worker(s), 1 already stopping (not signalled again); \
         the sockets stay open",
    );
    d.signal(Signal::SIGTERM);
    d.wait_log("stage 2, drain: SIGTERM to 0 worker(s), up to 30s; 3 already stopping");
    // They ignore SIGTERM: a quick stop ends them, each signalled again.
    d.signal(Signal::SIGQUIT);
    d.wait_log("SIGQUIT: shutdown escalated to quick: SIGQUIT to 3 worker(s), up to 5s");
    let status = d.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(0), "{}", d.log());
}

#[test]
fn a_killed_worker_is_replaced_and_the_log_says_why() {
    let d = Start::config(&hello("workers = 1")).run();
    let addr = {
        d.wait_log("all 1 workers ready");
        d.tcp_addr()
    };
    let first = get_ok(addr, "/").worker_pid();
    kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).unwrap();
    let second = wait_for("a replacement to answer", LIMIT, || {
        get(addr, "/")
            .ok()
            .map(|r| r.worker_pid())
            .filter(|p| *p != first)
    });
    assert_ne!(first, second);
    d.wait_log(&format!(
        "worker 1 (pid {first}) killed by SIGKILL (not sent by drover"
    ));
}

#[test]
fn a_worker_that_ran_stably_is_replaced_at_once_and_its_backoff_reset() {
    let d = Start::config(&hello(
        "workers = 1\nrespawn_delay = \"2s\"\nrespawn_reset_after = \"300ms\"",
    ))
    .run();
    d.wait_log("all 1 workers ready");
    let addr = d.tcp_addr();
    // Dies young: a failure, held back by respawn_delay.
    let first = get_ok(addr, "/").worker_pid();
    let _ = get(addr, "/crash");
    d.wait_log(&format!("worker 1 (pid {first}) exited with status 1"));
    d.wait_log("respawning in 2000.0 ms (failure 1 in a row)");
    // The replacement runs past respawn_reset_after: its death is not held back.
    let second = wait_for("the replacement", Duration::from_secs(10), || {
        get(addr, "/")
            .ok()
            .map(|r| r.worker_pid())
            .filter(|p| *p != first)
    });
    // The time under test: the worker must outlive respawn_reset_after.
    std::thread::sleep(Duration::from_millis(400));
    let _ = get(addr, "/crash");
    d.wait_log(&format!("worker 1 (pid {second}) exited with status 1"));
    let log = d.wait_log("respawning now");
    assert!(!log.contains("failure 2 in a row"), "{log}");
}

#[test]
fn a_crashing_worker_is_slowed_by_the_backoff() {
    let mut d = Start::args(&[
        "-b",
        "127.0.0.1:0",
        "--set",
        "respawn_delay=100ms",
        "--set",
        "respawn_max_delay=400ms",
        "--",
        "sh",
        "-c",
        "exit 1",
    ])
    .run();
    let began = Instant::now();
    d.wait_log("failure 5 in a row");
    // 100 + 200 + 400 + 400 ms of backoff must have passed by the 5th failure.
    assert!(
        began.elapsed() >= Duration::from_millis(1100),
        "{:?}",
        began.elapsed()
    );
    let log = d.log();
    assert!(log.contains("exited with status 1 after"), "{log}");
    assert!(
        log.contains("respawning in 200.0 ms (failure 2 in a row)"),
        "{log}"
    );
    assert!(
        log.contains("respawning in 400.0 ms (failure 4 in a row)"),
        "{log}"
    );
    assert!(log.matches("spawned").count() <= 6, "no fork loop: {log}");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
}

#[test]
fn exit_3_at_boot_stops_drover_with_status_3() {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 2\nready = \"notify\"\ncommand = [\"python3\", \"{}\", \"--exit\", \"3\"]",
        probe_py()
    );
    let mut d = Start::config(&config).run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(3));
    let log = d.log();
    assert!(
        log.contains("cannot boot: exited with status 3 before it reported ready"),
        "{log}"
    );
    assert!(log.contains("exiting with status 3"), "{log}");
}

#[test]
fn exit_3_at_start_without_the_notify_protocol_stops_drover_too() {
    let mut d = Start::args(&["-w", "2", "-b", "127.0.0.1:0", "--", "sh", "-c", "exit 3"]).run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(3));
    let log = d.log();
    assert!(
        log.contains("cannot boot: exited with status 3 within boot_timeout (30s) of start (ready = \"auto\")"),
        "{log}"
    );
}

#[test]
fn a_missing_program_cannot_boot() {
    let mut d = Start::args(&["-b", "127.0.0.1:0", "--", "no-such-program-for-drover"]).run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(3));
    assert!(d
        .log()
        .contains("\"no-such-program-for-drover\": command not found in PATH"));
}

#[test]
fn malformed_configs_name_file_line_column_and_exit_2() {
    let cases = [
        ("workers = 2\nworkerz = 3\n", "config.toml:2:1: unknown field `workerz` — did you mean `workers`?\n"),
        ("workers = 2\nzzz = 3\n", "config.toml:2:1: unknown field `zzz`, expected one of"),
        ("command = [\"x\"]\nworkers = \"two\"\n", "config.toml:2:11: invalid type: string \"two\", expected a number of workers from 1 to 4096"),
        ("command = [\"x\"]\nworkers = 0\n", "config.toml:2:11: 0 is out of range"),
        ("command = [\"x\"]\n\ngraceful_timeout = \"30 parsecs\"\n", "config.toml:3:20: invalid duration \"30 parsecs\""),
        ("command = [\"x\"]\nbind = [\"localhost:http\"]\n", "config.toml:2:9: invalid address \"localhost:http\""),
        ("command = [\"x\"]\nstop_signal = \"SIGFOO\"\n", "config.toml:2:15: unknown signal \"SIGFOO\""),
        ("command = [\"x\"\n", "config.toml:1:"),
        ("workers = 2\n", "no worker command"),
        // Checks that look at the whole config point at the value too.
        ("command = [\"x\"]\nbind = []\n", "config.toml:2:8: `bind` is empty: expected at least one address"),
        ("command = [\"x\"]\nboot_timeout = \"0s\"\n", "config.toml:2:16: `boot_timeout` must be more than 0s"),
        ("command = [\"x\"]\npidfile = \"\"\n", "config.toml:2:11: `pidfile` is empty: remove the key or give it a value"),
        ("command = [\"x\"]\non_exit = [\"\"]\n", "config.toml:2:11: `on_exit` is empty"),
        ("command = [\"\"]\n", "config.toml:1:11: `command`: the program name is empty"),
        (
            "command = [\"x\"]\nrespawn_delay = \"10s\"\nrespawn_max_delay = \"1s\"\n",
            "config.toml:3:21: `respawn_max_delay` (1s, set at ",
        ),
        (
            "command = [\"x\"]\nbind = [\"unix:/tmp/drover-x.sock\", \"unix:/tmp/drover-x.sock\"]\n",
            "config.toml:2:36: `bind`: unix:/tmp/drover-x.sock is listed twice (first at ",
        ),
    ];
    for (text, expected) in cases {
        let mut d = Start::config(text).run();
        let status = d.wait_exit(LIMIT);
        let log = d.log();
        assert_eq!(status.code(), Some(2), "{text:?}: {log}");
        assert!(
            log.contains(expected),
            "{text:?}: expected {expected:?} in {log:?}"
        );
        assert!(
            !log.contains("spawned") && !log.contains("listening"),
            "nothing started: {log}"
        );
    }
    // Values from the command line are named by their option.
    for (args, expected) in [
        (&["-w", "0"][..], "--workers 0: 0 is out of range"),
        (
            &["-b", "unix:/tmp/drover-y.sock", "-b", "unix:/tmp/drover-y.sock"],
            "--bind unix:/tmp/drover-y.sock: `bind`: unix:/tmp/drover-y.sock is listed twice \
             (first at --bind unix:/tmp/drover-y.sock)",
        ),
        (
            &["--set", "respawn_max_delay=1s", "--set", "respawn_delay=2s"],
            "--set respawn_max_delay=1s: `respawn_max_delay` (1s, set at --set respawn_max_delay=1s) \
             is less than `respawn_delay` (2s, set at --set respawn_delay=2s)",
        ),
    ] {
        let mut d = Start::args(&[args, &["--", "true"]].concat()).run();
        assert_eq!(d.wait_exit(LIMIT).code(), Some(2), "{args:?}");
        assert!(d.log().contains(expected), "{args:?}: {}", d.log());
    }
}

#[test]
fn check_validates_without_starting() {
    let good = format!("command = [\"{}\"]\nworkers = 3\n", hello_bin());
    let mut d = Start {
        args: vec!["check".into()],
        ..Start::config(&good)
    }
    .run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    assert!(
        d.log().contains("config.toml: ok (3 worker(s)"),
        "{}",
        d.log()
    );
    let mut d = Start {
        args: vec!["check".into()],
        ..Start::config("workers = -1")
    }
    .run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(2));
    assert!(d.log().contains("config.toml:1:11:"), "{}", d.log());
}

#[test]
fn the_backlog_setting_reaches_the_socket() {
    let d = Start::config(&hello("backlog = 17")).run();
    d.wait_log("all 2 workers ready");
    // Nobody accepts while paused: the queue fills up to the backlog (Linux
    // queues one more), and the next SYN is dropped.
    d.signal(Signal::SIGWINCH);
    d.wait_workers(0);
    let addr = d.tcp_addr();
    let held: Vec<std::net::TcpStream> = (0..40)
        .map_while(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok())
        .collect();
    assert_eq!(held.len(), 18, "backlog 17 holds 17 + 1 connections");
    assert_eq!(listen_queues(addr).map(|q| q.1), Some(18));
}

#[test]
fn a_workers_status_is_logged_and_shown() {
    // A worker that speaks the notify protocol by hand, as any library would.
    let script = "import os, socket, time\n\
                  s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
                  s.sendto(b'READY=1\\nSTATUS=warming caches', os.environ['NOTIFY_SOCKET'])\n\
                  time.sleep(60)\n";
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\n\
         control_socket = \"$DIR/ctl.sock\"\ncommand = [\"python3\", \"-c\", {script:?}]"
    );
    let d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    d.wait_log("status: warming caches");
    let out = std::process::Command::new(drover_bin())
        .args(["ctl", "--json", "--socket"])
        .arg(d.dir.path().join("ctl.sock"))
        .arg("status")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("\"status\":\"warming caches\""), "{out}");
}

#[test]
fn unix_and_ipv6_listeners_and_a_stale_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    // A socket file left behind by a dead server.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let config = hello(&format!(
        "bind = [\"unix:{}\", {{ address = \"[::1]:0\", name = \"v6\" }}]\nunix_socket_mode = \"0600\"",
        path.display()
    ));
    let mut d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    assert_eq!(d.addr(0), format!("unix:{}", path.display()));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let r = get_over(UnixStream::connect(&path).unwrap(), "/").unwrap();
    assert_eq!(r.status, 200);
    let v6: std::net::SocketAddr = d.addr(1).parse().unwrap();
    assert!(v6.is_ipv6());
    assert_eq!(get_ok(v6, "/").status, 200);
    assert!(d.log().contains("(fd name \"v6\")"));
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    assert!(!path.exists(), "socket file removed at exit");
}

#[test]
fn a_live_unix_socket_is_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.sock");
    let _live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut d = Start::args(&["-b", &format!("unix:{}", path.display()), "--", "true"]).run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(1));
    assert!(
        d.log().contains("is in use by a running server"),
        "{}",
        d.log()
    );
}

#[test]
fn cli_only_with_a_python_worker() {
    let probe = probe_py();
    let d = Start::args(&["-w", "2", "-b", "127.0.0.1:0", "--", "python3", &probe]).run();
    let addr = d.tcp_addr();
    let r = get_ok(addr, "/");
    assert!(r.body.starts_with("hello from pid"), "{r:?}");
    d.wait_workers(2);
}

#[test]
fn signals_blocked_by_drovers_parent_still_reach_it() {
    let start = Start {
        block_signals: true,
        ..Start::config(&hello("workers = 1"))
    };
    let mut d = start.run();
    d.wait_log("all 1 workers ready");
    let old = d.wait_workers(1)[0];
    // SIGCHLD must arrive: the killed worker is reaped and replaced.
    kill(old, Signal::SIGKILL).unwrap();
    wait_for("a replacement worker", LIMIT, || {
        let now = d.children();
        (now.len() == 1 && now[0] != old).then_some(())
    });
    assert!(
        zombies_of(d.pid()).is_empty(),
        "the killed worker was reaped"
    );
    get_ok(d.tcp_addr(), "/");
    // SIGTERM must arrive: a graceful shutdown.
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    assert!(
        d.log().contains("SIGTERM: graceful shutdown"),
        "{}",
        d.log()
    );
}

#[test]
fn the_worker_gets_the_systemd_contract_and_nothing_else() {
    let config = format!(
        r#"
bind = ["127.0.0.1:0", {{ address = "127.0.0.1:0", name = "admin" }}]
command = ["python3", "{probe}", "--notify"]
ready = "notify"
env_remove = ["PROBE_REMOVED"]
[env]
PROBE_EXTRA = "added"
"#,
        probe = probe_py()
    );
    let start = Start {
        ignore_sigint: true,
        leak_fd: Some(9),
        env: vec![("PROBE_REMOVED".into(), "x".into())],
        ..Start::config(&config)
    };
    let d = start.run();
    d.wait_log("all 1 workers ready");
    let body = get_ok(d.tcp_addr(), "/probe").body;
    let pid = field(&body, "pid");
    assert_eq!(
        field(&body, "LISTEN_PID"),
        format!("\"{pid}\""),
        "LISTEN_PID is the worker's own pid"
    );
    assert_eq!(field(&body, "LISTEN_FDS"), "\"2\"");
    assert_eq!(field(&body, "LISTEN_FDNAMES"), "\"bind0:admin\"");
    assert_eq!(field(&body, "DROVER_WORKER_ID"), "\"1\"");
    assert_eq!(field(&body, "DROVER_GENERATION"), "\"1\"");
    assert_eq!(field(&body, "DROVER_GRACEFUL_TIMEOUT"), "\"30\"");
    assert_eq!(field(&body, "PROBE_EXTRA"), "\"added\"");
    assert!(
        !body.contains("PROBE_REMOVED"),
        "removed from the environment: {body}"
    );
    assert!(field(&body, "NOTIFY_SOCKET").contains("/drover-"), "{body}");
    assert_eq!(field(&body, "pgid"), pid, "own process group");
    assert_eq!(field(&body, "stdin"), "\"/dev/null\"");
    assert_eq!(
        field(&body, "pdeathsig"),
        "9",
        "PR_SET_PDEATHSIG is SIGKILL"
    );
    assert_eq!(
        field(&body, "sig_blocked"),
        "\"0000000000000000\"",
        "empty signal mask"
    );
    // drover was started with SIGINT ignored; the worker must not inherit that.
    let ignored = u64::from_str_radix(field(&body, "sig_ignored").trim_matches('"'), 16).unwrap();
    assert_eq!(
        ignored & (1 << (libc::SIGINT - 1)),
        0,
        "SIGINT back to default"
    );
    // Descriptors: stdio, the two listeners, and nothing of the master's (fd 9
    // was leaked into drover by its parent).
    let fds = field_obj(&body, "fds");
    let numbers: Vec<&str> = fds
        .split(',')
        .map(|kv| kv.split(':').next().unwrap().trim().trim_matches('"'))
        .collect();
    assert_eq!(numbers, ["0", "1", "2", "3", "4"], "{fds}");
    // libsystemd's own check accepts the sockets (where libsystemd exists).
    let sd = field(&body, "sd_listen_fds");
    assert!(sd == "2" || sd == "null", "sd_listen_fds() = {sd}");
}

/// A JSON value, as text, for a key that appears once (enough for /probe).
fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let at = json
        .find(&format!("\"{key}\": "))
        .unwrap_or_else(|| panic!("{key} in {json}"));
    let rest = &json[at + key.len() + 4..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end].trim()
}

fn field_obj<'a>(json: &'a str, key: &str) -> &'a str {
    let at = json.find(&format!("\"{key}\": {{")).unwrap();
    let rest = &json[at + key.len() + 5..];
    &rest[..rest.find('}').unwrap()]
}

#[test]
fn notify_messages_from_other_processes_are_ignored() {
    let config = format!(
        r#"
bind = ["127.0.0.1:0"]
command = ["python3", "{probe}", "--probe-file", "$DIR/probe.json"]
ready = "notify"
boot_timeout = "2s"
respawn_delay = "10s"
"#,
        probe = probe_py()
    );
    let d = Start::config(&config).run();
    let probe = d.dir.path().join("probe.json");
    let body = wait_for("the probe file", LIMIT, || {
        let t = read_file(&probe);
        t.contains("NOTIFY_SOCKET").then_some(t)
    });
    let socket = field(&body, "NOTIFY_SOCKET").trim_matches('"').to_string();
    // The test process is not the worker: its READY=1 must not count.
    let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
    s.send_to(b"READY=1", &socket).unwrap();
    d.wait_log("did not report READY=1 within boot_timeout (2s)");
    let log = d.wait_log("(boot timeout)");
    assert!(log.contains("killed by SIGABRT"), "{log}");
    assert!(!log.contains("ready in"), "{log}");
}

/// Without `$XDG_RUNTIME_DIR` (a system service has none), drover's private
/// directory, with the notify socket and the scoreboard the workers write at
/// every request, is in memory (`/dev/shm`), not in the temp directory: on
/// a disk, the scoreboard's pages were written back there, and drover's
/// exit, which removes and unmaps it, could wait behind the disk.
#[test]
fn the_notify_socket_and_the_scoreboard_are_in_memory_not_on_a_disk() {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"python3\", \"{probe}\", \"--probe-file\", \"$DIR/probe.json\"]\n",
        probe = probe_py()
    );
    let start = Start {
        env: vec![("XDG_RUNTIME_DIR".into(), "".into())],
        ..Start::config(&config)
    };
    let mut d = start.run();
    let probe = d.dir.path().join("probe.json");
    let body = wait_for("the probe file", LIMIT, || {
        let t = read_file(&probe);
        t.contains("NOTIFY_SOCKET").then_some(t)
    });
    let socket = PathBuf::from(field(&body, "NOTIFY_SOCKET").trim_matches('"'));
    let dir = socket.parent().unwrap().to_path_buf();
    assert!(dir.join("scoreboard").exists(), "{}", dir.display());
    let fs = nix::sys::statfs::statfs(&dir).unwrap();
    assert_eq!(
        fs.filesystem_type(),
        nix::sys::statfs::TMPFS_MAGIC,
        "{} is not on a tmpfs",
        dir.display()
    );
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    assert!(!dir.exists(), "{} removed at the exit", dir.display());
}

#[test]
fn killing_the_master_leaves_no_worker_a_second_later() {
    let mut d = Start::config(&hello("workers = 3")).run();
    d.wait_log("all 3 workers ready");
    let workers = d.wait_workers(3);
    d.signal(Signal::SIGKILL);
    // Measured from the kill: within a second, no worker is alive.
    wait_for(
        "workers to die with the master",
        Duration::from_secs(1),
        || workers.iter().all(|w| !alive(*w)).then_some(()),
    );
    assert_eq!(d.wait_exit(LIMIT).signal(), Some(9));
}

#[test]
fn an_orphan_left_by_a_worker_is_reaped() {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"python3\", \"{}\"]\nsubreaper = true\nlog_level = \"debug\"",
        probe_py()
    );
    let d = Start::config(&config).run();
    let addr = d.tcp_addr();
    assert_eq!(get_ok(addr, "/orphan").body, "orphaned\n");
    // The grandchild's parent exited: it was re-parented to drover, then exited.
    let log = d.wait_log(": exited with status 0");
    assert!(log.contains("reaped pid"), "{log}");
    wait_for("no zombie under drover", LIMIT, || {
        d.children().len().eq(&1).then_some(())
    });
    assert!(zombies_of(d.pid()).is_empty());
}

#[test]
fn what_a_worker_leaves_in_its_process_group_goes_with_it() {
    // The worker starts a long sleep in its own group, then exits at once
    // on SIGTERM, leaving the sleep behind.
    let config = "bind = [\"127.0.0.1:0\"]\nworkers = 1\n\
                  command = [\"sh\", \"-c\", \"sleep 1234 & trap 'exit 0' TERM; wait\"]";
    let mut d = Start::config(config).run();
    let worker = d.wait_workers(1)[0];
    let leftover = wait_for("the worker's sleep", LIMIT, || {
        children_of(worker).first().copied()
    });
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    assert!(
        d.log()
            .contains("left processes in its process group: sent them SIGKILL"),
        "{}",
        d.log()
    );
    wait_for("the leftover to die", LIMIT, || {
        (!alive(leftover)).then_some(())
    });
}

#[test]
fn three_signals_are_three_events() {
    let d = Start::config(&hello("workers = 1")).run();
    d.wait_log("all 1 workers ready");
    // The kernel merges a signal into one already pending, so each is sent
    // once the previous one has been delivered (no longer pending); the
    // handler's bytes may then pile up in the pipe, and each is one event.
    let pending = || {
        let s = read_file(std::path::Path::new(&format!("/proc/{}/status", d.pid())));
        let line = s
            .lines()
            .find(|l| l.starts_with("ShdPnd:"))
            .unwrap()
            .to_string();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
            & (1 << (libc::SIGTTIN - 1))
            != 0
    };
    for _ in 0..3 {
        d.signal(Signal::SIGTTIN);
        wait_for("SIGTTIN delivered", LIMIT, || (!pending()).then_some(()));
    }
    d.wait_log("SIGTTIN: 3 -> 4 workers");
    d.wait_workers(4);
    d.signal(Signal::SIGTTOU);
    d.wait_log("SIGTTOU: 4 -> 3 workers");
    d.wait_workers(3);
}

#[test]
fn an_idle_master_does_not_wake_up() {
    let d = Start::config(&hello("")).run();
    d.wait_log("all 2 workers ready");
    let switches = || {
        let s = read_file(std::path::Path::new(&format!("/proc/{}/status", d.pid())));
        s.lines()
            .filter(|l| l.contains("ctxt_switches"))
            .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
            .sum::<u64>()
    };
    // The master reads a worker's output at most every 10 ms
    // (capture_output), so a line just read is followed by one more look at
    // the pipes: wait until the master has been still for 100 ms.
    let settled = || {
        let mut last = switches();
        wait_for("the master to settle", LIMIT, || {
            std::thread::sleep(Duration::from_millis(100));
            let now = switches();
            let still = now == last;
            last = now;
            still.then_some(now)
        })
    };
    let before = settled();
    // A measurement window, not a synchronisation: nothing should happen in it.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(switches(), before, "the idle master woke up");
    // Still true after a crash and its respawn (a past backoff deadline must
    // not linger as the next wake-up).
    let victim = d.wait_workers(2)[0];
    kill(victim, Signal::SIGKILL).unwrap();
    d.wait_log("respawning in");
    d.wait_log_count("ready in", 3);
    let before = settled();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(switches(), before, "the master woke up after a respawn");
}

#[test]
fn a_tight_descriptor_limit_slows_the_spawning_but_every_worker_starts() {
    // Each child on its way to exec holds a descriptor in the master: with 48
    // allowed, not all 64 can be in flight at once.
    let start = Start {
        program: Some("sh".into()),
        args: vec![
            "-c".into(),
            "ulimit -n 48 && exec \"$0\" \"$@\"".into(),
            drover_bin().into(),
            "-w".into(),
            "64".into(),
            "-b".into(),
            "127.0.0.1:0".into(),
            "--set".into(),
            "ready=notify".into(),
            "--".into(),
            hello_bin().into(),
        ],
        ..Start::default()
    };
    let mut d = start.run();
    d.wait_log("all 64 workers ready");
    assert!(!d.log().contains("cannot"), "{}", d.log());
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
}

#[test]
fn a_paused_master_does_not_spin_on_a_passed_backoff() {
    let d = Start::config(&hello("workers = 1\nrespawn_delay = \"300ms\"")).run();
    d.wait_log("all 1 workers ready");
    // CPU time of the master, in clock ticks (utime + stime).
    let cpu = || {
        let stat = read_file(std::path::Path::new(&format!("/proc/{}/stat", d.pid())));
        let fields: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        fields[11] + fields[12]
    };
    // A young worker dies: its slot waits out the backoff; pause meanwhile.
    kill(d.wait_workers(1)[0], Signal::SIGKILL).unwrap();
    d.wait_log("respawning in 300.0 ms");
    d.signal(Signal::SIGWINCH);
    d.wait_log("SIGWINCH: stopping all");
    // Measurement windows, not synchronisation: let the backoff pass, then
    // see how much CPU the paused master uses in a second.
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu() - before;
    assert!(
        used <= 2,
        "the paused master used {used} ticks of CPU in 1 s"
    );
}

#[test]
fn sockets_handed_in_by_a_parent_are_served() {
    // As systemd does: LISTEN_FDS=1 and LISTEN_PID=drover's pid, socket at fd 3.
    let sd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sd_addr = sd.local_addr().unwrap();
    // And one named explicitly: fd://5.
    let fd5 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fd5_addr = fd5.local_addr().unwrap();
    let start = Start {
        pass: vec![(sd.into(), 3)],
        systemd: true,
        ..Start::args(&["--", hello_bin()])
    };
    let d = start.run();
    assert_eq!(
        d.tcp_addr(),
        sd_addr,
        "the inherited socket replaces the default bind"
    );
    assert_eq!(get_ok(sd_addr, "/").status, 200);
    assert!(!d.log().contains("127.0.0.1:8000"));
    drop(d);

    let start = Start {
        pass: vec![(fd5.into(), 5)],
        ..Start::args(&["-b", "fd://5", "--", hello_bin()])
    };
    let d = start.run();
    assert_eq!(d.tcp_addr(), fd5_addr);
    assert_eq!(get_ok(fd5_addr, "/").status, 200);
}

/// `drover check` then a real start on the same config: (check's status,
/// check's output, the start's status, the start's output).
fn check_then_run(config: &str) -> (Option<i32>, String, Option<i32>, String) {
    let mut check = Start {
        args: vec!["check".into()],
        ..Start::config(config)
    }
    .run();
    let checked = check.wait_exit(LIMIT).code();
    let mut run = Start::config(config).run();
    let ran = run.wait_exit(LIMIT).code();
    (checked, check.log(), ran, run.log())
}

#[test]
fn check_finds_what_a_start_would_refuse_with_the_same_status() {
    let hello = hello_bin();
    let cases = [
        (
            format!("command = [\"{hello}\"]\nuser = \"nosuchuser-xyz\""),
            2,
            "config.toml:4:8: user \"nosuchuser-xyz\": no such user",
        ),
        (
            "command = [\"nonexistent-binary-xyz\"]".to_string(),
            3,
            "config.toml:3:11: cannot run the worker command: \"nonexistent-binary-xyz\": command not found in PATH",
        ),
        (
            // The PATH the workers get: env replaces drover's own.
            "command = [\"sh\", \"-c\", \"true\"]\n[env]\nPATH = \"/nonexistent\"".to_string(),
            3,
            "\"sh\": command not found in PATH",
        ),
        (
            format!("command = [\"{hello}\"]\nchdir = \"/nonexistent/dir\""),
            3,
            "config.toml:4:9: chdir /nonexistent/dir: not a directory",
        ),
        (
            "command = [\"./nonexistent-xyz\"]\nchdir = \"/\"".to_string(),
            3,
            "cannot run the worker command: /./nonexistent-xyz: no such file",
        ),
        (
            format!(
                "command = [\"{hello}\"]\nbind = [\"unix:$DIR/a.sock\",\n  \"unix:$DIR/a.sock\"]"
            ),
            2,
            "config.toml:4:3: `bind`: unix:",
        ),
    ];
    for (config, status, message) in cases {
        // A start binds a free port, at most.
        let bind = (!config.contains("bind =")).then_some("bind = [\"127.0.0.1:0\"]\n");
        let config = format!("workers = 1\n{}{config}", bind.unwrap_or_default());
        let (checked, check_log, ran, run_log) = check_then_run(&config);
        assert_eq!(checked, Some(status), "check of {config:?}: {check_log}");
        assert!(check_log.contains(message), "{config:?}: {check_log}");
        assert!(!check_log.contains("ok ("), "{check_log}");
        assert_eq!(ran, Some(status), "start of {config:?}: {run_log}");
        // A path is tried only at the exec by a start (the worker says so).
        if !message.contains("no such file") {
            assert!(run_log.contains(message), "start of {config:?}: {run_log}");
        }
    }
    let good =
        format!("bind = [\"127.0.0.1:0\"]\ncommand = [\"{hello}\"]\nchdir = \"/\"\nuser = \"0\"");
    let mut d = Start {
        args: vec!["check".into()],
        ..Start::config(&good)
    }
    .run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    assert!(
        d.log().contains(
            "checked: the settings, user and group, the program, chdir, and that each \
             LISTEN_FDS socket matches a bind; not checked: binding"
        ),
        "{}",
        d.log()
    );
}

/// The descriptor number at which `pid` holds the listening TCP socket on
/// `addr` (IPv4).
fn listening_fd(pid: nix::unistd::Pid, addr: std::net::SocketAddr) -> i32 {
    let std::net::IpAddr::V4(ip) = addr.ip() else {
        panic!("IPv4 only")
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(ip.octets()),
        addr.port()
    );
    let tcp = read_file(std::path::Path::new("/proc/net/tcp"));
    let inode = tcp
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 9 && f[1] == local && f[3] == "0A")
        .map(|f| f[9].to_string())
        .expect("the listening socket in /proc/net/tcp");
    let target = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
        .expect("drover holds its listening socket")
}

/// A bind that fails names where it was set and what to do: a port another
/// socket holds, a Unix socket in a directory that does not exist.
#[test]
fn a_bind_that_fails_says_where_it_was_set_and_what_to_do() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    for (bind, says) in [
        (
            format!("127.0.0.1:{port}"),
            format!(
                ":1:8: cannot listen on 127.0.0.1:{port}: Address already in use (os error 98): \
                 another socket listens on port {port} (`ss -ltnp 'sport = :{port}'` names its process)"
            ),
        ),
        (
            "unix:$DIR/missing/app.sock".to_string(),
            "/missing does not exist".to_string(),
        ),
    ] {
        let config = format!(
            "bind = [\"{bind}\"]\ncommand = [\"{}\"]\nworkers = 1\n",
            hello_bin()
        );
        let mut d = Start::config(&config).run();
        assert_eq!(d.wait_exit(LIMIT).code(), Some(1), "{}", d.log());
        let log = d.log();
        assert!(log.contains(&says), "{says:?} in {log}");
        assert!(log.contains("config.toml:1:8: cannot listen on"), "{log}");
        assert!(!log.contains("spawned"), "{log}");
    }
}

#[test]
fn fd_n_cannot_name_a_socket_drover_opened_itself() {
    // fd 5 is the socket drover binds for 127.0.0.1:0 (after its signal
    // pipe): adopting it a second time would close it twice.
    let mut d = Start::args(&[
        "-b",
        "127.0.0.1:0",
        "-b",
        "fd://5",
        "-w",
        "1",
        "--",
        hello_bin(),
    ])
    .run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(1), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains(
            "cannot listen on fd://5: descriptor 5 was not handed to drover when it started"
        ),
        "{log}"
    );
    assert!(!log.contains("spawned"), "{log}");
}

#[test]
fn a_reload_may_name_fd_n_only_for_a_socket_handed_in_and_not_yet_taken() {
    let handed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let handed_addr = handed.local_addr().unwrap();
    let config = |bind: &str| {
        format!(
            "bind = [{bind}]\ncommand = [\"{}\"]\nworkers = 1\nready = \"notify\"\n",
            hello_bin()
        )
    };
    let mut d = Start {
        pass: vec![(handed.into(), 5)],
        ..Start::config(&config("\"fd://5\", \"127.0.0.1:0\""))
    }
    .run();
    d.wait_log("all 1 workers ready");
    assert_eq!(get_ok(handed_addr, "/").status, 200);
    let own = d.addr(1).parse().unwrap();
    let rewrite = |text: String| std::fs::write(d.dir.path().join("config.toml"), text).unwrap();

    // drover's own listening socket, named by number.
    let own_fd = listening_fd(d.pid(), own);
    rewrite(config(&format!(
        "\"fd://5\", \"127.0.0.1:0\", \"fd://{own_fd}\""
    )));
    d.signal(Signal::SIGHUP);
    d.wait_log(&format!(
        "reload rejected, nothing changed: cannot listen on fd://{own_fd}: descriptor {own_fd} was not handed to drover"
    ));

    // fd 5 dropped by a reload, then named again: it was closed, and its
    // number may now be one of drover's own descriptors.
    rewrite(config("\"127.0.0.1:0\""));
    d.signal(Signal::SIGHUP);
    d.wait_log("reload applied");
    rewrite(config("\"127.0.0.1:0\", \"fd://5\""));
    d.signal(Signal::SIGHUP);
    d.wait_log("cannot listen on fd://5: descriptor 5 was already taken by an earlier fd://5");
    assert_eq!(
        get_ok(own, "/").status,
        200,
        "the current generation serves on"
    );

    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

#[test]
fn a_unix_socket_drover_cannot_connect_to_is_left_alone() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.sock");
    let _live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let inode = std::fs::metadata(&path).unwrap().ino();
    let bind = format!("unix:{}", path.display());
    let mode = |p: &std::path::Path, m| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    let start = if nix::unistd::geteuid().is_root() {
        // Another user's live socket (mode 0600) in a directory anyone may
        // write: drover, as nobody, gets EACCES on connect but could unlink.
        mode(&path, 0o600);
        mode(dir.path(), 0o777);
        Start {
            program: Some("setpriv".into()),
            ..Start::args(&[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                drover_bin(),
                "-b",
                &bind,
                "--",
                "true",
            ])
        }
    } else {
        // Our own socket without write permission: connect gets EACCES.
        mode(&path, 0o000);
        Start::args(&["-b", &bind, "--", "true"])
    };
    let mut d = start.run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(1), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("exists and drover cannot tell whether a server uses it (connecting failed: Permission denied"),
        "{log}"
    );
    assert_eq!(
        std::fs::metadata(&path).map(|m| m.ino()).ok(),
        Some(inode),
        "the live socket file is still there"
    );
}

/// How long drover says a worker took to be ready, from "worker N (pid P) ready in X ms".
fn ready_in_ms(log: &str, slot: u32) -> f64 {
    let needle = format!("worker {slot} (pid ");
    let line = log
        .lines()
        .find(|l| l.contains(&needle) && l.contains(") ready in "))
        .unwrap_or_else(|| panic!("no ready line for worker {slot}: {log}"));
    let rest = &line[line.find(") ready in ").unwrap() + ") ready in ".len()..];
    rest.split(' ').next().unwrap().parse().unwrap()
}

/// A worker that announces itself, boots for 2 s, then sends READY=1 and
/// sleeps (it serves nothing: readiness is what is tested).
const ANNOUNCING_WORKER: &str = "import os, socket, time\n\
p = os.environ['NOTIFY_SOCKET']\n\
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
s.sendto(b'X_DROVER_WILL_NOTIFY=1', p)\n\
time.sleep(2)\n\
s.sendto(b'READY=1', p)\n\
time.sleep(600)\n";

#[test]
fn by_default_a_worker_that_announces_itself_is_ready_at_ready_1() {
    // No `ready` setting: the default, "auto".
    let d = Start::args(&[
        "-w",
        "2",
        "-b",
        "127.0.0.1:0",
        "--",
        "python3",
        "-c",
        ANNOUNCING_WORKER,
    ])
    .run();
    let log = d.wait_log("all 2 workers ready");
    for slot in [1, 2] {
        let t = ready_in_ms(&log, slot);
        assert!(
            t >= 2000.0,
            "worker {slot} counted ready before its READY=1 ({t} ms): {log}"
        );
    }
    assert!(!log.contains("sent nothing to NOTIFY_SOCKET"), "{log}");
}

#[test]
fn by_default_a_silent_worker_is_ready_after_announce_timeout() {
    let d = Start::args(&[
        "-w",
        "2",
        "-b",
        "127.0.0.1:0",
        "--set",
        "announce_timeout=300ms",
        "--",
        "sleep",
        "600",
    ])
    .run();
    let log = d.wait_log("all 2 workers ready");
    for slot in [1, 2] {
        let t = ready_in_ms(&log, slot);
        assert!(
            t >= 300.0,
            "worker {slot} counted ready before announce_timeout ({t} ms): {log}"
        );
    }
    assert!(
        log.contains("sent nothing to NOTIFY_SOCKET within announce_timeout, 300ms: ready = \"auto\" counts it as spawned"),
        "{log}"
    );
}

#[test]
fn by_default_drovers_own_launchers_are_held_to_ready_1_from_their_exec() {
    // A program named drover-wsgi that says nothing for 1 s (an interpreter
    // slow to start on a saturated machine), then READY=1: known by name, it
    // is not taken for a silent server at announce_timeout.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let launcher = dir.path().join("drover-wsgi");
    let script = format!(
        "{}\n\
import os, socket, time\n\
time.sleep(1)\n\
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n\
time.sleep(600)\n",
        python3_shebang()
    );
    std::fs::write(&launcher, script).unwrap();
    std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = launcher.to_str().unwrap();
    let d = Start::args(&[
        "-w",
        "1",
        "-b",
        "127.0.0.1:0",
        "--set",
        "announce_timeout=300ms",
        "--",
        program,
        "app:app",
    ])
    .run();
    let log = d.wait_log("all 1 workers ready");
    let t = ready_in_ms(&log, 1);
    assert!(
        t >= 1000.0,
        "counted ready before its READY=1 ({t} ms): {log}"
    );
    assert!(!log.contains("sent nothing to NOTIFY_SOCKET"), "{log}");
}

#[test]
fn by_default_an_announced_worker_that_exits_3_before_ready_cannot_boot() {
    let worker = "import os, socket, sys\n\
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
s.sendto(b'X_DROVER_WILL_NOTIFY=1', os.environ['NOTIFY_SOCKET'])\n\
sys.exit(3)\n";
    let mut d = Start::args(&[
        "-w",
        "2",
        "-b",
        "127.0.0.1:0",
        "--",
        "python3",
        "-c",
        worker,
    ])
    .run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(3));
    let log = d.log();
    assert!(
        log.contains("cannot boot: exited with status 3 before it reported ready"),
        "{log}"
    );
}

#[test]
fn ready_spawn_still_counts_a_worker_ready_at_its_exec() {
    let d = Start::args(&[
        "-w",
        "1",
        "-b",
        "127.0.0.1:0",
        "--set",
        "ready=spawn",
        "--",
        "python3",
        "-c",
        ANNOUNCING_WORKER,
    ])
    .run();
    let log = d.wait_log("all 1 workers ready");
    let line = log
        .lines()
        .find(|l| l.contains("all 1 workers ready "))
        .unwrap();
    let rest = &line[line.find("ready ").unwrap() + "ready ".len()..];
    let t: f64 = rest.split(' ').next().unwrap().parse().unwrap();
    assert!(
        t < 2000.0,
        "ready = spawn waited for READY=1 ({t} ms): {log}"
    );
}

//! The Python side: the SDK's unit tests (run here so that they are part of
//! `cargo nextest run --workspace`), and drover running the Python WSGI worker
//! (`drover-wsgi`, installed from workers/python) with the example app, end to
//! end. The Python comes from the tests' venv (see common/python.rs).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, killpg};
use nix::unistd::Pid;

/// Two tests of `$name(core)`, `$name::python` and `$name::native`: the
/// tests of drover_wsgi's behaviour run with each of its cores (`--core`).
/// `auto` (what a user gets, and what the other test files run) is native
/// when the venv has it, which .ci/python-env installs.
macro_rules! with_each_core {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn python() {
                super::$name("python");
            }
            #[test]
            fn native() {
                super::$name("native");
            }
        }
    )*};
}

/// drover serving `app` with drover_wsgi (`wsgi_args` before the app), two
/// workers and a graceful_timeout of 10 s unless `extra` (top-level TOML)
/// says otherwise, and the example
/// app's cleanup file at $DIR/cleanup.
fn wsgi_config(wsgi_args: &[&str], app: &str, extra: &str) -> String {
    let mut command = vec![python::script("drover-wsgi")];
    command.extend(wsgi_args.iter().map(|s| s.to_string()));
    command.push(app.to_string());
    let command: Vec<String> = command.iter().map(|s| format!("{s:?}")).collect();
    let mut lines = vec![
        "bind = [\"127.0.0.1:0\"]".to_string(),
        format!("command = [{}]", command.join(", ")),
        "ready = \"notify\"".to_string(),
        format!("chdir = {:?}", python::examples_dir()),
    ];
    if !extra.contains("workers =") {
        lines.push("workers = 2".to_string());
    }
    if !extra.contains("graceful_timeout =") {
        lines.push("graceful_timeout = \"10s\"".to_string());
    }
    format!(
        "{}\n{extra}\n\n[env]\nEXAMPLE_CLEANUP_FILE = \"$DIR/cleanup\"\n",
        lines.join("\n")
    )
}

fn example(core: &str, extra: &str) -> String {
    wsgi_config(&["--core", core], "example_app:app", extra)
}

fn cleanup_lines(d: &Drover) -> Vec<String> {
    read_file(&d.dir.path().join("cleanup"))
        .lines()
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------
// The Python unit tests
// ---------------------------------------------------------------------------

/// The Python test modules; each runs as its own test here (they run in
/// parallel, and each is bounded on its own).
const PY_MODULES: &[&str] = &[
    "test_registry.py",
    "test_signals.py",
    "test_listen_notify.py",
    "test_http_parse.py",
    "test_wsgi_server.py",
    "test_production.py",
    "test_conformance.py",
    "test_scoreboard.py",
    "test_preload.py",
];

/// `python3 -m unittest discover -s workers/python/tests -t workers/python -p
/// <pattern> [-k <only>]` from the repository root; fails with its output
/// unless it passes.
fn run_python_unittests(pattern: &str, only: Option<&str>) {
    run_python_unittests_with(pattern, only, "auto");
}

/// The same with drover_wsgi's `core` (DROVER_WSGI_CORE for the workers the
/// tests start).
fn run_python_unittests_with(pattern: &str, only: Option<&str>, core: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut args = vec![
        "-m",
        "unittest",
        "discover",
        "-s",
        "workers/python/tests",
        "-t",
        "workers/python",
        "-p",
        pattern,
    ];
    if let Some(only) = only {
        args.extend(["-k", only]);
    }
    let mut child = Command::new(python::python())
        .args(&args)
        .current_dir(repo())
        .env("TMPDIR", dir.path())
        .env("DROVER_WSGI_CORE", core)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("the venv's python runs");
    let limit = Duration::from_secs(150);
    let began = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if began.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = read_file(&out_path);
    match status {
        Some(s) if s.success() => {
            let ran = output
                .lines()
                .find(|l| l.starts_with("Ran "))
                .unwrap_or("?");
            eprintln!("{pattern} ({core} core): {ran}");
            assert!(!ran.starts_with("Ran 0 "), "no Python test ran:\n{output}");
        }
        Some(s) => panic!("Python tests {pattern} failed ({s}):\n{output}"),
        None => panic!("Python tests {pattern} still running after {limit:?}:\n{output}"),
    }
}

#[test]
fn python_unit_tests_registry() {
    run_python_unittests("test_registry.py", None);
}

#[test]
fn python_unit_tests_signals() {
    run_python_unittests("test_signals.py", None);
}

#[test]
fn python_unit_tests_listen_notify() {
    run_python_unittests("test_listen_notify.py", None);
}

#[test]
fn python_unit_tests_http_parse() {
    run_python_unittests("test_http_parse.py", None);
}

#[test]
fn python_unit_tests_scoreboard() {
    run_python_unittests("test_scoreboard.py", None);
}

fn python_unit_tests_wsgi_server_http(core: &str) {
    run_python_unittests_with("test_wsgi_server.py", Some("ServerTest"), core);
}
with_each_core!(python_unit_tests_wsgi_server_http);

fn python_unit_tests_preload(core: &str) {
    run_python_unittests_with("test_preload.py", None, core);
}
with_each_core!(python_unit_tests_preload);

fn python_unit_tests_wsgi_server_held_responses(core: &str) {
    run_python_unittests_with("test_wsgi_server.py", Some("HeldResponsesTest"), core);
}
with_each_core!(python_unit_tests_wsgi_server_held_responses);

fn python_unit_tests_wsgi_server_lifecycle(core: &str) {
    run_python_unittests_with("test_wsgi_server.py", Some("LifecycleTest"), core);
}
with_each_core!(python_unit_tests_wsgi_server_lifecycle);

fn python_unit_tests_production_features(core: &str) {
    run_python_unittests_with("test_production.py", None, core);
}
with_each_core!(python_unit_tests_production_features);

fn python_unit_tests_http_conformance(core: &str) {
    run_python_unittests_with("test_conformance.py", None, core);
}
with_each_core!(python_unit_tests_http_conformance);

#[test]
fn every_python_test_module_is_run() {
    let mut found: Vec<String> = std::fs::read_dir(python::test_apps_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("test_") && n.ends_with(".py"))
        .collect();
    found.sort();
    let mut listed: Vec<String> = PY_MODULES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(
        found, listed,
        "add new Python test modules to PY_MODULES (and a #[test] for them)"
    );
}

/// The venv has the package as pip installed it: both modules (with their
/// `py.typed`) come from site-packages, not from the checkout, and the
/// console script and `python -m drover_wsgi` both run.
#[test]
fn the_package_is_installed_not_imported_from_the_checkout() {
    let probe = "import os, drover_worker, drover_wsgi\n\
                 for m in (drover_worker, drover_wsgi):\n\
                 \x20   d = os.path.dirname(m.__file__)\n\
                 \x20   print(d, os.path.exists(os.path.join(d, 'py.typed')))";
    let out = Command::new(python::python())
        .args(["-c", probe])
        .current_dir(repo())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let src = repo().join("workers/python").display().to_string();
    for line in text.lines() {
        assert!(line.contains("site-packages/drover_"), "{line}");
        assert!(
            !line.starts_with(&src),
            "imported from the checkout: {line}"
        );
        assert!(line.ends_with(" True"), "py.typed is installed: {line}");
    }
    assert_eq!(text.lines().count(), 2, "{text}");
    for argv in [
        vec![python::script("drover-wsgi"), "--help".to_string()],
        vec![
            python::python(),
            "-m".into(),
            "drover_wsgi".into(),
            "--help".into(),
        ],
    ] {
        let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{argv:?}: {help}");
        assert!(help.contains("usage: drover-wsgi"), "{argv:?}: {help}");
    }
}

// ---------------------------------------------------------------------------
// drover + drover_wsgi + example_app
// ---------------------------------------------------------------------------

fn the_example_app_answers_with_its_pid(core: &str) {
    let d = Start::config(&example(core, "")).run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let addr = d.tcp_addr();
    let r = get_ok(addr, "/");
    let pid = r.worker_pid();
    assert_eq!(r.body, format!("hello from pid {pid}\n"));
    assert_eq!(r.header("Content-Type"), Some("text/plain"));
    assert!(
        workers.iter().any(|w| w.as_raw() == pid),
        "{pid} is one of {workers:?}"
    );
    let r = get_ok(addr, "/sleep?ms=10");
    assert_eq!(r.body, "slept 10 ms\n");
    assert_eq!(get(addr, "/nope").unwrap().status, 404);
    assert_eq!(get(addr, "/sleep?ms=x").unwrap().status, 400);
    assert!(
        d.log().contains("drover_wsgi["),
        "the worker's log reaches drover's: {}",
        d.log()
    );
    let line = match core {
        "native" => "native core (drover_wsgi_native ",
        _ => "pure-Python core (--core python)",
    };
    assert_eq!(
        d.log().matches(line).count(),
        2,
        "one line per worker says which core runs: {}",
        d.log()
    );
}
with_each_core!(the_example_app_answers_with_its_pid);

/// A shutdown with a slow request in flight (see the common harness), and
/// each Python worker's cleanup registry ran.
fn graceful_with_request_in_flight(start: Start, stop: impl FnOnce(&Drover)) {
    let (d, workers) = stop_with_request_in_flight(start, stop);
    let log = d.log();
    let lines = cleanup_lines(&d);
    assert_eq!(
        lines.len(),
        2,
        "each worker ran its cleanup registry: {lines:?}"
    );
    for w in &workers {
        assert!(
            lines.contains(&format!("cleanup pid={w}")),
            "{w} cleaned up: {lines:?}"
        );
        assert!(
            log.contains(&format!("(pid {w}) exited with status 0")),
            "{log}"
        );
    }
    assert!(log.contains("stopping (graceful)"), "{log}");
}

fn sigterm_drains_the_python_worker_and_runs_its_cleanup(core: &str) {
    graceful_with_request_in_flight(Start::config(&example(core, "")), |d| {
        d.signal(Signal::SIGTERM)
    });
}
with_each_core!(sigterm_drains_the_python_worker_and_runs_its_cleanup);

fn ctrl_c_stops_the_python_workers_gracefully(core: &str) {
    let start = Start {
        own_group: true,
        ..Start::config(&example(core, ""))
    };
    // As a terminal does: SIGINT to the whole foreground process group. The
    // workers are in their own groups: only drover gets it, and it drains.
    graceful_with_request_in_flight(start, |d| killpg(d.pid(), Signal::SIGINT).unwrap());
}
with_each_core!(ctrl_c_stops_the_python_workers_gracefully);

fn sigquit_is_quick_for_the_python_worker(core: &str) {
    let mut d = Start::config(&example(core, "quick_timeout = \"5s\"")).run();
    d.wait_log("all 2 workers ready");
    d.wait_workers(2);
    // A request that would hold a graceful stop for a minute.
    let hang = get_in_flight(d.tcp_addr(), "/sleep?ms=60000");
    let began = Instant::now();
    d.signal(Signal::SIGQUIT);
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert_eq!(
        status.code(),
        Some(0),
        "the workers exited by themselves: {log}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "quick: {:?}",
        began.elapsed()
    );
    assert!(log.contains("stopping (quick)"), "{log}");
    assert_eq!(
        cleanup_lines(&d).len(),
        2,
        "quick stop still runs the cleanup"
    );
    assert!(
        hang.join().unwrap().is_err(),
        "the abandoned request gets no response"
    );
}
with_each_core!(sigquit_is_quick_for_the_python_worker);

#[test]
fn a_wrong_command_line_stops_drover_with_status_3() {
    // argparse's usage error was status 2, which drover took for a crash
    // and respawned forever; for each launcher, with the default ready mode.
    for launcher in [
        "drover-wsgi",
        "drover-uvicorn",
        "drover-granian",
        "drover-hypercorn",
        "drover-aiohttp",
    ] {
        let program = python::script(launcher);
        let mut d = Start::args(&[
            "-w",
            "2",
            "-b",
            "127.0.0.1:0",
            "--",
            &program,
            "--bogus",
            "x:app",
        ])
        .run();
        assert_eq!(
            d.wait_exit(LIMIT).code(),
            Some(3),
            "{launcher}: {}",
            d.log()
        );
        let log = d.log();
        assert!(
            log.contains("error: unrecognized arguments: --bogus"),
            "{log}"
        );
        assert!(log.contains("cannot boot: exited with status 3"), "{log}");
        assert!(
            log.matches("spawned").count() <= 2,
            "no respawn loop: {log}"
        );
    }
}

#[test]
fn an_app_that_fails_to_import_stops_drover_with_status_3() {
    let tests_dir = python::test_apps_dir();
    let config = wsgi_config(&["--chdir", &tests_dir], "broken_app:app", "");
    let mut d = Start::config(&config).run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(3));
    let log = d.log();
    assert!(log.contains("Traceback (most recent call last)"), "{log}");
    assert!(
        log.contains("ImportError: broken_app cannot be imported (on purpose)"),
        "{log}"
    );
    assert!(
        log.contains("cannot boot: cannot load the application 'broken_app:app'"),
        "{log}"
    );
    assert!(
        log.contains("cannot boot: exited with status 3 before it reported ready"),
        "{log}"
    );
    assert!(
        log.matches("spawned").count() <= 2,
        "no respawn loop: {log}"
    );
}

/// A reload whose new worker cannot import the app (a SyntaxError), then one
/// whose import hangs past boot_timeout: each rollback line names the worker
/// (slot, pid), how it ended, and where its output (the traceback, printed
/// before the line and without the pid on its own lines) is; the answer of
/// `drover ctl reload` and `ctl status` name the same worker and end. The
/// code before named no place to look, and the hang as 'killed by SIGABRT
/// (boot timeout) before it was ready', not by its boot_timeout.
#[test]
fn a_rolled_back_reload_names_the_failed_worker_and_where_its_traceback_is() {
    let app = tempfile::tempdir().unwrap();
    let write = |body: &str| {
        std::fs::write(
            app.path().join("rollback_app.py"),
            format!(
                "{body}\ndef app(environ, start_response):\n    \
                 start_response('200 OK', [])\n    return [b'ok']\n"
            ),
        )
        .unwrap()
    };
    write("");
    let config = wsgi_config(
        &["--chdir", &app.path().display().to_string()],
        "rollback_app:app",
        "control_socket = \"$DIR/ctl.sock\"\nboot_timeout = \"3s\"\nabort_grace = \"1s\"",
    );
    let d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");

    write("def broken(:");
    let (code, out) = d.ctl(&["reload"]);
    assert_eq!(code, 1, "{out}");
    let pid = pid_after(&out, "rolled back: worker 1 (pid ");
    let failed = format!(
        "worker 1 (pid {pid}) of the new generation exited with status 3 before it was ready"
    );
    assert!(out.contains(&failed), "{out}");
    let line = format!(
        "reload rolled back: {failed}; generation 1 keeps serving; \
         the output of pid {pid}, its standard error, is above"
    );
    let log = d.wait_log(&line);
    let before = &log[..log.find(&line).unwrap()];
    assert!(before.contains("SyntaxError"), "{log}");
    assert!(
        before.contains(&format!("drover_wsgi[{pid}]: cannot boot")),
        "{log}"
    );
    let (_, status) = d.ctl(&["status"]);
    assert!(
        status.contains(&format!("last reload rolled back: {failed}")),
        "{status}"
    );

    write("import time\ntime.sleep(60)");
    let (code, out) = d.ctl(&["reload"]);
    assert_eq!(code, 1, "{out}");
    let pid = pid_after(&out, "rolled back: worker 1 (pid ");
    let failed = format!(
        "worker 1 (pid {pid}) of the new generation was not ready within boot_timeout (3s) \
         and killed by SIGABRT"
    );
    assert!(out.contains(&failed), "{out}");
    let line = format!(
        "reload rolled back: {failed}; generation 1 keeps serving; \
         the output of pid {pid}, its standard error, is above"
    );
    let log = d.wait_log(&line);
    // faulthandler's dump of where the import hangs.
    assert!(
        log[..log.find(&line).unwrap()].contains("rollback_app.py\", line 2 in <module>"),
        "{log}"
    );
    assert_eq!(get_ok(d.tcp_addr(), "/").status, 200);
}

fn max_requests_recycles_the_worker(core: &str) {
    let config = wsgi_config(
        &[
            "--core",
            core,
            "--max-requests",
            "5",
            "--max-requests-jitter",
            "0",
        ],
        "example_app:app",
        "workers = 1",
    );
    let d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let addr = d.tcp_addr();
    let first = d.wait_workers(1)[0].as_raw();
    let pids: Vec<i32> = (0..10).map(|_| get_ok(addr, "/").worker_pid()).collect();
    assert_eq!(&pids[..5], &[first; 5], "{pids:?}");
    // The recycled worker stops accepting after its 5th request, but takes
    // what was already queued on the listener (a 6th request sent the moment
    // the 5th was answered can be): from the first new pid on, only new ones.
    let switched = pids
        .iter()
        .position(|p| *p != first)
        .unwrap_or_else(|| panic!("no new worker after 5 requests: {pids:?}"));
    assert!(switched <= 6, "the old worker served on: {pids:?}");
    assert!(
        pids[switched..].iter().all(|p| *p != first),
        "a new worker after 5 requests: {pids:?}"
    );
    let log = d.wait_log(&format!("worker 1 (pid {first}) exited with status 0"));
    assert!(
        log.contains("served 5 requests (--max-requests): recycling"),
        "{log}"
    );
    assert!(
        log.contains(&format!("worker 1 (pid {first}) is stopping")),
        "STOPPING=1 was sent: {log}"
    );
    assert!(
        log.contains(&format!(
            "INFO worker 1 (pid {first}) exited with status 0 after"
        )) && log.contains("as it announced (STOPPING=1); respawning now"),
        "replaced at once, not as a crash, nor warned about: {log}"
    );
    wait_for("the recycled worker's cleanup", LIMIT, || {
        cleanup_lines(&d)
            .contains(&format!("cleanup pid={first}"))
            .then_some(())
    });
}
with_each_core!(max_requests_recycles_the_worker);

/// Reads one response with a Content-Length body from a kept-alive stream.
fn read_one(s: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "connection closed mid-head: {raw:?}"
        );
        raw.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let len: usize = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("Content-Length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    raw.extend_from_slice(&body);
    parse_response(&raw).unwrap()
}

fn keep_alive_and_an_idle_connection_at_shutdown(core: &str) {
    let mut d = Start::config(&example(core, "")).run();
    d.wait_log("all 2 workers ready");
    let addr: SocketAddr = d.tcp_addr();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let a = read_one(&mut s);
    write!(s, "GET /sleep?ms=1 HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let b = read_one(&mut s);
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(a.worker_pid(), b.worker_pid(), "one connection, one worker");
    assert_eq!(a.header("Connection"), None, "kept alive");
    // The connection is now idle; a shutdown closes it cleanly (EOF, no reset).
    d.signal(Signal::SIGTERM);
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).expect("EOF, not a reset");
    assert_eq!(n, 0, "nothing more was sent: {rest:?}");
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    assert_eq!(cleanup_lines(&d).len(), 2);
}
with_each_core!(keep_alive_and_an_idle_connection_at_shutdown);

fn graceful_shutdown_under_load_resets_nothing(core: &str) {
    let mut d = Start::config(&example(core, "")).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let load = Load::start(addr, 50, "/sleep?ms=5");
    wait_answered(&load, 1000);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    wait_for("refusals after exit", LIMIT, || {
        get(addr, "/").is_err().then_some(())
    });
    let o = load.finish();
    eprintln!("outcomes: {o:?}");
    assert!(o.ok > 50, "the load was served before the shutdown: {o:?}");
    assert!(
        o.refused > 0,
        "connections were refused after the shutdown: {o:?}"
    );
    assert_eq!((o.reset, o.truncated, o.other), (0, 0, 0), "{o:?}");
    assert_eq!(cleanup_lines(&d).len(), 2);
}
with_each_core!(graceful_shutdown_under_load_resets_nothing);

/// The count of each `listeners closed (...): N queued connection(s) taken`
/// line of a stopping drover_wsgi worker, in the order logged.
fn queued_taken(log: &str) -> Vec<usize> {
    log.lines()
        .filter_map(|l| {
            l.rsplit("): ")
                .next()?
                .strip_suffix(" queued connection(s) taken")?
                .parse::<usize>()
                .ok()
        })
        .collect()
}

/// The bug of issue 13: on a graceful stop with a full listen queue, one
/// worker took every queued connection and abandoned what its threads could
/// not serve by its drain deadline, while its siblings exited idle (24 and 36
/// of 64 requests failed). Now a worker takes a queued connection only when a
/// request of the usual duration fits before its deadline, and leaves the
/// rest to the others: 64 clients, 1 s requests, 4 workers of 4 threads (16
/// in flight, 48 queued): every request is answered. graceful_timeout 8 s
/// (a drain deadline at 6.4 s): the queue needs 3.5 s after the stop, and a
/// loaded machine's requests take up to 1.5 s (at 5 s the margin was half a
/// second, and a loaded CI runner lost requests); a worker that takes the
/// whole queue needs 12 s.
fn a_graceful_stop_with_a_full_queue_serves_every_accepted_request(core: &str) {
    let config = wsgi_config(
        &["--core", core],
        "example_app:app",
        "workers = 4\ngraceful_timeout = \"8s\"",
    )
    .replace("graceful_timeout = \"10s\"\n", "");
    let mut d = Start::config(&config).run();
    d.wait_log("all 4 workers ready");
    let addr = d.tcp_addr();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let sent = sent.clone();
            std::thread::spawn(move || -> std::io::Result<Response> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_read_timeout(Some(LIMIT))?;
                write!(
                    s,
                    "GET /sleep?ms=1000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                )?;
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut raw = Vec::new();
                s.read_to_end(&mut raw)?;
                parse_response(&raw)
            })
        })
        .collect();
    // Every request sent, and most queued (48, less the connections a worker
    // accepted before their request arrived: it parks those and accepts more).
    wait_for("64 requests sent, about 48 of them queued", LIMIT, || {
        let all = sent.load(std::sync::atomic::Ordering::SeqCst) == 64;
        (all && listen_queues(addr)?.1 >= 40).then_some(())
    });
    // Half a second into the first 16 requests.
    std::thread::sleep(Duration::from_millis(500));
    d.signal(Signal::SIGTERM);
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| match r {
            Ok(r) if r.status == 200 => None,
            Ok(r) => Some(format!("status {}", r.status)),
            Err(e) => Some(e.to_string()),
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 64 failed: {failed:?}\n{log}",
        failed.len()
    );
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!log.contains("abandoning"), "{log}");
    // Each worker took its share of the queue (no worker all of it).
    let taken = queued_taken(&log);
    assert_eq!(taken.len(), 4, "{log}");
    assert!(
        taken.iter().all(|n| (1..=20).contains(n)),
        "{taken:?}: {log}"
    );
}
with_each_core!(a_graceful_stop_with_a_full_queue_serves_every_accepted_request);

/// The defect behind truncated responses in a reload under load (seen in CI:
/// `abandoning 6/8 busy thread(s) (drain deadline)`): a retired worker went
/// on taking connections from the queue it shares with its replacements,
/// which the clients kept full, until its drain deadline, and abandoned the
/// requests it was in then. A stopping worker now takes only as many as the
/// queue held when its stop came. 64 clients of 20 ms requests, 2 threads
/// per worker: the queue never empties, so the old code took a drain's worth
/// (hundreds); no queue ever holds more than the 64 clients.
fn a_retired_worker_takes_only_what_was_queued_at_its_stop(core: &str) {
    let config = wsgi_config(&["--core", core, "--threads", "2"], "example_app:app", "");
    let d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    let load = Load::start(d.tcp_addr(), 64, "/sleep?ms=20");
    wait_answered(&load, 200);
    d.signal(Signal::SIGHUP);
    d.wait_log("reload applied");
    d.wait_log_count("listeners closed", 2);
    let o = load.finish();
    let log = d.log();
    assert_eq!(
        (o.refused, o.reset, o.truncated, o.other),
        (0, 0, 0, 0),
        "{o:?}\n{log}"
    );
    let taken = queued_taken(&log);
    assert_eq!(taken.len(), 2, "{log}");
    assert!(taken.iter().all(|n| *n <= 64), "{taken:?}: {log}");
    assert!(!log.contains("abandoning"), "{log}");
}
with_each_core!(a_retired_worker_takes_only_what_was_queued_at_its_stop);

/// The defect of issue 13's user trial: with `--max-requests`, a stop that
/// finds every worker either recycling (listeners closed) or still booting
/// reset the connections queued meanwhile. drover's SIGTERM reached the
/// booting worker before it had any handler, it died, and with it the last
/// copy of the listener. Now a worker booting while none serves gets its
/// stop once it is ready, and drains the queue. The replacement here boots
/// behind a shell's `sleep` (a slow interpreter start): on the old code its
/// SIGTERM killed the shell and every queued client saw a reset.
#[test]
fn a_stop_while_the_only_worker_boots_serves_the_queued_connections() {
    let dir = tempfile::tempdir().unwrap();
    let slow = dir.path().join("slow");
    // The first worker recycles after 1 request; its successor sleeps
    // before its exec, then serves up to 1000.
    let script = r#"if [ -e "$SLOW" ]; then sleep 2; exec "$0" --max-requests 1000 "$@"; fi; exec "$0" --max-requests 1 "$@""#;
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\ngraceful_timeout = \"10s\"\n\
         chdir = {:?}\ncommand = [\"/bin/sh\", \"-c\", {script:?}, {:?}, \"--max-requests-jitter\", \"0\", \"example_app:app\"]\n",
        python::examples_dir(),
        python::script("drover-wsgi"),
    );
    let mut start = Start::config(&config);
    start.env = vec![("SLOW".into(), slow.display().to_string())];
    let mut d = start.run();
    d.wait_log("all 1 workers ready");
    let first = d.wait_workers(1)[0].as_raw();
    std::fs::write(&slow, "").unwrap();
    let addr = d.tcp_addr();
    assert_eq!(get_ok(addr, "/").worker_pid(), first);
    d.wait_log(&format!("worker 1 (pid {first}) exited with status 0"));
    d.wait_log_count("spawned", 2);
    let queued: Vec<_> = (0..3)
        .map(|_| {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(LIMIT)).unwrap();
            std::thread::spawn(move || get_over(s, "/"))
        })
        .collect();
    wait_for("3 connections queued", LIMIT, || {
        listen_queues(addr).filter(|q| q.1 >= 3)
    });
    let log = d.log();
    assert_eq!(
        log.matches("ready in").count(),
        1,
        "the successor is still booting: {log}"
    );
    d.signal(Signal::SIGTERM);
    for q in queued {
        let r = q.join().unwrap();
        let log = d.log();
        let r = r.unwrap_or_else(|e| panic!("a queued request failed: {e}\n{log}"));
        assert_eq!(r.status, 200, "{log}");
        assert_ne!(r.worker_pid(), first, "{log}");
    }
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("ready during the shutdown: sending SIGTERM"),
        "{log}"
    );
}

/// The kernel hands a signal sent to a process to any of its threads that
/// does not block it; drover_wsgi's handler (which records the stop) runs in
/// the main thread only, when it runs bytecode. A SIGTERM taken by one of
/// its pool threads (sent here with tgkill, as the kernel may choose) stops
/// the worker as one taken by the main thread does: on the old code the main
/// thread slept on in select, and a stop waited for drover's SIGKILL. (The
/// native core's threads block the stop signals: the kernel never picks
/// them, which is checked instead.)
fn drover_wsgi_stops_when_a_pool_thread_takes_the_stop_signal(core: &str) {
    let mut d = Start::config(&example(core, "workers = 1")).run();
    d.wait_log("all 1 workers ready");
    let pid = d.wait_workers(1)[0].as_raw();
    // (tid, whether it blocks SIGTERM) of each thread but the main one.
    let others = wait_for("the pool threads", LIMIT, || {
        let tids: Vec<(i32, bool)> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|t| *t != pid)
            .map(|t| {
                let status = read_file(Path::new(&format!("/proc/{pid}/task/{t}/status")));
                let blocked = status
                    .lines()
                    .find_map(|l| l.strip_prefix("SigBlk:"))
                    .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                    .unwrap_or(0);
                (t, blocked & (1 << (libc::SIGTERM - 1)) != 0)
            })
            .collect();
        (tids.len() >= 4).then_some(tids)
    });
    let began = Instant::now();
    match others.iter().find(|(_, blocks)| !blocks) {
        Some((tid, _)) => {
            // SAFETY: tgkill has no memory effects; the ids are the worker's.
            let sent = unsafe { libc::syscall(libc::SYS_tgkill, pid, *tid, libc::SIGTERM) };
            assert_eq!(sent, 0, "tgkill: {}", std::io::Error::last_os_error());
        }
        None if core == "native" => kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap(),
        None => panic!("the pool threads block SIGTERM: {others:?}"),
    }
    wait_for("the worker to stop", Duration::from_secs(10), || {
        d.log()
            .contains(&format!("worker 1 (pid {pid}) exited with status 0"))
            .then_some(())
    });
    let log = d.log();
    assert!(
        log.contains(&format!("drover_wsgi[{pid}]: stopping (graceful)")),
        "{log}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}
with_each_core!(drover_wsgi_stops_when_a_pool_thread_takes_the_stop_signal);

/// A client of a kept-alive connection sends its next request just as the
/// stop comes (wrk does so the instant it has a response; a reload or a
/// --max-requests recycle under keep-alive load): it must be answered
/// (Connection: close), not see the end of the stream. hello does so
/// (tests/drain.rs); drover_wsgi closed an idle kept-alive connection at
/// once, so wrk counted read errors at every reload and recycle.
fn a_kept_alive_request_sent_just_after_the_stop_is_answered(core: &str) {
    let mut d = Start::config(&example(core, "workers = 1")).run();
    d.wait_log("all 1 workers ready");
    let mut s = TcpStream::connect_timeout(&d.tcp_addr(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let first = read_one(&mut s);
    assert_eq!((first.status, first.header("Connection")), (200, None));
    d.signal(Signal::SIGTERM);
    d.wait_log("stopping (graceful)");
    // Sent either way: a client does not know of the stop.
    let sent = write!(s, "GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    let second = parse_response(&raw);
    assert!(
        sent.is_ok() && read.is_ok() && second.as_ref().is_ok_and(|r| r.status == 200),
        "closed under the client: write {sent:?}, read {read:?}, got {:?}",
        String::from_utf8_lossy(&raw)
    );
    assert_eq!(second.unwrap().header("Connection"), Some("close"));
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}
with_each_core!(a_kept_alive_request_sent_just_after_the_stop_is_answered);

/// drover_wsgi's default --keepalive-requests (1000): a keep-alive client
/// making 2,500 requests sees the 1000th and the 2000th response say
/// `Connection: close`, each followed by a clean end of the stream (EOF, not
/// a reset), and reconnects: three connections, of 1000, 1000 and 500
/// requests. (Which of the two workers takes each new connection is up to
/// the accepts: not asserted.)
fn the_default_keepalive_requests_close_every_1000th_response(core: &str) {
    let d = Start::config(&example(core, "")).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let mut per_conn: Vec<usize> = Vec::new();
    let mut pids: Vec<i32> = Vec::new();
    let mut conn: Option<TcpStream> = None;
    for _ in 0..2500 {
        let s = conn.get_or_insert_with(|| {
            per_conn.push(0);
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(LIMIT)).unwrap();
            s
        });
        write!(s, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let r = read_one(s);
        assert_eq!(r.status, 200);
        *per_conn.last_mut().unwrap() += 1;
        if per_conn.last() == Some(&1) {
            pids.push(r.worker_pid());
        }
        match r.header("Connection") {
            None => {}
            Some("close") => {
                let mut rest = Vec::new();
                let n = s.read_to_end(&mut rest).expect("EOF, not a reset");
                assert_eq!(n, 0, "nothing after the last response: {rest:?}");
                conn = None;
            }
            Some(other) => panic!("Connection: {other}"),
        }
    }
    assert_eq!(per_conn, [1000, 1000, 500], "requests per connection");
    eprintln!("the three connections' workers: {pids:?}");
}
with_each_core!(the_default_keepalive_requests_close_every_1000th_response);

/// The example app with the habits of tests/workers/app_habits.py that the
/// `APP_*` variables in `env` (lines of TOML) switch on.
fn app_with_habits(core: &str, extra: &str, env: &str) -> String {
    let habits = repo().join("tests/workers").display().to_string();
    format!(
        "{}PYTHONPATH = {habits:?}\n{env}\n",
        wsgi_config(&["--core", core], "app_habits:app", extra)
    )
}

/// An app whose own SIGTERM handler calls `sys.exit(0)` (a common way to
/// "exit cleanly" in a container). The SDK chains it after its own, and its
/// SystemExit unwound drover-wsgi's main thread at once: the request in
/// flight got no response, nothing was drained (curl: "Empty reply from
/// server"; found by the user trial with Flask). Now that exit waits for the
/// drain and the registry, and the log says so.
fn an_app_whose_own_sigterm_handler_exits_is_drained_first(core: &str) {
    let start = Start::config(&app_with_habits(core, "", "APP_SIGTERM_EXIT = \"1\""));
    let (d, workers) = stop_with_request_in_flight(start, |d| d.signal(Signal::SIGTERM));
    let log = d.log();
    let lines = cleanup_lines(&d);
    for w in &workers {
        assert!(
            log.contains(&format!("own SIGTERM handler pid={w}")),
            "the app's handler ran in {w}: {log}"
        );
        assert!(
            lines.contains(&format!("cleanup pid={w}")),
            "{w} ran its registry: {lines:?}"
        );
    }
    assert!(
        log.contains("handler raised SystemExit(0): the worker exits once it has drained"),
        "{log}"
    );
}
with_each_core!(an_app_whose_own_sigterm_handler_exits_is_drained_first);

/// Two workers of app_habits with the habit `env` and a stop budget of 3 s,
/// one request served, then SIGTERM: drover once it exited, the workers'
/// pids, its exit status and its log.
fn stopped_with_habit(core: &str, env: &str) -> (Drover, Vec<Pid>, ExitStatus, String) {
    // The workers are told a graceful_timeout of 3 s, and drover kills them
    // at 10 s: with both at 3 s, the SDK's last resort (faulthandler, 0.1 s
    // past the budget) leaves 0.15 s before drover's SIGKILL, and on a loaded
    // machine (load 20 on 2 cores) the SIGKILL came first, 16 ms before the
    // worker's own exit (status 1) was reaped. What is tested is that the
    // worker ends itself at its budget, not how soon a loaded machine runs it.
    let config = app_with_habits(core, "graceful_timeout = \"10s\"", env).replace(
        "command = [",
        "command = [\"env\", \"DROVER_GRACEFUL_TIMEOUT=3\", ",
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    get_ok(d.tcp_addr(), "/");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    (d, workers, status, log)
}

/// An app that starts a non-daemon thread that never ends (a queue consumer,
/// a scheduler): the interpreter's exit waits for it, and drover killed the
/// worker at graceful_timeout (exit status 4, "still running at its stop
/// deadline; sending SIGKILL") with nothing in the log to say why. Now the
/// worker names the thread, and exits 0 at the end of its stop budget, after
/// its registry.
fn an_app_thread_that_never_ends_does_not_hold_the_worker_to_sigkill(core: &str) {
    let (d, workers, status, log) = stopped_with_habit(core, "APP_NON_DAEMON_THREAD = \"1\"");
    assert_eq!(status.code(), Some(0), "no worker was killed: {log}");
    assert!(!log.contains("SIGKILL"), "{log}");
    assert!(
        log.contains("exit waits for the application's non-daemon thread(s) 'queue-consumer'"),
        "{log}"
    );
    let lines = cleanup_lines(&d);
    for w in &workers {
        assert!(
            log.contains(&format!("(pid {w}) exited with status 0")),
            "{log}"
        );
        assert!(lines.contains(&format!("cleanup pid={w}")), "{lines:?}");
    }
}
with_each_core!(an_app_thread_that_never_ends_does_not_hold_the_worker_to_sigkill);

/// The same thread, computing in C with the GIL held (0.6 s) across the
/// end of the stop budget: the exit's deadline thread gets its turn late
/// there, as on a loaded machine. faulthandler's last resort, armed at the start of the
/// exit, fired 0.1 s past the budget, before it: the workers, whose cleanup
/// had finished, exited 1 with a stack dump. It is now armed only once the
/// threads are joined (the teardown), and the workers exit 0.
fn an_app_thread_that_holds_the_gil_does_not_make_a_clean_stop_exit_1(core: &str) {
    let (d, workers, status, log) = stopped_with_habit(core, "APP_NON_DAEMON_THREAD = \"gil\"");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!log.contains("Timeout ("), "faulthandler fired: {log}");
    let lines = cleanup_lines(&d);
    for w in &workers {
        assert!(
            log.contains(&format!("(pid {w}) exited with status 0")),
            "{log}"
        );
        assert!(lines.contains(&format!("cleanup pid={w}")), "{lines:?}");
    }
}
with_each_core!(an_app_thread_that_holds_the_gil_does_not_make_a_clean_stop_exit_1);

/// An app whose teardown hangs (a finalizer that waits, run as the
/// interpreter clears its modules): no Python thread runs then, so the SDK's
/// exit deadline thread could not end it, and drover killed the worker at
/// graceful_timeout (exit status 4, SIGKILL). Now faulthandler's timer ends
/// it just past its stop budget, with every thread's stack on stderr.
fn an_app_whose_teardown_hangs_does_not_hold_the_worker_to_sigkill(core: &str) {
    let (d, workers, status, log) = stopped_with_habit(core, "APP_TEARDOWN_HANG = \"1\"");
    assert!(!log.contains("SIGKILL"), "no worker was killed: {log}");
    assert_ne!(status.code(), Some(4), "{log}");
    // Where it hung, for the operator: the finalizer's frame.
    assert!(log.contains("in __del__"), "{log}");
    let lines = cleanup_lines(&d);
    for w in &workers {
        assert!(
            log.contains(&format!("(pid {w}) exited with status 1")),
            "{log}"
        );
        assert!(lines.contains(&format!("cleanup pid={w}")), "{lines:?}");
    }
}
with_each_core!(an_app_whose_teardown_hangs_does_not_hold_the_worker_to_sigkill);

/// The same thread in a worker that `--max-requests` recycles: the worker
/// said STOPPING=1, drained and ran its registry, then its exit waited for
/// the thread forever, and drover waits for a recycled worker's exit before
/// it starts the replacement: the slot served nothing from then on (with
/// one worker, every request after the 3rd hung; found by the user trial).
/// Now the worker exits at the end of its stop budget and is replaced.
fn a_worker_recycled_with_an_app_thread_that_never_ends_is_replaced(core: &str) {
    let habits = repo().join("tests/workers").display().to_string();
    let config = format!(
        "{}PYTHONPATH = {habits:?}\nAPP_NON_DAEMON_THREAD = \"1\"\n",
        wsgi_config(
            &["--core", core, "--max-requests", "3"],
            "app_habits:app",
            "workers = 1\ngraceful_timeout = \"3s\""
        )
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let first = d.wait_workers(1)[0];
    let addr = d.tcp_addr();
    for _ in 0..3 {
        assert_eq!(get_ok(addr, "/").worker_pid(), first.as_raw());
    }
    // Answered by the replacement, within the recycled worker's budget
    // (2.75 s) and its successor's boot.
    let r = get(addr, "/").expect("the request after the recycle is answered");
    assert_eq!(r.status, 200);
    assert_ne!(r.worker_pid(), first.as_raw());
    let log = d.log();
    assert!(
        log.contains(&format!("(pid {first}) exited with status 0")),
        "{log}"
    );
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}
with_each_core!(a_worker_recycled_with_an_app_thread_that_never_ends_is_replaced);

/// A worker that recycles itself (--max-requests) with a request still
/// running that outlasts its budget (an endless stream, a slow client's
/// download): drover kills a worker graceful_timeout after its STOPPING=1,
/// so the worker abandons the request at its drain deadline, counted from
/// that STOPPING=1, runs its registry and exits 0. Before, a recycle had no
/// drain deadline: the worker waited for the request until drover's
/// SIGKILL, its registry never ran, and the exit counted as a failure of
/// the slot (found by the user trial, with a Flask SSE stream).
fn a_recycling_worker_abandons_a_request_that_outlasts_its_budget(core: &str) {
    let config = wsgi_config(
        &["--core", core, "--max-requests", "2"],
        "example_app:app",
        "workers = 1\ngraceful_timeout = \"3s\"",
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let first = d.wait_workers(1)[0];
    let addr = d.tcp_addr();
    let endless = get_in_flight(addr, "/sleep?ms=600000");
    assert_eq!(get_ok(addr, "/").worker_pid(), first.as_raw()); // the 2nd: recycles
    let log = d.wait_log(&format!("(pid {first}) exited with status 0"));
    // The drain deadline is 4/5 of (3 s less its reserve) from the
    // STOPPING=1: the worker abandons the request then and exits by itself
    // before drover's SIGKILL, 3 s after the STOPPING=1 (asserted below from
    // drover's log, not from this test's clock: under load the exit itself
    // took 0.7 s once).
    assert!(
        log.contains("abandoning 1 busy thread(s) (drain deadline)"),
        "{log}"
    );
    assert!(!log.contains("SIGKILL"), "{log}");
    assert!(
        cleanup_lines(&d).contains(&format!("cleanup pid={first}")),
        "the registry ran: {:?}\n{log}",
        cleanup_lines(&d)
    );
    assert!(
        endless.join().unwrap().is_err(),
        "the abandoned request got no answer"
    );
    let next = d.wait_workers(1)[0];
    assert_ne!(next, first);
    assert_eq!(get_ok(addr, "/").worker_pid(), next.as_raw());
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}
with_each_core!(a_recycling_worker_abandons_a_request_that_outlasts_its_budget);

/// A framework answers every exception of a view with its own 500 (Flask,
/// Django). A request body that stopped coming (`--body-timeout`) or a
/// malformed chunked body raises in the app's read of `wsgi.input`, and
/// such an app turned it into a 500 with a traceback in the log, where the
/// docs promise 408 (and 400): behind nginx with `proxy_request_buffering
/// off`, a slow upload was a server error (found by the trial behind
/// nginx). The client is now answered for what happened, whatever the app
/// made of it; a whole body is read as before.
fn a_body_failure_the_app_caught_is_answered_408_or_400(core: &str) {
    let args = [
        "--core",
        core,
        "--body-timeout",
        "1",
        "--body-min-rate",
        "0",
    ];
    let config = format!(
        "{}PYTHONPATH = {:?}\n",
        wsgi_config(&args, "catching_app:app", "workers = 1"),
        repo().join("tests/workers").display().to_string()
    );
    let d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let addr = d.tcp_addr();
    for (chunks, expected) in [
        ("5\r\nhello\r\n", "HTTP/1.1 408 "),   // then nothing more
        ("5\r\nhelloXX\r\n", "HTTP/1.1 400 "), // data longer than its size
        ("5\r\nhello\r\n0\r\n\r\n", "HTTP/1.1 200 "),
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        write!(
            s,
            "POST / HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}"
        )
        .unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let answer = String::from_utf8_lossy(&raw);
        assert!(
            answer.starts_with(expected),
            "{chunks:?}: {answer} {}",
            d.log()
        );
    }
}
with_each_core!(a_body_failure_the_app_caught_is_answered_408_or_400);

/// drover's master stalled (stopped, frozen, starved of CPU) reads no notify
/// message, and its queue holds only 10: a worker's send to it waited for as
/// long as the master did not read. A worker asked to stop then hung at its
/// STOPPING=1 before it drained (seen with a SIGSTOPped drover: the worker
/// sat in unix_wait_for_peer until the master was continued). Now the
/// STOPPING=1 is given up after 1 s, with a line that says so, and the
/// worker drains and exits while the master is still stopped.
#[test]
fn a_worker_stops_while_the_master_is_stalled_with_a_full_notify_queue() {
    let mut d = Start::config(&example("python", "")).run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let notify = notify_socket_of(workers[0]);
    kill(d.pid(), Signal::SIGSTOP).unwrap();
    let stalled = Resume(d.pid());
    fill_notify_queue(&notify);
    kill(workers[0], Signal::SIGTERM).unwrap();
    // 1 s for the STOPPING=1, then the drain: the worker exits (a zombie,
    // its parent being stopped).
    wait_for(
        "the worker's exit while the master is stopped",
        Duration::from_secs(8),
        || (!alive(workers[0])).then_some(()),
    );
    drop(stalled);
    let log = d.wait_log(&format!("(pid {}) exited with status 0", workers[0]));
    assert!(
        log.contains(&format!(
            "drover_wsgi[{}]: cannot send STOPPING=1: [Errno 11] the notify socket's queue stayed full \
             for 1.0s (its receiver is not reading): STOPPING=1 not sent",
            workers[0]
        )),
        "{log}"
    );
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

/// drover-granian serving a WSGI app sent no `WATCHDOG=1` (only its ASGI
/// loop did): with `timeout` set, drover aborted each worker at its first
/// timeout (`missed its heartbeat ... SIGABRT`) and replaced it, over and
/// over. Now it beats from its main thread: none misses a heartbeat over
/// three periods, and the workers go on serving.
#[test]
fn granian_wsgi_sends_heartbeats_when_drover_expects_them() {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [{:?}, \"example_app:app\"]\nworkers = 2\n\
         timeout = \"1s\"\ngraceful_timeout = \"10s\"\nchdir = {:?}\n",
        python::script("drover-granian"),
        python::examples_dir(),
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let log = d.log();
        assert!(!log.contains("missed its heartbeat"), "{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.wait_workers(2), workers);
    assert_eq!(get_ok(d.tcp_addr(), "/").status, 200);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

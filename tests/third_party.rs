//! Third-party Python servers as drover workers, as docs/workers.md shows
//! them: uWSGI and Granian through drover-granian (from the tests' venv, see
//! requirements-dev.txt) serving the example app on drover's socket, held to
//! their READY=1, reloaded under load (one request per connection, and
//! keep-alive) and stopped gracefully; and drover-granian and
//! drover-hypercorn serving the FastAPI app of tests/python_async.rs (ASGI,
//! with its lifespan).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::keepalive::*;
use common::websocket::{open_websocket, read_frame};
use common::*;

/// The uWSGI worker of docs/workers.md: one uWSGI process per drover worker
/// (no uWSGI master: drover is the supervisor), serving the socket of
/// systemd activation (`LISTEN_FDS`) with `protocol` (`http`: one request
/// per connection; `http11`: keep-alive), four threads, and SIGHUP as the
/// graceful stop (uWSGI's SIGTERM ends a worker at once). `wsgi_file` is
/// run from the example app's directory; `extra` adds keys.
fn uwsgi(protocol: &str, wsgi_file: &str, extra: &str) -> String {
    let command = [
        python::script("uwsgi"),
        "--protocol".into(),
        protocol.into(),
        "--wsgi-file".into(),
        wsgi_file.into(),
        "--callable".into(),
        "app".into(),
        "--threads".into(),
        "4".into(),
        "--pythonpath".into(),
        python::examples_dir(),
        "--disable-logging".into(),
    ];
    let command: Vec<String> = command.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [{}]\nworkers = 2\nstop_signal = \"SIGHUP\"\n\
         graceful_timeout = \"10s\"\nchdir = {:?}\ncontrol_socket = \"$DIR/ctl.sock\"\n{extra}\n\
         [env]\nEXAMPLE_CLEANUP_FILE = \"$DIR/cleanup\"\n",
        command.join(", "),
        python::examples_dir(),
    )
}

fn example(extra: &str) -> String {
    uwsgi("http", "example_app.py", extra)
}

#[test]
fn uwsgi_serves_on_drovers_socket() {
    let d = Start::config(&example("")).run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let addr = d.tcp_addr();
    let r = get_ok(addr, "/");
    let pid = r.worker_pid();
    assert_eq!(r.body, format!("hello from pid {pid}\n"));
    assert!(
        workers.iter().any(|w| w.as_raw() == pid),
        "{pid} is one of drover's workers {workers:?}: uWSGI runs in the worker process"
    );
    assert_eq!(get_ok(addr, "/sleep?ms=10").body, "slept 10 ms\n");
    let log = d.log();
    assert!(
        log.contains("SystemD socket activation detected"),
        "uWSGI took drover's socket: {log}"
    );
    assert!(!log.contains("epoll_ctl()"), "one socket, once: {log}");
}

/// `--protocol http11`: keep-alive, and a kept-alive connection stays with
/// the thread that served it.
#[test]
fn uwsgi_http11_keeps_connections_alive() {
    let d = Start::config(&uwsgi("http11", "example_app.py", "")).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    get_ok(addr, "/");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut pids = Vec::new();
    for _ in 0..2 {
        write!(s, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("Connection"), None, "kept alive: {r:?}");
        pids.push(r.worker_pid());
    }
    assert_eq!(pids[0], pids[1], "one connection, one worker");
}

/// One response read by its Content-Length from a kept-alive connection.
fn read_response(s: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = s
            .read(&mut byte)
            .unwrap_or_else(|e| panic!("no response within the read timeout: {e}"));
        assert_eq!(n, 1, "the connection stays open");
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_string();
    let len: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find_map(|(k, v)| k.eq_ignore_ascii_case("content-length").then_some(v))
        .expect("Content-Length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    raw.extend(body);
    parse_response(&raw).unwrap()
}

/// The default `ready = "auto"`: uWSGI says `STATUS=initializing uWSGI` at
/// once, so drover holds it to its READY=1, which it sends once the app is
/// loaded (here after a 2 s import).
#[test]
fn uwsgi_is_ready_at_its_ready_1_after_the_app_loaded() {
    let app = repo().join("tests/workers/slow_import_app.py");
    let d = Start::config(&uwsgi("http", &app.display().to_string(), "")).run();
    let started = Instant::now();
    d.wait_log("all 2 workers ready");
    let waited = started.elapsed();
    let log = d.log();
    assert!(
        waited >= Duration::from_millis(2000),
        "ready after {waited:?}, before the app's 2 s import ended: {log}"
    );
    assert!(!log.contains("sent nothing to NOTIFY_SOCKET"), "{log}");
    assert_eq!(get_ok(d.tcp_addr(), "/").status, 200);
}

/// A reload (a new generation ready, then the old one stopped) under steady
/// load: every request is answered, none refused or reset, and the new
/// generation serves. Each server's test starts drover its way.
fn reloads_under_load_without_a_failed_request(start: Start) {
    let d = start.run();
    d.wait_log("all 2 workers ready");
    let before = d.wait_workers(2);
    let addr = d.tcp_addr();
    let load = Load::start(addr, 16, "/sleep?ms=5");
    wait_answered(&load, 200);
    let (code, out) = d.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}\n{}", d.log());
    let o = load.finish_after(200);
    d.assert_replaced(&before);
    assert_eq!(
        (o.refused, o.reset, o.truncated, o.other),
        (0, 0, 0, 0),
        "{o:?}\n{}",
        d.log()
    );
}

/// A reload (new uWSGI workers, ready, then SIGHUP to the old ones) under
/// steady load: every request is answered, none refused or reset.
#[test]
fn uwsgi_reloads_under_load_without_a_failed_request() {
    reloads_under_load_without_a_failed_request(Start::config(&example("")));
}

/// SIGTERM to drover: the uWSGI workers get SIGHUP (`stop_signal`), finish
/// the request in flight, run the app's `drover_worker.on_exit` (Python's
/// atexit), exit, and drover exits 0.
#[test]
fn uwsgi_stops_gracefully_with_a_request_in_flight() {
    let mut d = Start::config(&example("")).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let workers = d.wait_workers(2);
    let slow = get_in_flight(addr, "/sleep?ms=2500");
    d.signal(Signal::SIGTERM);
    assert!(
        !slow.is_finished(),
        "the request ended before the stop was sent: nothing was tested"
    );
    let resp = slow
        .join()
        .unwrap()
        .expect("the in-flight request gets its full response");
    assert_eq!((resp.status, resp.body.as_str()), (200, "slept 2500 ms\n"));
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert_eq!(status.code(), Some(0), "{log}");
    for w in &workers {
        assert!(!alive(*w), "worker {w} is gone");
    }
    assert!(
        log.contains("graceful shutdown: stage 1, stop accepting"),
        "{log}"
    );
    assert!(
        log.contains("(0 killed)"),
        "the workers exited by themselves: {log}"
    );
    let cleanup = read_file(&d.dir.path().join("cleanup"));
    for w in &workers {
        assert!(
            cleanup.contains(&format!("cleanup pid={w}\n")),
            "{w} ran drover_worker.on_exit: {cleanup:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Granian, through the SDK's launcher (drover-granian)
// ---------------------------------------------------------------------------

/// drover-granian serving `app` (importable from the example app's
/// directory or tests/workers) with its defaults: 4 threads, drover's
/// default stop signal; `extra` adds keys.
fn granian(app: &str, extra: &str) -> String {
    format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [{:?}, {app:?}]\nworkers = 2\n\
         graceful_timeout = \"10s\"\nchdir = {:?}\ncontrol_socket = \"$DIR/ctl.sock\"\n{extra}\n\
         [env]\nEXAMPLE_CLEANUP_FILE = \"$DIR/cleanup\"\nPYTHONPATH = {:?}\n",
        python::script("drover-granian"),
        python::examples_dir(),
        repo().join("tests/workers").display().to_string(),
    )
}

#[test]
fn granian_serves_on_drovers_socket_once_the_app_is_imported() {
    let d = Start::config(&granian("slow_import_app:app", "")).run();
    let started = Instant::now();
    d.wait_log("all 2 workers ready");
    let waited = started.elapsed();
    let log = d.log();
    assert!(
        waited >= Duration::from_millis(2000),
        "ready after {waited:?}, before the app's 2 s import ended: {log}"
    );
    let workers = d.wait_workers(2);
    let addr = d.tcp_addr();
    let r = get_ok(addr, "/");
    let pid = r.worker_pid();
    assert_eq!(r.body, format!("hello from pid {pid}\n"));
    assert!(
        workers.iter().any(|w| w.as_raw() == pid),
        "{pid} is one of drover's workers {workers:?}"
    );
    assert!(log.contains("with Granian (4 threads)"), "{log}");
    // Keep-alive: two requests on one connection, one worker.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut pids = Vec::new();
    for _ in 0..2 {
        write!(s, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 200);
        pids.push(r.worker_pid());
    }
    assert_eq!(pids[0], pids[1], "one connection, one worker");
}

#[test]
fn granian_reloads_under_load_without_a_failed_request() {
    reloads_under_load_without_a_failed_request(Start::config(&granian("example_app:app", "")));
}

/// A body that is not ready when the headers go out (a generator here; a
/// Flask response under load) follows them at once: the launcher sets
/// TCP_NODELAY on drover's listener, as Granian does on its own listeners
/// (accepted connections inherit it). Without it each such response waited
/// for the client's delayed ACK (Nagle), 40 ms or more, which made
/// drover-granian 5-10x slower than Granian's command line on a Flask app.
#[test]
fn granian_sends_a_streamed_body_without_waiting_for_the_clients_ack() {
    let d = Start::config(&granian("streamed_app:app", "")).run();
    d.wait_log("all 2 workers ready");
    let mut s = TcpStream::connect(d.tcp_addr()).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut fastest = Duration::MAX;
    for i in 1..=20 {
        let sent = Instant::now();
        write!(s, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let r = read_response(&mut s);
        assert_eq!((r.status, r.body.as_str()), (200, "hello\n"));
        // Linux acknowledges the first segments of a connection at once.
        if i > 3 {
            fastest = fastest.min(sent.elapsed());
        }
    }
    // The app takes 5 ms, a delayed ACK 40 ms at least; a loaded machine
    // slows some responses, not the fastest of 17.
    assert!(
        fastest < Duration::from_millis(30),
        "the fastest of 17 keep-alive responses took {fastest:?}: the body waited for an ACK\n{}",
        d.log()
    );
}

/// Granian's backpressure bounds a worker's open connections (it holds a
/// permit from accept to close), not its requests in flight: with the
/// launcher's former default (twice the threads, 8) a worker's 9th
/// keep-alive connection waited unserved until another closed.
#[test]
fn granian_serves_more_open_keep_alive_connections_than_threads() {
    let d = Start::config(&granian("example_app:app", "")).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let n = 24;
    let mut open = Vec::new();
    for i in 1..=n {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 200, "connection {i} of {n}");
        open.push(s); // kept open (and idle) while the next ones are served
    }
}

/// The shared graceful-stop check (the request in flight is answered, new
/// connections are refused meanwhile, drover exits 0), and each worker
/// exited 0 after running its cleanup registry.
#[test]
fn granian_stops_gracefully_with_a_request_in_flight() {
    let start = Start::config(&granian("example_app:app", ""));
    let (d, workers) = stop_with_request_in_flight(start, |d| d.signal(Signal::SIGTERM));
    let log = d.log();
    let cleanup = read_file(&d.dir.path().join("cleanup"));
    for w in &workers {
        assert!(
            log.contains(&format!("(pid {w}) exited with status 0")),
            "{log}"
        );
        assert!(
            cleanup.contains(&format!("cleanup pid={w}\n")),
            "{w} ran its registry: {cleanup:?}"
        );
    }
}

/// A graceful stop escalated to quick (SIGTERM, then SIGQUIT) with a
/// request in flight that would hold the drain for a minute: each worker
/// abandons it at the quick stop's drain deadline, runs its registry (a
/// line starting with `note` in $DIR/`file`) and exits by itself before
/// drover's SIGKILL. drover-granian compared the clock with the SDK's drain
/// deadline the wrong way round and never saw it pass: drover killed its
/// workers (exit 4, no registry).
fn an_escalated_stop_abandons_the_request_in_flight(config: &str, file: &str, note: &str) {
    let mut d = Start::config(config).run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let hang = get_in_flight(d.tcp_addr(), "/sleep?ms=60000");
    d.signal(Signal::SIGTERM);
    d.wait_log_count("is stopping", 2);
    d.signal(Signal::SIGQUIT);
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert!(log.contains("shutdown escalated to quick"), "{log}");
    assert!(
        log.contains("(0 killed)"),
        "the workers exited by themselves: {log}"
    );
    assert_eq!(status.code(), Some(0), "{log}");
    let notes = read_file(&d.dir.path().join(file));
    for w in &workers {
        assert!(
            notes.contains(&format!("{note} pid={w}\n")),
            "{w} ran its registry: {notes:?}\n{log}"
        );
    }
    assert!(
        hang.join().unwrap().is_err(),
        "the abandoned request gets no response"
    );
}

#[test]
fn granian_abandons_the_request_in_flight_when_the_stop_turns_quick() {
    an_escalated_stop_abandons_the_request_in_flight(
        &granian("example_app:app", "quick_timeout = \"3s\""),
        "cleanup",
        "cleanup",
    );
}

#[test]
fn granian_with_an_app_that_cannot_be_imported_stops_drover_with_status_3() {
    let mut d = Start::config(&granian("no_such_module:app", "")).run();
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(
        log.contains("cannot boot: cannot load the application 'no_such_module:app'"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------
// ASGI (FastAPI) under Granian (drover-granian) and Hypercorn (drover-hypercorn)
// ---------------------------------------------------------------------------

/// An ASGI launcher: its console script and what it logs once it serves.
#[derive(Clone, Copy)]
struct Asgi {
    script: &'static str,
    serving: &'static str,
    /// What it logs when the app's lifespan startup fails.
    startup_failed: &'static str,
}

/// drover-granian finds the FastAPI app to be ASGI (`--interface auto`).
const GRANIAN: Asgi = Asgi {
    script: "drover-granian",
    serving: "with Granian (ASGI)",
    startup_failed: "cannot boot: the application's lifespan startup failed",
};
/// drover-uvicorn (its READY=1 comes between the lifespan startup and
/// uvicorn's first accept).
const UVICORN: Asgi = Asgi {
    script: "drover-uvicorn",
    serving: "ready: serving",
    startup_failed: "cannot boot: the application's startup failed (status 3)",
};
const HYPERCORN: Asgi = Asgi {
    script: "drover-hypercorn",
    serving: "with Hypercorn",
    startup_failed: "cannot boot: the application's lifespan startup failed",
};

/// The FastAPI app of tests/python_async.rs.
const FASTAPI: &str = "integration.fastapi_app:app";

/// `launcher` serving `app` from workers/python/tests; the app's notes
/// (lifespan startup and shutdown, registry) go to $DIR/notes; `env` adds
/// variables.
fn asgi(launcher: Asgi, app: &str, env: &str) -> String {
    format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [{:?}, \"--chdir\", {:?}, {app:?}]\nworkers = 2\n\
         graceful_timeout = \"10s\"\nboot_timeout = \"60s\"\ncontrol_socket = \"$DIR/ctl.sock\"\n\n\
         [env]\nAPP_CLEANUP_FILE = \"$DIR/notes\"\n{env}\n",
        python::script(launcher.script),
        python::test_apps_dir(),
    )
}

/// The notes `workers` wrote, sorted, against `expected` (each with
/// " pid=N" for every worker), sorted.
fn assert_notes(d: &Drover, workers: &[nix::unistd::Pid], expected: &[&str]) {
    let mut notes: Vec<String> = read_file(&d.dir.path().join("notes"))
        .lines()
        .map(str::to_string)
        .collect();
    notes.sort();
    let mut want: Vec<String> = workers
        .iter()
        .flat_map(|w| expected.iter().map(move |e| format!("{e} pid={w}")))
        .collect();
    want.sort();
    assert_eq!(notes, want, "{}", d.log());
}

/// The default `ready = "auto"` waits for the READY=1 the launcher sends
/// once the lifespan startup (2 s here, after a 0.5 s import) is complete.
fn asgi_is_ready_once_the_lifespan_startup_completed(launcher: Asgi) {
    let d = Start::config(&asgi(launcher, FASTAPI, "APP_STARTUP_SECONDS = \"2\"")).run();
    let started = Instant::now();
    d.wait_log("all 2 workers ready");
    let waited = started.elapsed();
    let workers = d.wait_workers(2);
    assert_notes(&d, &workers, &["lifespan startup"]);
    let log = d.log();
    assert!(
        waited >= Duration::from_millis(2500),
        "ready after {waited:?}, before the app's import and startup (2.5 s) ended: {log}"
    );
    assert!(log.contains(launcher.serving), "{log}");
    let r = get_ok(d.tcp_addr(), "/");
    assert!(
        workers.iter().any(|w| r.body == format!("{{\"pid\":{w}}}")),
        "{} is from one of drover's workers {workers:?}",
        r.body
    );
}

/// The shared graceful-stop check, then in each worker the lifespan
/// shutdown and the registry ran, and it exited 0.
fn asgi_stops_gracefully_with_a_request_in_flight(launcher: Asgi) {
    asgi_app_stops_gracefully_with_a_request_in_flight(launcher, FASTAPI, "");
}

fn asgi_app_stops_gracefully_with_a_request_in_flight(
    launcher: Asgi,
    app: &str,
    env: &str,
) -> Drover {
    let start = Start::config(&asgi(launcher, app, env));
    let (d, workers) = stop_with_request_in_flight(start, |d| d.signal(Signal::SIGTERM));
    let log = d.log();
    for w in &workers {
        assert!(
            log.contains(&format!("(pid {w}) exited with status 0")),
            "{log}"
        );
    }
    assert_notes(
        &d,
        &workers,
        &["lifespan startup", "lifespan shutdown", "registry"],
    );
    d
}

/// The FastAPI app with its own SIGTERM handler that calls `sys.exit(0)`
/// (tests/workers/app_habits.py): the SDK chains it, and under
/// drover-granian and drover-hypercorn its SystemExit ended the event loop
/// at once: the request in flight was cut, no lifespan shutdown (found by
/// the user trial). Now that exit waits for the drain, the lifespan
/// shutdown and the registry. uvicorn takes the signals itself while it
/// serves, and calls the app's handler after its shutdown.
fn asgi_app_whose_own_sigterm_handler_exits_is_drained_first(launcher: Asgi) {
    let env = format!(
        "APP_SIGTERM_EXIT = \"1\"\nPYTHONPATH = {:?}",
        repo().join("tests/workers").display().to_string()
    );
    let d = asgi_app_stops_gracefully_with_a_request_in_flight(launcher, "asgi_habits:app", &env);
    let log = d.log();
    assert!(log.contains("own SIGTERM handler pid="), "{log}");
}

/// An open websocket when the worker stops: closed at once with 1012
/// ("service restart", the client reconnects to another worker), and the
/// app's receive gets the disconnect (`app_code`: uvicorn and the Hypercorn
/// launcher say 1012; Granian reports the client's answering close as 1005,
/// "no status"). Under drover-hypercorn it stayed open until the drain
/// deadline (up to 24 s of a 30 s graceful_timeout, at every reload), then
/// Hypercorn cancelled the app and the client got 1011, "internal error";
/// Granian dropped it without a close frame, 1006 for the client (found by
/// the user trial).
fn asgi_closes_an_open_websocket_with_1012_at_the_stop(launcher: Asgi, app_code: u16) {
    let mut d = Start::config(&asgi(launcher, FASTAPI, "")).run();
    d.wait_log("all 2 workers ready");
    let mut ws = open_websocket(d.tcp_addr());
    d.signal(Signal::SIGTERM);
    let (opcode, payload) = read_frame(&mut ws).expect("a close frame");
    assert_eq!(opcode, 8, "a close frame: {payload:?} {}", d.log());
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    assert_eq!(code, 1012, "{}", d.log());
    // The client's close, masked (mask 0).
    let _ = ws.write_all(&[0x88, 0x82, 0, 0, 0, 0, payload[0], payload[1]]);
    let status = d.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(0), "{}", d.log());
    let notes = read_file(&d.dir.path().join("notes"));
    assert!(
        notes.contains(&format!("websocket disconnect code={app_code} pid=")),
        "{notes}"
    );
}

#[test]
fn hypercorn_closes_an_open_websocket_with_1012_at_the_stop() {
    asgi_closes_an_open_websocket_with_1012_at_the_stop(HYPERCORN, 1012);
}

#[test]
fn uvicorn_closes_an_open_websocket_with_1012_at_the_stop() {
    asgi_closes_an_open_websocket_with_1012_at_the_stop(UVICORN, 1012);
}

#[test]
fn granian_asgi_closes_an_open_websocket_with_1012_at_the_stop() {
    asgi_closes_an_open_websocket_with_1012_at_the_stop(GRANIAN, 1005);
}

/// A request whose response is sent and whose background task
/// (Starlette's `BackgroundTasks`, 2 s) still runs when the stop comes: the
/// task runs to its end before the lifespan shutdown and the registry.
/// drover-granian exited under it once Granian's drain was done (the
/// responses sent): the task neither finished nor saw a cancellation (found
/// by the user trial: a FastAPI `BackgroundTasks` lost at every reload).
fn asgi_runs_a_background_task_to_its_end_at_the_stop(launcher: Asgi) {
    let mut d = Start::config(&asgi(launcher, FASTAPI, "")).run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let r = get_ok(d.tcp_addr(), "/background?s=2");
    assert_eq!(r.body, "{\"queued\":true}");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(0), "{}", d.log());
    let notes = read_file(&d.dir.path().join("notes"));
    let done = notes
        .find("background task done")
        .unwrap_or_else(|| panic!("the background task ran to its end: {notes}"));
    let pid = &notes[done..].lines().next().unwrap()["background task done ".len()..];
    let shutdown = notes
        .find(&format!("lifespan shutdown {pid}"))
        .unwrap_or_else(|| panic!("{pid}'s lifespan shutdown: {notes}"));
    assert!(
        done < shutdown,
        "the task ended before its lifespan shutdown: {notes}"
    );
    assert_eq!(notes.matches("background task done").count(), 1, "{notes}");
    for w in &workers {
        for note in ["lifespan shutdown", "registry"] {
            assert!(notes.contains(&format!("{note} pid={w}\n")), "{notes}");
        }
    }
}

#[test]
fn granian_asgi_runs_a_background_task_to_its_end_at_the_stop() {
    asgi_runs_a_background_task_to_its_end_at_the_stop(GRANIAN);
}

#[test]
fn hypercorn_runs_a_background_task_to_its_end_at_the_stop() {
    asgi_runs_a_background_task_to_its_end_at_the_stop(HYPERCORN);
}

#[test]
fn uvicorn_runs_a_background_task_to_its_end_at_the_stop() {
    asgi_runs_a_background_task_to_its_end_at_the_stop(UVICORN);
}

#[test]
fn granian_asgi_app_whose_own_sigterm_handler_exits_is_drained_first() {
    asgi_app_whose_own_sigterm_handler_exits_is_drained_first(GRANIAN);
}

#[test]
fn hypercorn_app_whose_own_sigterm_handler_exits_is_drained_first() {
    asgi_app_whose_own_sigterm_handler_exits_is_drained_first(HYPERCORN);
}

#[test]
fn uvicorn_app_whose_own_sigterm_handler_exits_is_drained_first() {
    asgi_app_whose_own_sigterm_handler_exits_is_drained_first(UVICORN);
}

/// The answer to `GET path` with `headers` on `stream` (`Connection: close`).
fn ask(mut stream: impl Read + Write, path: &str, headers: &str) -> Response {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: app\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    parse_response(&raw).unwrap()
}

/// `launcher` serving `app` (from workers/python/tests) on one socket,
/// `bind`, with `args` before the app.
fn launcher_on(launcher: Asgi, bind: &str, args: &str, app: &str) -> Drover {
    let config = format!(
        "bind = [{bind:?}]\nworkers = 1\ngraceful_timeout = \"10s\"\nboot_timeout = \"60s\"\n\
         command = [{:?}, \"--chdir\", {:?}, {args} {app:?}]\n",
        python::script(launcher.script),
        python::test_apps_dir(),
    );
    let d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    d
}

/// drover-granian serves a Unix socket (docs/deployment.md's advice behind
/// nginx), as Granian's `--uds` does, a WSGI app and an ASGI one, and stops
/// cleanly. It refused one before (`cannot boot: Granian serves one TCP
/// socket here`).
#[test]
fn granian_serves_a_unix_socket() {
    for (app, path) in [("apps:app", "/pid"), (FASTAPI, "/")] {
        let mut d = launcher_on(GRANIAN, "unix:$DIR/http.sock", "", app);
        let s = std::os::unix::net::UnixStream::connect(d.dir.path().join("http.sock")).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let resp = ask(s, path, "");
        let pid = d.wait_workers(1)[0];
        assert_eq!(resp.status, 200, "{app}: {}", d.log());
        assert!(resp.body.contains(&pid.to_string()), "{app}: {}", resp.body);
        d.signal(Signal::SIGTERM);
        assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{app}: {}", d.log());
    }
}

/// What nginx sends behind TLS with `X-Forwarded-For
/// $proxy_add_x_forwarded_for`: the client's own header, then the client's
/// address; and `X-Forwarded-Proto $scheme`.
const FROM_NGINX: &str =
    "X-Forwarded-For: 198.51.100.7, 203.0.113.9\r\nX-Forwarded-Proto: https\r\n";

/// Behind nginx on a Unix socket (docs/deployment.md's advice) or on
/// 127.0.0.1, every ASGI launcher believes the proxy's `X-Forwarded-Proto`
/// and `X-Forwarded-For` as drover-uvicorn does (the client address is the
/// rightmost entry that is not a trusted proxy's), and from a peer outside
/// `--forwarded-allow-ips` it does not. `app` answers the scheme and client
/// it sees at `path`, as `expect(scheme, client)` writes them. Hypercorn and
/// Granian read no proxy headers: the app saw `http` and nginx's address
/// (none on the Unix socket, `{"scheme":"http","client":null}` under
/// Hypercorn), and drover-granian refused to serve a Unix socket at all.
fn the_proxy_headers_are_believed(
    launcher: Asgi,
    app: &str,
    path: &str,
    expect: fn(&str, &str) -> String,
) {
    // Each started in turn, asked, and stopped.
    let unix_socket = || {
        let d = launcher_on(launcher, "unix:$DIR/http.sock", "", app);
        let s = std::os::unix::net::UnixStream::connect(d.dir.path().join("http.sock")).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let resp = ask(s, path, FROM_NGINX);
        (d, resp)
    };
    let tcp = |args: &str| {
        let d = launcher_on(launcher, "127.0.0.1:0", args, app);
        let s = TcpStream::connect(d.tcp_addr()).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let resp = ask(s, path, FROM_NGINX);
        (d, resp)
    };
    type Run<'a> = Box<dyn Fn() -> (Drover, Response) + 'a>;
    let runs: [(&str, Run, bool); 3] = [
        ("127.0.0.1 (trusted by default)", Box::new(|| tcp("")), true),
        ("a Unix socket", Box::new(unix_socket), true),
        (
            "127.0.0.1 outside --forwarded-allow-ips",
            Box::new(|| tcp("\"--forwarded-allow-ips\", \"10.0.0.1\",")),
            false,
        ),
    ];
    for (what, run, believed) in runs {
        let (mut d, resp) = run();
        let want = if believed {
            expect("https", "203.0.113.9")
        } else {
            expect("http", "127.0.0.1")
        };
        assert_eq!(
            (resp.status, resp.body.trim()),
            (200, want.as_str()),
            "{what}: {}",
            d.log()
        );
        d.signal(Signal::SIGTERM);
        assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{what}: {}", d.log());
    }
}

fn fastapi_client(scheme: &str, client: &str) -> String {
    format!("{{\"scheme\":\"{scheme}\",\"client\":\"{client}\"}}")
}

#[test]
fn hypercorn_believes_the_proxy_headers_as_uvicorn_does() {
    the_proxy_headers_are_believed(HYPERCORN, FASTAPI, "/client", fastapi_client);
}

#[test]
fn granian_asgi_believes_the_proxy_headers_as_uvicorn_does() {
    the_proxy_headers_are_believed(GRANIAN, FASTAPI, "/client", fastapi_client);
}

#[test]
fn uvicorn_believes_the_proxy_headers() {
    the_proxy_headers_are_believed(UVICORN, FASTAPI, "/client", fastapi_client);
}

/// A WSGI app under drover-granian: `wsgi.url_scheme` and `REMOTE_ADDR`.
#[test]
fn granian_wsgi_believes_the_proxy_headers_as_uvicorn_does() {
    the_proxy_headers_are_believed(
        GRANIAN,
        "apps:app",
        "/scheme-and-client",
        |scheme, client| format!("{scheme} {client}"),
    );
}

/// An app that cannot be imported, and one whose lifespan startup fails:
/// each stops drover with status 3.
fn asgi_app_that_cannot_boot_stops_drover_with_status_3(launcher: Asgi) {
    for (app, env, says) in [
        (
            "broken_app:app",
            "",
            "cannot boot: cannot load the application 'broken_app:app'",
        ),
        (FASTAPI, "APP_STARTUP_FAIL = \"1\"", launcher.startup_failed),
    ] {
        let mut d = Start::config(&asgi(launcher, app, env)).run();
        let status = d.wait_exit(LIMIT);
        let log = d.log();
        assert_eq!(status.code(), Some(3), "{app} {env}: {log}");
        assert!(log.contains(says), "{log}");
        assert!(
            log.contains("RuntimeError: the lifespan startup fails (on purpose)") || env.is_empty(),
            "the traceback: {log}"
        );
    }
}

#[test]
fn granian_asgi_is_ready_once_the_lifespan_startup_completed() {
    asgi_is_ready_once_the_lifespan_startup_completed(GRANIAN);
}

#[test]
fn granian_asgi_reloads_under_load_without_a_failed_request() {
    reloads_under_load_without_a_failed_request(Start::config(&asgi(GRANIAN, FASTAPI, "")));
}

/// A client that connected before a reload and sends its request only once
/// the old generation has stopped (the moment between a connect and its
/// first write, made long): the request is served by the new generation.
/// Granian's graceful shutdown (hyper's) closes every connection it has
/// accepted but not yet read from, so a request that arrived just after its
/// stop was reset: 1 of 4,541 requests in the reload under load, and the
/// packets of one such connection showed Granian's FIN 98 µs after the
/// handshake, the request 28 µs later, then Granian's RST. The launcher
/// defers the accept until the request has arrived (`TCP_DEFER_ACCEPT`).
#[test]
fn granian_asgi_serves_a_connection_silent_until_the_old_generation_stopped() {
    let d = Start::config(&asgi(GRANIAN, FASTAPI, "")).run();
    d.wait_log("all 2 workers ready");
    let before = d.wait_workers(2);
    let mut early = TcpStream::connect(d.tcp_addr()).unwrap();
    early.set_read_timeout(Some(LIMIT)).unwrap();
    let (code, out) = d.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}\n{}", d.log());
    d.wait_log("reload applied");
    d.wait_log_count("exited with status 0 (recycled: reload)", 2);
    let after = d.wait_workers(2);
    write!(
        early,
        "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let read = early.read_to_end(&mut raw);
    let r = read
        .map_err(|e| e.to_string())
        .and_then(|_| parse_response(&raw).map_err(|e| format!("{e:?}")))
        .unwrap_or_else(|e| panic!("the request is answered: {e}\n{}", d.log()));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        after.iter().any(|w| r.body == format!("{{\"pid\":{w}}}")),
        "{} is from the new generation {after:?} (the old one was {before:?})",
        r.body
    );
}

#[test]
fn granian_asgi_stops_gracefully_with_a_request_in_flight() {
    asgi_stops_gracefully_with_a_request_in_flight(GRANIAN);
}

#[test]
fn granian_asgi_app_that_cannot_boot_stops_drover_with_status_3() {
    asgi_app_that_cannot_boot_stops_drover_with_status_3(GRANIAN);
}

#[test]
fn granian_asgi_abandons_the_request_in_flight_when_the_stop_turns_quick() {
    an_escalated_stop_abandons_the_request_in_flight(
        &asgi(GRANIAN, FASTAPI, "").replace("[env]", "quick_timeout = \"3s\"\n[env]"),
        "notes",
        "registry",
    );
}

#[test]
fn uvicorn_is_ready_once_the_lifespan_startup_completed() {
    asgi_is_ready_once_the_lifespan_startup_completed(UVICORN);
}

#[test]
fn uvicorn_app_that_cannot_boot_stops_drover_with_status_3() {
    asgi_app_that_cannot_boot_stops_drover_with_status_3(UVICORN);
}

#[test]
fn hypercorn_abandons_the_request_in_flight_when_the_stop_turns_quick() {
    an_escalated_stop_abandons_the_request_in_flight(
        &asgi(HYPERCORN, FASTAPI, "").replace("[env]", "quick_timeout = \"3s\"\n[env]"),
        "notes",
        "registry",
    );
}

#[test]
fn hypercorn_is_ready_once_the_lifespan_startup_completed() {
    asgi_is_ready_once_the_lifespan_startup_completed(HYPERCORN);
}

#[test]
fn hypercorn_reloads_under_load_without_a_failed_request() {
    reloads_under_load_without_a_failed_request(Start::config(&asgi(HYPERCORN, FASTAPI, "")));
}

#[test]
fn hypercorn_stops_gracefully_with_a_request_in_flight() {
    asgi_stops_gracefully_with_a_request_in_flight(HYPERCORN);
}

#[test]
fn hypercorn_app_that_cannot_boot_stops_drover_with_status_3() {
    asgi_app_that_cannot_boot_stops_drover_with_status_3(HYPERCORN);
}

// ---------------------------------------------------------------------------
// Reloads under keep-alive load (how wrk, a proxy's pool or a browser talk)
// ---------------------------------------------------------------------------

/// A reload under keep-alive load (a new generation ready, then the stop
/// signal to the old one): every request is answered, a request sent on a
/// connection the old worker closed is sent again on a new one (as an HTTP
/// client does), none is refused, cut or reset mid-response.
fn reload_under_keep_alive_load(config: &str, clients: usize, path: &str) -> KeptOutcomes {
    let d = Start::config(config).run();
    d.wait_log("all 2 workers ready");
    let before = d.wait_workers(2);
    let load = KeepAliveLoad::start(d.tcp_addr(), clients, path);
    load.wait_answered(200);
    let (code, out) = d.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}\n{}", d.log());
    // The verdict comes as the last old worker is sent SIGTERM, and until
    // it acts on it, it serves its kept-alive connections as before: the
    // load runs until the old workers are gone, so that every connection
    // they held has met their stop.
    d.assert_replaced(&before);
    let o = load.finish_after(200);
    assert_eq!(
        (o.refused, &o.failed),
        (0, &Vec::new()),
        "{o:?}\n{}",
        d.log()
    );
    o
}

/// drover-uvicorn under keep-alive load. uvicorn's shutdown closes every
/// kept-alive connection that is between two requests at once, so the
/// request its client was sending then was lost (wrk -c16, two reloads: 40
/// read errors of 47,625 requests; a proxy answers a POST lost so with a
/// 502). The launcher now answers `Connection: close` from the stop on and
/// gives such connections up to a second to send their next request: none
/// has to be sent again.
#[test]
fn uvicorn_reloads_under_keep_alive_load_without_a_resent_request() {
    let command = [
        python::script("drover-uvicorn"),
        "--chdir".into(),
        repo().join("workers/python/tests").display().to_string(),
        "--no-access-log".into(),
        "integration.fastapi_app:app".into(),
    ];
    let command: Vec<String> = command.iter().map(|s| format!("{s:?}")).collect();
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [{}]\nworkers = 2\ngraceful_timeout = \"10s\"\n\
         control_socket = \"$DIR/ctl.sock\"\n[env]\nAPP_IMPORT_SECONDS = \"0\"\n",
        command.join(", "),
    );
    let o = reload_under_keep_alive_load(&config, 16, "/sleep?s=0.005");
    assert_eq!(o.resent, 0, "{o:?}");
    assert!(o.announced_close > 0, "{o:?}");
}

/// drover-hypercorn under keep-alive load. Hypercorn's shutdown closes
/// every kept-alive connection that is between two requests at once, so the
/// request its client was sending then was lost (wrk -c16, two reloads: 34
/// read errors of 45,037 requests). As drover-uvicorn, the launcher answers
/// `Connection: close` from the stop on and gives such connections up to a
/// second to send their next request: none has to be sent again.
#[test]
fn hypercorn_reloads_under_keep_alive_load_without_a_resent_request() {
    let config = asgi(HYPERCORN, FASTAPI, "APP_IMPORT_SECONDS = \"0\"");
    let o = reload_under_keep_alive_load(&config, 16, "/sleep?s=0.005");
    assert_eq!(o.resent, 0, "{o:?}");
    assert!(o.announced_close > 0, "{o:?}");
}

#[test]
fn granian_reloads_under_keep_alive_load_without_a_failed_request() {
    reload_under_keep_alive_load(&granian("example_app:app", ""), 16, "/sleep?ms=5");
}

/// uWSGI's http11 (keep-alive): 6 clients, fewer than a generation's 8
/// threads (a kept-alive connection holds its thread). A stopping uWSGI
/// worker closes its kept-alive connections without a word, so their
/// clients resend (counted in `resent`); Granian answers `Connection: close`.
#[test]
fn uwsgi_http11_reloads_under_keep_alive_load_without_a_failed_request() {
    reload_under_keep_alive_load(&uwsgi("http11", "example_app.py", ""), 6, "/sleep?ms=5");
}

// ---------------------------------------------------------------------------

/// prometheus_client's multiprocess mode with the recipe of
/// docs/migrating-from-gunicorn.md (Gunicorn's child_exit hook becomes an
/// on_exit function of the worker): workers that recycle themselves drop
/// their live gauges, so the sum counts the workers alive, while the
/// counters of the recycled workers stay in the total.
#[test]
fn prometheus_multiprocess_live_gauges_follow_recycled_workers() {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [{:?}, \"--max-requests\", \"3\", \"prometheus_app:app\"]\n\
         workers = 2\nready = \"notify\"\ngraceful_timeout = \"10s\"\n\
         [env]\nPROMETHEUS_MULTIPROC_DIR = \"$DIR/prometheus\"\nPYTHONPATH = {:?}\n",
        python::script("drover-wsgi"),
        repo().join("tests/workers").display().to_string(),
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    for _ in 0..20 {
        get_ok(addr, "/");
    }
    let dir = d.dir.path().join("prometheus");
    let live_files = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with("gauge_livesum_")
            })
            .count()
    };
    // Recycles (every 3 requests, /metrics included) may be under way: wait
    // for a moment when the two slots' workers are the only ones counted.
    let metrics = wait_for("the live gauge to count 2 workers", LIMIT, || {
        let body = get_ok(addr, "/metrics").body;
        (body.contains("app_live_workers 2.0") && live_files() == 2).then_some(body)
    });
    assert!(metrics.contains("app_requests_total 20.0"), "{metrics}");
    assert!(
        d.log().matches("as it announced (STOPPING=1)").count() >= 5,
        "{}",
        d.log()
    );
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    assert_eq!(live_files(), 0, "every worker marked itself dead");
}

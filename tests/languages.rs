//! Node.js, Go and async Rust workers under drover, as
//! docs/other-languages.md and workers/rust/README.md show them: the examples
//! in workers/node and workers/go (standard library only) and
//! workers/rust/examples/{tokio_hyper,axum}.rs (tokio with hyper 1.x or
//! axum 0.8, on the SDK) are held to their READY=1 through a slow start, stopped gracefully with a
//! request in flight (the request is answered, their cleanup runs, drover
//! exits 0), stopped quickly, reloaded under load (a request per connection,
//! and keep-alive) without a failed request, unharmed by drover's SIGUSR1,
//! and gone when drover is killed.
//!
//! Node needs `node` (18 or newer) and `systemd-notify`, Go needs `go` (1.19
//! or newer); the Rust example is built with the workspace. A missing tool fails the test and names its Debian package
//! (`.ci/run` installs them): a language that is not there is not tested,
//! and must not pass as if it were.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::keepalive::KeepAliveLoad;
use common::*;

#[derive(Clone, Copy, Debug)]
enum Lang {
    Node,
    Go,
    /// tokio and hyper on the SDK.
    Rust,
    /// axum on the SDK.
    Axum,
}

/// The command that runs a language's example worker, and the directory its
/// build went to (removed when dropped).
struct Worker {
    command: Vec<String>,
    _build: Option<tempfile::TempDir>,
}

/// `name`'s path in `PATH`, or a failed test that says what to install.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed, so this language's worker cannot be tested: \
                 install it (Debian: apt-get install {package}; .ci/run does)"
            )
        })
}

/// The output of `program args`, which must succeed.
fn output(program: &Path, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{} {args:?}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{}{}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The first two numbers of a version in `text` ("v20.20.2", "go1.19.8").
fn version(text: &str) -> (u32, u32) {
    let start = text.find(|c: char| c.is_ascii_digit()).unwrap_or(0);
    let mut parts = text[start..]
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

impl Lang {
    fn worker(self) -> Worker {
        match self {
            Lang::Node => {
                let node = tool("node", "nodejs");
                let v = output(&node, &["--version"], &repo());
                assert!(
                    version(&v) >= (18, 0),
                    "the Node worker needs Node.js 18 or newer; {} is {v}",
                    node.display()
                );
                // Node has no Unix datagram socket: the example sends READY=1
                // through systemd-notify.
                tool("systemd-notify", "systemd");
                Worker {
                    command: vec![
                        node.display().to_string(),
                        repo().join("workers/node/server.js").display().to_string(),
                    ],
                    _build: None,
                }
            }
            Lang::Rust => Worker {
                command: vec![sdk_example_bin("tokio_hyper")],
                _build: None,
            },
            Lang::Axum => Worker {
                command: vec![sdk_example_bin("axum")],
                _build: None,
            },
            Lang::Go => {
                let go = tool("go", "golang-go");
                let v = output(&go, &["version"], &repo());
                let words: Vec<&str> = v.split_whitespace().collect();
                assert!(
                    words.get(2).is_some_and(|w| version(w) >= (1, 19)),
                    "the Go worker needs Go 1.19 or newer; {} is {v}",
                    go.display()
                );
                // Each test builds its own copy (tests run in parallel
                // processes); Go's build cache makes the next builds quick.
                let dir = tempfile::tempdir().unwrap();
                let bin = dir.path().join("worker");
                let cache = Path::new(drover_bin()).with_file_name("go-build");
                let out = Command::new(&go)
                    .args(["build", "-buildvcs=false", "-o"])
                    .arg(&bin)
                    .arg(".")
                    .current_dir(repo().join("workers/go"))
                    .env("GOCACHE", cache)
                    // Standard library only: nothing to download.
                    .env("GOPROXY", "off")
                    .env("GOTOOLCHAIN", "local")
                    .output()
                    .expect("run go build");
                assert!(
                    out.status.success(),
                    "go build of workers/go failed ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
                Worker {
                    command: vec![bin.display().to_string()],
                    _build: Some(dir),
                }
            }
        }
    }
}

/// drover's configuration for 2 workers of `w` on an ephemeral port; the
/// example appends "cleanup pid=N" to $DIR/cleanup. `extra` adds keys,
/// `env` variables.
fn config(w: &Worker, extra: &str, env: &str) -> String {
    let command: Vec<String> = w.command.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [{}]\nworkers = 2\ngraceful_timeout = \"10s\"\n\
         {extra}\n[env]\nEXAMPLE_CLEANUP_FILE = \"$DIR/cleanup\"\n{env}\n",
        command.join(", ")
    )
}

/// The cleanup lines the workers wrote.
fn cleanups(d: &Drover) -> String {
    read_file(&d.dir.path().join("cleanup"))
}

/// How long each worker took to become ready, from the log's
/// "worker N (pid P) ready in X ms" lines.
fn ready_times(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| l.split(") ready in ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

/// The default readiness (`ready = "auto"`) with a worker that takes 1.5 s
/// to start: the example announces at once that READY=1 will come (Node
/// through systemd-notify, a child of the worker), so drover waits for it
/// instead of counting the worker ready at `announce_timeout` (1 s).
fn is_held_to_its_ready_through_a_slow_start(lang: Lang) {
    let w = lang.worker();
    let d = Start::config(&config(&w, "", "EXAMPLE_BOOT_MS = \"1500\"")).run();
    let log = d.wait_log("all 2 workers ready");
    let times = ready_times(&log);
    assert_eq!(times.len(), 2, "{log}");
    assert!(
        times.iter().all(|&ms| ms >= 1500.0),
        "drover waited for READY=1: {times:?}\n{log}"
    );
    assert!(!log.contains("sent nothing to NOTIFY_SOCKET"), "{log}");
    // STATUS=, sent with READY=1, is shown as well.
    d.wait_log_count("status: serving", 2);
    assert_eq!(get_ok(d.tcp_addr(), "/").status, 200);
}

/// SIGTERM to drover with a request in flight: the workers stop accepting,
/// answer it in full, run their cleanup and exit 0; drover exits 0.
fn stops_gracefully_with_a_request_in_flight(lang: Lang) {
    let w = lang.worker();
    let (d, workers) = stop_with_request_in_flight(Start::config(&config(&w, "", "")), |d| {
        d.signal(Signal::SIGTERM)
    });
    let log = d.log();
    let done = cleanups(&d);
    for pid in workers {
        assert!(
            done.contains(&format!("cleanup pid={pid}\n")),
            "{done}\n{log}"
        );
        assert!(
            log.contains(&format!("(pid {pid}) exited with status 0")),
            "{log}"
        );
    }
}

/// SIGQUIT to drover: the workers close their connections at once (the
/// request in flight is not answered), run their cleanup and exit 0, well
/// before the request would have ended.
fn stops_quickly_on_sigquit(lang: Lang) {
    let w = lang.worker();
    let mut d = Start::config(&config(&w, "", "")).run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let slow = get_in_flight(d.tcp_addr(), "/sleep?ms=10000");
    let sent = Instant::now();
    d.signal(Signal::SIGQUIT);
    let status = d.wait_exit(LIMIT);
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "a quick stop took {:?}",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", d.log());
    let answer = slow.join().unwrap();
    assert!(answer.is_err(), "the request was cut: {answer:?}");
    let done = cleanups(&d);
    for pid in workers {
        assert!(done.contains(&format!("cleanup pid={pid}\n")), "{done}");
    }
}

/// A reload (SIGHUP) under steady load, a new connection per request:
/// every request is answered, none refused, reset or cut, and the new
/// generation serves.
fn reloads_under_load_without_a_failed_request(lang: Lang) {
    let w = lang.worker();
    let d = Start::config(&config(&w, "", "")).run();
    d.wait_log("all 2 workers ready");
    let before = d.wait_workers(2);
    let load = Load::start(d.tcp_addr(), 16, "/sleep?ms=5");
    wait_answered(&load, 200);
    d.signal(Signal::SIGHUP);
    d.wait_log("reload applied");
    d.wait_log_count("(recycled: reload)", 2);
    let o = load.finish_after(200);
    d.assert_replaced(&before);
    let log = d.log();
    assert_eq!(
        (o.refused, o.reset, o.truncated, o.other),
        (0, 0, 0, 0),
        "{o:?}\n{log}"
    );
    // The old generation left on its own, in time.
    assert!(!log.contains("SIGKILL"), "{log}");
}

/// A reload (SIGHUP) under keep-alive load, short requests (a connection is
/// often between two requests when the stop comes): the old workers answer
/// `Connection: close` from their stop on and give an idle connection a
/// second to send its next request, so no request is lost, and none even
/// has to be sent again on a new connection. (Node's usual `server.close()`
/// keeps serving busy kept-alive connections until drover's SIGKILL; Go's
/// `Shutdown` at once closes the idle ones under clients about to use them:
/// 10 to 16 requests of 16 clients were sent again.)
fn reloads_under_keep_alive_load_without_a_resent_request(lang: Lang) {
    let w = lang.worker();
    let d = Start::config(&config(&w, "", "")).run();
    d.wait_log("all 2 workers ready");
    let before = d.wait_workers(2);
    let load = KeepAliveLoad::start(d.tcp_addr(), 16, "/");
    load.wait_answered(200);
    d.signal(Signal::SIGHUP);
    d.wait_log("reload applied");
    // The old workers end their kept-alive connections and exit while the
    // load goes on.
    d.wait_log_count("(recycled: reload)", 2);
    let o = load.finish_after(200);
    d.assert_replaced(&before);
    let log = d.log();
    assert_eq!((o.refused, &o.failed), (0, &Vec::new()), "{o:?}\n{log}");
    assert_eq!(o.resent, 0, "{o:?}\n{log}");
    assert!(o.announced_close > 0, "{o:?}");
    // The old generation left on its own, in time.
    assert!(!log.contains("SIGKILL"), "{log}");
}

/// drover forwards SIGUSR1 (reopen your logs) to the workers: they go on
/// serving, and stop gracefully afterwards. (Node's default action for it
/// starts its inspector, a debugger on 127.0.0.1:9229 that any local user
/// can attach to.)
fn serve_on_after_sigusr1(lang: Lang) {
    let w = lang.worker();
    let mut d = Start::config(&config(&w, "", "")).run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    d.signal(Signal::SIGUSR1);
    d.wait_log("SIGUSR1: forwarded to 2 worker(s)");
    assert_eq!(get_ok(d.tcp_addr(), "/").status, 200);
    // A worker gets the SIGTERM after the SIGUSR1: its exit status says
    // whether the SIGUSR1 did anything else than nothing.
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    let log = d.log();
    for pid in workers {
        assert!(
            log.contains(&format!("(pid {pid}) exited with status 0")),
            "{log}"
        );
    }
    assert!(
        !log.contains("Debugger listening") && !log.contains("inspector"),
        "{log}"
    );
}

/// With `timeout` set, the workers send `WATCHDOG=1` in time: none misses a
/// heartbeat over three periods, and they go on serving.
fn sends_heartbeats_when_drover_expects_them(lang: Lang) {
    let w = lang.worker();
    let d = Start::config(&config(&w, "timeout = \"1s\"", "")).run();
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
}

/// `preload = true` needs a worker that implements the template protocol;
/// these do not: drover says so at once (Node's READY=1 comes from its
/// child, systemd-notify) and exits 3, naming its own SIGKILL as its own.
fn is_refused_as_a_preload_template_with_a_clear_error(lang: Lang) {
    let w = lang.worker();
    let mut d = Start::config(&config(&w, "preload = true", "")).run();
    let log = d.assert_refused_as_no_template();
    assert!(log.contains("killed by SIGKILL (sent by drover)"), "{log}");
    assert!(!log.contains("not sent by drover"), "{log}");
}

/// SIGKILL to drover: the workers die with it (drover's parent-death
/// signal), none is left serving.
fn die_with_a_killed_master(lang: Lang) {
    let w = lang.worker();
    let mut d = Start::config(&config(&w, "", "")).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let workers = d.wait_workers(2);
    d.signal(Signal::SIGKILL);
    d.wait_exit_only(LIMIT);
    wait_for("the workers to die with drover", LIMIT, || {
        workers.iter().all(|w| !alive(*w)).then_some(())
    });
    assert!(get(addr, "/").is_err(), "nothing serves on {addr}");
}

macro_rules! tests_per_language {
    ($($name:ident),* $(,)?) => {
        mod node {
            $( #[test] fn $name() { super::$name(super::Lang::Node) } )*
        }
        mod go {
            $( #[test] fn $name() { super::$name(super::Lang::Go) } )*
        }
        mod rust {
            $( #[test] fn $name() { super::$name(super::Lang::Rust) } )*
        }
        mod axum {
            $( #[test] fn $name() { super::$name(super::Lang::Axum) } )*
        }
    };
}

tests_per_language!(
    is_held_to_its_ready_through_a_slow_start,
    stops_gracefully_with_a_request_in_flight,
    stops_quickly_on_sigquit,
    reloads_under_load_without_a_failed_request,
    reloads_under_keep_alive_load_without_a_resent_request,
    serve_on_after_sigusr1,
    sends_heartbeats_when_drover_expects_them,
    is_refused_as_a_preload_template_with_a_clear_error,
    die_with_a_killed_master,
);

/// tokio waits for a `spawn_blocking` task without limit when its runtime is
/// dropped: the example shuts its runtime down with what is left of the
/// drain instead, so a blocking task still running at the stop holds it up
/// to the drain deadline only; its cleanup runs, it exits 0 before drover's
/// SIGKILL.
#[test]
fn rust_a_blocking_task_does_not_hold_the_stop_past_the_drain_deadline() {
    let w = Lang::Rust.worker();
    let cfg = config(&w, "", "").replace("graceful_timeout = \"10s\"", "graceful_timeout = \"2s\"");
    let mut d = Start::config(&cfg).run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let stuck = get_in_flight(d.tcp_addr(), "/blocking?ms=60000");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    assert!(stuck.join().unwrap().is_err(), "the request was abandoned");
    // Out by the drain deadline ((2 s - 0.25 s) * 4/5 = 1.4 s), before
    // drover's SIGKILL at 2 s: told by drover's log, not by this test's
    // clock (0.6 s of margin for the exit and this test's polling).
    let log = d.log();
    assert!(!log.contains("SIGKILL"), "{log}");
    let done = cleanups(&d);
    for pid in workers {
        assert!(
            done.contains(&format!("cleanup pid={pid}\n")),
            "{done}\n{log}"
        );
    }
}

/// A handler that panics: tokio catches the panic on the worker's (main)
/// thread, the connection is closed unanswered, and the worker serves on
/// with its cleanup registry intact: it runs once, at the stop. (The SDK's
/// panic hook ran the registry at such a panic before.)
#[test]
fn rust_a_panicking_handler_leaves_the_worker_serving_and_its_cleanup_for_the_stop() {
    let w = Lang::Rust.worker();
    let cfg = config(&w, "", "").replace("workers = 2", "workers = 1");
    let mut d = Start::config(&cfg).run();
    d.wait_log("all 1 workers ready");
    let workers = d.wait_workers(1);
    assert!(get(d.tcp_addr(), "/panic").is_err(), "no answer to /panic");
    d.wait_log("a bug in a handler");
    assert_eq!(get_ok(d.tcp_addr(), "/").status, 200);
    assert_eq!(d.wait_workers(1), workers, "the same worker serves on");
    assert_eq!(cleanups(&d), "", "no cleanup before the stop");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    assert_eq!(cleanups(&d), format!("cleanup pid={}\n", workers[0]));
}

/// The example fills its scoreboard record: drover's /metrics counts its
/// requests.
#[test]
fn rust_its_requests_are_counted_in_drovers_metrics() {
    let w = Lang::Rust.worker();
    let cfg = config(&w, "admin_bind = \"unix:$DIR/admin.sock\"", "")
        .replace("workers = 2", "workers = 1");
    let d = Start::config(&cfg).run();
    d.wait_log("all 1 workers ready");
    for _ in 0..5 {
        assert_eq!(get_ok(d.tcp_addr(), "/").status, 200);
    }
    let metrics = d.admin("/metrics").body;
    assert!(
        metrics.contains("drover_requests_total{slot=\"1\"} 5\n"),
        "{metrics}"
    );
}

//! Real asyncio frameworks as drover workers, from the tests' venv: an
//! aiohttp app with its own signal handlers (chained by the SDK's
//! `install_asyncio()`) and under the SDK's `drover_worker.aiohttp`, and
//! FastAPI under the SDK's uvicorn launcher.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::keepalive::{KeepAliveLoad, KeptOutcomes};
use common::websocket::{open_websocket, read_frame};
use common::*;

fn integration_app(name: &str) -> String {
    repo()
        .join("workers/python/tests/integration")
        .join(name)
        .display()
        .to_string()
}

fn lines(path: &std::path::Path) -> Vec<String> {
    read_file(path).lines().map(str::to_string).collect()
}

/// The bug of issue 13: aiohttp's `run_app` installs its SIGTERM handler
/// with `loop.add_signal_handler`, and `install_asyncio()` replaced it, so
/// the app never got its GracefulExit: drover's SIGKILL ended it at the
/// deadline with no cleanup. Now both handlers run: the in-flight request is
/// answered, aiohttp's on_cleanup and the SDK's registry run, every worker
/// exits 0 well before the deadline.
#[test]
fn aiohttp_stops_gracefully_with_its_own_signal_handlers_chained() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cleanup");
    let mut start = Start::args(&[
        "-w",
        "2",
        "-b",
        "127.0.0.1:0",
        "--set",
        "ready=notify",
        "--set",
        "graceful_timeout=10s",
        "--",
        &python::python(),
        &integration_app("aiohttp_app.py"),
    ]);
    start.env = vec![("APP_CLEANUP_FILE".into(), file.display().to_string())];
    let mut d = start.run();
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let addr = d.tcp_addr();
    let r = get_ok(addr, "/");
    assert!(r.body.starts_with("hello from pid "), "{}", r.body);
    let slow = get_in_flight(addr, "/sleep?s=1.5");
    let began = Instant::now();
    d.signal(Signal::SIGTERM);
    let resp = slow
        .join()
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!((resp.status, resp.body.as_str()), (200, "slept\n"));
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("(0 killed)"), "{log}");
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "stopped by itself, not at the deadline: {:?}",
        began.elapsed()
    );
    let mut cleanup = lines(&file);
    cleanup.sort();
    let mut expected: Vec<String> = workers
        .iter()
        .flat_map(|w| {
            [
                format!("aiohttp on_cleanup pid={w}"),
                format!("registry pid={w}"),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(cleanup, expected, "{log}");
}

/// drover running FastAPI through the SDK's uvicorn launcher
/// (`drover-uvicorn`), with a control socket for `drover ctl`.
fn fastapi(app: &str, extra: &str, env: &[(&str, &str)]) -> Drover {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 2\nready = \"notify\"\n\
         control_socket = \"$DIR/ctl.sock\"\ngraceful_timeout = \"10s\"\nboot_timeout = \"60s\"\n\
         command = [{:?}, \"--chdir\", {:?}, \"--no-access-log\", {app:?}]\n{extra}\n",
        python::script("drover-uvicorn"),
        repo().join("workers/python/tests").display().to_string(),
    );
    let mut start = Start::config(&config);
    start.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    start.run()
}

/// One GET: when it began, how long it took, why it failed (if it did) and
/// the pid that answered (the app's `{"pid":N}`).
type Sample = (Instant, Duration, Option<String>, Option<i32>);

/// One GET / and what a sample records of it.
fn sample_get(addr: std::net::SocketAddr) -> (Option<String>, Option<i32>) {
    match get(addr, "/") {
        Ok(r) if r.status == 200 => (None, pid_of(&r.body)),
        Ok(r) => (Some(format!("status {}", r.status)), None),
        Err(e) => (Some(e.to_string()), None),
    }
}

fn pid_of(body: &str) -> Option<i32> {
    body.trim()
        .strip_prefix("{\"pid\":")?
        .strip_suffix('}')?
        .parse()
        .ok()
}

/// Latencies of GET / from `clients` threads until `stop` is set.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    fn start(addr: std::net::SocketAddr, clients: usize) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let began = Instant::now();
                        let (error, pid) = sample_get(addr);
                        out.push((began, began.elapsed(), error, pid));
                    }
                    out
                })
            })
            .collect();
        Sampler { stop, threads }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// FastAPI with a slow import under the launcher: drover waits for READY=1
/// (sent after the lifespan startup), so reloads under load fail no request;
/// the latencies with and without reloads are printed (the p99 ratio is
/// noted in docs/workers.md, not asserted: the machine is shared).
#[test]
fn fastapi_under_the_uvicorn_launcher_reloads_under_load_with_no_failure() {
    reloads_under_load("");
}

/// The same with `preload = true`: one template per generation imports the
/// app, and the workers are forked from it, so that a reload costs one
/// import instead of one per worker.
#[test]
fn fastapi_with_preload_reloads_under_load_with_no_failure() {
    let log = reloads_under_load("preload = true");
    for generation in 2..=4 {
        assert!(
            log.contains(&format!("template of generation {generation}")),
            "{log}"
        );
    }
}

/// Three reloads under the load of 8 clients: none fails; the latencies
/// with and without reloads are printed. Returns drover's log.
fn reloads_under_load(extra: &str) -> String {
    let d = fastapi("integration.fastapi_app:app", extra, &[]);
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let log = d.log();
    assert!(
        log.contains("lifespan") || log.contains("Application startup complete"),
        "{log}"
    );
    let began = Instant::now();
    let sampler = Sampler::start(addr, 8);
    std::thread::sleep(Duration::from_secs(3));
    let reloads_began = Instant::now();
    for i in 0..3 {
        let (code, out) = d.ctl(&["reload"]);
        assert_eq!(code, 0, "reload {i}: {out}\n{}", d.log());
        assert!(
            out.contains(&format!("applied: generation {}", i + 2)),
            "{out}"
        );
    }
    let reloads_ended = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let samples = sampler.finish();
    let failed: Vec<&String> = samples.iter().filter_map(|s| s.2.as_ref()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}\n{}",
        failed.len(),
        samples.len(),
        d.log()
    );
    let before: Vec<Duration> = samples
        .iter()
        .filter(|s| s.0 < reloads_began)
        .map(|s| s.1)
        .collect();
    let during: Vec<Duration> = samples
        .iter()
        .filter(|s| s.0 >= reloads_began && s.0 <= reloads_ended)
        .map(|s| s.1)
        .collect();
    eprintln!(
        "requests: {} without a reload ({:.0} req/s, p99 {:?}), {} during 3 reloads in {:?} (p99 {:?})",
        before.len(),
        before.len() as f64 / (reloads_began - began).as_secs_f64(),
        p99(before.clone()),
        during.len(),
        reloads_ended - reloads_began,
        p99(during.clone()),
    );
    d.log()
}

/// Open-loop load: GET / sent on a fixed schedule, `rate` a second, from a
/// pool of threads. Each latency is measured from the request's scheduled
/// send time, not from when a thread got round to sending it, so a stall
/// that holds the senders back is counted in the requests behind it (no
/// coordinated omission). Samples are (scheduled time, latency, error).
struct Paced {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Paced {
    fn start(addr: std::net::SocketAddr, rate: f64) -> Paced {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(0));
        let period = Duration::from_secs_f64(1.0 / rate);
        let t0 = Instant::now();
        // Enough senders that a stall of a second at this rate does not run
        // out of them (they would then send late, which is still measured).
        let threads = (0..64)
            .map(|_| {
                let (stop, next) = (stop.clone(), next.clone());
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let scheduled = t0 + period * i as u32;
                        if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let (error, pid) = sample_get(addr);
                        out.push((scheduled, scheduled.elapsed(), error, pid));
                    }
                    out
                })
            })
            .collect();
        Paced { stop, threads }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

/// The pids of the workers (not templates) `drover ctl --json status` lists.
fn worker_pids(d: &Drover) -> Vec<i32> {
    let (code, out) = d.ctl(&["--json", "status"]);
    assert_eq!(code, 0, "{out}");
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    status["status"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

/// What the 2 workers serve at saturation: 8 clients looping for 2 s.
fn saturation(addr: std::net::SocketAddr) -> f64 {
    let sampler = Sampler::start(addr, 8);
    std::thread::sleep(Duration::from_secs(2));
    let samples = sampler.finish();
    let ok = samples.iter().filter(|s| s.2.is_none()).count();
    if ok < samples.len() {
        eprintln!(
            "saturation: {} of {} requests failed",
            samples.len() - ok,
            samples.len()
        );
    }
    ok as f64 / 2.0
}

fn describe(name: &str, mut latencies: Vec<Duration>) -> String {
    latencies.sort();
    let at = |q: usize| latencies[(latencies.len() * q / 100).min(latencies.len() - 1)];
    format!(
        "{name}: {} requests, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        at(50),
        at(99),
        latencies.last().unwrap()
    )
}

/// Issue 13's measure as production runs it: not at 100 % CPU (see
/// `reloads_under_load`) but at a fixed, moderate request rate: 25 % of what
/// the 2 workers served at saturation a moment before (8 looping clients; at
/// 40 % the shared machine's share for the test fell below the paced rate
/// even without a reload). 5 s without a reload,
/// then 5 reloads (SIGHUP), each measured from the HUP until the last old
/// worker exited, 1 s apart. No request fails; the p99 of the requests
/// scheduled during the reloads against that of those scheduled before is
/// printed, not asserted (docs/workers.md has the figures: on this shared
/// machine it is not stable enough for a timed assertion).
#[test]
fn fastapi_reloads_at_a_moderate_rate_with_no_failure() {
    reloads_at_a_moderate_rate("");
}

#[test]
fn fastapi_with_preload_reloads_at_a_moderate_rate_with_no_failure() {
    reloads_at_a_moderate_rate("preload = true");
}

/// The 1-minute load average, from /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

/// `boot_priority` off against on, interleaved in one run so that the
/// shared machine's other load falls on each alike: the app paced as
/// `reloads_at_a_moderate_rate` does, then `ROUNDS` (default 6) times, for
/// each value: a reload into `boot_priority = VALUE` (the config file is
/// rewritten before it; a generation boots, and with "idle" exits, at its
/// own), then 1.5 s without a reload, then a second, measured, reload at
/// the same value (its old workers are the first's). The p99 of the
/// requests scheduled during each value's measured reloads against that of
/// those scheduled in the quiet windows, split into booting and swapping,
/// and the load average. Printed, not asserted. `BOOT_PRIORITIES` (default
/// "normal,10,idle") sets the values (`control-import`, `control-spin`: no
/// reload, the work of two boots outside drover at SCHED_IDLE, see
/// `control`), `BOOT_PRIORITY_EXTRA` adds settings (`preload = true`).
#[test]
#[ignore = "a measurement: minutes of load; run with --ignored"]
fn fastapi_reload_latency_by_boot_priority() {
    let rounds: usize = std::env::var("ROUNDS").map_or(6, |r| r.parse().unwrap());
    let values: Vec<String> = std::env::var("BOOT_PRIORITIES")
        .unwrap_or("normal,10,idle".into())
        .split(',')
        .map(|v| match v.parse::<u32>() {
            Ok(n) => n.to_string(),
            Err(_) if v.starts_with("control-") => v.to_string(),
            Err(_) => format!("{v:?}"),
        })
        .collect();
    let extra = std::env::var("BOOT_PRIORITY_EXTRA").unwrap_or_default();
    // BOOT_BURN_SECONDS: the app's import also burns that much CPU (an app
    // heavier to import than the test's, to see the effect above the noise
    // of a shared machine).
    let burn = std::env::var("BOOT_BURN_SECONDS").unwrap_or_default();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("burn_app.py"),
        "import os, time\n\
         t = time.process_time()\n\
         while time.process_time() - t < float(os.environ.get('BURN', '0') or 0):\n    pass\n\
         from integration.fastapi_app import app\n",
    )
    .unwrap();
    let pythonpath = dir.path().display().to_string();
    let d = fastapi(
        "burn_app:app",
        &format!("{extra}\nboot_priority = \"normal\""),
        &[("BURN", &burn), ("PYTHONPATH", &pythonpath)],
    );
    d.wait_log("all 2 workers ready");
    let config = d.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let addr = d.tcp_addr();
    let saturated = saturation(addr);
    let rate = (saturated * 0.25).max(20.0);
    let load_before = load_average();
    let paced = Paced::start(addr, rate);
    std::thread::sleep(Duration::from_secs(1));
    let mut quiet = Vec::new();
    // Each reload: its value, its window, the workers it replaced, and the
    // quiet window just before it.
    type Reload<'a> = (
        &'a str,
        Instant,
        Instant,
        Instant,
        Vec<i32>,
        (Instant, Instant),
    );
    let mut reloads: Vec<Reload> = Vec::new();
    let mut reloaded = 0;
    for i in 0..rounds * values.len() {
        let value = &values[i % values.len()];
        std::fs::write(
            &config,
            text.replace(
                "boot_priority = \"normal\"",
                &format!("boot_priority = {value}"),
            ),
        )
        .unwrap();
        let q = Instant::now();
        std::thread::sleep(Duration::from_millis(1500));
        quiet.push((q, Instant::now()));
        if let Some(work) = value.strip_prefix("control-") {
            // The serving workers are the "old" ones: none is new.
            let serving = worker_pids(&d);
            let (hup, end) = control(work, &burn, &pythonpath);
            reloads.push((value, hup, end, end, serving, *quiet.last().unwrap()));
            continue;
        }
        // Unmeasured: brings the workers to this value's generation, so that
        // the measured reload's old workers also exit at it
        // (`DROVER_EXIT_PRIORITY`), not at the previous value's.
        reload(&d, &mut reloaded);
        let q = Instant::now();
        std::thread::sleep(Duration::from_millis(1500));
        quiet.push((q, Instant::now()));
        let (hup, applied, end, old) = reload(&d, &mut reloaded);
        reloads.push((value, hup, applied, end, old, *quiet.last().unwrap()));
    }
    let samples = paced.finish();
    let failed = samples.iter().filter(|s| s.2.is_some()).count();
    let within = |a: Instant, b: Instant| -> Vec<Duration> {
        samples
            .iter()
            .filter(|s| s.0 >= a && s.0 <= b)
            .map(|s| s.1)
            .collect()
    };
    let base: Vec<Duration> = quiet.iter().flat_map(|(a, b)| within(*a, *b)).collect();
    let base_p99 = p99(base.clone());
    let mut lines = vec![
        format!(
            "saturation {saturated:.0} req/s; paced at {rate:.0} req/s; {} requests, {failed} failed; \
             load average {load_before} -> {}",
            samples.len(),
            load_average()
        ),
        describe("quiet windows", base),
    ];
    for value in &values {
        let mine: Vec<_> = reloads.iter().filter(|r| r.0 == value).collect();
        let all: Vec<Duration> = mine.iter().flat_map(|r| within(r.1, r.3)).collect();
        let slow = all.iter().filter(|l| **l > base_p99.mul_f64(1.5)).count();
        // Who answered the slow ones: a worker the reload replaces, or one
        // it started (its first requests).
        let by_new = mine
            .iter()
            .flat_map(|r| {
                samples.iter().filter(move |s| {
                    s.0 >= r.1
                        && s.0 <= r.3
                        && s.1 > base_p99.mul_f64(1.5)
                        && s.3.is_some_and(|p| !r.4.contains(&p))
                })
            })
            .count();
        // Of those, the ones among a new worker's first 5 requests (a fresh
        // process's first calls of a route are slow: FastAPI's first-call
        // work, cold caches).
        let mut first: std::collections::BTreeMap<i32, Vec<Instant>> = Default::default();
        for s in &samples {
            if let Some(p) = s.3 {
                first.entry(p).or_default().push(s.0);
            }
        }
        for times in first.values_mut() {
            times.sort();
            times.truncate(5);
        }
        let by_first = mine
            .iter()
            .flat_map(|r| {
                let first = &first;
                samples.iter().filter(move |s| {
                    s.0 >= r.1
                        && s.0 <= r.3
                        && s.1 > base_p99.mul_f64(1.5)
                        && s.3
                            .is_some_and(|p| !r.4.contains(&p) && first[&p].contains(&s.0))
                })
            })
            .count();
        // Against the quiet window just before it: the other processes' load
        // is much the same over those few seconds.
        let mut each: Vec<f64> = mine
            .iter()
            .map(|r| {
                p99(within(r.1, r.3)).as_secs_f64() / p99(within(r.5 .0, r.5 .1)).as_secs_f64()
            })
            .collect();
        let shown: Vec<String> = each.iter().map(|r| format!("{r:.1}")).collect();
        // The two phases apart: booting (HUP to "reload applied") and
        // swapping (the old workers drain and exit).
        let phase = |from: fn(&Reload) -> Instant, to: fn(&Reload) -> Instant| {
            let l: Vec<Duration> = mine.iter().flat_map(|r| within(from(r), to(r))).collect();
            let n = l.len();
            if n == 0 {
                return "- (0 requests)".to_string();
            }
            format!(
                "{:.2} ({n} requests)",
                p99(l).as_secs_f64() / base_p99.as_secs_f64()
            )
        };
        let boot = phase(|r| r.1, |r| r.2);
        let swap = phase(|r| r.2, |r| r.3);
        each.sort_by(f64::total_cmp);
        lines.push(format!(
            "{}, p90 {:.1?}; p99 ratio {:.2}; each reload's p99 / its quiet window's: {} (median \
             {:.2}); slower than 1.5x the quiet p99: {slow} ({by_new} answered by a new worker, {by_first} \
             among its first 5); p99 ratio booting {boot}, swapping {swap}; reloads took {:.2?} on average",
            describe(&format!("boot_priority {value:>8}"), all.clone()),
            {
                let mut sorted = all.clone();
                sorted.sort();
                sorted[sorted.len() * 9 / 10]
            },
            p99(all).as_secs_f64() / base_p99.as_secs_f64(),
            shown.join(" "),
            each[each.len() / 2],
            mine.iter().map(|r| r.3 - r.1).sum::<Duration>() / mine.len() as u32,
        ));
    }
    eprintln!("{}", lines.join("\n"));
    assert_eq!(failed, 0);
}

/// One SIGHUP, `reloaded` being the reloads applied before it: when it was
/// sent, when the new generation took over ("reload applied": before it the
/// new workers boot, after it the old ones drain and exit), when the last
/// old worker exited, and the old workers.
fn reload(d: &Drover, reloaded: &mut usize) -> (Instant, Instant, Instant, Vec<i32>) {
    let old = worker_pids(d);
    let hup = Instant::now();
    d.signal(Signal::SIGHUP);
    let mut applied = None;
    // An idle boot on a busy machine may take up to half the boot_timeout
    // (60 s) per worker before drover restores it.
    wait_for("the old workers to exit", Duration::from_secs(150), || {
        if applied.is_none() && d.log().matches("reload applied: generation").count() > *reloaded {
            applied = Some(Instant::now());
        }
        old.iter()
            .all(|p| !alive(nix::unistd::Pid::from_raw(*p)))
            .then_some(())
    });
    let end = Instant::now();
    *reloaded += 1;
    d.wait_log_count("reload applied: generation", *reloaded);
    (hup, applied.unwrap_or(end), end, old)
}

/// The control for `fastapi_reload_latency_by_boot_priority`'s values
/// `control-import` and `control-spin`: no reload, but two processes outside
/// drover, under `SCHED_IDLE` (`chrt --idle 0`), do what two booting workers
/// do (import the app) or only burn a CPU second each. What they cost the
/// serving workers is what the machine charges for work that runs only on
/// idle CPU time, whoever starts it. Returns when they began and ended.
fn control(work: &str, burn: &str, pythonpath: &str) -> (Instant, Instant) {
    let code = match work {
        "import" => "import burn_app",
        "spin" => "import time\nt = time.process_time()\nwhile time.process_time() - t < 1: pass",
        other => panic!("unknown control {other:?}: control-import or control-spin"),
    };
    let began = Instant::now();
    let children: Vec<_> = (0..2)
        .map(|_| {
            std::process::Command::new("chrt")
                .args(["--idle", "0", &python::python(), "-c", code])
                .env("BURN", burn)
                .env("PYTHONPATH", pythonpath)
                .current_dir(repo().join("workers/python/tests"))
                .spawn()
                .expect("chrt (util-linux) runs the control")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "the control {work} failed");
    }
    (began, Instant::now())
}

fn reloads_at_a_moderate_rate(extra: &str) {
    let d = fastapi("integration.fastapi_app:app", extra, &[]);
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let saturated = saturation(addr);
    let rate = (saturated * 0.25).max(20.0);
    let paced = Paced::start(addr, rate);
    std::thread::sleep(Duration::from_secs(1));
    let baseline_began = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let mut windows = Vec::new();
    for i in 0..5 {
        let old = worker_pids(&d);
        let hup = Instant::now();
        d.signal(Signal::SIGHUP);
        wait_for("the old workers to exit", LIMIT, || {
            old.iter()
                .all(|p| !alive(nix::unistd::Pid::from_raw(*p)))
                .then_some(())
        });
        windows.push((hup, Instant::now()));
        d.wait_log_count("reload applied: generation", i + 1);
        std::thread::sleep(Duration::from_secs(1));
    }
    let samples = paced.finish();
    let failed: Vec<&String> = samples.iter().filter_map(|s| s.2.as_ref()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}\n{}",
        failed.len(),
        samples.len(),
        d.log()
    );
    let log = d.log();
    assert!(log.contains("reload applied: generation 6"), "{log}");
    let in_window = |t: Instant| windows.iter().any(|(a, b)| t >= *a && t <= *b);
    let before: Vec<Duration> = samples
        .iter()
        .filter(|s| s.0 >= baseline_began && s.0 < windows[0].0)
        .map(|s| s.1)
        .collect();
    let during: Vec<Duration> = samples
        .iter()
        .filter(|s| in_window(s.0))
        .map(|s| s.1)
        .collect();
    // Each reload on its own: an episode of the shared machine's contention
    // shows as one bad window among good ones.
    let reloads: Vec<String> = windows
        .iter()
        .map(|(a, b)| {
            let mine: Vec<Duration> = samples
                .iter()
                .filter(|s| s.0 >= *a && s.0 <= *b)
                .map(|s| s.1)
                .collect();
            format!("{:.2?} (p99 {:.1?})", *b - *a, p99(mine))
        })
        .collect();
    let threshold = p99(before.clone()).mul_f64(1.5);
    eprintln!(
        "saturation {saturated:.0} req/s; paced at {rate:.0} req/s; reloads took {}\n{}\n{}\n\
         p99 ratio (during/without): {:.2}\n{}",
        reloads.join(", "),
        describe("without a reload", before.clone()),
        describe("during the reloads", during.clone()),
        p99(during).as_secs_f64() / p99(before).as_secs_f64(),
        fresh_workers(&samples, baseline_began, threshold),
    );
}

/// What a fresh worker's first requests cost: the samples of each pid that
/// did not answer before `since` (the reloads' workers), in the order they
/// were scheduled, split into each pid's first 5 and the rest; and how many
/// of all the requests slower than `threshold` were among a fresh pid's
/// first 5.
fn fresh_workers(samples: &[Sample], since: Instant, threshold: Duration) -> String {
    const FIRST: usize = 5;
    let mut by_pid: std::collections::BTreeMap<i32, Vec<&Sample>> = Default::default();
    for s in samples {
        if let Some(pid) = s.3 {
            by_pid.entry(pid).or_default().push(s);
        }
    }
    let (mut first, mut later) = (Vec::new(), Vec::new());
    let mut slow_first = 0;
    for mine in by_pid.values_mut() {
        mine.sort_by_key(|s| s.0);
        if mine[0].0 < since {
            continue;
        }
        for (i, s) in mine.iter().enumerate() {
            if i < FIRST {
                first.push(s.1);
                slow_first += usize::from(s.1 > threshold);
            } else {
                later.push(s.1);
            }
        }
    }
    let slow = samples
        .iter()
        .filter(|s| s.0 >= since && s.1 > threshold)
        .count();
    if first.is_empty() || later.is_empty() {
        return "no fresh worker answered".into();
    }
    format!(
        "{}\n{}\nslower than 1.5x the baseline p99 ({threshold:.1?}): {slow}, of which a fresh \
         worker's first {FIRST}: {slow_first}",
        describe(&format!("fresh workers' first {FIRST}"), first),
        describe("fresh workers' later", later),
    )
}

/// An app that cannot be imported stops drover with status 3 (the launcher
/// exits 3 instead of uvicorn's 1, so drover does not respawn it forever).
#[test]
fn a_fastapi_app_that_cannot_be_imported_stops_drover_with_status_3() {
    let mut d = fastapi("broken_app:app", "", &[]);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(3), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("ImportError: broken_app cannot be imported (on purpose)"),
        "{log}"
    );
    assert!(
        log.contains("cannot boot: cannot load the application 'broken_app:app'"),
        "{log}"
    );
    assert!(
        log.matches("spawned").count() <= 2,
        "no respawn loop: {log}"
    );
}

/// SIGTERM: the in-flight request is answered, the lifespan shutdown and the
/// SDK's registry run, every worker exits 0 by itself.
#[test]
fn fastapi_drains_on_sigterm_and_runs_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes");
    let file_text = file.display().to_string();
    let mut d = fastapi(
        "integration.fastapi_app:app",
        "",
        &[("APP_CLEANUP_FILE", &file_text)],
    );
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let addr = d.tcp_addr();
    let slow = get_in_flight(addr, "/sleep?s=1.5");
    d.signal(Signal::SIGTERM);
    let resp = slow
        .join()
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!((resp.status, resp.body.as_str()), (200, "{\"slept\":1.5}"));
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("(0 killed)"), "{log}");
    let mut notes = lines(&file);
    notes.sort();
    let mut expected: Vec<String> = workers
        .iter()
        .flat_map(|w| {
            [
                format!("lifespan shutdown pid={w}"),
                format!("lifespan startup pid={w}"),
                format!("registry pid={w}"),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(notes, expected, "{log}");
}

/// drover forwards SIGUSR1 ("reopen your logs": logrotate's `postrotate`)
/// to every worker. drover-uvicorn left it at its default action, so a log
/// rotation killed every FastAPI worker (`killed by SIGUSR1`, respawned as a
/// failure, its lifespan shutdown and registry never run). The launcher now
/// ignores it, as drover-wsgi does: the same workers serve on, and stop by
/// themselves with their cleanup.
#[test]
fn fastapi_workers_survive_sigusr1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes");
    let file_text = file.display().to_string();
    let mut d = fastapi(
        "integration.fastapi_app:app",
        "",
        &[("APP_CLEANUP_FILE", &file_text)],
    );
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    d.signal(Signal::SIGUSR1);
    d.wait_log("SIGUSR1: forwarded to 2 worker(s)");
    let addr = d.tcp_addr();
    for _ in 0..4 {
        let r = get_ok(addr, "/");
        assert!(r.body.starts_with("{\"pid\":"), "{}", r.body);
    }
    // A SIGUSR1 that killed a worker reached it before this SIGTERM (drover
    // sent it first, and a pending SIGUSR1 is delivered before a SIGTERM).
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!log.contains("killed by SIGUSR1"), "{log}");
    assert_eq!(log.matches("spawned").count(), 2, "no respawn: {log}");
    let mut registry: Vec<String> = lines(&file)
        .into_iter()
        .filter(|l| l.starts_with("registry"))
        .collect();
    registry.sort();
    let mut expected: Vec<String> = workers
        .iter()
        .map(|w| format!("registry pid={w}"))
        .collect();
    expected.sort();
    assert_eq!(registry, expected, "{log}");
}

/// Behind nginx on a Unix socket (docs/deployment.md's advice), the proxy's
/// `X-Forwarded-Proto` and `X-Forwarded-For` reach a FastAPI app as its
/// scheme and client address, as they reach a WSGI app under drover-wsgi,
/// which trusts Unix-socket peers. uvicorn checks the peer's address
/// against `--forwarded-allow-ips` and a Unix-socket peer has none: the app
/// behind an https nginx saw `http` and no client (`{"scheme":"http",
/// "client":null}`; found by the trial behind nginx). The client address is
/// the rightmost entry that is not a trusted proxy's, so what the client
/// itself wrote at the left of the header is not believed.
#[test]
fn fastapi_on_a_unix_socket_believes_the_proxy_headers() {
    let config = format!(
        "bind = [\"unix:$DIR/http.sock\"]\nworkers = 1\nready = \"notify\"\n\
         graceful_timeout = \"10s\"\nboot_timeout = \"60s\"\n\
         command = [{:?}, \"--chdir\", {:?}, \"--no-access-log\", \"integration.fastapi_app:app\"]\n",
        python::script("drover-uvicorn"),
        repo().join("workers/python/tests").display().to_string(),
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let path = d.dir.path().join("http.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    // What nginx sends with `X-Forwarded-For $proxy_add_x_forwarded_for`
    // (the client's own header, then the client's address) and
    // `X-Forwarded-Proto $scheme` behind TLS.
    s.write_all(
        b"GET /client HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 198.51.100.7, 203.0.113.9\r\n\
          X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let resp = parse_response(&raw).unwrap();
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (200, "{\"scheme\":\"https\",\"client\":\"203.0.113.9\"}"),
        "{}",
        d.log()
    );
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

/// drover running the aiohttp app of `aiohttp_app.py` under `command`, with
/// a control socket; `APP_RUN = "drover"` serves it with
/// `drover_worker.aiohttp.run_app`, anything else with aiohttp's own
/// `web.run_app`. The app notes its cleanup in `$DIR/cleanup`.
fn aiohttp(command: &[String], run: &str) -> Drover {
    aiohttp_with(command, run, "")
}

/// [`aiohttp`] with `extra` lines of configuration.
fn aiohttp_with(command: &[String], run: &str, extra: &str) -> Drover {
    let command: Vec<String> = command.iter().map(|s| format!("{s:?}")).collect();
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 2\nready = \"notify\"\n\
         control_socket = \"$DIR/ctl.sock\"\ngraceful_timeout = \"10s\"\n{extra}\n\
         command = [{}]\n[env]\nAPP_RUN = {run:?}\nAPP_CLEANUP_FILE = \"$DIR/cleanup\"\n\
         PYTHONPATH = {:?}\n",
        command.join(", "),
        repo().join("workers/python/tests").display().to_string(),
    );
    Start::config(&config).run()
}

fn aiohttp_run_app() -> Vec<String> {
    vec![python::python(), integration_app("aiohttp_app.py")]
}

/// Three reloads under 16 clients on kept-alive connections and 8 sending
/// `Connection: close`: (the kept-alive clients' outcomes, the failures of
/// the others).
fn aiohttp_reloads_under_load(run: &str) -> (KeptOutcomes, Vec<String>) {
    let d = aiohttp(&aiohttp_run_app(), run);
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let kept = KeepAliveLoad::start(addr, 16, "/");
    let closing = Sampler::start(addr, 8);
    kept.wait_answered(200);
    for _ in 0..3 {
        let before = d.wait_workers(2);
        let (code, out) = d.ctl(&["reload"]);
        assert_eq!(code, 0, "{out}\n{}", d.log());
        d.assert_replaced(&before);
        kept.wait_answered(kept.answered.load(std::sync::atomic::Ordering::Relaxed) + 200);
    }
    let o = kept.finish_after(200);
    let samples = closing.finish();
    let failed: Vec<String> = samples.iter().filter_map(|s| s.2.clone()).collect();
    eprintln!(
        "Connection: close: {} requests, {} failed",
        samples.len(),
        failed.len()
    );
    (o, failed)
}

/// aiohttp's shutdown closes at once every connection with no request in
/// progress (kept alive between two requests, or accepted with its request
/// not read yet): under `web.run_app` a reload lost the requests on their
/// way there (wrk, two reloads: 41 of 106,205 kept-alive requests and 3 of
/// 26,719 with `Connection: close`). `drover_worker.aiohttp.run_app` answers
/// `Connection: close` from the stop on and lets such connections send their
/// next request first: three reloads, no request lost or sent again.
#[test]
fn aiohttp_under_the_sdk_reloads_under_load_without_a_lost_request() {
    let (o, failed) = aiohttp_reloads_under_load("drover");
    assert_eq!(
        (o.refused, o.resent, &o.failed, &failed),
        (0, 0, &Vec::new(), &Vec::<String>::new()),
        "{o:?}"
    );
    assert!(o.announced_close > 0, "{o:?}");
}

/// `drover-aiohttp module:app` on SIGTERM with a request in flight: the
/// request is answered, `on_cleanup` and the registry run in every worker,
/// which exits 0 by itself.
#[test]
fn drover_aiohttp_drains_on_sigterm_and_runs_the_registry() {
    let command = vec![
        python::script("drover-aiohttp"),
        "--no-access-log".into(),
        "integration.aiohttp_app:app".into(),
    ];
    let mut d = aiohttp(&command, "drover");
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let addr = d.tcp_addr();
    let r = get_ok(addr, "/");
    assert!(r.body.starts_with("hello from pid "), "{}", r.body);
    let slow = get_in_flight(addr, "/sleep?s=1.5");
    let began = Instant::now();
    d.signal(Signal::SIGTERM);
    let resp = slow
        .join()
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!((resp.status, resp.body.as_str()), (200, "slept\n"));
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("(0 killed)"), "{log}");
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "{:?}",
        began.elapsed()
    );
    let mut cleanup = lines(&d.dir.path().join("cleanup"));
    cleanup.sort();
    let mut expected: Vec<String> = workers
        .iter()
        .flat_map(|w| {
            [
                format!("aiohttp on_cleanup pid={w}"),
                format!("registry pid={w}"),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(cleanup, expected, "{log}");
}

/// A websocket open at the stop: aiohttp alone leaves it to its handler
/// until the shutdown timeout, then cancels the handler and drops the
/// connection (no close frame). Under `drover_worker.aiohttp.run_app` it is
/// closed at once with 1012 ("service restart"), the handler's loop ends,
/// and the worker exits 0 long before the drain deadline.
#[test]
fn aiohttp_under_the_sdk_closes_an_open_websocket_with_1012_at_the_stop() {
    let mut d = aiohttp(&aiohttp_run_app(), "drover");
    d.wait_log("all 2 workers ready");
    let mut ws = open_websocket(d.tcp_addr());
    let began = Instant::now();
    d.signal(Signal::SIGTERM);
    let (opcode, payload) = read_frame(&mut ws).expect("a close frame");
    assert_eq!(opcode, 8, "a close frame: {payload:?}");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1012);
    // The client's close in reply, as a client sends it.
    ws.write_all(&[0x88, 0x82, 0, 0, 0, 0, payload[0], payload[1]])
        .unwrap();
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    let cleanup = read_file(&d.dir.path().join("cleanup"));
    // The handler's `async for` ended (aiohttp records the close it fed the
    // handler as 1000, whatever code went out).
    assert!(cleanup.contains("websocket closed "), "{cleanup}\n{log}");
    assert_eq!(
        cleanup.matches("registry pid=").count(),
        2,
        "{cleanup}\n{log}"
    );
}

/// `drover-aiohttp` with an app that cannot be imported: status 3, "cannot
/// boot", and drover stops instead of respawning it.
#[test]
fn drover_aiohttp_with_an_app_that_cannot_be_imported_stops_drover_with_status_3() {
    let command = vec![python::script("drover-aiohttp"), "broken_app:app".into()];
    let mut d = aiohttp(&command, "drover");
    assert_eq!(d.wait_exit(LIMIT).code(), Some(3), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("cannot boot: cannot load the application 'broken_app:app'"),
        "{log}"
    );
    assert!(
        log.matches("spawned").count() <= 2,
        "no respawn loop: {log}"
    );
}

/// SIGQUIT with a minute-long request in flight: aiohttp's shutdown would
/// cancel the handler only after its timeout had passed twice, past the
/// quick deadline, and the abandon then skipped `on_cleanup`. The request is
/// cancelled at the quick stop's drain deadline instead: `on_cleanup` and
/// the registry run in every worker, which exits 0 before drover's kill.
/// (A 10 s quick budget: of the default 5 s, the share of `on_cleanup`
/// after the drain deadline is under half a second, and in 1 run of the
/// whole suite the loaded machine let the abandon come first.)
#[test]
fn aiohttp_under_the_sdk_cancels_what_runs_at_a_quick_stop_and_cleans_up() {
    let mut d = aiohttp_with(&aiohttp_run_app(), "drover", "quick_timeout = \"10s\"");
    d.wait_log("all 2 workers ready");
    let workers = d.wait_workers(2);
    let slow = get_in_flight(d.tcp_addr(), "/sleep?s=60");
    d.signal(Signal::SIGQUIT);
    assert!(
        slow.join().unwrap().is_err(),
        "the cancelled request gets no response"
    );
    let status = d.wait_exit(LIMIT);
    let log = d.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("(0 killed)"), "{log}");
    assert!(
        log.contains("drain deadline reached: cancelling 1 request(s) in flight"),
        "{log}"
    );
    let mut cleanup = lines(&d.dir.path().join("cleanup"));
    cleanup.sort();
    let mut expected: Vec<String> = workers
        .iter()
        .flat_map(|w| {
            [
                format!("aiohttp on_cleanup pid={w}"),
                format!("registry pid={w}"),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(cleanup, expected, "{log}");
}

//! Observability with the real binary: JSON logs, and (see docs/observability.md)
//! the admin endpoint, metrics, events and captured worker output.

mod common;

use common::*;
use nix::sys::signal::Signal;

/// `log_format = "json"`: every line drover writes is one JSON object whose
/// first keys are ts, level and msg.
#[test]
fn json_logs_have_stable_keys() {
    let mut d = Start::config(
        "command = [\"sleep\", \"30\"]\nbind = [\"127.0.0.1:0\"]\nlog_format = \"json\"\n",
    )
    .run();
    d.wait_log("all 1 workers ready");
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(LIMIT).success());
    let log = d.log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 4, "{log}");
    for line in lines {
        assert!(
            line.starts_with("{\"ts\":\"") && line.contains(",\"level\":\""),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(line).expect(line);
        let ts = v["ts"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
        assert!(["info", "warn", "error", "debug"].contains(&v["level"].as_str().unwrap()));
        assert!(v["msg"].is_string());
    }
    assert!(log.contains("\"msg\":\"exiting with status 0 after "));
}

/// Parses a Prometheus text exposition with `prometheus_client`'s parser (the
/// reference implementation, in the tests' venv). Returns every sample as
/// (family, type, sample name, labels, value as text). Panics on what the
/// parser rejects.
fn parse_metrics(text: &str) -> Vec<(String, String, String, serde_json::Value, String)> {
    use std::io::Write;
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = []\n\
        for f in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in f.samples:\n\
        \x20       out.append([f.name, f.type, s.name, s.labels, repr(s.value)])\n\
        print(json.dumps(out))\n";
    let mut child = std::process::Command::new(python::python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejects the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<(String, String, String, serde_json::Value, String)>>(&out.stdout)
        .unwrap()
}

/// Every family `metrics::render` writes parses with the reference parser,
/// with the type it declares (the scoreboard families included).
#[test]
fn the_exposition_parses_with_prometheus_client() {
    use drover::metrics::*;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut counters = Counters::default();
    counters.observe(&drover::events::Kind::WorkerReady {
        slot: 1,
        pid: 2,
        generation: 1,
        seconds: 0.3,
    });
    let mut latency = Histogram::new(drover::scoreboard::LATENCY_BOUNDS);
    latency.observe(0.02);
    let snapshot = Snapshot {
        version: "0.1.0",
        start_time: std::time::SystemTime::now(),
        uptime: std::time::Duration::from_millis(1500),
        generation: 2,
        slots: 2,
        ready: true,
        workers: vec![WorkerSample {
            slot: 1,
            pid: std::process::id() as i32,
            generation: 2,
            state: "ready",
        }],
        listeners: vec![ListenerSample {
            name: "we\"ird\\name".into(),
            fd: std::os::fd::AsFd::as_fd(&listener),
        }],
        counters: &counters,
        requests: vec![SlotRequests {
            slot: 1,
            busy: 1,
            requests: 7,
            latency,
        }],
    };
    let samples = parse_metrics(&render(&snapshot));
    let family = |name: &str| {
        samples
            .iter()
            .find(|s| s.0 == name)
            .unwrap_or_else(|| panic!("no family {name}"))
            .1
            .clone()
    };
    for (name, kind) in [
        ("drover_build_info", "gauge"),
        ("drover_start_time_seconds", "gauge"),
        ("drover_uptime_seconds", "gauge"),
        ("drover_workers", "gauge"),
        ("drover_worker_starts", "counter"),
        ("drover_worker_exits", "counter"),
        ("drover_reloads", "counter"),
        ("drover_upgrades", "counter"),
        ("drover_worker_boot_seconds", "histogram"),
        ("drover_listen_queue_length", "gauge"),
        ("drover_listen_queue_max", "gauge"),
        ("drover_worker_resident_memory_bytes", "gauge"),
        ("drover_master_resident_memory_bytes", "gauge"),
        ("drover_worker_busy", "gauge"),
        ("drover_requests", "counter"),
        ("drover_request_duration_seconds", "histogram"),
    ] {
        assert_eq!(family(name), kind, "{name}");
    }
    let queue = samples
        .iter()
        .find(|s| s.2 == "drover_listen_queue_length")
        .unwrap();
    assert_eq!(queue.3["listener"], "we\"ird\\name", "labels round-trip");
    let boot_count = samples
        .iter()
        .find(|s| s.2 == "drover_worker_boot_seconds_count")
        .unwrap();
    assert_eq!(boot_count.4.parse::<f64>().unwrap(), 1.0);
}

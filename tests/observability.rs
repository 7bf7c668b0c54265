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

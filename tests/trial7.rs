//! Faults found by the user trial "trial7": observability under churn, the
//! deployment kits, liveness and limits, as an operator meets them with the
//! release binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use common::*;
use nix::unistd::Pid;

/// Reference workers, an admin endpoint on a Unix socket and a control
/// socket, in the test's directory.
fn config(workers: u32) -> String {
    format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = {workers}\nready = \"notify\"\n\
         command = [\"{}\"]\ncontrol_socket = \"$DIR/ctl.sock\"\n\
         admin_bind = \"unix:$DIR/admin.sock\"\n",
        hello_bin()
    )
}

/// Kills a master the test made (the new master of an upgrade outlives the
/// old one, which the harness kills) when the test ends.
struct KillOnDrop(Pid);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

/// `drover_start_time_seconds` is when the master started, the same at
/// every scrape: a restart (or an upgrade) is what changes it, and
/// `changes(drover_start_time_seconds[5m])` is how dashboards count them.
/// The code before computed it at each scrape as now minus the uptime, and
/// it moved by a few hundred nanoseconds from scrape to scrape (2 values in
/// 200 scrapes of an idle drover, 3 per master under churn).
#[test]
fn the_start_time_is_the_same_at_every_scrape() {
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let d = Start::config(&config(1)).run();
    d.wait_log("all 1 workers ready");
    let start_time = |body: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix("drover_start_time_seconds "))
            .unwrap_or_else(|| panic!("no drover_start_time_seconds in {body}"))
            .to_string()
    };
    let first = start_time(&d.admin("/metrics").body);
    let value: f64 = first.parse().unwrap();
    assert!(
        value >= before - 1.0 && value <= before + LIMIT.as_secs_f64(),
        "start time {value}, test began at {before}"
    );
    let mut seen = std::collections::BTreeSet::from([first]);
    for _ in 0..200 {
        seen.insert(start_time(&d.admin("/metrics").body));
    }
    assert_eq!(seen.len(), 1, "drover_start_time_seconds moved: {seen:?}");
}

/// `drover ctl events` follows drover, not one master: across a binary
/// upgrade it goes on with the new master's events, and ends only when
/// drover exits. The code before ended at the old master's `exiting` with
/// status 0, as if drover had stopped: a log shipper running it stopped
/// following at the first upgrade.
#[test]
fn ctl_events_follows_drover_across_a_binary_upgrade() {
    let d = Start::config(&config(2)).run();
    d.wait_log("all 2 workers ready");
    let mut follower = Command::new(drover_bin())
        .arg("ctl")
        .arg("--socket")
        .arg(d.dir.path().join("ctl.sock"))
        .args(["--json", "events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let collect = |stream: Box<dyn std::io::Read + Send>| {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        lines
    };
    let out = collect(Box::new(follower.stdout.take().unwrap()));
    let err = collect(Box::new(follower.stderr.take().unwrap()));
    let has = |lines: &Arc<Mutex<Vec<String>>>, needle: &str| {
        lines.lock().unwrap().iter().any(|l| l.contains(needle))
    };
    wait_for("the subscription", LIMIT, || {
        has(&out, "following events").then_some(())
    });

    let (status, answer) = d.ctl(&["upgrade"]);
    assert_eq!(status, 0, "{answer}");
    let new: i32 = answer
        .split("new master pid ")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no new master in {answer:?}"));
    let new = KillOnDrop(Pid::from_raw(new));
    // The old master's last words, then the new master's events.
    wait_for("the old master's exiting event", LIMIT, || {
        has(&out, "\"event\":\"exiting\"").then_some(())
    });
    let (status, answer) = d.ctl(&["scale", "3"]);
    assert_eq!(status, 0, "{answer}");
    wait_for("the new master's scaled event", LIMIT, || {
        has(&out, "\"event\":\"scaled\"").then_some(())
    });
    assert!(
        follower.try_wait().unwrap().is_none(),
        "the follower stays while drover runs"
    );
    let note = format!("following the new master (pid {})", new.0);
    assert!(has(&err, &note), "{:?}", err.lock().unwrap());

    // drover stops: the stream ends with the new master's `exiting`, status 0.
    nix::sys::signal::kill(new.0, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_for("the follower to exit", LIMIT, || {
        follower.try_wait().unwrap()
    });
    assert!(status.success(), "{status:?} {:?}", err.lock().unwrap());
    let exits = out
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("\"event\":\"exiting\""))
        .count();
    assert_eq!(exits, 2, "one exiting event per master");
    let answers = out
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("following events"))
        .count();
    assert_eq!(answers, 1, "--json prints the opening answer once");
}

/// The Kubernetes kit's startup probe outlasts `boot_timeout`: the kubelet
/// restarts the container after `failureThreshold` failed probes, one each
/// `periodSeconds` from the start, so that must leave drover its whole
/// boot budget plus a margin (drover's own start, and its verdict in the
/// log). The kit had 30 probes a second apart for a 30 s `boot_timeout`:
/// the last probe came at 29 s, and a worker that boots in 29.5 s, which
/// drover accepts, had the pod restarted in a loop.
#[test]
fn the_kubernetes_startup_probe_outlasts_boot_timeout() {
    let yaml = read_file(&repo().join("deploy/kubernetes/drover.yaml"));
    let probe: Vec<&str> = yaml
        .lines()
        .skip_while(|l| l.trim() != "startupProbe:")
        .skip(1)
        .take_while(|l| !l.trim_end().ends_with("Probe:"))
        .collect();
    let number = |key: &str| -> u64 {
        probe
            .iter()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no {key} in the startup probe: {probe:?}"))
            .trim()
            .parse()
            .unwrap()
    };
    let boot_timeout: u64 = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("boot_timeout = \""))
        .and_then(|v| v.strip_suffix("s\""))
        .expect("boot_timeout in the ConfigMap")
        .parse()
        .unwrap();
    // The kubelet probes at 0, period, 2 * period, ...: the last failure
    // that restarts the container comes at (threshold - 1) * period.
    let last_probe = (number("failureThreshold") - 1) * number("periodSeconds");
    const MARGIN: u64 = 5;
    assert!(
        last_probe >= boot_timeout + MARGIN,
        "the startup probe gives up at {last_probe}s, boot_timeout is {boot_timeout}s"
    );
}

/// The seconds of `key = "Ns"` in a kit's config text (indented or not).
fn kit_seconds(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key} = \"")))
        .and_then(|v| v.strip_suffix("s\""))
        .map(|v| v.parse().unwrap())
}

/// Every kit's config sets `timeout`, so that a worker whose every thread
/// is stuck (a deadlock, an upstream that never answers) is replaced: the
/// kits' liveness checks ask the master (`/livez`, `WatchdogSec=`), which
/// answers whatever the workers do, and the manifest says "drover replaces
/// hung ones". With the kits as they were (no `timeout`, so no
/// heartbeats), 10 `GET /hang` to the Kubernetes kit's config (2
/// drover-wsgi workers of 4 threads) left every thread stuck: `GET /`
/// timed out, `/livez` and `/readyz` answered 200, and nothing changed.
#[test]
fn every_kit_replaces_a_hung_worker() {
    for kit in [
        "deploy/container/drover.toml",
        "deploy/systemd/drover.toml",
        "deploy/kubernetes/drover.yaml",
    ] {
        let text = read_file(&repo().join(kit));
        assert!(
            kit_seconds(&text, "timeout").is_some(),
            "{kit}: no timeout: a hung worker is never replaced"
        );
    }
}

/// A file drover cannot create at start-up (the pidfile, the log file, the
/// control socket, a Unix admin endpoint) is named with the setting and
/// where it was set, like every other config error: the operator edits that
/// line. The code before said `drover: log file: Not a directory (os error
/// 20)` for `log_file` (neither the path nor the setting), and the path
/// alone for the others.
#[test]
fn a_file_drover_cannot_create_names_its_setting() {
    // A path under a regular file (the config itself): ENOTDIR, root or not.
    for (key, value, said) in [
        ("pidfile", "\"$DIR/config.toml/drover.pid\"", "pidfile"),
        ("log_file", "\"$DIR/config.toml/drover.log\"", "log_file"),
        (
            "control_socket",
            "\"$DIR/config.toml/ctl.sock\"",
            "control socket",
        ),
        (
            "admin_bind",
            "\"unix:$DIR/config.toml/admin.sock\"",
            "admin_bind unix:",
        ),
    ] {
        let config = format!(
            "bind = [\"127.0.0.1:0\"]\ncommand = [\"{}\"]\n{key} = {value}\n",
            hello_bin()
        );
        let mut d = Start::config(&config).run();
        let status = d.wait_exit(LIMIT);
        assert_eq!(status.code(), Some(1), "{key}: {}", d.log());
        let col = key.len() + 4;
        let dir = d.dir.path().display().to_string();
        let want = format!("config.toml:3:{col}: {said}");
        let line = d
            .log()
            .lines()
            .find(|l| l.contains("Not a directory"))
            .unwrap_or_else(|| panic!("{key}: no error in {}", d.log()))
            .to_string();
        assert!(line.contains(&want), "{key}: {line:?} lacks {want:?}");
        assert!(line.contains(&format!("{dir}/config.toml/")), "{line}");
        let hint = format!("{dir}/config.toml is not a directory: choose a path in a directory");
        assert!(line.contains(&hint), "{key}: {line:?} lacks {hint:?}");
    }
}

/// The errno alone does not say whether the file or its directory is
/// missing, nor what to do: a file drover cannot create names the missing
/// directory and what to do (the code before ended at `No such file or
/// directory (os error 2)` for all four).
#[test]
fn a_file_drover_cannot_create_says_what_to_do() {
    for (key, value) in [
        ("pidfile", "$DIR/missing/drover.pid"),
        ("log_file", "$DIR/missing/drover.log"),
        ("control_socket", "$DIR/missing/control.sock"),
        ("admin_bind", "unix:$DIR/missing/admin.sock"),
    ] {
        let config = format!(
            "bind = [\"127.0.0.1:0\"]\ncommand = [\"{}\"]\n{key} = \"{value}\"\n",
            hello_bin()
        );
        let mut d = Start::config(&config).run();
        assert_eq!(d.wait_exit(LIMIT).code(), Some(1), "{key}: {}", d.log());
        let log = d.log();
        let says = format!(
            "the directory {}/missing does not exist: create it (systemd: \
             RuntimeDirectory=), or choose a path in one that does",
            d.dir.path().display()
        );
        assert!(log.contains(&says), "{key}: {says:?} in {log}");
        assert!(!log.contains("spawned"), "{key}: {log}");
    }
}

/// The label sets of one family in an exposition.
fn label_sets(body: &str, family: &str) -> std::collections::BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix(family)?.strip_prefix('{'))
        .map(|rest| rest.split('}').next().unwrap().to_string())
        .collect()
}

/// A worker's memory series is its slot's, the same across replacements:
/// with a `pid` label (the code before) every replacement started a new
/// series, which Prometheus keeps for hours: with `max_requests` (300,
/// under wrk) 642 replacements in 40 s, so as many series, and a leak
/// drawn as hundreds of short lines.
#[test]
fn worker_memory_series_outlive_their_workers() {
    let d = Start::config(&config(2)).run();
    d.wait_log("all 2 workers ready");
    let body = d.admin("/metrics").body;
    let family = "drover_worker_resident_memory_bytes";
    let before = label_sets(&body, family);
    assert_eq!(
        before,
        ["slot=\"1\"", "slot=\"2\""]
            .map(String::from)
            .into_iter()
            .collect(),
        "{body}"
    );
    // Replace both workers: new pids, the same series.
    let old = d.wait_workers(2);
    for pid in &old {
        nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    }
    wait_for("two new workers, both ready", LIMIT, || {
        let now = d.wait_workers(2);
        let (_, status) = d.ctl(&["status"]);
        (now.iter().all(|p| !old.contains(p)) && status.contains("2/2 workers ready")).then_some(())
    });
    let body = d.admin("/metrics").body;
    assert_eq!(label_sets(&body, family), before, "{body}");
}

/// A log file on a full disk: drover serves on, and once lines can be
/// written again the first one says how many were lost and why. The log is
/// a symlink to /dev/full (every write: ENOSPC), then to a regular file
/// (and SIGUSR1 reopens it, as after a rotation). The code before lost the
/// lines without a word: an operator saw a gap in the log, and a line cut
/// short by the full disk ran into the next one.
#[test]
fn lines_lost_to_a_full_disk_are_counted_in_the_log() {
    let logs = tempfile::tempdir().unwrap();
    let link = logs.path().join("drover.log");
    std::os::unix::fs::symlink("/dev/full", &link).unwrap();
    let config = format!(
        "{}log_file = \"{}\"\nadmin_bind = \"unix:$DIR/admin.sock\"\n",
        config(1).replace("admin_bind = \"unix:$DIR/admin.sock\"\n", ""),
        link.display()
    );
    let d = Start::config(&config).run();
    wait_for("drover ready", LIMIT, || {
        let (status, out) = d.ctl(&["status"]);
        (status == 0 && out.contains("1/1 workers ready")).then_some(())
    });
    // Lines nobody can write: a worker more, then one less.
    for (signal, wanted) in [
        (nix::sys::signal::Signal::SIGTTIN, "2 worker(s) wanted"),
        (nix::sys::signal::Signal::SIGTTOU, "1 worker(s) wanted"),
    ] {
        d.signal(signal);
        wait_for(wanted, LIMIT, || {
            let (_, out) = d.ctl(&["status"]);
            out.contains(wanted).then_some(())
        });
    }
    // Space again: the log is a regular file, reopened.
    std::fs::remove_file(&link).unwrap();
    std::fs::write(&link, "").unwrap();
    d.signal(nix::sys::signal::Signal::SIGUSR1);
    let text = wait_for("the log file written", LIMIT, || {
        let text = read_file(&link);
        text.contains("log file reopened").then_some(text)
    });
    let first = text.lines().next().unwrap();
    let lost: u64 = first
        .split("WARN ")
        .nth(1)
        .and_then(|rest| {
            rest.strip_suffix(" log line(s) lost: No space left on device (os error 28)")
        })
        .unwrap_or_else(|| panic!("the first line does not count the lost ones: {text}"))
        .parse()
        .unwrap();
    assert!(lost >= 2, "{text}");
}

/// `/readyz` stays ready while workers recycle themselves (`max_requests`):
/// the slot's successor boots after the old worker's announced exit, and
/// that is a recycle, as a reload's replacement is, not a degradation. The
/// code before answered `503 degraded` whenever a slot was between two
/// workers: under wrk with drover-wsgi `--max-requests 300` (3 workers),
/// 127 of 130 probes in 10 s, so a Kubernetes readiness probe took the
/// pod out of its Service for as long as the load lasted.
#[test]
fn readyz_stays_ready_while_workers_recycle_themselves() {
    let script = toml_string(RECYCLING_WORKER);
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 2\nready = \"notify\"\n\
         command = [\"python3\", \"-c\", {script}]\n\
         admin_bind = \"unix:$DIR/admin.sock\"\ncontrol_socket = \"$DIR/ctl.sock\"\n"
    );
    let d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    let mut answers = std::collections::BTreeMap::<String, u32>::new();
    let began = std::time::Instant::now();
    while began.elapsed() < std::time::Duration::from_secs(3) {
        let r = d.admin("/readyz");
        *answers.entry(r.body.trim().to_string()).or_default() += 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let recycled = d.log().matches("as it announced (STOPPING=1)").count();
    assert!(recycled >= 4, "the workers recycled {recycled} times");
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        ["ready"],
        "{answers:?} over {recycled} recycles"
    );
}

/// The value of an unlabelled sample, or of one with exactly `labels`.
fn metric(body: &str, name_and_labels: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name_and_labels} ")))
        .unwrap_or_else(|| panic!("no {name_and_labels} in {body}"))
        .parse()
        .unwrap()
}

/// `drover_upgrades_total{outcome="applied"}` counts the upgrades that
/// happened: the new master, whose scrapes are the only ones after it,
/// counts the upgrade it completed. The code before counted it only in the
/// old master, just before that one retired: no scrape ever saw it, and the
/// series stayed 0 through every upgrade.
#[test]
fn an_applied_upgrade_is_counted_where_it_can_be_seen() {
    let d = Start::config(&config(1)).run();
    d.wait_log("all 1 workers ready");
    let before = d.admin("/metrics").body;
    let applied = "drover_upgrades_total{outcome=\"applied\"}";
    assert_eq!(metric(&before, applied), 0.0);
    let (status, answer) = d.ctl(&["upgrade"]);
    assert_eq!(status, 0, "{answer}");
    let new: i32 = answer
        .split("new master pid ")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no new master in {answer:?}"));
    let _new = KillOnDrop(Pid::from_raw(new));
    // The new master answers on the same endpoint: its own start time.
    let after = wait_for("the new master's scrape", LIMIT, || {
        let body = d.admin("/metrics").body;
        (metric(&body, "drover_start_time_seconds") != metric(&before, "drover_start_time_seconds"))
            .then_some(body)
    });
    assert_eq!(metric(&after, applied), 1.0, "{after}");
    assert_eq!(
        metric(&after, "drover_upgrades_total{outcome=\"rolled_back\"}"),
        0.0
    );
}

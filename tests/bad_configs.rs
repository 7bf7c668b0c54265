//! The corpus of malformed and hostile configs (tests/configs/bad/): each
//! `NAME.toml` has the message it must produce in `NAME.expect` (`$FILE`
//! stands for the path drover was given). Each is refused at start with
//! exit status 2 and that message, and, sent as a reload to a running
//! master, is rejected with it while the master goes on serving unchanged.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// Every (config, expected message) of the corpus, sorted by name.
fn corpus() -> Vec<(PathBuf, String)> {
    let dir = repo().join("tests/configs/bad");
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "toml").then_some(path)
        })
        .map(|path| {
            let expect = path.with_extension("expect");
            let message = std::fs::read_to_string(&expect)
                .unwrap_or_else(|e| panic!("{}: {e}", expect.display()));
            (path, message.trim_end().to_string())
        })
        .collect();
    out.sort();
    out
}

fn relative(path: &Path) -> String {
    path.strip_prefix(repo()).unwrap().display().to_string()
}

#[test]
fn the_corpus_is_large_and_each_message_is_located_or_names_its_cause() {
    let corpus = corpus();
    assert!(corpus.len() >= 40, "{} configs", corpus.len());
    for (path, message) in &corpus {
        // FILE:LINE:COL, or a cause named without a place.
        let located = message.strip_prefix("$FILE:").is_some_and(|rest| {
            let mut it = rest.splitn(3, ':');
            it.next().is_some_and(|l| l.parse::<u32>().is_ok())
                && it.next().is_some_and(|c| c.parse::<u32>().is_ok())
        });
        let named = message.starts_with("$FILE: cannot read: ")
            || message.starts_with("no worker command: ");
        assert!(located || named, "{}: {message}", path.display());
    }
}

#[test]
fn every_bad_config_is_refused_at_start_with_its_message_and_status_2() {
    let mut wrong = Vec::new();
    for (path, message) in corpus() {
        let shown = relative(&path);
        let mut child = Command::new(drover_bin())
            .arg("-c")
            .arg(&shown)
            .current_dir(repo())
            // No DROVER_* or RUST_LOG from the test's environment.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A config wrongly accepted starts a drover: stop it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let mut stderr = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
        let out_code = status.and_then(|s| s.code());
        let expected = format!("drover: {}", message.replace("$FILE", &shown));
        if out_code != Some(2) || stderr.trim_end() != expected {
            wrong.push(format!(
                "{shown}: exit {out_code:?}\n  expected: {expected}\n  got:      {}",
                stderr.trim_end()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A reload through the control socket: the master's answer.
fn reload(socket: &Path) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(b"{\"command\":\"reload\"}\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn every_bad_config_sent_as_a_reload_is_rejected_and_changes_nothing() {
    let good = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"{}\"]\nworkers = 2\nready = \"notify\"\n\
         control_socket = \"$DIR/ctl.sock\"\n",
        hello_bin()
    );
    let mut d = Start::config(&good).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let socket = d.dir.path().join("ctl.sock");
    let config = d.dir.path().join("config.toml");
    let mut workers = d.children();
    workers.sort();
    let corpus = corpus();
    let mut wrong = Vec::new();
    for (path, message) in &corpus {
        std::fs::write(&config, std::fs::read(path).unwrap()).unwrap();
        let answer = reload(&socket);
        let v: serde_json::Value = serde_json::from_str(answer.trim()).unwrap();
        let expected = format!(
            "rejected: {}",
            message.replace("$FILE", &config.display().to_string())
        );
        if v["ok"] != false || v["message"] != expected.as_str() {
            wrong.push(format!(
                "{}:\n  expected: {expected}\n  got:      {answer}",
                path.display()
            ));
        }
        // Still serving, with the same workers.
        assert_eq!(get(addr, "/").map(|r| r.status).ok(), Some(200));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let mut after = d.children();
    after.sort();
    assert_eq!(after, workers, "the workers changed");
    // The answer can reach the client before drover's log line reaches the
    // log file: wait for the last one, then count them all.
    let logged = || d.log().matches("reload rejected, nothing changed").count();
    wait_for("every rejection logged", LIMIT, || {
        (logged() >= corpus.len()).then_some(())
    });
    assert_eq!(logged(), corpus.len());
    assert!(!d.log().contains("generation 2"), "{}", d.log());
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
}

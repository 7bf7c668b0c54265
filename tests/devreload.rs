//! The development mode (`--reload`): a Python app served by drover-wsgi is
//! edited under a running drover. A good edit is served after the same
//! readiness-gated reload as SIGHUP; a broken one is rolled back and the old
//! workers keep serving; an idle drover that watches files still never wakes.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const APP: &str = "def app(environ, start_response):\n    \
                   start_response(\"200 OK\", [(\"Content-Type\", \"text/plain\")])\n    \
                   return [b\"VERSION\\n\"]\n";

fn write_app(dir: &Path, version: &str) {
    // As an editor saves: a new file renamed over the old one.
    let tmp = dir.join(".app.py.tmp");
    std::fs::write(&tmp, APP.replace("VERSION", version)).unwrap();
    std::fs::rename(&tmp, dir.join("app.py")).unwrap();
}

/// What the app answers, once it answers `expected`.
fn wait_body(d: &Drover, expected: &str) {
    let addr = d.tcp_addr();
    wait_for(&format!("the app to answer {expected:?}"), LIMIT, || {
        get(addr, "/")
            .ok()
            .filter(|r| r.status == 200 && r.body == format!("{expected}\n"))
    });
}

fn master_wakeups(d: &Drover) -> u64 {
    read_file(Path::new(&format!("/proc/{}/status", d.pid())))
        .lines()
        .filter(|l| l.contains("ctxt_switches"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn an_edited_app_is_reloaded_and_a_broken_edit_keeps_the_old_workers() {
    let app = tempfile::tempdir().unwrap();
    write_app(app.path(), "v1");
    let d = Start {
        args: vec![
            "-w".into(),
            "2".into(),
            "-b".into(),
            "127.0.0.1:0".into(),
            "--reload".into(),
            "--set".into(),
            "ready=notify".into(),
            "--set".into(),
            format!("chdir={}", app.path().display()),
            "--".into(),
            python::script("drover-wsgi"),
            "app:app".into(),
        ],
        ..Start::default()
    }
    .run();
    d.wait_log("all 2 workers ready");
    assert!(
        d.log().contains(&format!(
            "--reload: watching {} (1 directories); a change reloads",
            app.path().display()
        )),
        "{}",
        d.log()
    );
    wait_body(&d, "v1");

    // Idle: watching costs no wake-up.
    let before = master_wakeups(&d);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(master_wakeups(&d), before, "the idle master woke up");

    // A good edit: one reload (editor temp files are not named), served.
    write_app(app.path(), "v2");
    d.wait_log("reload applied: generation 2 serves");
    let changed = format!(
        "--reload: {} changed: reloading",
        app.path().join("app.py").display()
    );
    assert!(d.log().contains(&changed), "{}", d.log());
    wait_body(&d, "v2");
    let serving = d.wait_workers(2);

    // A broken edit: the new generation cannot boot, generation 2 serves on.
    std::fs::write(app.path().join("app.py"), "def app(:\n").unwrap();
    d.wait_log("reload rolled back");
    assert!(
        d.log().contains("generation 2 keeps serving"),
        "{}",
        d.log()
    );
    wait_body(&d, "v2");
    assert_eq!(d.wait_workers(2), serving, "the old workers serve on");

    // Fixed: the next save reloads again.
    write_app(app.path(), "v3");
    d.wait_log("reload applied: generation 4 serves");
    wait_body(&d, "v3");
    assert_eq!(d.log().matches("--reload: ").count(), 4, "{}", d.log());
}

#[test]
fn reload_paths_that_cannot_be_watched_stop_the_start() {
    let mut d = Start::args(&[
        "--reload",
        "--set",
        "reload_paths=[\"/nonexistent-drover-dir\"]",
        "--",
        "true",
    ])
    .run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(2));
    assert!(
        d.log().contains(
            "--reload: cannot watch /nonexistent-drover-dir: ENOENT: No such file or directory"
        ),
        "{}",
        d.log()
    );
}

//! Faults found by the user trial "trial5": what an operator sees after a
//! binary upgrade, with the release binary's behaviour as the reference.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::unistd::Pid;

/// A worker that, once `$DIR/hold` exists, holds the sockets for 1.5 s after
/// SIGTERM without accepting: whatever gets into a queue meanwhile is reset
/// at its exit. Without the file it exits at once (an old master retiring
/// after an upgrade need not be waited for).
const HOLDING_WORKER: &str =
    "[\"sh\", \"-c\", \"trap '[ -e $DIR/hold ] && sleep 1.5; exit 0' TERM; \
                              while :; do sleep 0.05; done\"]";

fn config(binds: &str) -> String {
    format!(
        "bind = [{binds}]\nworkers = 1\nready = \"spawn\"\ncommand = {HOLDING_WORKER}\n\
         control_socket = \"$DIR/ctl.sock\"\n"
    )
}

/// What `drover ctl upgrade` against `d`'s control socket printed.
fn ctl_upgrade(d: &Drover) -> String {
    let out = Command::new(drover_bin())
        .arg("ctl")
        .arg("--socket")
        .arg(d.dir.path().join("ctl.sock"))
        .arg("upgrade")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `drover ctl upgrade` against `d`'s control socket; the new master's pid.
fn upgrade(d: &Drover) -> Pid {
    let out = ctl_upgrade(d);
    out.split("new master pid ")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .map(Pid::from_raw)
        .unwrap_or_else(|| panic!("no new master in {out:?}"))
}

/// Kills a master this test made (a new master outlives the old one, which
/// the harness kills) when the test ends, even by a failed assertion.
struct KillOnDrop(Pid);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, Signal::SIGKILL);
    }
}

/// Connection attempts to `addr` that complete their handshake within 200 ms.
fn handshakes(addr: SocketAddr, tries: usize) -> usize {
    (0..tries)
        .filter(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
        .count()
}

/// Upgrades `d` `times` times; returns the master that serves at the end.
/// Each old master retires (exit 0) before the next upgrade.
fn upgrade_times(d: &mut Drover, times: usize) -> (Pid, Vec<KillOnDrop>) {
    let mut guards = Vec::new();
    let mut serving = d.pid();
    for i in 0..times {
        let new = upgrade(d);
        guards.push(KillOnDrop(new));
        if i == 0 {
            assert_eq!(d.wait_exit_only(LIMIT).code(), Some(0));
        } else {
            wait_for("the old master to retire", LIMIT, || {
                (!alive(serving)).then_some(())
            });
        }
        // The new master is ready (it said so to the old one, which retired).
        serving = new;
    }
    (serving, guards)
}

#[test]
fn after_an_upgrade_the_shutdown_still_refuses_new_connections_and_removes_the_socket_file() {
    // Once and twice upgraded: each new master must stop as the first would.
    for times in [1, 2] {
        let mut d = Start::config(&config("\"127.0.0.1:0\", \"unix:$DIR/app.sock\"")).run();
        d.wait_log("all 1 workers ready");
        let addr = d.tcp_addr();
        let file = d.dir.path().join("app.sock");
        assert!(file.exists());
        let (serving, _guards) = upgrade_times(&mut d, times);
        assert_eq!(handshakes(addr, 1), 1, "the new master serves");
        std::fs::write(d.dir.path().join("hold"), "").unwrap();
        nix::sys::signal::kill(serving, Signal::SIGTERM).unwrap();
        d.wait_log("closed 2 listener(s)");
        // The old code, after an upgrade: no filter (5 of 5 got in at once,
        // to be reset when the worker exited) and the socket file stayed.
        // (Each attempt the filter stops waits 200 ms: 1 s of the hold.)
        let got_in = handshakes(addr, 5);
        assert_eq!(
            (got_in, file.exists()),
            (0, false),
            "after {times} upgrade(s): handshakes during the drain, socket file left"
        );
        assert_eq!(unix_connects(&file), 0);
        wait_for("the new master to exit", LIMIT, || {
            (!alive(serving)).then_some(())
        });
        assert!(!file.exists(), "{}", d.log());
    }
}

/// Connections by path to a Unix socket that succeed, of 3.
fn unix_connects(path: &Path) -> usize {
    (0..3)
        .filter(|_| std::os::unix::net::UnixStream::connect(path).is_ok())
        .count()
}

#[test]
fn a_socket_systemd_handed_in_is_left_accepting_after_an_upgrade() {
    // systemd keeps its copy of the socket: the new master must not refuse
    // connections on it at its shutdown, any more than the first would.
    let sd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = sd.local_addr().unwrap();
    let kept = sd.try_clone().unwrap();
    let start = Start {
        pass: vec![(sd.into(), 3)],
        systemd: true,
        ..Start::config(&config(&format!("\"{addr}\"")))
    };
    let mut d = start.run();
    d.wait_log("all 1 workers ready");
    let (serving, _guards) = upgrade_times(&mut d, 1);
    nix::sys::signal::kill(serving, Signal::SIGTERM).unwrap();
    d.wait_log("closed 1 listener(s)");
    assert_eq!(handshakes(addr, 10), 10, "systemd's socket was filtered");
    wait_for("the new master to exit", LIMIT, || {
        (!alive(serving)).then_some(())
    });
    drop(kept);
}

#[test]
fn with_subreaper_an_upgrade_leaves_the_new_master_serving() {
    // As a child subreaper the old master ended every child it had at its
    // exit as "left by workers": the new master too, which then stopped
    // with all its workers, and nothing served.
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 2\nready = \"notify\"\nsubreaper = true\n\
         command = [\"{}\"]\ncontrol_socket = \"$DIR/ctl.sock\"\n",
        hello_bin()
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let (serving, _guards) = upgrade_times(&mut d, 1);
    assert!(
        !d.log().contains("left by workers"),
        "the old master took the new one for a worker's leftover:\n{}",
        d.log()
    );
    assert!(alive(serving), "the new master was ended");
    assert_eq!(get_ok(addr, "/").status, 200);
    nix::sys::signal::kill(serving, Signal::SIGTERM).unwrap();
    wait_for("the new master to exit", LIMIT, || {
        (!alive(serving)).then_some(())
    });
}

#[test]
fn a_drover_serving_fd_n_can_be_upgraded() {
    // The new master gets the socket at fd 3 (LISTEN_FDS), not at N: the
    // old code looked for descriptor 5, refused to start (exit 1), and the
    // upgrade failed.
    let handed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = handed.local_addr().unwrap();
    let config = format!(
        "bind = [\"fd://5\"]\nworkers = 1\nready = \"notify\"\ncommand = [\"{}\"]\n\
         control_socket = \"$DIR/ctl.sock\"\n",
        hello_bin()
    );
    let start = Start {
        pass: vec![(handed.into(), 5)],
        ..Start::config(&config)
    };
    let mut d = start.run();
    d.wait_log("all 1 workers ready");
    assert_eq!(get_ok(addr, "/").status, 200);
    let (serving, _guards) = upgrade_times(&mut d, 1);
    let answered_by = get_ok(addr, "/").worker_pid();
    assert_eq!(
        Pid::from_raw(stat(Pid::from_raw(answered_by)).unwrap().1),
        serving,
        "not a worker of the new master"
    );
    nix::sys::signal::kill(serving, Signal::SIGTERM).unwrap();
    wait_for("the new master to exit", LIMIT, || {
        (!alive(serving)).then_some(())
    });
}

/// One GET on the admin endpoint at the Unix socket `path`.
fn admin_get(path: &Path, what: &str) -> Response {
    let s = wait_for("the admin socket", LIMIT, || {
        std::os::unix::net::UnixStream::connect(path).ok()
    });
    s.set_read_timeout(Some(LIMIT)).unwrap();
    get_over(s, what).unwrap()
}

#[test]
fn readyz_stays_ready_while_the_new_master_of_an_upgrade_boots() {
    // Workers that wait for $DIR/go before they exec: the test decides when
    // the new master's workers are ready.
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 2\nready = \"notify\"\nboot_timeout = \"20s\"\n\
         command = [\"sh\", \"-c\", \"while [ ! -e $DIR/go ]; do sleep 0.02; done; exec {}\"]\n\
         control_socket = \"$DIR/ctl.sock\"\nadmin_bind = \"unix:$DIR/admin.sock\"\n",
        hello_bin()
    );
    let mut d = Start::config(&config).run();
    let go = d.dir.path().join("go");
    let admin = d.dir.path().join("admin.sock");
    std::fs::write(&go, "").unwrap();
    d.wait_log("all 2 workers ready");
    assert_eq!(admin_get(&admin, "/readyz").status, 200);
    std::fs::remove_file(&go).unwrap();
    let upgrading = {
        let socket = d.dir.path().join("ctl.sock");
        std::thread::spawn(move || {
            let out = Command::new(drover_bin())
                .arg("ctl")
                .arg("--socket")
                .arg(socket)
                .arg("upgrade")
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    d.wait_log("upgrade: started");
    // The old master serves all along: a load balancer's probe must say so.
    // The old code: the new master took the endpoint at its start and
    // answered "503 booting: 0/2 slots have a ready worker" until its
    // workers were ready.
    let answers: Vec<(u16, String)> = (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            let r = admin_get(&admin, "/readyz");
            (r.status, r.body.trim().to_string())
        })
        .collect();
    std::fs::write(&go, "").unwrap();
    let out = upgrading.join().unwrap();
    assert!(out.contains("upgraded: new master pid"), "{out}");
    let new: Pid = out
        .split("new master pid ")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .map(Pid::from_raw)
        .unwrap();
    let _guard = KillOnDrop(new);
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "/readyz during the upgrade: {answers:?}"
    );
    assert_eq!(d.wait_exit_only(LIMIT).code(), Some(0));
    // The new master answers on the same socket file, which the old master
    // left in place.
    let r = admin_get(&admin, "/readyz");
    assert_eq!((r.status, r.body.trim()), (200, "ready"));
    nix::sys::signal::kill(new, Signal::SIGTERM).unwrap();
    wait_for("the new master to exit", LIMIT, || {
        (!alive(new)).then_some(())
    });
    assert!(
        !admin.exists(),
        "the new master removes its admin socket file"
    );
}

#[test]
fn a_ctl_timeout_says_that_no_answer_came_in_time() {
    // The reload's worker takes 1.5 s to boot (the first one none): the
    // reload's verdict comes after the client's --timeout. The old message:
    // "Resource temporarily unavailable (os error 11)".
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\n\
         command = [\"sh\", \"-c\", \"[ -e $DIR/booted ] && sleep 1.5; touch $DIR/booted; exec {}\"]\n\
         control_socket = \"$DIR/ctl.sock\"\n",
        hello_bin()
    );
    let d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let out = Command::new(drover_bin())
        .arg("ctl")
        .arg("--socket")
        .arg(d.dir.path().join("ctl.sock"))
        .args(["--timeout", "300ms", "reload"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no answer within 300ms (--timeout): drover goes on with the command"),
        "{err}"
    );
    d.wait_log("reload applied");
}

#[test]
fn ctl_and_check_piped_into_a_reader_that_has_gone_end_without_a_panic() {
    // `drover ctl status | head -1`: head exits after one line. The old ctl
    // panicked ("failed printing to stdout: Broken pipe", a backtrace, 101).
    let d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\ncommand = [\"{}\"]\n\
         control_socket = \"$DIR/ctl.sock\"\n",
        hello_bin()
    ))
    .run();
    d.wait_log("all 1 workers ready");
    let socket = d.dir.path().join("ctl.sock").display().to_string();
    let config = d.dir.path().join("config.toml").display().to_string();
    for args in [
        vec!["ctl", "--socket", &socket, "status"],
        vec!["check", "--print", "-c", &config],
    ] {
        let mut child = Command::new(drover_bin())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before anything is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && out.status.code() != Some(101),
            "{args:?}: {:?}\n{err}",
            out.status
        );
    }
}

#[test]
fn running_out_of_open_files_says_which_limit_to_raise() {
    // 100 workers with capture_output under a limit of 64 open files: the
    // old message ended at "EMFILE: Too many open files" (and exit 3 reads
    // as a worker that cannot boot).
    let start = Start {
        program: Some("sh".into()),
        ..Start::args(&[
            "-c",
            "ulimit -n 64 && exec \"$0\" \"$@\"",
            drover_bin(),
            "-b",
            "127.0.0.1:0",
            "-w",
            "100",
            "--set",
            "ready=notify",
            "--set",
            "capture_output=true",
            "--",
            hello_bin(),
        ])
    };
    let mut d = start.run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(3));
    assert!(
        d.log().contains(
            "EMFILE: Too many open files; drover reached its limit of open files (64): \
             raise it (`ulimit -n`, systemd's LimitNOFILE=) or run fewer workers"
        ),
        "{}",
        d.log()
    );
}

#[test]
fn a_failed_upgrade_leaves_the_admin_endpoint_to_the_old_master() {
    // The new master adopts the old one's admin socket; when it then fails
    // (its worker exits 3 before it is ready), it must leave the socket file
    // to the old master, which goes on answering there.
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\ncommand = [\"{}\"]\n\
         control_socket = \"$DIR/ctl.sock\"\nadmin_bind = \"unix:$DIR/admin.sock\"\n",
        hello_bin()
    );
    let d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let admin = d.dir.path().join("admin.sock");
    let broken = config.replace(
        &format!("command = [\"{}\"]", hello_bin()),
        "command = [\"sh\", \"-c\", \"exit 3\"]",
    );
    std::fs::write(
        d.dir.path().join("config.toml"),
        broken.replace("$DIR", &d.dir.path().display().to_string()),
    )
    .unwrap();
    let out = ctl_upgrade(&d);
    assert!(out.contains("upgrade failed"), "{out}");
    assert!(
        admin.exists(),
        "the failed new master removed the admin socket file"
    );
    let r = admin_get(&admin, "/readyz");
    assert_eq!((r.status, r.body.trim()), (200, "ready"));
}

#[test]
fn an_upgrade_that_drops_a_unix_bind_removes_its_socket_file() {
    // The old master keeps its socket files at its retirement (they are
    // the new master's); one for a bind the new config dropped was left
    // behind for good by the old code.
    let config = "\"127.0.0.1:0\", \"unix:$DIR/gone.sock\"";
    let mut d = Start::config(&config_with(config)).run();
    d.wait_log("all 1 workers ready");
    let file = d.dir.path().join("gone.sock");
    assert!(file.exists());
    std::fs::write(
        d.dir.path().join("config.toml"),
        config_with("\"127.0.0.1:0\"").replace("$DIR", &d.dir.path().display().to_string()),
    )
    .unwrap();
    let (serving, _guards) = upgrade_times(&mut d, 1);
    assert!(d.log().contains("matches no bind"), "{}", d.log());
    wait_for("the dropped bind's socket file to go", LIMIT, || {
        (!file.exists()).then_some(())
    });
    nix::sys::signal::kill(serving, Signal::SIGTERM).unwrap();
    wait_for("the new master to exit", LIMIT, || {
        (!alive(serving)).then_some(())
    });
}

/// A config of one hello worker on `binds`, with a control socket.
fn config_with(binds: &str) -> String {
    format!(
        "bind = [{binds}]\nworkers = 1\nready = \"notify\"\ncommand = [\"{}\"]\n\
         control_socket = \"$DIR/ctl.sock\"\n",
        hello_bin()
    )
}

//! `boot_priority`: a worker started while others serve boots at a lower
//! CPU priority (a nice increment, or SCHED_IDLE), and every thread of it
//! (and of the processes it started) is back at the normal one once it is
//! ready. drover refuses the setting when it could not give the priority
//! back.

mod common;

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// A worker that starts threads and a child process while it boots, sends
/// `READY=1` once the file `$1.<generation>` exists, and goes on starting
/// threads from a thread of its own (so some are started while drover
/// restores the priority) until 1 s after it, then writes how many it
/// started after READY=1 to `$1.<generation>.done`.
/// SIGTERM ends it and its child.
const WORKER: &str = r#"
import os, signal, socket, subprocess, sys, threading, time
base = sys.argv[1] + "." + os.environ["DROVER_GENERATION"]
threading.stack_size(256 * 1024)
def idle():
    threading.Event().wait()
for _ in range(3):
    threading.Thread(target=idle, daemon=True).start()
child = subprocess.Popen(["sleep", "1000"])
def stop(*_):
    child.kill()
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
ready_at = []
def spawner():
    after = 0
    while not ready_at or time.monotonic() < ready_at[0] + 1.0:
        threading.Thread(target=idle, daemon=True).start()
        after += bool(ready_at)
        time.sleep(0.005)
    with open(base + ".done", "w") as f:
        f.write(str(after))
threading.Thread(target=spawner, daemon=True).start()
while not os.path.exists(base):
    time.sleep(0.01)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
ready_at.append(time.monotonic())
while True:
    time.sleep(1)
"#;

/// Fields 19 and 41 of `/proc/PID/task/TID/stat`: the thread's nice value
/// and scheduling policy (0: SCHED_OTHER, 5: SCHED_IDLE).
fn priority_of(pid: i32, tid: &str) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some((fields.get(16)?.parse().ok()?, fields.get(38)?.parse().ok()?))
}

const SCHED_OTHER: i32 = 0;
const SCHED_IDLE: i32 = 5;

/// (process, thread, (nice, policy)) of every thread of `pid` and of its
/// children.
fn priorities(pid: Pid) -> Vec<(i32, String, (i32, i32))> {
    let mut out = Vec::new();
    for p in std::iter::once(pid).chain(children_of(pid)) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let tid = t.file_name().to_string_lossy().into_owned();
            if let Some(n) = priority_of(p.as_raw(), &tid) {
                out.push((p.as_raw(), tid, n));
            }
        }
    }
    out
}

fn all_at(values: &[(i32, String, (i32, i32))], priority: (i32, i32)) -> bool {
    values.iter().all(|v| v.2 == priority)
}

fn config(boot_priority: &str) -> String {
    format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\nboot_priority = {boot_priority}\n\
         boot_timeout = \"30s\"\ngraceful_timeout = \"5s\"\ncommand = [\"python3\", \"-c\", {WORKER:?}, \"$DIR/go\"]\n"
    )
}

/// The pid of the worker of `generation` drover logged as spawned.
fn spawned(d: &Drover, generation: u32) -> Pid {
    let needle = format!(") spawned, generation {generation}");
    let log = d.wait_log(&needle);
    let line = log.lines().find(|l| l.contains(&needle)).unwrap();
    pid_after(line, "(pid ")
}

fn touch(path: &Path) {
    std::fs::write(path, "").unwrap();
}

/// At the start nothing serves: the first worker boots at drover's own
/// priority. A reload's worker boots at drover's nice value + 10 (every
/// thread, and the child it started) while the first one serves; once it
/// sent READY=1, every thread of it and of its child is back at drover's,
/// also those its own thread kept starting around the READY=1.
#[test]
fn a_reloads_worker_boots_at_nice_plus_10_and_every_thread_is_restored_when_ready() {
    boots_low_and_is_restored("10");
}

/// The same with `boot_priority = "idle"`: SCHED_IDLE while booting,
/// SCHED_OTHER once ready.
#[test]
fn a_reloads_worker_boots_at_sched_idle_and_every_thread_is_restored_when_ready() {
    boots_low_and_is_restored("\"idle\"");
}

fn boots_low_and_is_restored(boot_priority: &str) {
    let mut d = Start::config(&config(boot_priority)).run();
    let normal = (
        priority_of(d.pid().as_raw(), &d.pid().to_string())
            .unwrap()
            .0,
        SCHED_OTHER,
    );
    let boot = if boot_priority == "10" {
        ((normal.0 + 10).min(19), SCHED_OTHER)
    } else {
        (normal.0, SCHED_IDLE)
    };
    if boot == normal {
        eprintln!("skipped: the tests run at nice {normal:?}: boot_priority can lower nothing");
        return;
    }
    let go = d.dir.path().join("go");
    let first = spawned(&d, 1);
    // Booting, with its threads and child started: all at the normal value.
    wait_for("the first worker's threads", LIMIT, || {
        (priorities(first).len() >= 6).then_some(())
    });
    let values = priorities(first);
    assert!(all_at(&values, normal), "{values:?}");
    touch(&go.with_extension("1"));
    d.wait_log("all 1 workers ready");

    d.signal(Signal::SIGHUP);
    // (Not the first other child of drover: at the reload drover checks
    // that it can restore a priority with a probe process.)
    let second = spawned(&d, 2);
    // Its threads and child, once it has had the CPU to start them: under
    // SCHED_IDLE on a busy machine that may take a while (drover gives it
    // the normal priority at half its boot_timeout, 30 s).
    // The worker's threads and its child's are read at different moments
    // (the child list first): a sample can hold the threads started after
    // the Popen but not the child, listed by the next one.
    let began = std::time::Instant::now();
    let started = |values: &[(i32, String, (i32, i32))]| {
        values.len() >= 6 && values.iter().any(|v| v.0 != second.as_raw())
    };
    let mut values = priorities(second);
    while !started(&values) && began.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
        values = priorities(second);
    }
    assert!(
        !values.is_empty() && all_at(&values, boot),
        "booting: {values:?}"
    );
    if values.len() >= 6 {
        assert!(
            values.iter().any(|v| v.0 != second.as_raw()),
            "its child: {values:?}"
        );
    } else {
        eprintln!(
            "starved of CPU: checked the {} thread(s) it had",
            values.len()
        );
    }
    // The first worker serves on at the normal value.
    assert!(all_at(&priorities(first), normal));

    touch(&go.with_extension("2"));
    d.wait_log("reload applied: generation 2");
    let done = go.with_extension("2.done");
    let after: u32 = wait_for("its thread to stop starting threads", LIMIT, || {
        std::fs::read_to_string(&done).ok()?.parse().ok()
    });
    assert!(after > 0, "no thread started after READY=1");
    // Restored at READY=1, and once more 200 ms later (a thread still
    // being created at the first restore); the test looks at least 1 s
    // after READY=1, and gives drover's loop a few more on a busy machine.
    let began = std::time::Instant::now();
    loop {
        let values = priorities(second);
        let low: Vec<_> = values.iter().filter(|v| v.2 != normal).collect();
        if low.is_empty() {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "not restored: {low:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

/// drover cannot lower a nice value (or leave SCHED_IDLE) without
/// CAP_SYS_NICE or an RLIMIT_NICE that allows it (a container's root has
/// neither by default): it refuses `boot_priority` at start, with what to
/// change, rather than leave a ready worker at the low priority; no worker
/// is started. As root, drover is run without CAP_SYS_NICE (setpriv) and
/// with RLIMIT_NICE 0 (prlimit); also as root with `master_as_user`, where
/// the master gives up its capabilities when it becomes the workers' user.
#[test]
fn boot_priority_is_refused_when_drover_could_not_restore_the_priority() {
    let root = nix::unistd::geteuid().is_root();
    let mut without = vec!["prlimit".to_string(), "--nice=0:0".into()];
    if root {
        without.extend([
            "setpriv".into(),
            "--inh-caps=-sys_nice".into(),
            "--bounding-set=-sys_nice".into(),
        ]);
    }
    // Lowering a nice value is EACCES; leaving SCHED_IDLE, EPERM.
    for (value, shown, errno) in [("10", "10", "EACCES"), ("idle", "\"idle\"", "EPERM")] {
        let (code, err) = run(&drover_argv(&without, value, &[]));
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains(&format!(
                "boot_priority = {shown}: drover could not give a worker its priority back at \
                 READY=1"
            )) && err.contains(errno)
                && err.contains("drover needs CAP_SYS_NICE, or an RLIMIT_NICE of at least")
                && err.contains("or set boot_priority = \"normal\""),
            "{err}"
        );
        assert!(!err.contains("spawned"), "{err}");
    }

    if !root {
        eprintln!("skipped the master_as_user case: needs root");
        return;
    }
    let as_user = ["--set", "user=nobody", "--set", "master_as_user=true"];
    let (code, err) = run(&drover_argv(
        &["prlimit".into(), "--nice=0:0".into()],
        "10",
        &as_user,
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("boot_priority = 10: drover could not give"),
        "{err}"
    );
    // With CAP_SYS_NICE kept (root, drover not becoming the user) it starts.
    let mut d = Start::args(&[
        "--set",
        "boot_priority=10",
        "-b",
        "127.0.0.1:0",
        "--",
        "sleep",
        "1000",
    ])
    .run();
    d.wait_log("spawned");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

/// `wrapper` then drover with `boot_priority = value`, `more` settings and
/// `sleep 1000` as the worker.
fn drover_argv(wrapper: &[String], value: &str, more: &[&str]) -> Vec<String> {
    let mut argv = wrapper.to_vec();
    argv.push(drover_bin().into());
    argv.extend(["--set".into(), format!("boot_priority={value}")]);
    argv.extend(more.iter().map(|s| s.to_string()));
    argv.extend(["-b", "127.0.0.1:0", "--", "sleep", "1000"].map(String::from));
    argv
}

/// Runs `argv` to its exit (drover refuses at once): status and stderr.
fn run(argv: &[String]) -> (Option<i32>, String) {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir(repo());
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let out = std::thread::scope(|s| {
        let waiter = s.spawn(|| child.wait_with_output().unwrap());
        let began = std::time::Instant::now();
        while !waiter.is_finished() {
            if began.elapsed() > LIMIT {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        waiter.join().unwrap()
    });
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// With `preload`, a reload's template loads the app under SCHED_IDLE while
/// the first generation serves, and gets drover's priority back once it is
/// ready to fork; the worker forked from it runs at drover's priority.
#[test]
fn a_preload_template_loads_at_the_boot_priority_and_is_restored_when_ready_to_fork() {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\npreload = true\n\
         boot_priority = \"idle\"\nboot_timeout = \"30s\"\n\
         command = [{:?}, \"--chdir\", {:?}, \"--no-access-log\", \"integration.fastapi_app:app\"]\n",
        python::script("drover-uvicorn"),
        repo().join("workers/python/tests").display().to_string(),
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let normal = (
        priority_of(d.pid().as_raw(), &d.pid().to_string())
            .unwrap()
            .0,
        SCHED_OTHER,
    );
    d.signal(Signal::SIGHUP);
    let needle = "template of generation 2 (pid ";
    let template = pid_after(&d.wait_log(needle), needle);
    let loading = priorities(template);
    assert!(
        !loading.is_empty() && all_at(&loading, (normal.0, SCHED_IDLE)),
        "loading: {loading:?}"
    );
    d.wait_log(&format!(
        "template of generation 2 (pid {template}) ready to fork"
    ));
    wait_for("the template's priority restored", LIMIT, || {
        all_at(&priorities(template), normal).then_some(())
    });
    d.wait_log("reload applied: generation 2");
    let worker = spawned(&d, 2);
    let values = priorities(worker);
    assert!(all_at(&values, normal), "forked worker: {values:?}");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

/// A worker under the Python SDK whose last atexit handler (registered
/// before the SDK's, so run after its registry) writes the scheduling policy
/// it starts at, whether `DROVER_EXIT_PRIORITY` was set, and the policy and
/// time (since it started) at which its policy changed, waiting for that up
/// to 2.5 s if it started at another than SCHED_OTHER, to `$1.<worker pid>`.
const EXITING: &str = r#"
import atexit, os, sys, time
def last():
    first = os.sched_getscheduler(0)
    began = time.monotonic()
    while first != 0 and os.sched_getscheduler(0) == first and time.monotonic() - began < 2.5:
        time.sleep(0.01)
    with open("%s.%d" % (sys.argv[1], os.getpid()), "w") as f:
        f.write("%d %s %d %.2f" % (first, os.environ.get("DROVER_EXIT_PRIORITY", "-"),
                                  os.sched_getscheduler(0), time.monotonic() - began))
atexit.register(last)
import drover_worker as dw
dw.install()
dw.ready()
while True:
    time.sleep(1)
"#;

/// What `EXITING` wrote at its exit, after drover (with `boot_priority`)
/// was stopped by SIGTERM, and drover's exit status.
fn exit_priority(boot_priority: &str) -> (String, ExitStatus, String) {
    let mut d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\nworkers = 1\nready = \"notify\"\nboot_priority = {boot_priority}\n\
         graceful_timeout = \"2s\"\ncommand = [{:?}, \"-c\", {EXITING:?}, \"$DIR/exit\"]\n",
        python::python()
    ))
    .run();
    d.wait_log("all 1 workers ready");
    let pid = spawned(&d, 1);
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(LIMIT);
    let written =
        std::fs::read_to_string(d.dir.path().join(format!("exit.{pid}"))).unwrap_or_else(|e| {
            panic!(
                "the worker's atexit handler wrote nothing ({e})\n{}",
                d.log()
            )
        });
    (written, status, d.log())
}

/// `boot_priority = "idle"` covers a stopped worker's exit too: the SDK
/// runs what follows its registry (the other atexit handlers, the
/// interpreter's teardown) at SCHED_IDLE, and drover gives the normal
/// priority back at half the graceful_timeout (1 s of 2 s), so that a busy
/// machine cannot starve the exit into a SIGKILL.
#[test]
fn with_boot_priority_idle_a_stopped_worker_exits_at_sched_idle_until_half_its_timeout() {
    let (written, status, log) = exit_priority("\"idle\"");
    let fields: Vec<&str> = written.split(' ').collect();
    assert_eq!(
        fields[..3],
        ["5", "idle", "0"],
        "SCHED_IDLE after the registry, then SCHED_OTHER: {written}\n{log}"
    );
    let restored_after: f64 = fields[3].parse().unwrap();
    assert!(
        (0.5..2.0).contains(&restored_after),
        "restored {restored_after} s into the exit, expected about 1 s (half of 2 s)\n{log}"
    );
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!log.contains("SIGKILL"), "{log}");
}

/// Without it, the exit runs at the worker's priority.
#[test]
fn without_boot_priority_idle_a_stopped_worker_exits_at_its_own_priority() {
    let (written, status, log) = exit_priority("\"normal\"");
    assert!(written.starts_with("0 - 0 "), "{written}\n{log}");
    assert_eq!(status.code(), Some(0), "{log}");
}

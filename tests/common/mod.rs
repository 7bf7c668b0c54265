//! The test harness: starts the real drover binary, reads its log, talks HTTP
//! to it, and cleans up whatever it started. Every wait has a deadline.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
use nix::sys::signal::{kill, killpg};
use nix::unistd::Pid;

pub mod keepalive;
pub mod python;
pub mod websocket;

/// Upper bound of any single wait in a test.
pub const LIMIT: Duration = Duration::from_secs(20);

pub fn drover_bin() -> &'static str {
    env!("CARGO_BIN_EXE_drover")
}

/// The reference worker, from the `hello` package of the workspace: built
/// next to drover (same target directory and profile) by `cargo test` and
/// `cargo nextest run`, which build the default members' test targets and
/// hello's integration test with them. A copy missing or older than its
/// sources (a run narrowed to drover alone, `cargo test -p drover`) stops the
/// test with the command that builds it, rather than testing an old worker.
pub fn hello_bin() -> &'static str {
    static HELLO: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HELLO.get_or_init(|| {
        let bin = Path::new(drover_bin()).with_file_name("hello");
        fresh_bin(
            &bin,
            &["workers/hello", "workers/rust/src"],
            "cargo build -p hello",
        )
    })
}

/// An example worker of the SDK (`workers/rust/examples/NAME.rs`:
/// `tokio_hyper`, `axum`), built next to drover by `cargo nextest run
/// --workspace` (which builds the workspace's examples); checked for
/// staleness as [`hello_bin`] is.
pub fn sdk_example_bin(name: &str) -> String {
    let bin = Path::new(drover_bin()).with_file_name(format!("examples/{name}"));
    // Its own source only: cargo does not rebuild an example when another
    // one changes.
    fresh_bin(
        &bin,
        &[
            &format!("workers/rust/examples/{name}.rs"),
            "workers/rust/src",
        ],
        &format!("cargo build -p drover-worker --example {name}"),
    )
}

/// `bin`'s path, if it is built and newer than the files in `sources`;
/// otherwise a failed test that names the command `build` that builds it.
fn fresh_bin(bin: &Path, sources: &[&str], build: &str) -> String {
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    let sources = sources
        .iter()
        .filter_map(|dir| newest_change(&repo().join(dir)))
        .max();
    match (built, sources) {
        (Some(built), Some(sources)) if built >= sources => {}
        (Some(_), _) => panic!(
            "{} is older than its sources: run `{build}` (or `cargo nextest run --workspace`)",
            bin.display()
        ),
        (None, _) => panic!(
            "{} is not built: run `{build}` (or `cargo nextest run --workspace`)",
            bin.display()
        ),
    }
    bin.display().to_string()
}

/// The newest modification time of the files in `dir` (not below it: hello's
/// tests/ are not part of the executable), or of `dir` if it is a file.
pub fn newest_change(dir: &Path) -> Option<std::time::SystemTime> {
    if dir.is_file() {
        return dir.metadata().and_then(|m| m.modified()).ok();
    }
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .filter(|meta| meta.is_file())
        .filter_map(|meta| meta.modified().ok())
        .max()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn probe_py() -> String {
    repo().join("tests/workers/probe.py").display().to_string()
}

/// A directory whose `python3` is a link to the interpreter that `python3` on
/// the test's PATH runs, put first on the PATH of a drover whose command
/// names `python3`. That `python3` can be a pyenv shim (a bash script that
/// runs `pyenv exec`): on a loaded machine one start through it took up to
/// 6.6 s, against a worker's boot_timeout of 3–5 s in some tests. Resolved
/// once per test process (so a changed pyenv version is followed); `None`
/// when there is no `python3`, and drover then says so itself.
fn direct_python3_dir() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let exe = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
        if !out.status.success() || !exe.is_absolute() {
            return None;
        }
        // Next to drover, shared by the test processes: a link made under a
        // name of this process's own and renamed into place, so a concurrent
        // test never finds the link half made.
        let dir = Path::new(drover_bin()).with_file_name("direct-python3");
        std::fs::create_dir_all(&dir).ok()?;
        let tmp = dir.join(format!("python3.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&exe, &tmp).ok()?;
        std::fs::rename(&tmp, dir.join("python3")).ok()?;
        Some(dir)
    })
    .as_deref()
}

/// The `#!` line of a Python script a test writes and drover runs as its
/// program: the link of `direct_python3_dir`. PATH does not help there: a
/// command that names the script, not `python3`, keeps the test's PATH, and
/// `#!/usr/bin/env python3` ran the pyenv shim.
pub fn python3_shebang() -> String {
    match direct_python3_dir() {
        Some(dir) => format!("#!{}", dir.join("python3").display()),
        None => "#!/usr/bin/env python3".to_string(),
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What /proc says of `pid`, for a failure message: each thread's state, and
/// where it waits in the kernel (its stack is readable by root only).
/// Under the load of a clean-clone CI, a drover that had logged its last
/// line was not reaped for 20 s, and nothing said where it was.
pub fn process_state(pid: Pid) -> String {
    let mut out = String::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    for task in tasks.into_iter().flatten().flatten() {
        let read = |name: &str| std::fs::read_to_string(task.path().join(name)).unwrap_or_default();
        let stat = read("stat");
        // "tid (comm) S ...": the state is the field after the command.
        let state = stat
            .rsplit_once(')')
            .map_or("?", |(_, rest)| rest.trim_start());
        let state = state.split(' ').next().unwrap_or("?");
        out.push_str(&format!(
            "\n  thread {} state {state} wchan {} stack:\n{}",
            task.file_name().to_string_lossy(),
            read("wchan"),
            read("stack").trim_end()
        ));
    }
    if out.is_empty() {
        out.push_str("gone from /proc");
    }
    out
}

/// The processes (but this one) holding an end of one of the pipes
/// `inodes`: "pid PID (parent PPID, state S): COMMAND LINE" each.
pub fn pipe_holders(inodes: &[u64]) -> Vec<String> {
    let names: Vec<String> = inodes.iter().map(|i| format!("pipe:[{i}]")).collect();
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| names.iter().any(|n| l.as_os_str() == n.as_str()))
        });
        if !holds {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace()
            .collect();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        found.push(format!(
            "pid {pid} (parent {}, state {}): {}",
            fields.get(1).unwrap_or(&"?"),
            fields.first().unwrap_or(&"?"),
            String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .trim_end()
        ));
    }
    found
}

/// How to start drover.
#[derive(Default)]
pub struct Start {
    pub config: Option<String>,
    pub args: Vec<String>,
    /// Put drover in its own process group, as a shell does for a job.
    pub own_group: bool,
    /// Start drover with SIGINT ignored (as `cmd &` in a script does).
    pub ignore_sigint: bool,
    /// Start drover with SIGTERM, SIGCHLD and SIGHUP blocked (the mask
    /// survives exec: a careless parent can hand it down).
    pub block_signals: bool,
    /// Leak this (non close-on-exec) descriptor number into drover.
    pub leak_fd: Option<i32>,
    pub env: Vec<(String, String)>,
    /// Sockets to hand to drover at the given descriptor numbers.
    pub pass: Vec<(std::os::fd::OwnedFd, i32)>,
    /// Hand them over as systemd does: LISTEN_FDS, and LISTEN_PID = drover's pid.
    pub systemd: bool,
    /// Run this program (with `args`) instead of drover, e.g. a wrapper.
    pub program: Option<String>,
    /// Start drover with this soft `RLIMIT_NOFILE` (`ulimit -n`).
    pub nofile: Option<u64>,
}

pub struct Drover {
    pub child: Child,
    pub dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// The inodes of the pipes of drover's stdout and stderr.
    pipes: [u64; 2],
    status: Option<ExitStatus>,
}

impl Start {
    pub fn config(toml: &str) -> Start {
        Start {
            config: Some(toml.to_string()),
            ..Start::default()
        }
    }

    pub fn args(args: &[&str]) -> Start {
        Start {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Start::default()
        }
    }

    pub fn run(self) -> Drover {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = if self.systemd {
            // sh's $$ is the pid that execs drover.
            let mut c = Command::new("sh");
            let script = format!(
                "LISTEN_FDS={} LISTEN_PID=$$ exec \"$0\" \"$@\"",
                self.pass.len()
            );
            c.arg("-c").arg(script).arg(drover_bin());
            c
        } else {
            Command::new(self.program.as_deref().unwrap_or(drover_bin()))
        };
        if let Some(text) = &self.config {
            let text = text.replace("$DIR", &dir.path().display().to_string());
            let path = dir.path().join("config.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("-c").arg(path);
        }
        cmd.args(
            self.args
                .iter()
                .map(|a| a.replace("$DIR", &dir.path().display().to_string())),
        );
        cmd.current_dir(repo())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.env_remove("RUST_LOG");
        // Settings from the environment (DROVER_WORKERS…) of whoever runs the
        // tests would change what the tests start; each test sets its own.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("DROVER_") {
                cmd.env_remove(name);
            }
        }
        let mentions_python3 = self
            .config
            .iter()
            .chain(&self.args)
            .any(|t| t.contains("python3"));
        let own_path = self.env.iter().any(|(k, _)| k == "PATH");
        if let (true, false, Some(dir)) = (mentions_python3, own_path, direct_python3_dir()) {
            let rest = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{rest}", dir.display()));
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if self.own_group {
            cmd.process_group(0);
        }
        let (ignore_sigint, leak) = (self.ignore_sigint, self.leak_fd);
        let (block_signals, nofile) = (self.block_signals, self.nofile);
        let pass: Vec<(i32, i32)> = self
            .pass
            .iter()
            .map(|(fd, to)| (std::os::fd::AsRawFd::as_raw_fd(fd), *to))
            .collect();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // drover must not outlive the test that started it.
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                if ignore_sigint {
                    libc::signal(libc::SIGINT, libc::SIG_IGN);
                }
                if block_signals {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    for sig in [libc::SIGTERM, libc::SIGCHLD, libc::SIGHUP] {
                        libc::sigaddset(&mut set, sig);
                    }
                    libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                }
                for &(fd, to) in &pass {
                    if fd == to {
                        libc::fcntl(fd, libc::F_SETFD, 0);
                    } else {
                        libc::dup2(fd, to);
                    }
                }
                if let Some(fd) = leak {
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                    libc::dup2(null, fd);
                }
                if let Some(n) = nofile {
                    let mut limit: libc::rlimit = std::mem::zeroed();
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                    limit.rlim_cur = n;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start drover");
        drop(self.pass);
        let log = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        let pipes = [
            nix::sys::stat::fstat(child.stdout.as_ref().unwrap())
                .unwrap()
                .st_ino,
            nix::sys::stat::fstat(child.stderr.as_ref().unwrap())
                .unwrap()
                .st_ino,
        ];
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("| {line}");
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            }));
        }
        Drover {
            child,
            dir,
            log,
            readers,
            pipes,
            status: None,
        }
    }
}

impl Drover {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`; returns the whole log.
    pub fn wait_log(&self, needle: &str) -> String {
        wait_for(&format!("log line {needle:?}"), LIMIT, || {
            let log = self.log();
            log.contains(needle).then_some(log)
        })
    }

    /// Waits until `needle` appears `n` times in the log.
    pub fn wait_log_count(&self, needle: &str, n: usize) {
        wait_for(&format!("{n} x {needle:?}"), LIMIT, || {
            (self.log().matches(needle).count() >= n).then_some(())
        });
    }

    /// The address of the `i`-th "listening on" line.
    pub fn addr(&self, i: usize) -> String {
        let log = self.wait_log_count_then("listening on ", i + 1);
        let line = log
            .lines()
            .filter(|l| l.contains("listening on "))
            .nth(i)
            .unwrap();
        let rest = line.split("listening on ").nth(1).unwrap();
        rest.split(' ').next().unwrap().to_string()
    }

    fn wait_log_count_then(&self, needle: &str, n: usize) -> String {
        self.wait_log_count(needle, n);
        self.log()
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.addr(0).parse().expect("a TCP address")
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    /// Waits for drover to exit, then for its output to close (everything
    /// drover and its workers printed); returns its status. Output still open
    /// at the limit fails with the processes that hold it.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let status = self.wait_exit_only(limit);
        let deadline = Instant::now() + LIMIT;
        while !self.readers.iter().all(|r| r.is_finished()) {
            assert!(
                Instant::now() < deadline,
                "drover exited ({status}) but its output was still open {LIMIT:?} later, held by: {}",
                pipe_holders(&self.pipes).join("; ")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        status
    }

    /// Waits for drover to exit, without waiting for its output to close
    /// (a process it started may hold it open: a new master after an upgrade).
    /// A drover still there at the limit fails with what /proc says of it.
    pub fn wait_exit_only(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for drover to exit; drover now: {}",
                process_state(self.pid())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Live (non-zombie) processes whose parent is drover.
    pub fn children(&self) -> Vec<Pid> {
        children_of(self.pid())
    }

    /// Waits until `n` workers are alive and returns their pids.
    /// `drover ctl ARGS` against the control socket `$DIR/ctl.sock`: (exit
    /// status, standard output).
    pub fn ctl(&self, args: &[&str]) -> (i32, String) {
        let out = std::process::Command::new(drover_bin())
            .arg("ctl")
            .arg("--socket")
            .arg(self.dir.path().join("ctl.sock"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// One GET on the admin endpoint at the Unix socket `$DIR/admin.sock`
    /// (drover may still be starting: it appears once drover has bound it).
    pub fn admin(&self, path: &str) -> Response {
        let socket = self.dir.path().join("admin.sock");
        let s = wait_for("the admin socket", LIMIT, || {
            std::os::unix::net::UnixStream::connect(&socket).ok()
        });
        s.set_read_timeout(Some(LIMIT)).unwrap();
        get_over(s, path).unwrap()
    }

    /// With `preload = true` and a command that is no template (it sent
    /// READY=1 on NOTIFY_SOCKET): drover exits 3 and says so. Its log.
    pub fn assert_refused_as_no_template(&mut self) -> String {
        let status = self.wait_exit(LIMIT);
        let log = self.log();
        assert_eq!(status.code(), Some(3), "{log}");
        assert!(
            log.contains("the worker command of generation 1 does not implement preload: it sent READY=1 on NOTIFY_SOCKET"),
            "{log}"
        );
        log
    }

    /// After a reload: as many workers serve as `before`, none of them.
    pub fn assert_replaced(&self, before: &[Pid]) {
        let after = self.wait_workers(before.len());
        assert!(
            after.iter().all(|p| !before.contains(p)),
            "a new generation serves: {before:?} -> {after:?}"
        );
    }

    pub fn wait_workers(&self, n: usize) -> Vec<Pid> {
        wait_for(&format!("{n} workers"), LIMIT, || {
            let c = self.children();
            (c.len() == n).then_some(c)
        })
    }
}

impl Drop for Drover {
    fn drop(&mut self) {
        let pids = self.children();
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        for p in pids {
            let _ = killpg(p, Signal::SIGKILL);
        }
    }
}

/// A process's state letter and parent pid, from /proc.
pub fn stat(pid: Pid) -> Option<(char, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let mut it = after.split(' ');
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` is alive (exists and is not a zombie).
pub fn alive(pid: Pid) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z')
}

fn all_pids() -> Vec<Pid> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .parse()
                .ok()
                .map(Pid::from_raw)
        })
        .collect()
}

/// The pid in `text` after `prefix` ("worker 1 (pid "), up to its ')':
/// drover names a process so in its log and its answers.
pub fn pid_after(text: &str, prefix: &str) -> Pid {
    let rest = &text[text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
        + prefix.len()..];
    let pid = &rest[..rest.find(')').unwrap_or_else(|| panic!("no ')' in {rest}"))];
    Pid::from_raw(pid.parse().unwrap_or_else(|e| panic!("{pid:?}: {e}")))
}

pub fn children_of(parent: Pid) -> Vec<Pid> {
    all_pids()
        .into_iter()
        .filter(|p| stat(*p).is_some_and(|(s, pp)| pp == parent.as_raw() && s != 'Z'))
        .collect()
}

pub fn zombies_of(parent: Pid) -> Vec<Pid> {
    all_pids()
        .into_iter()
        .filter(|p| stat(*p).is_some_and(|(s, pp)| pp == parent.as_raw() && s == 'Z'))
        .collect()
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn worker_pid(&self) -> i32 {
        self.header("X-Worker-Pid")
            .expect("X-Worker-Pid")
            .parse()
            .unwrap()
    }
}

/// One GET with `Connection: close` over any stream.
pub fn get_over(mut s: impl Read + Write, path: &str) -> std::io::Result<Response> {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    read_response_to_end(s)
}

pub fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let bad = |why: &str| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{why}: {text:?}"))
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let resp = Response {
        status,
        headers,
        body: body.to_string(),
    };
    if let Some(len) = resp.header("Content-Length") {
        if len.parse::<usize>().ok() != Some(resp.body.len()) {
            return Err(bad("truncated body"));
        }
    }
    Ok(resp)
}

pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(LIMIT))?;
    get_over(s, path)
}

/// GETs until a worker answers 200.
pub fn get_ok(addr: SocketAddr, path: &str) -> Response {
    wait_for(&format!("GET {path} to answer"), LIMIT, || {
        get(addr, path).ok().filter(|r| r.status == 200)
    })
}

/// `addr` as /proc/net/tcp{,6} writes it.
fn proc_net_addr(a: SocketAddr) -> String {
    let ip = match a.ip() {
        std::net::IpAddr::V4(ip) => format!("{:08X}", u32::from_ne_bytes(ip.octets())),
        std::net::IpAddr::V6(ip) => ip
            .octets()
            .chunks(4)
            .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    };
    format!("{ip}:{:04X}", a.port())
}

/// The queues of the listening socket on `addr`, from its LISTEN line:
/// (its backlog, the connections waiting in its accept queue). Listening
/// sockets are listed first, so this line is read reliably even while the
/// rest of the table churns (a connection's own line can be skipped then).
///
/// Read only up to that line: the whole table had 54,000 lines (TIME_WAIT
/// of the load tests) on a CI machine, and reading it in every poll made a
/// wait for an accept take seconds.
pub fn listen_queues(addr: SocketAddr) -> Option<(u64, u64)> {
    use std::io::BufRead;
    let table = if addr.is_ipv4() { "tcp" } else { "tcp6" };
    let local = proc_net_addr(addr);
    let file = std::fs::File::open(format!("/proc/net/{table}")).ok()?;
    let line = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            f.len() > 4 && f[1] == local && f[3] == "0A"
        })?;
    let (tx, rx) = line.split_whitespace().nth(4)?.split_once(':')?;
    Some((
        u64::from_str_radix(tx, 16).ok()?,
        u64::from_str_radix(rx, 16).ok()?,
    ))
}

/// The bytes the server has not yet read on the connection from `remote` to
/// `local` (its receive queue), if its end is ESTABLISHED: one exact lookup
/// through sock_diag (`NETLINK_SOCK_DIAG`, as `ss` asks), not a scan of
/// /proc/net/tcp. That table is the whole machine's: with the TIME_WAIT of
/// other load tests, one read took 0.55 s (27,000 lines) and 2 s (58,700)
/// under load, and a line can be skipped while the table churns, so a wait
/// for a request's read outlasted the 5 s request itself (a full run: "the
/// request ended before the stop was sent").
fn unread_bytes(local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const TCP_ESTABLISHED: u8 = 1;
    fn octets(a: SocketAddr) -> [u8; 16] {
        let mut o = [0u8; 16];
        match a.ip() {
            std::net::IpAddr::V4(ip) => o[..4].copy_from_slice(&ip.octets()),
            std::net::IpAddr::V6(ip) => o = ip.octets(),
        }
        o
    }
    // struct nlmsghdr, then struct inet_diag_req_v2 (linux/inet_diag.h)
    // naming the socket by its own end (src) and its peer's (dst).
    let mut req = Vec::with_capacity(72);
    req.extend(72u32.to_ne_bytes());
    req.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend((libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend([0u8; 8]); // sequence number, port id
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    req.extend([family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    req.extend(u32::MAX.to_ne_bytes()); // every state
    req.extend(local.port().to_be_bytes());
    req.extend(remote.port().to_be_bytes());
    req.extend(octets(local));
    req.extend(octets(remote));
    req.extend([0u8; 4]); // any interface
                          // INET_DIAG_NOCOOKIE: the socket is named by its addresses alone.
    req.extend([0xffu8; 8]);
    // SAFETY: plain system calls on a socket this function owns, with
    // buffers that outlive them.
    let sock = unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        if fd < 0 {
            return None;
        }
        OwnedFd::from_raw_fd(fd)
    };
    let mut answer = [0u8; 512];
    // SAFETY: as above.
    let n = unsafe {
        if libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) != req.len() as isize {
            return None;
        }
        libc::recv(
            sock.as_raw_fd(),
            answer.as_mut_ptr().cast(),
            answer.len(),
            0,
        )
    };
    // A struct inet_diag_msg after the nlmsghdr (an NLMSG_ERROR when there
    // is no such socket): its state at byte 1, its receive queue at 56.
    let msg_type = u16::from_ne_bytes([answer[4], answer[5]]);
    if n < 16 + 72 || msg_type != SOCK_DIAG_BY_FAMILY || answer[16 + 1] != TCP_ESTABLISHED {
        return None;
    }
    Some(u32::from_ne_bytes(
        answer[16 + 56..16 + 60].try_into().unwrap(),
    ))
}

/// Sends a GET of `path` and returns, with a thread reading the answer,
/// once the server has read the request: its end of the connection is
/// ESTABLISHED with an empty receive queue. An accept alone is not "in
/// flight": a server that accepted but had not read yet (Granian's hyper)
/// rightly closes such a connection as idle at a graceful stop.
pub fn get_in_flight(
    addr: SocketAddr,
    path: &str,
) -> std::thread::JoinHandle<std::io::Result<Response>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(LIMIT)).expect("set_read_timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let client = s.local_addr().expect("local_addr");
    let handle = std::thread::spawn(move || read_response_to_end(s));
    wait_for("the server to read the request", LIMIT, || {
        // An answer, a close or a reset before we saw the read: the caller
        // asserts on what the client got, not on a wait that cannot end.
        if handle.is_finished() {
            return Some(());
        }
        // The server's end: ESTABLISHED, its receive queue empty.
        (unread_bytes(addr, client)? == 0).then_some(())
    });
    handle
}

fn read_response_to_end(mut s: impl Read) -> std::io::Result<Response> {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

pub fn read_file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// What happened to each connection attempt of a [`Load`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcomes {
    /// A complete 200 response.
    pub ok: u64,
    /// Refused at connect time (nothing was accepted).
    pub refused: u64,
    /// Reset after the connection was established.
    pub reset: u64,
    /// Closed before a complete response (empty or short).
    pub truncated: u64,
    /// Anything else: connect timeouts, non-200 statuses, other errors.
    pub other: u64,
}

/// Waits until `load` has had `n` complete responses.
pub fn wait_answered(load: &Load, n: u64) {
    wait_for(&format!("{n} answered requests"), LIMIT, || {
        (load.answered.load(std::sync::atomic::Ordering::Relaxed) >= n).then_some(())
    });
}

/// `clients` threads that each open a connection, send one GET and read the
/// whole response, again and again, counting every outcome.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Complete responses so far, across clients.
    pub answered: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Outcomes>>,
}

impl Load {
    pub fn start(addr: SocketAddr, clients: usize, path: &str) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, answered, path) = (stop.clone(), answered.clone(), path.to_string());
                std::thread::spawn(move || {
                    let mut o = Outcomes::default();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let before = o.ok;
                        one_request(addr, &path, &mut o);
                        answered.fetch_add(o.ok - before, std::sync::atomic::Ordering::Relaxed);
                    }
                    o
                })
            })
            .collect();
        Load {
            stop,
            answered,
            threads,
        }
    }

    /// `more` responses more (after a reload: on the new generation
    /// alone), then the outcomes, printed.
    pub fn finish_after(self, more: u64) -> Outcomes {
        let served = self.answered.load(std::sync::atomic::Ordering::Relaxed);
        wait_answered(&self, served + more);
        let o = self.finish();
        eprintln!("outcomes: {o:?}");
        o
    }

    pub fn finish(self) -> Outcomes {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = Outcomes::default();
        for t in self.threads {
            let o = t.join().unwrap();
            total.ok += o.ok;
            total.refused += o.refused;
            total.reset += o.reset;
            total.truncated += o.truncated;
            total.other += o.other;
        }
        total
    }
}

fn one_request(addr: SocketAddr, path: &str, o: &mut Outcomes) {
    use std::io::ErrorKind::*;
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) if e.kind() == ConnectionRefused => {
            o.refused += 1;
            // Nothing listens: do not spin on refusals.
            std::thread::sleep(Duration::from_millis(5));
            return;
        }
        Err(_) => {
            o.other += 1;
            return;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut raw = Vec::new();
    let result = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n"
    )
    .and_then(|_| s.read_to_end(&mut raw));
    match result {
        Err(e) if matches!(e.kind(), ConnectionReset | BrokenPipe | ConnectionAborted) => {
            o.reset += 1
        }
        Err(_) => o.other += 1,
        Ok(_) => match parse_response(&raw) {
            Ok(r) if r.status == 200 => o.ok += 1,
            Ok(_) => o.other += 1,
            Err(_) => o.truncated += 1,
        },
    }
}

/// A graceful stop with a slow request in flight, as every worker kind must
/// pass it: `stop` is called while `/sleep?ms=5000` is being served; the
/// request is answered in full, new connections are refused meanwhile, and
/// drover exits 0 with no worker left. (5 s: on a saturated machine the
/// steps from the connect to the stop took 3.5 s in a CI run.) Returns drover and the workers' pids
/// for the caller's own checks (cleanup, log lines).
pub fn stop_with_request_in_flight(start: Start, stop: impl FnOnce(&Drover)) -> (Drover, Vec<Pid>) {
    let mut d = start.run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let workers = d.wait_workers(2);
    let slow = get_in_flight(addr, "/sleep?ms=5000");
    stop(&d);
    // What follows proves a drain only if the request was still being served
    // when the stop was sent (a very slow machine could take longer than the
    // request between its accept and here: then say so, do not pass).
    assert!(
        !slow.is_finished(),
        "the request ended before the stop was sent: nothing was tested"
    );
    // New connections are refused as soon as the master and the workers have
    // closed the listeners, while the slow request is still being served.
    wait_for("new connections to be refused", LIMIT, || {
        get(addr, "/").is_err().then_some(())
    });
    let resp = slow
        .join()
        .unwrap()
        .expect("the in-flight request gets its full response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, "slept 5000 ms\n");
    let status = d.wait_exit(LIMIT);
    assert_eq!(
        status.code(),
        Some(0),
        "every worker stopped in time: {}",
        d.log()
    );
    for w in &workers {
        assert!(!alive(*w), "worker {w} is gone");
    }
    let log = d.log();
    assert!(
        log.contains("graceful shutdown: stage 1, stop accepting"),
        "{log}"
    );
    assert!(log.contains("exiting with status 0"), "{log}");
    (d, workers)
}

/// A worker that recycles itself as drover-wsgi's `--max-requests` does:
/// it boots in 0.3 s, serves 0.2 s, says `STOPPING=1` and exits 0.
pub const RECYCLING_WORKER: &str = "import os, socket, time\n\
def say(m):\n    \
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n    \
p = os.environ['NOTIFY_SOCKET']\n    \
s.sendto(m, '\\0' + p[1:] if p.startswith('@') else p)\n\
time.sleep(0.3)\nsay(b'READY=1')\ntime.sleep(0.2)\nsay(b'STOPPING=1')\n";

/// `text` as a TOML basic string, quotes included.
pub fn toml_string(text: &str) -> String {
    format!(
        "\"{}\"",
        text.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}

/// A notify socket the test owns, as systemd's: it tells who sent each
/// message (SO_PASSCRED), and anyone may send to it.
pub fn notify_socket(path: &Path) -> std::os::unix::net::UnixDatagram {
    use nix::sys::socket::{setsockopt, sockopt::PassCred};
    use std::os::unix::fs::PermissionsExt;
    let sock = std::os::unix::net::UnixDatagram::bind(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
    setsockopt(&sock, PassCred, &true).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    sock
}

/// The next message and its sender's pid; `None` after the read timeout.
pub fn recv_from(sock: &std::os::unix::net::UnixDatagram) -> Option<(Pid, String)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixCredentials};
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(UnixCredentials);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .ok()?;
    let pid = msg.cmsgs().ok()?.find_map(|c| match c {
        ControlMessageOwned::ScmCredentials(cred) => Some(Pid::from_raw(cred.pid())),
        _ => None,
    })?;
    let n = msg.bytes;
    Some((pid, String::from_utf8_lossy(&buf[..n]).into_owned()))
}

/// The `NOTIFY_SOCKET` in the environment of `pid` (a worker, a new master).
pub fn notify_socket_of(pid: Pid) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p)))
        .unwrap_or_else(|| panic!("pid {pid} has no NOTIFY_SOCKET"))
}

/// Fills the queue of the notify socket at `path` (its receiver does not
/// read: a stalled master): it is full once a fresh sender cannot send even
/// one datagram (each sender is also bounded by its own send buffer, so it
/// may take several).
pub fn fill_notify_queue(path: &Path) {
    let full = (0..1000).any(|_| {
        let sender = std::os::unix::net::UnixDatagram::unbound().unwrap();
        sender.set_nonblocking(true).unwrap();
        let mut sent = 0;
        while sender.send_to(b"FILLER=1", path).is_ok() {
            sent += 1;
        }
        sent == 0
    });
    assert!(full, "the notify socket's queue never filled");
}

/// SIGCONT to a process the test stopped, when dropped, also when the test
/// fails.
pub struct Resume(pub Pid);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// `cmd` set to die with the test (and with no input).
pub fn bounded(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
}

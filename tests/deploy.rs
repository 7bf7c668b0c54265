//! Deployment: drover started the way systemd starts it (socket activation,
//! a notify socket, the settings of the shipped units in deploy/systemd).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::unistd::Pid;

use common::python;

/// Two sockets handed in as systemd does (fds 3 and 4), of which the config
/// binds only the first: the second is reported as an error, and the first
/// is served and logged as inherited.
#[test]
fn an_activated_socket_that_matches_no_bind_is_an_error() {
    let served = TcpListener::bind("127.0.0.1:0").unwrap();
    let served_addr = served.local_addr().unwrap();
    let stray = TcpListener::bind("127.0.0.1:0").unwrap();
    let stray_addr = stray.local_addr().unwrap();
    let bind = served_addr.to_string();
    let start = Start {
        pass: vec![(served.into(), 3), (stray.into(), 4)],
        systemd: true,
        ..Start::args(&["-b", &bind, "--", hello_bin()])
    };
    let d = start.run();
    assert_eq!(get_ok(served_addr, "/").status, 200);
    let log = d.wait_log("listening on ");
    assert!(
        log.contains(&format!(
            "listening on {served_addr} (inherited, fd name \"bind0\")"
        )),
        "{log}"
    );
    let log = d.wait_log("matches no bind");
    let line = log.lines().find(|l| l.contains("matches no bind")).unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains(&format!("the activated socket fd 4 ({stray_addr})")),
        "{line}"
    );
    // Closed: nothing accepts on that address any more.
    assert!(std::net::TcpStream::connect(stray_addr).is_err());
}

/// A bind drover opens itself is not called inherited.
#[test]
fn a_bind_opened_by_drover_is_not_called_inherited() {
    let d = Start::args(&["-b", "127.0.0.1:0", "--", hello_bin()]).run();
    let log = d.wait_log("listening on ");
    let line = log.lines().find(|l| l.contains("listening on ")).unwrap();
    assert!(line.ends_with("(fd name \"bind0\")"), "{line}");
}

/// `drover check` given the same sockets fails on the stray one (status 2,
/// the same message), and passes when every socket matches a bind.
#[test]
fn check_reports_an_activated_socket_that_matches_no_bind() {
    let served = TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = served.local_addr().unwrap().to_string();
    let stray = TcpListener::bind("127.0.0.1:0").unwrap();
    let stray_addr = stray.local_addr().unwrap();
    let mut d = Start {
        pass: vec![(served.into(), 3), (stray.into(), 4)],
        systemd: true,
        ..Start::args(&["check", "-b", &bind, "--", hello_bin()])
    }
    .run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(2), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains(&format!(
            "drover: error: the activated socket fd 4 ({stray_addr}) matches no bind"
        )),
        "{log}"
    );
    assert!(!log.contains("ok ("), "{log}");

    let served = TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = served.local_addr().unwrap().to_string();
    let mut d = Start {
        pass: vec![(served.into(), 3)],
        systemd: true,
        ..Start::args(&["check", "-b", &bind, "--", hello_bin()])
    }
    .run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

/// A unit file (with its drop-ins laid over it) as `(section, key, value)`
/// lines, in order; comments and blank lines left out.
struct Unit(Vec<(String, String, String)>);

impl Unit {
    fn read(paths: &[&str]) -> Unit {
        let mut lines = Vec::new();
        for path in paths {
            let text = std::fs::read_to_string(repo().join(path)).unwrap();
            let mut section = String::new();
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                    continue;
                }
                if let Some(s) = line.strip_prefix('[') {
                    section = s.trim_end_matches(']').to_string();
                    continue;
                }
                let (k, v) = line.split_once('=').expect("KEY=VALUE");
                lines.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
            }
        }
        Unit(lines)
    }

    /// The value in force: the last one given (an empty one resets).
    fn get(&self, section: &str, key: &str) -> Option<&str> {
        let v = self
            .0
            .iter()
            .rev()
            .find(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())?;
        (!v.is_empty()).then_some(v)
    }

    fn service(&self, key: &str) -> &str {
        self.get("Service", key)
            .unwrap_or_else(|| panic!("drover.service sets no {key}="))
    }

    fn duration(&self, key: &str) -> Duration {
        humantime::parse_duration(self.service(key)).unwrap()
    }
}

/// A command line of the unit, with the installed paths replaced by this
/// checkout's: the binary, and the config at /etc/drover/drover.toml.
fn command_line(line: &str, config: &Path) -> Vec<String> {
    line.split_whitespace()
        .map(|w| match w {
            "/usr/local/bin/drover" => drover_bin().to_string(),
            "/etc/drover/drover.toml" => config.display().to_string(),
            other => other.to_string(),
        })
        .collect()
}

/// The app's virtualenv as the kits install it (/srv/app/.venv): a venv of
/// the system's python3 (a per-user one, as pyenv's under /root, is
/// unreadable to the service's user and hidden by ProtectHome=) with the
/// drover-worker wheel, built from a copy of workers/python (a build writes
/// next to its sources) by the tests' venv and pip-installed offline. Made
/// in `dir`.
fn app_venv(dir: &Path) -> PathBuf {
    let src = dir.join("drover-worker");
    std::fs::create_dir(&src).unwrap();
    for f in ["pyproject.toml", "README.md", "src"] {
        let ok = std::process::Command::new("cp")
            .arg("-r")
            .arg(repo().join("workers/python").join(f))
            .arg(&src)
            .status()
            .unwrap()
            .success();
        assert!(ok, "copy workers/python/{f}");
    }
    let run = |program: &str, args: &[&str]| {
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let venv = dir.join("venv");
    let (venv_s, src_s) = (venv.display().to_string(), src.display().to_string());
    let wheels = dir.join("wheels").display().to_string();
    let pip = ["-m", "pip", "-q", "--disable-pip-version-check"];
    let build = ["wheel", "--no-deps", "--no-build-isolation", "-w", &wheels];
    run(
        &python::python(),
        &[&pip[..], &build[..], &[&src_s]].concat(),
    );
    run("/usr/bin/python3", &["-m", "venv", &venv_s]);
    let install = ["install", "--no-index", "--find-links", &wheels];
    let venv_python = venv.join("bin/python").display().to_string();
    run(
        &venv_python,
        &[&pip[..], &install[..], &["drover-worker"]].concat(),
    );
    venv
}

/// A shipped config as installed: the app from /srv/app (this checkout's
/// example app, in workers/python/examples) with its virtualenv `venv`, the
/// runtime directory at `run`, and `binds` replaced.
fn installed_config(
    text: &str,
    dir: &Path,
    venv: &Path,
    run: &Path,
    binds: &[(&str, &str)],
) -> PathBuf {
    let examples = repo().join("workers/python/examples");
    let mut text = text
        .replace("/srv/app/.venv", &venv.display().to_string())
        .replace("/srv/app", &examples.display().to_string())
        .replace("/run/drover", &run.display().to_string());
    for (from, to) in binds {
        text = text.replace(from, to);
    }
    let path = dir.join("drover.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// What drover.service asks of systemd's sandbox, done with mount namespaces
/// and setpriv where that can be done without systemd: RuntimeDirectory= (a
/// writable directory, first argument), ProtectSystem=strict (everything
/// else read-only), PrivateTmp=, ProtectHome=, PrivateDevices= (a /dev with
/// null, zero, full, random, urandom and shm only), UMask=, User=/Group=
/// (nobody), NoNewPrivileges= and CapabilityBoundingSet= (empty). Then it
/// execs the rest of its arguments.
const SANDBOX: &str = r#"set -e
run=$1; shift
mount --make-rprivate /
cover /tmp 1777
cover /root 755
cover /home 755
mount --bind "$run" "$run"
mount -o remount,bind,rw "$run"
mount -o remount,bind,ro /
mkdir /tmp/.dev
mount --rbind /dev /tmp/.dev
mount -t tmpfs -o mode=755 tmpfs /dev
for n in null zero full random urandom; do
  touch /dev/$n
  mount --bind /tmp/.dev/$n /dev/$n
done
mkdir /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
umount -l /tmp/.dev
rmdir /tmp/.dev
umask "$UNIT_UMASK"
exec setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs \
  --bounding-set=-all --inh-caps=-all "$@"
"#;

/// Shell function for the sandboxes: `cover DIR MODE` mounts an empty tmpfs
/// on DIR (PrivateTmp=, ProtectHome=) but keeps visible, read-only, the
/// paths of `$KEEP` (colon-separated) under it: this checkout and the
/// tests' files, wherever they are (a clone in /tmp, a home directory).
const COVER: &str = r#"
cover() {
  dir=$1
  [ -d "$dir" ] || return 0
  exec 9<"$dir"
  mount -t tmpfs -o mode="$2" tmpfs "$dir"
  old_ifs=$IFS
  IFS=:
  for p in $KEEP; do
    case "$p/" in
      "$dir"/*)
        mkdir -p "$p"
        mount --no-canonicalize --rbind "/proc/self/fd/9/${p#"$dir"/}" "$p"
        mount -o remount,bind,ro "$p" ;;
    esac
  done
  IFS=$old_ifs
  exec 9<&-
}
"#;

/// What the sandboxes must keep visible: the checkout, the build and the
/// tests' own files.
fn keep() -> String {
    let bin = Path::new(drover_bin()).parent().unwrap();
    [
        repo().as_path(),
        bin,
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    ]
    .map(|p| p.display().to_string())
    .join(":")
}

/// Reads messages into `seen` until a new one contains `needle`; returns it.
fn recv_until(sock: &UnixDatagram, seen: &mut Vec<(Pid, String)>, needle: &str) -> String {
    let deadline = Instant::now() + LIMIT;
    let from = seen.len();
    loop {
        if let Some((_, m)) = seen[from..].iter().find(|(_, m)| m.contains(needle)) {
            return m.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needle:?}; got {seen:?}"
        );
        seen.extend(recv_from(sock));
    }
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// A port that was free a moment ago (systemd-socket-activate cannot bind
/// port 0; a port taken meanwhile is retried by the caller).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts drover as drover.service and drover.socket would: the socket bound
/// by `systemd-socket-activate` (which starts drover at the first
/// connection), the service's environment (NOTIFY_SOCKET, WATCHDOG_USEC), in
/// the sandbox its hardening options ask for. Returns drover and the address.
fn start_as_the_unit(
    service: &Unit,
    socket: &Unit,
    notify: &Path,
    config: &Path,
    run: &Path,
) -> (Drover, SocketAddr) {
    let listen = socket.get("Socket", "ListenStream").unwrap();
    let fdname = socket.get("Socket", "FileDescriptorName").unwrap();
    let watchdog = service.duration("WatchdogSec").as_micros();
    for _ in 0..5 {
        let addr: SocketAddr = listen
            .replace(":8000", &format!(":{}", free_port()))
            .parse()
            .unwrap();
        let mut args = vec![
            "-m".to_string(),
            "sh".into(),
            "-c".into(),
            format!("{COVER}{SANDBOX}"),
            "sandbox".into(),
            run.display().to_string(),
            "systemd-socket-activate".into(),
            format!("--listen={addr}"),
            format!("--fdname={fdname}"),
            format!("--setenv=NOTIFY_SOCKET={}", notify.display()),
            format!("--setenv=WATCHDOG_USEC={watchdog}"),
        ];
        args.extend(command_line(service.service("ExecStart"), config));
        let d = Start {
            program: Some("unshare".into()),
            args,
            env: vec![
                ("UNIT_UMASK".into(), service.service("UMask").into()),
                ("KEEP".into(), keep()),
            ],
            ..Start::default()
        }
        .run();
        let log = wait_for("systemd-socket-activate to listen", LIMIT, || {
            let log = d.log();
            (log.contains("Listening on") || log.contains("in use")).then_some(log)
        });
        if log.contains(&format!("Listening on {addr} as 3.")) {
            return (d, addr);
        }
        eprintln!("retrying on another port: {log}");
    }
    panic!("systemd-socket-activate found no free port in 5 tries");
}

/// drover under systemd-socket-activate with the settings of the shipped
/// units (deploy/systemd), in the sandbox of their hardening options: the
/// connection that activates it is served, systemd hears READY=1 once every
/// worker is ready, a reload both ways (ExecReload=drover ctl reload, and
/// the SIGHUP of Type=notify-reload) with RELOADING=1 + MONOTONIC_USEC and
/// READY=1, and SIGTERM to drover alone (KillMode=mixed) stops it cleanly
/// within TimeoutStopSec with STOPPING=1. Every message comes from drover's
/// own pid (NotifyAccess=main).
#[test]
fn drover_runs_as_the_shipped_systemd_units() {
    let service = Unit::read(&["deploy/systemd/drover.service"]);
    let reload_unit = Unit::read(&[
        "deploy/systemd/drover.service",
        "deploy/systemd/drover.service.d/notify-reload.conf",
    ]);
    let socket = Unit::read(&["deploy/systemd/drover.socket"]);
    assert_eq!(service.service("Type"), "notify");
    assert_eq!(reload_unit.service("Type"), "notify-reload");
    assert_eq!(service.service("KillMode"), "mixed");
    assert_eq!(service.service("NotifyAccess"), "main");

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // RuntimeDirectory=drover, RuntimeDirectoryMode=, owned by User=.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let mode = u32::from_str_radix(service.service("RuntimeDirectoryMode"), 8).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
    let venv = app_venv(dir.path());
    let text = std::fs::read_to_string(repo().join("deploy/systemd/drover.toml")).unwrap();
    let config = installed_config(&text, dir.path(), &venv, &run, &[]);
    let notify_path = dir.path().join("notify");
    let notify = notify_socket(&notify_path);

    let (mut d, addr) = start_as_the_unit(&service, &socket, &notify_path, &config, &run);
    // The first client starts drover, and waits in the socket's queue.
    let first = std::thread::spawn(move || get(addr, "/"));
    let mut seen = Vec::new();
    let ready = recv_until(&notify, &mut seen, "READY=1");
    assert!(
        ready.contains("STATUS=4/4 workers ready, generation 1"),
        "{ready}"
    );
    let first = first.join().unwrap().expect("the activating client");
    assert_eq!(first.status, 200);
    let log = d.log();
    assert!(
        log.contains(&format!(
            "listening on {addr} (inherited, fd name \"{}\")",
            socket.get("Socket", "FileDescriptorName").unwrap()
        )),
        "{log}"
    );
    assert!(!log.contains("ERROR"), "{log}");
    let workers = d.wait_workers(4);
    // The sandbox held: workers run as User= with no capabilities.
    for w in &workers {
        let status = std::fs::read_to_string(format!("/proc/{w}/status")).unwrap();
        assert!(
            status.contains("Uid:\t65534\t65534\t65534\t65534"),
            "{status}"
        );
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        assert!(status.contains("CapBnd:\t0000000000000000"), "{status}");
    }

    // systemctl reload, Type=notify: ExecReload, run as User=.
    let before = monotonic_usec();
    let reload = command_line(service.service("ExecReload"), &config);
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(&reload)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout} {:?}", out.stderr);
    assert!(stdout.contains("applied"), "{stdout}");
    let reloading = recv_until(&notify, &mut seen, "RELOADING=1");
    let usec: u64 = reloading
        .split("MONOTONIC_USEC=")
        .nth(1)
        .and_then(|s| s.lines().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(
        (before..=monotonic_usec()).contains(&usec),
        "MONOTONIC_USEC={usec} is not CLOCK_MONOTONIC of the reload"
    );
    let ready = recv_until(&notify, &mut seen, "READY=1");
    assert!(ready.contains("generation 2"), "{ready}");
    assert_eq!(get_ok(addr, "/").status, 200);

    // systemctl reload, Type=notify-reload: systemd sends ReloadSignal.
    let signal: Signal = reload_unit.service("ReloadSignal").parse().unwrap();
    assert!(reload_unit.get("Service", "ExecReload").is_none());
    d.signal(signal);
    recv_until(&notify, &mut seen, "RELOADING=1\nMONOTONIC_USEC=");
    let ready = recv_until(&notify, &mut seen, "READY=1");
    assert!(ready.contains("generation 3"), "{ready}");
    assert_eq!(get_ok(addr, "/").status, 200);

    // systemctl stop: KillSignal= to drover only (KillMode=mixed).
    let workers = d.wait_workers(4);
    let signal: Signal = service.service("KillSignal").parse().unwrap();
    let stopped = Instant::now();
    d.signal(signal);
    recv_until(&notify, &mut seen, "STOPPING=1");
    let status = d.wait_exit(service.duration("TimeoutStopSec"));
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(stopped.elapsed() < service.duration("TimeoutStopSec"));
    for w in workers {
        assert!(!alive(w), "worker {w} outlived drover");
    }
    while let Some(m) = recv_from(&notify) {
        seen.push(m);
    }
    // NotifyAccess=main: systemd would drop anyone else's messages.
    let pid = d.pid();
    assert!(seen.iter().all(|(p, _)| *p == pid), "{seen:?}");
    let kinds: Vec<&str> = seen
        .iter()
        .filter_map(|(_, m)| {
            ["READY=1", "RELOADING=1", "STOPPING=1"]
                .into_iter()
                .find(|k| m.lines().any(|l| l == *k))
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "STOPPING=1"
        ],
        "{seen:?}"
    );
}

/// `systemd-analyze` on the shipped units, with this checkout's binary at
/// ExecStart: `verify` finds nothing to say (the notify-reload drop-in is
/// only for systemd 253 or newer: older ones name exactly what they do not
/// know), and `security --offline` rates the sandbox at most 3.0 ("OK").
#[test]
fn the_shipped_units_pass_systemd_analyze() {
    let dir = tempfile::tempdir().unwrap();
    let installed = |name: &str, parts: &[&str]| {
        let mut text = String::new();
        for p in parts {
            text += &std::fs::read_to_string(repo().join("deploy/systemd").join(p)).unwrap();
        }
        let text = text.replace("/usr/local/bin/drover", drover_bin());
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    };
    let analyze = |args: &[&str], units: &[&PathBuf]| {
        let out = std::process::Command::new("systemd-analyze")
            .args(args)
            .args(units)
            .output()
            .expect("systemd-analyze (Debian's systemd package; .ci/run installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let service = installed("drover.service", &["drover.service"]);
    let socket = installed("drover.socket", &["drover.socket"]);
    let (code, text) = analyze(&["verify", "--man=no"], &[&service, &socket]);
    assert_eq!((code, text.as_str()), (Some(0), ""));

    let version: u32 = analyze(&["--version"], &[])
        .1
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    let reload = installed(
        "reload/drover.service",
        &["drover.service", "drover.service.d/notify-reload.conf"],
    );
    let reload_socket = installed("reload/drover.socket", &["drover.socket"]);
    let (code, text) = analyze(&["verify", "--man=no"], &[&reload, &reload_socket]);
    assert_eq!(code, Some(0), "{text}");
    if version >= 253 {
        assert_eq!(text, "");
    } else {
        let unknown: Vec<&str> = text.lines().collect();
        assert_eq!(unknown.len(), 2, "{text}");
        assert!(
            unknown[0].ends_with("Failed to parse service type, ignoring: notify-reload"),
            "{text}"
        );
        assert!(
            unknown[1].ends_with("Unknown key 'ReloadSignal' in section [Service], ignoring."),
            "{text}"
        );
    }

    let (_, text) = analyze(&["security", "--offline=yes", "--no-pager"], &[&service]);
    let level: f64 = text
        .split("Overall exposure level for drover.service: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {text}"));
    assert!(level <= 3.0, "exposure {level}:\n{text}");
}

/// The Dockerfile's ENTRYPOINT (exec form), STOPSIGNAL, USER and
/// HEALTHCHECK.
struct Image {
    entrypoint: Vec<String>,
    stop_signal: Signal,
    user: String,
    health: Health,
}

/// `HEALTHCHECK [OPTIONS] CMD [...]` (exec form).
struct Health {
    command: Vec<String>,
    start_period: Duration,
    timeout: Duration,
}

impl Health {
    /// The instruction, its continuation lines joined.
    fn read(text: &str) -> Health {
        let mut lines = text.lines().skip_while(|l| !l.starts_with("HEALTHCHECK "));
        let mut line = String::new();
        for l in lines.by_ref() {
            line.push_str(l.trim_end_matches('\\'));
            if !l.ends_with('\\') {
                break;
            }
        }
        assert!(!line.is_empty(), "the Dockerfile has no HEALTHCHECK");
        let (options, command) = line.split_once(" CMD ").expect("HEALTHCHECK ... CMD");
        let option = |name: &str| {
            options
                .split_whitespace()
                .find_map(|o| o.strip_prefix(&format!("--{name}=")))
                .map(|v| humantime::parse_duration(v).unwrap())
                .unwrap_or_else(|| panic!("HEALTHCHECK has no --{name}: {options}"))
        };
        Health {
            command: serde_json::from_str(command.trim())
                .unwrap_or_else(|e| panic!("HEALTHCHECK CMD not in exec form ({e}): {command}")),
            start_period: option("start-period"),
            timeout: option("timeout"),
        }
    }

    /// Runs the command as the image would (the installed paths replaced by
    /// this checkout's, `config` for the image's): its exit status and
    /// what it printed.
    fn run(&self, config: &Path) -> (i32, String) {
        let argv = command_line(&self.command.join(" "), config);
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Image {
    fn read() -> Image {
        let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
        let last = |word: &str| {
            text.lines()
                .rev()
                .find_map(|l| l.strip_prefix(word))
                .map(str::trim)
                .unwrap_or_else(|| panic!("the Dockerfile has no {word}"))
                .to_string()
        };
        let entrypoint = last("ENTRYPOINT ");
        assert!(
            entrypoint.starts_with('['),
            "ENTRYPOINT in shell form: a shell would be PID 1 and drover would not get SIGTERM"
        );
        Image {
            entrypoint: entrypoint
                .trim_matches(['[', ']'])
                .split(',')
                .map(|w| w.trim().trim_matches('"').to_string())
                .collect(),
            stop_signal: last("STOPSIGNAL ").parse().unwrap(),
            user: last("USER "),
            health: Health::read(&text),
        }
    }
}

/// The config the Kubernetes kit mounts (the ConfigMap's `drover.toml`).
fn configmap_config() -> String {
    let yaml = std::fs::read_to_string(repo().join("deploy/kubernetes/drover.yaml")).unwrap();
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "drover.toml: |");
    lines.next().expect("the ConfigMap has drover.toml");
    let mut text = String::new();
    for l in lines.take_while(|l| l.is_empty() || l.starts_with("    ")) {
        text += l.get(4..).unwrap_or("");
        text.push('\n');
    }
    text
}

/// What a container runtime and the Kubernetes kit give drover, done with
/// namespaces: a new PID namespace in which drover is PID 1 (unshare --fork:
/// the namespace's first process), a read-only root file system
/// (readOnlyRootFilesystem), writable /tmp and runtime directory (the
/// emptyDir volumes, first argument), the image's USER with no capabilities
/// and no new privileges. Then it execs the rest of its arguments.
const CONTAINER: &str = r#"set -e
run=$1; user=$2; shift 2
mount --make-rprivate /
cover /tmp 1777
mount --bind "$run" "$run"
mount -o remount,bind,rw "$run"
mount -o remount,bind,ro /
exec setpriv --reuid="${user%:*}" --regid="${user#*:}" --clear-groups --no-new-privs \
  --bounding-set=-all --inh-caps=-all "$@"
"#;

/// drover as the image and the Kubernetes kit run it: PID 1 of its PID
/// namespace, the image's ENTRYPOINT with the ConfigMap's config (the same
/// settings as the image's own deploy/container/drover.toml), the image's
/// user, a read-only root. It serves; STOPSIGNAL (what `docker stop` and the
/// kubelet send) with a request in flight: drover serves on for the
/// ConfigMap's pre-stop delay (5 s), then the request is answered, new
/// connections are refused, drover exits 0 and no worker is left.
#[test]
fn drover_runs_as_pid_1_of_the_shipped_image() {
    let image = Image::read();
    assert_eq!(image.entrypoint[0], "/usr/local/bin/drover");
    assert_eq!(image.stop_signal, Signal::SIGTERM);
    let kube = configmap_config();
    let own = std::fs::read_to_string(repo().join("deploy/container/drover.toml")).unwrap();
    // The same settings, but for the pre-stop delay a plain container has
    // no load balancer to wait for.
    let mut kube_table = toml::from_str::<toml::Table>(&kube).unwrap();
    assert_eq!(
        kube_table.remove("prestop_delay").unwrap().as_str(),
        Some("5s")
    );
    assert_eq!(
        kube_table,
        toml::from_str::<toml::Table>(&own).unwrap(),
        "the ConfigMap and deploy/container/drover.toml disagree"
    );

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let (uid, gid) = image.user.split_once(':').unwrap();
    std::os::unix::fs::chown(&run, uid.parse().ok(), gid.parse().ok()).unwrap();
    let venv = app_venv(dir.path());
    let config = installed_config(
        &kube,
        dir.path(),
        &venv,
        &run,
        &[
            ("0.0.0.0:8000", "127.0.0.1:0"),
            ("0.0.0.0:9100", "127.0.0.1:0"),
        ],
    );
    let mut args: Vec<String> = [
        "--pid",
        "--fork",
        "--kill-child",
        "--mount",
        "--mount-proc",
        "sh",
        "-c",
        &format!("{COVER}{CONTAINER}"),
        "container",
    ]
    .map(String::from)
    .into();
    args.push(run.display().to_string());
    args.push(image.user.clone());
    args.extend(command_line(&image.entrypoint.join(" "), &config));
    let mut d = Start {
        program: Some("unshare".into()),
        args,
        env: vec![("KEEP".into(), keep())],
        ..Start::default()
    }
    .run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    // The image's HEALTHCHECK asks the master, with what the image has,
    // and gives it the time to boot.
    assert_eq!(image.health.command[0], "/usr/local/bin/drover");
    let boot_timeout = Duration::from_secs(config_seconds(&own, "boot_timeout"));
    assert!(image.health.start_period >= boot_timeout);
    // ctl gives up before Docker does: its own answer, not a killed probe.
    let cmd = &image.health.command;
    let ctl_timeout = cmd
        .iter()
        .position(|a| a == "--timeout")
        .map(|i| &cmd[i + 1]);
    let ctl_timeout = humantime::parse_duration(ctl_timeout.expect("ctl --timeout")).unwrap();
    assert!(ctl_timeout < image.health.timeout);
    let (code, out) = image.health.run(&config);
    assert_eq!(code, 0, "the HEALTHCHECK failed: {out}");
    assert!(out.starts_with("ok: ready: 2/2 workers ready"), "{out}");
    // The probes' endpoint, as the manifests name it.
    let admin: SocketAddr = d
        .wait_log("admin endpoint on ")
        .split("admin endpoint on ")
        .nth(1)
        .and_then(|s| {
            s.split(':')
                .take(2)
                .collect::<Vec<_>>()
                .join(":")
                .parse()
                .ok()
        })
        .expect("the admin endpoint's address");
    assert_eq!(get_ok(admin, "/livez").status, 200);
    assert_eq!(get_ok(admin, "/readyz").status, 200);
    // unshare --fork waits for drover, its only child.
    let drover = d.wait_workers(1)[0];
    let status = std::fs::read_to_string(format!("/proc/{drover}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.ends_with("\t1"), "drover is not PID 1: {nspid}");
    assert!(
        status.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")),
        "{status}"
    );
    let workers = children_of(drover);
    assert_eq!(workers.len(), 2);
    assert_eq!(get_ok(addr, "/").status, 200);

    let slow = get_in_flight(addr, "/sleep?ms=1500");
    let stopped = Instant::now();
    nix::sys::signal::kill(drover, image.stop_signal).unwrap();
    // The pre-stop delay: still serving, and the readiness probe fails.
    d.wait_log("SIGTERM: pre-stop: serving for 5s more");
    assert_eq!(get(addr, "/").unwrap().status, 200);
    let readyz = get(admin, "/readyz").unwrap();
    assert_eq!(
        (readyz.status, readyz.body.trim()),
        (503, "pre-stop: shutting down soon")
    );
    let (code, out) = image.health.run(&config);
    assert_eq!(
        (code, out.trim()),
        (1, "failed: not ready: pre-stop: shutting down soon")
    );
    assert!(stopped.elapsed() < Duration::from_secs(5));
    wait_for("new connections to be refused", LIMIT, || {
        get(addr, "/").is_err().then_some(())
    });
    let resp = slow.join().unwrap().expect("the request in flight");
    assert_eq!((resp.status, resp.body.as_str()), (200, "slept 1500 ms\n"));
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    assert!(stopped.elapsed() >= Duration::from_secs(5));
    for w in workers {
        assert!(!alive(w), "worker {w} outlived drover");
    }
}

/// The first `KEY: N` of the Kubernetes manifests, as a number.
fn yaml_number(key: &str) -> u64 {
    let yaml = std::fs::read_to_string(repo().join("deploy/kubernetes/drover.yaml")).unwrap();
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in deploy/kubernetes/drover.yaml"))
}

fn config_seconds(toml: &str, key: &str) -> u64 {
    let table: toml::Table = toml::from_str(toml).unwrap();
    let value = table[key].as_str().unwrap();
    humantime::parse_duration(value).unwrap().as_secs()
}

/// The orchestrators' stop deadlines are the budget docs/deployment.md
/// derives: pre-stop + graceful_timeout + hook_timeout + a 5 s margin, with
/// the values of the config each one runs.
#[test]
fn the_stop_budgets_add_up() {
    const MARGIN: u64 = 5;
    let kube = configmap_config();
    let prestop = config_seconds(&kube, "prestop_delay");
    // drover is PID 1 of the pod, so a subreaper: the processes the workers
    // left get quick_timeout after the last worker is gone.
    assert!(!kube.contains("subreaper"), "{kube}");
    let budget = config_seconds(&kube, "graceful_timeout")
        + config_seconds(&kube, "quick_timeout")
        + config_seconds(&kube, "hook_timeout");
    assert_eq!(
        yaml_number("terminationGracePeriodSeconds"),
        prestop + budget + MARGIN
    );

    let service = Unit::read(&["deploy/systemd/drover.service"]);
    let config = std::fs::read_to_string(repo().join("deploy/systemd/drover.toml")).unwrap();
    let budget =
        config_seconds(&config, "graceful_timeout") + config_seconds(&config, "hook_timeout");
    assert_eq!(
        service.duration("TimeoutStopSec").as_secs(),
        budget + MARGIN
    );
    // The first workers may take boot_timeout; a reload waits for ExecReload.
    assert!(
        service.duration("TimeoutStartSec").as_secs() > config_seconds(&config, "boot_timeout")
    );
}

/// A random delay in `[lo, hi)`, from the standard library's hasher seeds.
fn random_between(lo: Duration, hi: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .unwrap_or_default()
            .as_nanos(),
    );
    let r = h.finish();
    lo + (hi - lo).mul_f64((r % 1_000_000) as f64 / 1_000_000.0)
}

/// Traffic as a load balancer sends it to a pod being taken out: clients
/// open new connections (one request each) until [`Endpoint::remove`] has
/// been called and its delay has passed, as an endpoint controller and
/// kube-proxy stop routing some time after the pod got SIGTERM.
struct Endpoint {
    cutoff: Arc<Mutex<Option<Instant>>>,
    threads: Vec<std::thread::JoinHandle<(Outcomes, Refusals)>>,
    answered: Arc<AtomicU64>,
}

impl Endpoint {
    fn start(addr: SocketAddr, clients: usize, path: &str) -> Endpoint {
        let cutoff = Arc::new(Mutex::new(None::<Instant>));
        let answered = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (cutoff, answered, path) = (cutoff.clone(), answered.clone(), path.to_string());
                std::thread::spawn(move || {
                    let mut o = Outcomes::default();
                    let mut refusals = Refusals::default();
                    while cutoff.lock().unwrap().is_none_or(|c| Instant::now() < c) {
                        let (refused, began) = (o.refused, Instant::now());
                        if one_request(addr, &path, &mut o) {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        if o.refused > refused {
                            refusals.add(began.elapsed());
                        }
                    }
                    (o, refusals)
                })
            })
            .collect();
        Endpoint {
            cutoff,
            threads,
            answered,
        }
    }

    fn wait_answered(&self, n: u64) {
        wait_for(&format!("{n} answered requests"), LIMIT, || {
            (self.answered.load(Ordering::Relaxed) >= n).then_some(())
        });
    }

    /// No new connection after `after` from now; returns every outcome,
    /// and how long the refused attempts took.
    fn remove(self, after: Duration) -> (Outcomes, Refusals) {
        *self.cutoff.lock().unwrap() = Some(Instant::now() + after);
        let mut total = Outcomes::default();
        let mut refusals = Refusals::default();
        for t in self.threads {
            let (o, r) = t.join().unwrap();
            refusals.slowest = refusals.slowest.max(r.slowest);
            refusals.after_a_retransmission += r.after_a_retransmission;
            total.ok += o.ok;
            total.refused += o.refused;
            total.reset += o.reset;
            total.truncated += o.truncated;
            total.other += o.other;
        }
        (total, refusals)
    }
}

/// How long refused connection attempts took.
#[derive(Debug, Default, Clone, Copy)]
struct Refusals {
    slowest: Duration,
    /// Refused only after the client's SYN was dropped and sent again
    /// (Linux's first retransmission comes after 1 s).
    after_a_retransmission: u64,
}

impl Refusals {
    fn add(&mut self, took: Duration) {
        self.slowest = self.slowest.max(took);
        if took >= Duration::from_millis(900) {
            self.after_a_retransmission += 1;
        }
    }
}

/// One new connection, one GET, the whole response; `true` if answered 200.
fn one_request(addr: SocketAddr, path: &str, o: &mut Outcomes) -> bool {
    use std::io::ErrorKind::*;
    use std::io::{Read, Write};
    let mut s = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) if e.kind() == ConnectionRefused => {
            o.refused += 1;
            // A refused client retries soon, as a proxy would elsewhere.
            std::thread::sleep(Duration::from_millis(5));
            return false;
        }
        Err(_) => {
            o.other += 1;
            return false;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut raw = Vec::new();
    let sent = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    );
    match sent.and_then(|_| s.read_to_end(&mut raw)) {
        Err(e) if matches!(e.kind(), ConnectionReset | BrokenPipe | ConnectionAborted) => {
            o.reset += 1
        }
        Err(_) => o.other += 1,
        Ok(_) => match parse_response(&raw) {
            Ok(r) if r.status == 200 => {
                o.ok += 1;
                return true;
            }
            Ok(_) => o.other += 1,
            Err(_) => o.truncated += 1,
        },
    }
    false
}

/// Without a pre-stop delay, SIGTERM closes the listener at once, and the
/// clients the load balancer still sends (for a random 0.2–1.5 s) are
/// refused: the flaw the pre-stop delay is for. Nothing is reset or cut.
#[test]
fn without_a_prestop_delay_late_clients_are_refused() {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"{}\"]\nworkers = 2\nready = \"notify\"\n",
        hello_bin()
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    let lb = Endpoint::start(d.tcp_addr(), 16, "/");
    lb.wait_answered(200);
    d.signal(Signal::SIGTERM);
    let after = random_between(Duration::from_millis(200), Duration::from_millis(1500));
    let (o, refusals) = lb.remove(after);
    eprintln!("endpoint removed {after:?} after SIGTERM: {o:?}, {refusals:?}");
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    assert!(o.refused > 0, "{o:?}");
    assert_eq!((o.reset, o.truncated, o.other), (0, 0, 0), "{o:?}");
}

fn hello_config(extra: &str) -> String {
    format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"{}\"]\nworkers = 2\nready = \"notify\"\n\
         control_socket = \"$DIR/ctl.sock\"\n{extra}\n",
        hello_bin()
    )
}

/// With `prestop_delay = "2s"`, SIGTERM leaves drover serving while the
/// load balancer still sends (a random 0.2–1.5 s): no client is refused and
/// none fails. Meanwhile drover is not ready (`ctl ready` exits 1 with
/// "pre-stop") and says so in `ctl status` and the log; after the delay the
/// graceful shutdown runs as usual and drover exits 0.
#[test]
fn with_a_prestop_delay_late_clients_are_all_answered() {
    prestop_under_load(&hello_config("prestop_delay = \"2s\""));
}

/// The same with drover-wsgi workers.
#[test]
fn with_a_prestop_delay_late_clients_of_drover_wsgi_are_all_answered() {
    let wsgi = format!(
        "[{:?}, \"example_app:app\"]\nchdir = \"{}\"",
        python::script("drover-wsgi"),
        python::examples_dir()
    );
    let config =
        hello_config("prestop_delay = \"2s\"").replace(&format!("[\"{}\"]", hello_bin()), &wsgi);
    prestop_under_load(&config);
}

fn prestop_under_load(config: &str) {
    let mut d = Start::config(config).run();
    d.wait_log("all 2 workers ready");
    let (code, out) = d.ctl(&["ready"]);
    assert_eq!(
        (code, out.trim()),
        (0, "ok: ready: 2/2 workers ready, generation 1")
    );
    let lb = Endpoint::start(d.tcp_addr(), 16, "/");
    lb.wait_answered(200);
    let sigterm = Instant::now();
    d.signal(Signal::SIGTERM);
    d.wait_log("SIGTERM: pre-stop: serving for 2s more");
    let (code, out) = d.ctl(&["ready"]);
    assert_eq!(
        (code, out.trim()),
        (1, "failed: not ready: pre-stop: shutting down soon")
    );
    let (code, out) = d.ctl(&["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("2/2 workers ready, generation 1, pre-stop"),
        "{out}"
    );
    assert!(out.contains(", pre-stop: shutting down in "), "{out}");
    let after = random_between(Duration::from_millis(200), Duration::from_millis(1500));
    let (o, _) = lb.remove(after.saturating_sub(sigterm.elapsed()));
    eprintln!("endpoint removed {after:?} after SIGTERM: {o:?}");
    assert!(
        sigterm.elapsed() < Duration::from_secs(2),
        "the load balancer was slower than the delay: nothing was tested"
    );
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    assert!(sigterm.elapsed() >= Duration::from_secs(2));
    assert_eq!(
        (o.refused, o.reset, o.truncated, o.other),
        (0, 0, 0, 0),
        "{o:?}"
    );
    assert!(o.ok > 200, "{o:?}");
    let log = d.log();
    let over = log
        .find("pre-stop delay over")
        .expect("the delay's end logged");
    let stage1 = log.find("SIGTERM: graceful shutdown: stage 1").unwrap();
    assert!(over < stage1, "{log}");
}

/// The delay is for SIGTERM only: a second SIGTERM, SIGINT or SIGQUIT ends
/// it at once, and SIGINT (Ctrl+C) or `ctl stop` alone never starts it.
#[test]
fn a_second_signal_or_another_stop_skips_the_prestop_delay() {
    for (first, second, expect) in [
        (
            Some(Signal::SIGTERM),
            Some(Signal::SIGTERM),
            "SIGTERM: graceful shutdown: stage 1",
        ),
        (
            Some(Signal::SIGTERM),
            Some(Signal::SIGQUIT),
            "SIGQUIT: quick shutdown: stage 1",
        ),
        (
            Some(Signal::SIGINT),
            None,
            "SIGINT: graceful shutdown: stage 1",
        ),
        (None, None, "control: stop: graceful shutdown: stage 1"),
    ] {
        let mut d = Start::config(&hello_config("prestop_delay = \"30s\"")).run();
        d.wait_log("all 2 workers ready");
        let began = Instant::now();
        match first {
            Some(sig) => d.signal(sig),
            None => assert_eq!(d.ctl(&["stop"]).0, 0),
        }
        if let Some(sig) = second {
            d.wait_log("pre-stop: serving for 30s more");
            d.signal(sig);
        }
        assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
        assert!(began.elapsed() < Duration::from_secs(10));
        let log = d.log();
        assert!(log.contains(expect), "{log}");
        assert_eq!(
            log.contains("pre-stop delay cut short"),
            second.is_some(),
            "{log}"
        );
    }
}

/// `drover ctl ready` exits 0 only when every slot has a ready worker and
/// drover is neither paused nor stopping, with the reason otherwise.
#[test]
fn ctl_ready_is_a_readiness_probe() {
    // A worker that never reports READY=1: booting for good.
    let config = "bind = [\"127.0.0.1:0\"]\ncommand = [\"sh\", \"-c\", \"exec sleep 60\"]\n\
                  ready = \"notify\"\nboot_timeout = \"60s\"\ncontrol_socket = \"$DIR/ctl.sock\"\n";
    let d = Start::config(config).run();
    d.wait_workers(1);
    let (code, out) = wait_for("the control socket", LIMIT, || {
        let (code, out) = d.ctl(&["ready"]);
        (!out.is_empty()).then_some((code, out))
    });
    assert_eq!(
        (code, out.trim()),
        (
            1,
            "failed: not ready: booting: 0/1 slots have a ready worker, 1 needed"
        )
    );
    drop(d);

    let d = Start::config(&hello_config("")).run();
    d.wait_log("all 2 workers ready");
    assert_eq!(d.ctl(&["ready"]).0, 0);
    d.signal(Signal::SIGWINCH);
    d.wait_log("SIGWINCH: stopping all 2 worker(s)");
    let (code, out) = d.ctl(&["ready"]);
    assert_eq!(
        (code, out.trim()),
        (1, "failed: not ready: paused: workers stopped (SIGWINCH)")
    );
}

/// What systemd hears beyond start, reload and stop: `STATUS=` follows the
/// workers (after a scale-up, the new worker's readiness is reported, not
/// left at "2/3"), and a reload that fails says so with its `READY=1`
/// (the old generation serves, so the service is ready, but its status
/// names the failure until a reload is applied).
#[test]
fn systemd_hears_the_status_after_a_scale_up_and_a_failed_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = notify_socket(&path);
    let start = Start {
        env: vec![("NOTIFY_SOCKET".into(), path.display().to_string())],
        ..Start::config(&hello_config(""))
    };
    let d = start.run();
    let mut seen = Vec::new();
    recv_until(&sock, &mut seen, "READY=1");
    let (code, out) = d.ctl(&["scale", "3"]);
    assert_eq!(code, 0, "{out}");
    recv_until(&sock, &mut seen, "STATUS=3/3 workers ready, generation 1");

    // A rejected reload: the file does not parse.
    let config = d.dir.path().join("config.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}\nworkers = \"many\"\n")).unwrap();
    let (code, out) = d.ctl(&["reload"]);
    assert_eq!(code, 1, "{out}");
    let ready = recv_until(&sock, &mut seen, "READY=1");
    assert!(
        ready.contains("STATUS=3/3 workers ready, generation 1; last reload rejected: "),
        "{ready}"
    );
    // A rolled-back one: the new workers cannot boot.
    std::fs::write(&config, good.replace(hello_bin(), "/bin/false")).unwrap();
    let (code, out) = d.ctl(&["reload"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("rolled back"), "{out}");
    let ready = recv_until(&sock, &mut seen, "READY=1");
    assert!(
        ready.contains("generation 1; last reload rolled back: "),
        "{ready}"
    );
    let (_, out) = d.ctl(&["status"]);
    assert!(out.contains("; last reload rolled back: "), "{out}");
    // An applied reload clears it.
    std::fs::write(&config, &good).unwrap();
    let (code, out) = d.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}");
    let ready = recv_until(&sock, &mut seen, "READY=1");
    assert!(
        ready.contains("STATUS=2/2 workers ready, generation "),
        "{ready}"
    );
    assert!(!ready.contains("last reload"), "{ready}");
}

/// A service manager that does not read its NOTIFY_SOCKET (PID 1 busy or
/// hung: its queue full) must not stall drover: the master keeps answering
/// its control socket and signals, its `READY=1` waits and is sent once
/// the queue has room, and it stops as usual (`STOPPING=1` arrives too).
/// The code before sent with a blocking send: the master hung in its
/// `READY=1`, `ctl status` got no answer and SIGTERM was never read.
#[test]
fn a_service_manager_that_does_not_read_never_stalls_drover() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = notify_socket(&path);
    fill_notify_queue(&path);
    let start = Start {
        env: vec![("NOTIFY_SOCKET".into(), path.display().to_string())],
        ..Start::config(&hello_config(""))
    };
    let mut d = start.run();
    d.wait_log("all 2 workers ready");
    let (code, out) = d.ctl(&["--timeout", "10s", "status"]);
    assert_eq!(code, 0, "the master answers while its READY=1 waits: {out}");
    d.wait_log("is not reading: READY=1 waits, sent again every 100ms until it is taken");
    // The queue drained: READY=1 is sent again, and taken.
    let mut seen = Vec::new();
    let ready = recv_until(&sock, &mut seen, "READY=1");
    assert!(ready.contains("STATUS=2/2 workers ready"), "{ready}");
    assert!(seen.iter().any(|(_, m)| m == "FILLER=1"), "{seen:?}");
    d.wait_log("took READY=1 at last");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    recv_until(&sock, &mut seen, "STOPPING=1");
}

/// A service manager stuck with drover's watchdog at 100 ms (a tick every
/// 50 ms): the dropped `WATCHDOG=1`s are warned about at most once a
/// second, each warning with the count since the last one, and none goes
/// uncounted: once the receiver reads again, the rest are counted too. The
/// old code warned at every tick, here some 40 warnings in 2 s.
#[test]
fn dropped_watchdog_pings_are_counted_once_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = notify_socket(&path);
    fill_notify_queue(&path);
    let start = Start {
        env: vec![
            ("NOTIFY_SOCKET".into(), path.display().to_string()),
            ("WATCHDOG_USEC".into(), "100000".into()),
        ],
        ..Start::config(&hello_config(""))
    };
    let mut d = start.run();
    d.wait_log("all 2 workers ready");
    let stuck = Instant::now();
    while stuck.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The receiver reads again: READY=1 is taken, then the pings.
    let mut seen = Vec::new();
    recv_until(&sock, &mut seen, "READY=1");
    recv_until(&sock, &mut seen, "WATCHDOG=1");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    let log = d.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WATCHDOG=1 dropped") || l.contains("periodic message"))
        .collect();
    let counted: u64 = warnings
        .iter()
        .map(|l| {
            let count = |after: &str| {
                l.split(after)
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            };
            count("; ").or_else(|| count(": ")).unwrap_or(1)
        })
        .sum();
    let secs = stuck.elapsed().as_secs() + 2;
    assert!(
        (warnings.len() as u64) <= secs,
        "{} warnings in about {secs} s:\n{log}",
        warnings.len()
    );
    // Some 40 ticks were missed (fewer on a loaded machine).
    assert!(counted >= 10, "{counted} counted:\n{log}");
}

/// A service manager that stops reading before drover's shutdown: its
/// STOPPING=1 gets its last wait after the shutdown is done, not inside it
/// (the wait once came first, and stage 3's time and the on_exit hook's
/// start both took its second).
#[test]
fn a_stopping_message_that_waits_does_not_delay_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = notify_socket(&path);
    let start = Start {
        env: vec![("NOTIFY_SOCKET".into(), path.display().to_string())],
        ..Start::config(&hello_config(
            "on_exit = [\"sh\", \"-c\", \"echo on-exit-ran\"]",
        ))
    };
    let mut d = start.run();
    let mut seen = Vec::new();
    recv_until(&sock, &mut seen, "READY=1");
    fill_notify_queue(&path);
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    let log = d.log();
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"))
    };
    let dropped = at("did not take STOPPING=1");
    assert!(at("stage 3 done") < dropped, "{log}");
    assert!(at("stage 4, on_exit hook") < dropped, "{log}");
}

/// The new master of an upgrade is stopped while the old master does not
/// read its notify socket (stopped with SIGSTOP, its queue full): the new
/// master's READY=1 is withdrawn, its stop waits, and at its exit reaches
/// the old master as a SIGTERM, which stops it and its workers once it runs
/// again. The old code dropped both messages at the new master's exit: the
/// old master, resumed, logged "upgrade failed: the new master (pid N)
/// exited with status 0 before it was ready" and served on.
#[test]
fn a_stop_of_the_new_master_reaches_an_old_master_that_does_not_read() {
    let (log, new) = stop_an_upgrade_whose_old_master_does_not_read(false);
    assert!(
        log.contains(&format!(
            "upgrade cancelled: the new master (pid {new}) was asked to stop (SIGTERM)"
        )),
        "{log}"
    );
    assert!(!log.contains("upgrade failed"), "{log}");
}

/// As above, but the operator's SIGTERM reaches the stopped old master too,
/// before the new master's stop (which then merges into it). Resumed, the
/// old master read the new one's exit first, logged "upgrade failed ...;
/// this master keeps serving" and then stopped. Now the stop is read first
/// and cancels the upgrade, as it would have if read at once.
#[test]
fn a_stop_that_reaches_an_old_master_before_the_new_ones_does_not_say_it_keeps_serving() {
    let (log, new) = stop_an_upgrade_whose_old_master_does_not_read(true);
    assert!(!log.contains("keeps serving"), "{log}");
    // The operator's stop cancels the upgrade, as when it is read at once.
    assert!(
        log.contains(&format!(
            "SIGTERM: upgrade cancelled: the new master (pid {new}) was not ready yet"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("upgrade: the new master (pid {new}) exited")),
        "{log}"
    );
}

/// A drover of `workers` hello workers, upgraded (SIGUSR2) so that the new
/// master's workers boot slowly (1 s, once $DIR/slow exists): the old
/// master can be stopped before the new one is ready. Returns it, the new
/// master's pid and the old workers.
fn an_upgrade_with_slow_new_workers(workers: usize) -> (Drover, Pid, Vec<Pid>) {
    let d = Start::config(&format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"sh\", \"-c\", \"[ -e $DIR/slow ] && sleep 1; exec {}\"]\n\
         workers = {workers}\nready = \"notify\"\n",
        hello_bin()
    ))
    .run();
    d.wait_log(&format!("all {workers} workers ready"));
    let old_workers = d.children();
    std::fs::write(d.dir.path().join("slow"), "").unwrap();
    d.signal(Signal::SIGUSR2);
    let log = d.wait_log("upgrade: started");
    let new = log
        .split("as pid ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    (d, Pid::from_raw(new.parse().unwrap()), old_workers)
}

/// An upgrade whose new master is slow to boot; the old master is stopped
/// (SIGSTOP) with its notify queue full, so that the new master's READY=1
/// waits; the new master is asked to stop (and, if `operator_too`, the old
/// one first), exits, and the old master is resumed. It must stop and take
/// its workers with it. Returns its log and the new master's pid.
fn stop_an_upgrade_whose_old_master_does_not_read(operator_too: bool) -> (String, Pid) {
    use nix::sys::signal::kill;
    let (mut d, new, old_workers) = an_upgrade_with_slow_new_workers(2);
    struct Resume(Pid, Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGCONT);
            let _ = kill(self.1, Signal::SIGKILL);
        }
    }
    let _resume = Resume(d.pid(), new);
    kill(d.pid(), Signal::SIGSTOP).unwrap();
    let socket = notify_socket_of(new);
    fill_notify_queue(&socket);
    d.wait_log("is not reading: READY=1 waits");
    if operator_too {
        kill(d.pid(), Signal::SIGTERM).unwrap();
    }
    kill(new, Signal::SIGTERM).unwrap();
    wait_for("the new master to exit", LIMIT, || {
        (!alive(new)).then_some(())
    });
    kill(d.pid(), Signal::SIGCONT).unwrap();
    assert_eq!(d.wait_exit_only(LIMIT).code(), Some(0), "{}", d.log());
    let log = d.log();
    assert!(old_workers.iter().all(|w| !alive(*w)), "{log}");
    (log, new)
}

/// One keep-alive GET on `s`: the response's status and whether it ends the
/// connection (`Connection: close`).
fn get_keep_alive(s: &mut std::net::TcpStream, path: &str) -> (u16, bool) {
    use std::io::{Read, Write};
    write!(s, "GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed before a response");
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.contains("connection: close"))
}

/// During the pre-stop delay the workers are told (SIGWINCH) to end
/// keep-alive: a client on a kept-alive connection gets its next answer with
/// `Connection: close`, while drover still serves; the Rust reference
/// worker and drover-wsgi both do.
#[test]
fn during_the_prestop_delay_workers_end_keep_alive() {
    let wsgi = format!("[{:?}, \"example_app:app\"]", python::script("drover-wsgi"));
    for command in [format!("[\"{}\"]", hello_bin()), wsgi] {
        let config = format!(
            "bind = [\"127.0.0.1:0\"]\ncommand = {command}\nworkers = 1\nready = \"notify\"\n\
             chdir = \"{}\"\nprestop_delay = \"5s\"\n",
            python::examples_dir()
        );
        let mut d = Start::config(&config).run();
        d.wait_log("all 1 workers ready");
        let mut s = std::net::TcpStream::connect(d.tcp_addr()).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        assert_eq!(get_keep_alive(&mut s, "/"), (200, false));
        let sigterm = Instant::now();
        d.signal(Signal::SIGTERM);
        d.wait_log("SIGTERM: pre-stop: serving for 5s more");
        // The notice reaches the worker soon after: until then the
        // connection stays open, and every answer is a 200.
        wait_for("an answer with Connection: close", LIMIT, || {
            let (status, close) = get_keep_alive(&mut s, "/");
            assert_eq!(status, 200);
            close.then_some(())
        });
        assert!(sigterm.elapsed() < Duration::from_secs(5), "{command}");
        // Proven: the rest of the delay is cut short (SIGINT), not waited.
        d.signal(Signal::SIGINT);
        d.wait_log("pre-stop delay cut short");
        assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    }
}

/// A worker that boots during the pre-stop delay (here the successor of one
/// that was killed) gets the same notice as those serving when it began:
/// its keep-alive clients are answered with `Connection: close` well before
/// the delay ends. The old code sent the notice only to the workers serving
/// when the delay began: the successor kept every connection alive until
/// stage 1.
#[test]
fn a_worker_respawned_during_the_prestop_delay_ends_keep_alive_too() {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"{}\"]\nworkers = 1\nready = \"notify\"\n\
         prestop_delay = \"8s\"\nrespawn_delay = \"50ms\"\n",
        hello_bin()
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let first = d.wait_workers(1)[0];
    let sigterm = Instant::now();
    d.signal(Signal::SIGTERM);
    d.wait_log("SIGTERM: pre-stop: serving for 8s more");
    nix::sys::signal::kill(first, Signal::SIGKILL).unwrap();
    let successor = wait_for("the successor", LIMIT, || {
        d.children().into_iter().find(|p| *p != first)
    });
    d.wait_log(&format!("worker 1 (pid {successor}) ready in"));
    let mut s = std::net::TcpStream::connect(d.tcp_addr()).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    // The notice follows READY=1 closely: until it arrives the connection
    // stays open, and every answer is a 200.
    wait_for("an answer with Connection: close", LIMIT, || {
        let (status, close) = get_keep_alive(&mut s, "/");
        assert_eq!(status, 200);
        close.then_some(())
    });
    assert!(
        !d.log().contains("stage 1") && sigterm.elapsed() < Duration::from_secs(8),
        "Connection: close came only with the shutdown ({:?} after SIGTERM)",
        sigterm.elapsed()
    );
    // A second SIGTERM cuts the delay short.
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

/// An upgrade whose new master's READY=1 goes into the queue of an old
/// master that does not read (SIGSTOP); the new master then gets `signal`
/// and exits, and the old master is resumed. Returns the old master (now
/// reading that READY=1), the new master's pid and the old workers.
fn ready_1_read_after_the_new_master_got(signal: Signal) -> (Drover, Pid, Vec<Pid>) {
    use nix::sys::signal::kill;
    let (d, new, old_workers) = an_upgrade_with_slow_new_workers(1);
    let resume = Resume(d.pid());
    kill(d.pid(), Signal::SIGSTOP).unwrap();
    // The new master's workers boot after this: its READY=1 comes later.
    d.wait_log_count("all 1 workers ready", 2);
    kill(new, signal).unwrap();
    wait_for("the new master to exit", LIMIT, || {
        (!alive(new)).then_some(())
    });
    drop(resume); // SIGCONT
    (d, new, old_workers)
}

/// The new master, its READY=1 queued, is stopped (SIGTERM): the stop was
/// the service's, and the old master, reading the READY=1 of a master that
/// has exited, stops too, and says so. Before, it logged "retiring this
/// one" and "released 1 listener(s) to the new master", for a master that
/// was gone.
#[test]
fn an_old_master_that_reads_ready_1_of_a_new_master_gone_since_says_so() {
    let (mut d, new, old_workers) = ready_1_read_after_the_new_master_got(Signal::SIGTERM);
    assert_eq!(d.wait_exit_only(LIMIT).code(), Some(0), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains(&format!("upgrade: new master pid {new} reported ready in "))
            && log.contains("but exited with status 0 before this master read it"),
        "{log}"
    );
    assert!(!log.contains("retiring this one"), "{log}");
    assert!(
        !log.contains("released 1 listener(s) to the new master"),
        "{log}"
    );
    assert!(
        log.contains("(the new master they were for has exited)"),
        "{log}"
    );
    assert!(old_workers.iter().all(|w| !alive(*w)), "{log}");
}

/// The new master, its READY=1 queued, crashes (SIGKILL, as the OOM killer
/// sends): nothing stopped the service, and the old master serves on, its
/// workers and sockets as they were, and reports the upgrade as failed.
/// Before, it stopped too, and nothing served the sockets.
#[test]
fn an_old_master_serves_on_when_the_new_one_crashed_after_its_ready_1() {
    let (mut d, new, old_workers) = ready_1_read_after_the_new_master_got(Signal::SIGKILL);
    let log = d.wait_log("upgrade failed: ");
    assert!(
        log.contains(&format!("the new master (pid {new}) killed by SIGKILL"))
            && log.contains("after it reported ready, before this master read it"),
        "{log}"
    );
    assert_eq!(get_ok(d.tcp_addr(), "/").status, 200, "{}", d.log());
    assert_eq!(d.children(), old_workers, "{}", d.log());
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    assert!(!d.log().contains("stopping this one too"), "{}", d.log());
}

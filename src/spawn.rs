//! fork + execve of one worker.
//!
//! Everything the child needs (argv, envp, the descriptor plan) is built
//! before the fork; between fork and exec the child makes only
//! async-signal-safe system calls: no allocation, no locks, no logging. A
//! failure in the child is reported through a close-on-exec pipe as the step
//! that failed and its errno, so the master can log the real cause.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::{access, pipe2, AccessFlags, Pid};

/// Room for the decimal digits of any pid, plus the terminating NUL.
const PID_ROOM: usize = 21;

/// The program to run, resolved against `PATH` once, and the process
/// settings it runs with.
#[derive(Debug, Clone)]
pub struct Program {
    path: CString,
    argv: Vec<CString>,
    pub identity: Option<Identity>,
    chdir: Option<CString>,
    umask: Option<libc::mode_t>,
}

/// The user and groups a worker runs as, resolved before any fork.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `None`: keep drover's user (only the group changes).
    pub uid: Option<libc::uid_t>,
    pub gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl Identity {
    /// Switches this process (the master) to the identity: groups, then
    /// group, then user, as the child does before exec.
    pub fn apply_to_self(&self) -> Result<(), SpawnError> {
        use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
        let failed = |what: &str, e: Errno| {
            SpawnError::Identity(format!("cannot switch drover to its user: {what}: {e}"))
        };
        let groups: Vec<Gid> = self.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        setgroups(&groups).map_err(|e| failed("setgroups", e))?;
        setgid(Gid::from_raw(self.gid)).map_err(|e| failed("setgid", e))?;
        if let Some(uid) = self.uid {
            setuid(Uid::from_raw(uid)).map_err(|e| failed("setuid", e))?;
        }
        Ok(())
    }

    /// Looks up `user` and `group` (names or numbers). `None` when neither is set.
    pub fn resolve(
        user: Option<&str>,
        group: Option<&str>,
    ) -> Result<Option<Identity>, SpawnError> {
        use nix::unistd::{Group, User};
        let user = user
            .map(|name| lookup("user", name, User::from_uid, User::from_name))
            .transpose()?;
        let group = group
            .map(|name| lookup("group", name, Group::from_gid, Group::from_name))
            .transpose()?;
        let gid = match (&group, &user) {
            (Some(g), _) => g.gid,
            (None, Some(u)) => u.gid,
            (None, None) => return Ok(None),
        };
        // Supplementary groups: the user's, as login(1) would set them.
        let groups = match &user {
            Some(u) => {
                let name = CString::new(u.name.as_bytes())
                    .map_err(|_| SpawnError::unknown("user", &u.name, "NUL in name"))?;
                nix::unistd::getgrouplist(&name, gid)
                    .map_err(|e| {
                        SpawnError::unknown("user", &u.name, format!("cannot list its groups: {e}"))
                    })?
                    .into_iter()
                    .map(|g| g.as_raw())
                    .collect()
            }
            None => vec![gid.as_raw()],
        };
        Ok(Some(Identity {
            uid: user.map(|u| u.uid.as_raw()),
            gid: gid.as_raw(),
            groups,
        }))
    }
}

/// A user or group (`key`) by number or, failing that, by name.
fn lookup<Id: From<u32>, T>(
    key: &'static str,
    name: &str,
    by_id: impl FnOnce(Id) -> nix::Result<Option<T>>,
    by_name: impl FnOnce(&str) -> nix::Result<Option<T>>,
) -> Result<T, SpawnError> {
    match name.parse::<u32>() {
        Ok(n) => by_id(Id::from(n)),
        Err(_) => by_name(name),
    }
    .map_err(|e| SpawnError::unknown(key, name, e.to_string()))?
    .ok_or_else(|| SpawnError::unknown(key, name, format!("no such {key}")))
}

impl Program {
    /// Resolves `argv[0]` like a shell would (a name without '/' is looked up
    /// in `path_var`) and converts everything for execve.
    pub fn new(argv: &[String], path_var: Option<&OsStr>) -> Result<Program, SpawnError> {
        let name = argv.first().ok_or(SpawnError::Empty)?;
        let path = if name.contains('/') {
            PathBuf::from(name)
        } else {
            search_path(name, path_var).ok_or_else(|| SpawnError::NotFound {
                name: name.clone(),
                hint: String::new(),
            })?
        };
        Ok(Program {
            path: cstring(path.as_os_str().as_bytes())?,
            argv: argv
                .iter()
                .map(|a| cstring(a.as_bytes()))
                .collect::<Result<_, _>>()?,
            identity: None,
            chdir: None,
            umask: None,
        })
    }

    /// Runs the program as `identity`, in `chdir`, with `umask`.
    pub fn with(
        mut self,
        identity: Option<Identity>,
        chdir: Option<&Path>,
        umask: Option<u32>,
    ) -> Result<Program, SpawnError> {
        self.identity = identity;
        self.chdir = chdir
            .map(|p| cstring(p.as_os_str().as_bytes()))
            .transpose()?;
        self.umask = umask.map(|m| m as libc::mode_t);
        Ok(self)
    }

    pub fn shown(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }
}

impl SpawnError {
    fn unknown(key: &'static str, name: &str, why: impl Into<String>) -> SpawnError {
        SpawnError::Unknown {
            key,
            name: name.to_string(),
            why: why.into(),
        }
    }

    /// A name not found in `PATH` that is a file in the workers' working
    /// directory (`workdir`, else drover's) was meant as that file: say how
    /// to name it (a name without '/' is only looked up in `PATH`).
    pub fn looked_up_from(self, workdir: Option<&Path>) -> SpawnError {
        let SpawnError::NotFound { name, .. } = self else {
            return self;
        };
        let file = workdir.unwrap_or(Path::new(".")).join(&name);
        let hint = if file.is_file() {
            let run = match exec_hint(Path::new(&format!("./{name}")), Errno::EACCES, workdir) {
                hint if access(&file, AccessFlags::X_OK).is_err() && !hint.is_empty() => hint,
                _ => String::new(),
            };
            format!(
                "; {name} in the working directory is named \"./{name}\" (a name without '/' \
                 is looked up in PATH only){run}"
            )
        } else {
            String::new()
        };
        SpawnError::NotFound { name, hint }
    }
}

/// What to do about an `execve` of `program` that failed with `errno`, for
/// the usual mistakes ("" for the others): a script that is not executable
/// or has no `#!` line, a relative path that is not there from the workers'
/// working directory (`workdir`, else drover's own), a `#!` interpreter that
/// is missing. Starts with "; ", to follow the error.
pub fn exec_hint(program: &Path, errno: Errno, workdir: Option<&Path>) -> String {
    let shown = program.display();
    let run_with = |interpreter: &str| {
        format!(
            "run it with {interpreter}: command = [\"{interpreter}\", \"{shown}\", ...] \
             (or make it executable with a #! line)"
        )
    };
    let interpreter = match program.extension().and_then(OsStr::to_str) {
        Some("py") => Some("python3"),
        Some("sh") => Some("sh"),
        Some("js") => Some("node"),
        Some("rb") => Some("ruby"),
        Some("pl") => Some("perl"),
        _ => None,
    };
    let here = || match workdir {
        Some(dir) => format!(
            "the workers' working directory, chdir = {:?}",
            dir.display().to_string()
        ),
        None => format!(
            "drover's working directory, {} (set chdir, or give an absolute path)",
            std::env::current_dir().map_or("unknown".into(), |d| d.display().to_string())
        ),
    };
    let full = match workdir {
        Some(dir) if program.is_relative() => dir.join(program),
        _ => program.to_path_buf(),
    };
    match errno {
        Errno::EACCES if full.is_dir() => "; it is a directory, not a program".into(),
        // Executable, yet refused: the workers' `user` cannot reach what it
        // needs (not "chmod +x it", which it is).
        Errno::EACCES if has_execute_bits(&full) => match shebang(&full) {
            Some(i) => format!(
                "; it is executable, but the workers' user cannot reach its #! interpreter, \
                 {i}, or a directory on the way to either (a virtualenv made from a Python \
                 under /root links there), or its file system is mounted noexec"
            ),
            None => "; it is executable, but the workers' user cannot reach a directory on \
                     its path, or its file system is mounted noexec"
                .into(),
        },
        Errno::EACCES if full.is_file() => match interpreter {
            Some(i) => format!("; it is not executable: {}", run_with(i)),
            None => "; it is not executable: chmod +x it, or run it with its interpreter".into(),
        },
        Errno::ENOEXEC => match interpreter {
            Some(i) => format!("; it has no #! line: {}", run_with(i)),
            None => "; it is not a program this system can run (no #! line?)".into(),
        },
        Errno::ENOENT if full.is_file() => {
            "; the interpreter on its #! line is missing (or the line ends with \\r)".into()
        }
        Errno::ENOENT if program.is_relative() => {
            format!("; a relative command is resolved against {}", here())
        }
        _ => String::new(),
    }
}

/// A regular file with an execute bit (for anyone).
fn has_execute_bits(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The interpreter a script's `#!` line names.
fn shebang(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    let line = head[..n]
        .strip_prefix(b"#!")?
        .split(|b| *b == b'\n')
        .next()?;
    let line = String::from_utf8_lossy(line);
    line.split_whitespace().next().map(str::to_string)
}

fn search_path(name: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    let default = OsString::from("/usr/local/bin:/usr/bin:/bin");
    let dirs = path_var.unwrap_or(&default);
    std::env::split_paths(dirs)
        .map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d
            }
        })
        .map(|d| d.join(name))
        .find(|p| p.is_file() && access(p.as_path(), AccessFlags::X_OK).is_ok())
}

fn cstring(bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul(String::from_utf8_lossy(bytes).into_owned()))
}

/// A worker's environment, as NUL-terminated `KEY=VALUE` entries.
#[derive(Debug, Clone, Default)]
pub struct Env {
    entries: Vec<Vec<u8>>,
    /// Entries whose value is the child's own pid, written after the fork.
    pid_entries: Vec<usize>,
}

/// Variables that describe drover's own supervision; a worker gets its own.
const PROTOCOL_VARS: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

impl Env {
    /// drover's own environment, less the protocol variables and `remove`.
    pub fn inherit(remove: &[String]) -> Env {
        let mut env = Env::default();
        for (k, v) in std::env::vars_os() {
            let key = k.as_bytes();
            let dropped = PROTOCOL_VARS.iter().any(|p| p.as_bytes() == key)
                || remove.iter().any(|r| r.as_bytes() == key);
            if !dropped {
                env.set(&k, &v);
            }
        }
        env
    }

    /// Sets (or replaces) a variable.
    pub fn set(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) {
        let mut entry = key.as_ref().as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_ref().as_bytes());
        entry.retain(|b| *b != 0);
        entry.push(0);
        self.replace(key.as_ref().as_bytes(), entry);
    }

    /// Sets `key` to the child's own pid, which only the child knows.
    pub fn set_child_pid(&mut self, key: &str) {
        let mut entry = format!("{key}=").into_bytes();
        entry.resize(entry.len() + PID_ROOM, 0);
        let i = self.replace(key.as_bytes(), entry);
        self.pid_entries.push(i);
    }

    pub fn get(&self, key: &str) -> Option<&OsStr> {
        self.entries.iter().find_map(|e| {
            let rest = e.strip_prefix(key.as_bytes())?.strip_prefix(b"=")?;
            Some(OsStr::from_bytes(&rest[..rest.len() - 1]))
        })
    }

    fn replace(&mut self, key: &[u8], entry: Vec<u8>) -> usize {
        let pos = self
            .entries
            .iter()
            .position(|e| e.len() > key.len() && e.starts_with(key) && e[key.len()] == b'=');
        match pos {
            Some(i) => {
                self.entries[i] = entry;
                self.pid_entries.retain(|p| *p != i);
                i
            }
            None => {
                self.entries.push(entry);
                self.entries.len() - 1
            }
        }
    }
}

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("the worker command is empty")]
    Empty,
    #[error("{name:?}: command not found in PATH{hint}")]
    NotFound {
        name: String,
        /// Set by [`SpawnError::looked_up_from`].
        hint: String,
    },
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    #[error("{0}")]
    Identity(String),
    /// `user` or `group` (the `key`) names no such user or group.
    #[error("{key} {name:?}: {why}")]
    Unknown {
        key: &'static str,
        name: String,
        why: String,
    },
    #[error("chdir {0}: not a directory (or not reachable)")]
    NoDirectory(std::path::PathBuf),
    #[error("cannot prepare to fork: {0}{hint}", hint = limit_hint(*.0))]
    Setup(Errno),
    #[error("fork failed: {0}")]
    Fork(Errno),
    #[error("{program}: {step} failed: {errno}{hint}")]
    Child {
        program: String,
        step: &'static str,
        errno: Errno,
        /// What to do about it, for the usual mistakes (see [`exec_hint`]).
        hint: String,
    },
}

/// The steps the child takes, in order; the failing one is reported.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Step {
    ProcessGroup,
    ParentDeathSignal,
    Stdin,
    Listeners,
    CloseOnExec,
    Chdir,
    Groups,
    Gid,
    Uid,
    Exec,
    Output,
    Priority,
}

const STEP_NAMES: [&str; 12] = [
    "setpgid (own process group)",
    "prctl(PR_SET_PDEATHSIG)",
    "redirecting stdin from /dev/null",
    "placing the listeners at fd 3..",
    "marking other descriptors close-on-exec",
    "chdir",
    "setgroups",
    "setgid",
    "setuid",
    "execve",
    "redirecting stdout and stderr to drover (capture_output)",
    "setting the boot priority (boot_priority)",
];

/// A lower CPU priority than drover's to start a child at (`boot_priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Low {
    /// This nice value.
    Nice(i32),
    /// The `SCHED_IDLE` policy.
    Idle,
}

/// Starts one worker: `program` with `env`, the `listeners` at fds 3.., stdin
/// from `devnull`, at priority `low` if set. Returns once the child has
/// exec'd (or failed to).
pub fn spawn(
    program: &Program,
    env: &Env,
    listeners: &[RawFd],
    devnull: RawFd,
    die_with_parent: bool,
    low: Option<Low>,
) -> Result<Pid, SpawnError> {
    let started = start(program, env, listeners, devnull, die_with_parent, None, low)?;
    match read_report(started.report.as_raw_fd()) {
        Report::Failed(step, errno) => Err(started.failed(step, errno)),
        // A blocking read ends with the report or at exec.
        _ => Ok(started.pid),
    }
}

/// A child forked and on its way to exec: `report` becomes readable when it
/// has exec'd (end of file: the pipe closed on exec) or failed to (the step
/// and errno). Reading it later lets the master fork the next worker while
/// this one execs.
#[derive(Debug)]
pub struct Started {
    pub pid: Pid,
    pub report: std::os::fd::OwnedFd,
    program: String,
    /// The child's working directory, if drover changes it (`chdir`).
    workdir: Option<PathBuf>,
}

impl Started {
    /// What the child has reported so far, without blocking. A failed child
    /// exits at once (status 127); its exit is reaped like any other.
    pub fn poll(&self) -> Option<Result<(), SpawnError>> {
        match read_report(self.report.as_raw_fd()) {
            Report::Pending => None,
            Report::Execd => Some(Ok(())),
            Report::Failed(step, errno) => Some(Err(self.failed(step, errno))),
        }
    }

    fn failed(&self, step: u8, errno: Errno) -> SpawnError {
        let hint = if step == Step::Exec as u8 {
            exec_hint(Path::new(&self.program), errno, self.workdir.as_deref())
        } else {
            limit_hint(errno)
        };
        SpawnError::Child {
            program: self.program.clone(),
            step: STEP_NAMES.get(step as usize).copied().unwrap_or("setup"),
            errno,
            hint,
        }
    }
}

/// Forks one worker as [`spawn`] does, without waiting for its exec: see
/// [`Started`]. Its report pipe is non-blocking. With `output`, the
/// worker's standard output and error go to those descriptors (the write
/// ends of the `capture_output` pipes) instead of drover's.
pub fn spawn_async(
    program: &Program,
    env: &Env,
    listeners: &[RawFd],
    devnull: RawFd,
    output: Option<(RawFd, RawFd)>,
    low: Option<Low>,
) -> Result<Started, SpawnError> {
    let started = start(program, env, listeners, devnull, true, output, low)?;
    nix::fcntl::fcntl(
        &started.report,
        nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
    )
    .map_err(SpawnError::Setup)?;
    Ok(started)
}

fn start(
    program: &Program,
    env: &Env,
    listeners: &[RawFd],
    devnull: RawFd,
    die_with_parent: bool,
    output: Option<(RawFd, RawFd)>,
    low: Option<Low>,
) -> Result<Started, SpawnError> {
    // Everything the child touches is allocated here, before the fork.
    let mut entries = env.entries.clone();
    let pid_slots: Vec<(*mut u8, usize)> = env
        .pid_entries
        .iter()
        .map(|&i| {
            let e = &mut entries[i];
            let start = e.len() - PID_ROOM;
            // SAFETY: `start` is within the entry's buffer.
            (unsafe { e.as_mut_ptr().add(start) }, PID_ROOM)
        })
        .collect();
    let envp: Vec<*const libc::c_char> = entries
        .iter()
        .map(|e| e.as_ptr().cast())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let argv: Vec<*const libc::c_char> = program
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let mut scratch: Vec<RawFd> = vec![-1; listeners.len()];
    let (err_read, err_write) = pipe2(OFlag::O_CLOEXEC).map_err(SpawnError::Setup)?;
    let plan = ChildPlan {
        path: program.path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        pid_slots: &pid_slots,
        listeners,
        scratch: scratch.as_mut_ptr(),
        devnull,
        report: err_write.as_raw_fd(),
        master: nix::unistd::getpid().as_raw(),
        fd_limit: fd_limit(),
        chdir: program
            .chdir
            .as_ref()
            .map_or(std::ptr::null(), |c| c.as_ptr()),
        umask: program.umask,
        identity: program.identity.as_ref(),
        die_with_parent,
        output,
        low,
    };

    // Block every signal across the fork so that none runs the master's
    // handlers in the child before it has reset them.
    let mut saved = SigSet::empty();
    nix::sys::signal::sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut saved),
    )
    .map_err(SpawnError::Setup)?;
    // SAFETY: the child only runs `run_child`, which is async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the child of a fork; `plan` points to memory this
        // process owns a private copy of.
        unsafe { run_child(&plan) }
    }
    let fork_errno = Errno::last();
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&saved), None);
    drop(err_write);
    if pid < 0 {
        return Err(SpawnError::Fork(fork_errno));
    }
    Ok(Started {
        pid: Pid::from_raw(pid),
        report: err_read,
        program: program.shown(),
        workdir: program
            .chdir
            .as_ref()
            .map(|c| PathBuf::from(OsStr::from_bytes(c.as_bytes()))),
    })
}

fn fd_limit() -> RawFd {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    soft.min(65536) as RawFd
}

/// For EMFILE, what to raise ("" for any other error). Starts with "; ".
/// drover holds descriptors per worker (two with `capture_output`), and a
/// child inherits them all until its exec: many workers reach a soft limit
/// of 1024 (systemd's default) sooner than one would think.
pub fn limit_hint(errno: Errno) -> String {
    if errno != Errno::EMFILE {
        return String::new();
    }
    format!(
        "; drover reached its limit of open files ({}): raise it (`ulimit -n`, \
         systemd's LimitNOFILE=) or run fewer workers",
        fd_limit()
    )
}

/// What a child's report pipe says.
enum Report {
    /// Nothing yet (non-blocking pipe only).
    Pending,
    /// Closed without a report: the exec succeeded.
    Execd,
    /// The step that failed, and its errno.
    Failed(u8, Errno),
}

/// Reads the child's report. The child writes its 5 bytes in one write
/// (atomic for a pipe) just before it exits, so they arrive together.
fn read_report(fd: RawFd) -> Report {
    let mut buf = [0u8; 5];
    loop {
        // SAFETY: reading into a buffer we own.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        return match n {
            5 => {
                let errno = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
                Report::Failed(buf[0], Errno::from_raw(errno))
            }
            _ if n < 0 && Errno::last() == Errno::EINTR => continue,
            _ if n < 0 && Errno::last() == Errno::EAGAIN => Report::Pending,
            // End of file, or a short or failed read: no failure to tell.
            _ => Report::Execd,
        };
    }
}

/// What the child needs, as raw pointers into memory allocated before the fork.
struct ChildPlan<'a> {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    pid_slots: &'a [(*mut u8, usize)],
    listeners: &'a [RawFd],
    scratch: *mut RawFd,
    devnull: RawFd,
    report: RawFd,
    master: libc::pid_t,
    fd_limit: RawFd,
    chdir: *const libc::c_char,
    umask: Option<libc::mode_t>,
    identity: Option<&'a Identity>,
    die_with_parent: bool,
    /// Standard output and error (capture_output), else drover's own.
    output: Option<(RawFd, RawFd)>,
    /// The priority to run at (`boot_priority`), else drover's own.
    low: Option<Low>,
}

/// The child between fork and exec. Only async-signal-safe calls.
unsafe fn run_child(p: &ChildPlan) -> ! {
    let mut report = p.report;
    let fail = |report: RawFd, step: Step| -> ! {
        let errno = Errno::last_raw().to_ne_bytes();
        let msg = [step as u8, errno[0], errno[1], errno[2], errno[3]];
        libc::write(report, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    };

    // Own process group: a terminal's Ctrl+C (SIGINT to the foreground group)
    // reaches only the master, which decides what the workers get.
    if libc::setpgid(0, 0) != 0 {
        fail(report, Step::ProcessGroup);
    }
    // Default dispositions for every signal (an ignored one would survive
    // exec), then the empty mask (signals were blocked across the fork).
    // Failures for signals that cannot be changed are expected and harmless.
    let mut dfl: libc::sigaction = std::mem::zeroed();
    dfl.sa_sigaction = libc::SIG_DFL;
    for sig in 1..65 {
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

    if libc::dup2(p.devnull, 0) < 0 {
        fail(report, Step::Stdin);
    }
    // The capture pipes' write ends are close-on-exec; dup2 clears it on 1
    // and 2. (They are above 2: the master's own 0 to 2 are open.)
    if let Some((out, err)) = p.output {
        if libc::dup2(out, 1) < 0 || libc::dup2(err, 2) < 0 {
            fail(report, Step::Output);
        }
    }
    // Listeners to 3, 4, ...: first copy them (and the report pipe) above the
    // target range so that no dup2 below overwrites a source still needed.
    let n = p.listeners.len() as RawFd;
    let above = 3 + n;
    report = match libc::fcntl(report, libc::F_DUPFD_CLOEXEC, above) {
        -1 => fail(report, Step::Listeners),
        fd => fd,
    };
    for (i, &fd) in p.listeners.iter().enumerate() {
        let copy = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above);
        if copy < 0 {
            fail(report, Step::Listeners);
        }
        *p.scratch.add(i) = copy;
    }
    for i in 0..p.listeners.len() {
        // dup2 clears close-on-exec on the new descriptor: it survives exec.
        if libc::dup2(*p.scratch.add(i), 3 + i as RawFd) < 0 {
            fail(report, Step::Listeners);
        }
    }
    // Every descriptor above the listeners is close-on-exec, whoever opened it
    // (drover's own parent may have leaked some to us).
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    if libc::syscall(
        libc::SYS_close_range,
        above as libc::c_uint,
        libc::c_uint::MAX,
        CLOSE_RANGE_CLOEXEC,
    ) != 0
    {
        // Kernels before 5.11: mark them one by one.
        for fd in above..p.fd_limit {
            if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0
                && Errno::last_raw() != libc::EBADF
            {
                fail(report, Step::CloseOnExec);
            }
        }
    }
    if !p.chdir.is_null() && libc::chdir(p.chdir) != 0 {
        fail(report, Step::Chdir);
    }
    if let Some(mask) = p.umask {
        libc::umask(mask);
    }
    // Before exec, so that every thread the program starts inherits it; and
    // before the credentials change: a process may always lower its own
    // priority, whoever it runs as.
    if let Some(low) = p.low {
        if set_low(low) != 0 {
            fail(report, Step::Priority);
        }
    }
    // Groups before the user: after setuid we could no longer change them.
    if let Some(id) = p.identity {
        if libc::setgroups(id.groups.len(), id.groups.as_ptr()) != 0 {
            fail(report, Step::Groups);
        }
        if libc::setgid(id.gid) != 0 {
            fail(report, Step::Gid);
        }
        if let Some(uid) = id.uid {
            if libc::setuid(uid) != 0 {
                fail(report, Step::Uid);
            }
        }
    }
    // Never outlive the master. Set after the credentials change, which
    // clears it. If the master died before this took effect, we are already
    // orphaned and the signal will never come: leave now.
    if p.die_with_parent
        && libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
    {
        fail(report, Step::ParentDeathSignal);
    }
    if libc::getppid() != p.master {
        libc::_exit(1);
    }
    // LISTEN_PID and friends: our own pid, in decimal, written in place.
    let pid = libc::getpid();
    for &(slot, room) in p.pid_slots {
        write_decimal(slot, room, pid as u64);
    }
    libc::execve(p.path, p.argv, p.envp);
    fail(report, Step::Exec)
}

/// Puts the calling thread at `low`: 0, or -1 with errno set.
/// Async-signal-safe.
pub fn set_low(low: Low) -> libc::c_int {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system calls on the calling thread.
    unsafe {
        match low {
            Low::Nice(n) => libc::setpriority(libc::PRIO_PROCESS, 0, n),
            Low::Idle => libc::sched_setscheduler(0, libc::SCHED_IDLE, &param),
        }
    }
}

/// Writes `n` in decimal followed by NUL into `room` bytes at `dst`.
unsafe fn write_decimal(dst: *mut u8, room: usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len.min(room - 1) {
        *dst.add(i) = digits[len - 1 - i];
    }
    *dst.add(len.min(room - 1)) = 0;
}

/// Opens /dev/null once, close-on-exec, for every worker's stdin.
pub fn open_devnull() -> std::io::Result<std::fs::File> {
    let path = Path::new("/dev/null");
    std::fs::File::open(path).map_err(|e| crate::hint::at_path(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_are_found_by_number_or_name() {
        let by_name = Identity::resolve(Some("root"), None).unwrap().unwrap();
        let by_number = Identity::resolve(Some("0"), Some("0")).unwrap().unwrap();
        assert_eq!((by_name.uid, by_name.gid), (Some(0), 0));
        assert_eq!((by_number.uid, by_number.gid), (Some(0), 0));
        assert!(Identity::resolve(None, None).unwrap().is_none());
        let only_group = Identity::resolve(None, Some("root")).unwrap().unwrap();
        assert_eq!((only_group.uid, only_group.groups), (None, vec![0]));
        for (user, group, said) in [
            (
                Some("nosuchuser-xyz"),
                None,
                "user \"nosuchuser-xyz\": no such user",
            ),
            (
                None,
                Some("nosuchgroup-xyz"),
                "group \"nosuchgroup-xyz\": no such group",
            ),
        ] {
            let e = Identity::resolve(user, group).unwrap_err().to_string();
            assert_eq!(e, said);
        }
    }

    #[test]
    fn env_replaces_and_reserves_the_pid() {
        let mut env = Env::default();
        env.set("A", "1");
        env.set("A", "2");
        env.set_child_pid("LISTEN_PID");
        assert_eq!(env.get("A").unwrap(), "2");
        assert_eq!(env.entries.len(), 2);
        assert_eq!(env.pid_entries, vec![1]);
        let mut buf = env.entries[1].clone();
        let start = buf.len() - PID_ROOM;
        unsafe { write_decimal(buf.as_mut_ptr().add(start), PID_ROOM, 4_194_304) };
        assert_eq!(
            CString::from_vec_with_nul(buf[..start + 8].to_vec())
                .unwrap()
                .as_bytes(),
            b"LISTEN_PID=4194304"
        );
    }

    #[test]
    fn program_is_found_in_path_or_refused() {
        let p = Program::new(
            &["sh".into(), "-c".into()],
            Some(OsStr::new("/nonexistent:/bin:/usr/bin")),
        )
        .unwrap();
        assert!(p.shown().ends_with("/sh"));
        let e =
            Program::new(&["no-such-program-xyz".into()], Some(OsStr::new("/bin"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"no-such-program-xyz\": command not found in PATH"
        );
    }
}

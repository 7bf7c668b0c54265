//! The master: one single-threaded loop that waits for the next event or
//! deadline, hands it to the `Supervisor`, which decides, and carries out
//! what it decided (`Action`s).
//!
//! Each turn: the supervisor's own duties (what is overdue, the rollout,
//! the worker count), their actions, then wait — on the signal pipe, the
//! notify socket, the control socket and the exec reports, for at most the
//! time until the nearest deadline, or forever when none is due — then read
//! what arrived, and carry out the decisions it led to.
//!
//! `Master` holds the I/O endpoints; everything else is the supervisor's.

mod action;
mod generation;
mod pool;
mod priority;
mod rollout;
mod shutdown;
mod status;
mod supervisor;
mod template;
mod upgrade;
mod view;
mod worker;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::config::{Loaded, Source};
use crate::control::{self, ControlSocket};
use crate::listen;
use crate::logfile::LogFile;
use crate::notify::{self, NotifySocket};
use crate::pidfile::Pidfile;
use crate::sdnotify::{Ready, Systemd};
use crate::signals::{self, Event, SignalPipe};
use crate::spawn;
use action::{Action, Note};
use generation::Generation;
use shutdown::{Cause, Outcome};
use supervisor::Supervisor;
use worker::{describe, ms, Pace};

/// Exit statuses of the master (documented in docs/signals.md).
pub mod exit {
    /// Every worker stopped in time.
    pub const OK: u8 = 0;
    /// drover could not start or failed while running.
    pub const FAILURE: u8 = 1;
    /// Bad command line or configuration; nothing was started.
    pub const USAGE: u8 = 2;
    /// A worker could not boot at start-up.
    pub const CANNOT_BOOT: u8 = 3;
    /// The shutdown completed, but some workers had to be killed.
    pub const KILLED: u8 = 4;
}

/// Why the master could not start (or a reload could not be prepared).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Listen(#[from] listen::ListenError),
    #[error("{}{source}", crate::config::located(at))]
    Pidfile {
        at: Option<crate::config::Place>,
        source: crate::pidfile::PidfileError,
    },
    #[error("cannot create the notify socket: {0}")]
    Notify(std::io::Error),
    #[error("cannot open /dev/null: {0}")]
    DevNull(std::io::Error),
    #[error("cannot become a child subreaper: {0}")]
    Subreaper(Errno),
    /// The program, or `chdir`: a start reports it as "cannot boot". `at`
    /// is where the setting was given.
    #[error("{}{}{source}", crate::config::located(at), if matches!(source, spawn::SpawnError::NoDirectory(_)) { "" } else { "cannot run the worker command: " })]
    Program {
        at: Option<crate::config::Place>,
        source: spawn::SpawnError,
    },
    #[error("{}{source}", crate::config::located(at))]
    Identity {
        at: Option<crate::config::Place>,
        source: spawn::SpawnError,
    },
    #[error("{}control socket {path}: {source}", crate::config::located(at))]
    Control {
        at: Option<crate::config::Place>,
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    #[error("{}admin_bind {addr}: {source}", crate::config::located(at))]
    Admin {
        at: Option<crate::config::Place>,
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    BootNice(String),
}

impl StartError {
    pub fn exit_status(&self) -> u8 {
        match self {
            StartError::Program { .. } => exit::CANNOT_BOOT,
            StartError::Identity { .. } | StartError::Watch(_) => exit::USAGE,
            _ => exit::FAILURE,
        }
    }
}

/// The workers' program as a start would prepare it from `s` (user, group
/// and `PATH` lookups included), for `drover check`.
pub fn prepare(s: &crate::config::Settings) -> Result<spawn::Program, StartError> {
    generation::prepare(s, false).map(|(_, program)| program)
}

/// The settings read only at start (docs/signals.md, "Reload").
const START_ONLY: &[&str] = &[
    "subreaper",
    "pidfile",
    "control_socket",
    "log_file",
    "log_level",
    "log_format",
    "admin_bind",
    "reload",
    "reload_paths",
    "reload_extra_files",
];

/// Those of the start-only settings that differ between `before` and `after`.
fn changed_start_only(
    before: &crate::config::Settings,
    after: &crate::config::Settings,
) -> Vec<&'static str> {
    let (before, after) = (before.shown(), after.shown());
    before
        .into_iter()
        .zip(after)
        .filter(|((key, old), (_, new))| START_ONLY.contains(key) && old != new)
        .map(|((key, _), _)| key)
        .collect()
}

/// The master: its I/O endpoints, and the supervisor that decides.
pub struct Master {
    source: Source,
    sup: Supervisor,
    notify: NotifySocket,
    signals: SignalPipe,
    control: Option<ControlSocket>,
    systemd: Systemd,
    log: Option<LogFile>,
    pidfile: Option<Pidfile>,
    devnull: File,
    /// Children forked and not yet confirmed exec'd: their report pipes.
    exec_reports: Vec<spawn::Started>,
    /// `preload`: the templates the workers are forked from.
    templates: template::Templates,
    upgrade: Option<upgrade::Upgrade>,
    /// `READY=1` datagrams from processes no worker speaks for, so far.
    stranger_readies: u32,
    /// The new master of an upgrade that succeeded: our child, but no
    /// process left by a worker (`end_orphans` spares it).
    successor: Option<Pid>,
    /// ... which had exited already when we read its `READY=1`: nothing
    /// took the listeners we release.
    successor_gone: bool,
    /// When WATCHDOG=1 is next due to our service manager.
    next_watchdog: Option<Instant>,
    /// `master_as_user`: the master switched to the workers' user at start.
    master_switched: bool,
    exe: upgrade::Exe,
    /// `--reload`: the app's files, watched.
    watch: Option<crate::watch::Watcher>,
    /// The admin endpoint (`admin_bind`).
    admin: Option<crate::admin::Admin>,
    /// Events, metrics' counters, the scoreboard, captured output.
    obs: crate::observe::Observer,
    /// The notify socket's budget: the current window, and the datagrams
    /// read in it (see `read_notify`).
    notify_window: (Instant, usize),
    /// The window's budget is spent (a flood): the socket is not read again
    /// before then.
    notify_rest: Option<Instant>,
    /// When a flood of the notify socket was last logged.
    flood_logged: Option<Instant>,
    /// Who sent the datagrams of the current window.
    flood_senders: Senders,
}

/// A flood of the notify socket (a worker that sends in a loop) is more
/// than [`NOTIFY_BUDGET`] datagrams read within a window of
/// [`NOTIFY_WINDOW`] (well-behaved workers send a few a second each). The
/// master then reads the socket only until [`NOTIFY_OPEN`] into each
/// window, and lets it rest for the rest: its cost is bounded, whatever a
/// worker sends, and signals, control requests and deadlines are served
/// meanwhile. The senders wait while it rests (a `send` blocks while the
/// queue is full: nothing is lost), and every sender gets its turn while
/// it is read: reading goes on for all of the open part, not just for a
/// burst, so that a well-behaved worker's `READY=1` gets in however fast
/// the flood refills the queue.
const NOTIFY_BUDGET: usize = 128;
const NOTIFY_WINDOW: Duration = Duration::from_millis(10);
const NOTIFY_OPEN: Duration = Duration::from_millis(2);
/// A flood is logged at most this often.
const FLOOD_LOG_EVERY: Duration = Duration::from_secs(60);

/// Starts drover: binds, spawns the workers and supervises them until
/// shutdown. `first` is `source` as loaded by the caller. Returns the exit
/// status. The steps are those of docs/design.md ("Start-up").
pub fn run(source: Source, first: Loaded, log: Option<LogFile>) -> Result<u8, StartError> {
    let started = Instant::now();
    // 1. Before anything opens a descriptor: fds 3.. may be sockets from our parent.
    let inherited = listen::take_inherited()?;
    let upgrade_admin = listen::take_upgrade_admin();
    let exe = upgrade::Exe::saved();
    // 2. Handlers next: a signal that arrives from now on is an event, not a death.
    let signals = SignalPipe::install().map_err(StartError::Signals)?;
    // 3. What our own service manager gave us.
    let systemd = Systemd::from_env();
    // 4.
    if first.settings.subreaper {
        become_subreaper().map_err(StartError::Subreaper)?;
        debug!("child subreaper: orphans of workers are re-parented to drover");
    }
    // 5. Before binding: a second drover on the same pidfile must be told
    // that another one runs, not that its address is in use.
    let pidfile = create_pidfile(&first.settings)?;
    // 6. Generation 1: program, environment, listeners.
    let mut gen = Generation::build(1, first, inherited, &Vec::new(), false)?;
    // 7. The notify and control sockets.
    let notify = NotifySocket::open(gen.owner()).map_err(StartError::Notify)?;
    let control = bind_control(&gen.s)?;
    // 8. The workers' standard input.
    let devnull = spawn::open_devnull().map_err(StartError::DevNull)?;
    // 8b. `--reload`: the app's files, watched from the loop.
    let watch = crate::watch::from_settings(&gen.s)?;
    // 8c. What the master shows the world: the admin endpoint, the events,
    // the scoreboard (in the notify socket's private directory).
    let admin = bind_admin(&gen.s, upgrade_admin)?;
    let obs = crate::observe::Observer::new(&gen.s, notify.dir(), gen.owner());
    // 9. Everything privileged is done: sockets bound, files created.
    let master_switched = gen.s.master_as_user && gen.program.identity.is_some();
    if master_switched {
        let id = gen.program.identity.take().expect("checked above");
        switch_user(&id, pidfile.as_ref(), gen.s.control_socket.as_deref())?;
    }
    // 9b. As the master now is: can it give a worker its priority back?
    gen.boot =
        priority::check(&gen.s, gen.program.identity.as_ref()).map_err(StartError::BootNice)?;
    // 10. The loop spawns the workers and runs until the shutdown is over.
    let mut master = Master {
        sup: Supervisor::new(Rc::new(gen), started),
        source,
        notify,
        signals,
        control,
        next_watchdog: systemd.watchdog.map(|w| started + w / 2),
        systemd,
        log,
        pidfile,
        devnull,
        exec_reports: Vec::new(),
        templates: template::Templates::default(),
        upgrade: None,
        stranger_readies: 0,
        successor: None,
        successor_gone: false,
        master_switched,
        exe,
        watch,
        admin,
        obs,
        notify_window: (started, 0),
        notify_rest: None,
        flood_logged: None,
        flood_senders: Senders::default(),
    };
    master.sup.predecessor_listens = master.systemd.upgrading();
    let first = master.sup.current().clone();
    master.obs.publish(crate::events::Kind::Started {
        pid: std::process::id(),
        workers: first.s.workers.0,
        generation: first.number,
    });
    let outcome = master.run_loop();
    let status = master.wind_up(outcome);
    info!(
        "exiting with status {status} after {}",
        ms(started.elapsed())
    );
    Ok(status)
}

/// Step 5: the pidfile, if `pidfile` is set.
fn create_pidfile(s: &crate::config::Settings) -> Result<Option<Pidfile>, StartError> {
    let Some(path) = s.pidfile.as_deref() else {
        return Ok(None);
    };
    Pidfile::create(path)
        .map(Some)
        .map_err(|source| StartError::Pidfile {
            at: s.places.of("pidfile").cloned(),
            source,
        })
}

/// Step 7: the control socket, if `control_socket` is set.
fn bind_control(s: &crate::config::Settings) -> Result<Option<ControlSocket>, StartError> {
    let Some(path) = &s.control_socket else {
        return Ok(None);
    };
    ControlSocket::bind(path)
        .map(Some)
        .map_err(|source| StartError::Control {
            at: s.places.of("control_socket").cloned(),
            path: path.display().to_string(),
            source,
        })
}

/// `Action::RestorePriority` (and a preload template ready to fork): every
/// thread of `who` (`pid`) still at the boot priority gets the normal one
/// back.
pub(super) fn restore_priority(who: &str, pid: Pid, boot: priority::Boot) {
    match priority::restore(pid, boot) {
        Ok(done) => debug!(
            "{who} (pid {pid}): {boot} for {} thread(s) in {} pass(es)",
            done.threads, done.passes
        ),
        // drover checked that it could (`priority::check`): the worker or a
        // child changed its user or its RLIMIT_NICE since.
        Err((e, done)) => error!(
            "{who} (pid {pid}): some of its threads stay at their boot priority \
             ({done_threads} set from {boot}, then: {e})",
            done_threads = done.threads
        ),
    }
}

/// Binds the admin endpoint, if `admin_bind` is set, or takes over the one
/// the old master of an upgrade `handed` on for that address.
fn bind_admin(
    s: &crate::config::Settings,
    handed: Option<std::os::fd::OwnedFd>,
) -> Result<Option<crate::admin::Admin>, StartError> {
    let Some(addr) = &s.admin_bind else {
        return Ok(None);
    };
    let (admin, whose) = match handed.and_then(|fd| crate::admin::Admin::adopt(fd, &addr.0)) {
        Some(admin) => (
            admin,
            " (the old master's socket: it answers there until this master is ready)",
        ),
        None => {
            let admin = crate::admin::Admin::bind(&addr.0).map_err(|source| StartError::Admin {
                at: s.places.of("admin_bind").cloned(),
                addr: addr.0.to_string(),
                source,
            })?;
            (admin, "")
        }
    };
    let shown = admin
        .local_addr()
        .map_or(addr.0.to_string(), |a| a.to_string());
    info!("admin endpoint on {shown}: /livez, /readyz, /metrics{whose}");
    Ok(Some(admin))
}

/// At the end of a shutdown, as a child subreaper: the processes left to
/// us (a worker's `setsid()` daemon, re-parented here when the worker
/// exited) get SIGTERM and `limit` to exit, then SIGKILL, and are reaped,
/// so that none outlives drover holding a copy of its sockets. Without
/// the subreaper they were re-parented elsewhere, beyond drover's reach.
/// The new master of an upgrade and the event hooks still running
/// (`spared`) are our children too: the new master serves on, and the hooks
/// get their `hook_timeout` at our exit (`EventHooks::finish`). A preload template retired by the stop and not yet
/// gone (one still importing the application when the stop came: it got
/// SIGTERM) is among our children too, but is no worker's: it is named as
/// what it is, and waited for in the same way. Returns how many had to be
/// killed, templates and processes left by workers alike: each is a kill
/// the operator should see, as a worker's is (exit status 4,
/// `DROVER_KILLED`).
fn end_orphans(limit: Duration, spared: &[Pid], templates: &[Pid]) -> u32 {
    let mut flag: libc::c_int = 0;
    // SAFETY: plain prctl with a pointer to an int.
    let subreaper =
        unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut flag) } == 0 && flag != 0;
    if !subreaper {
        return 0; // orphans went to init, not to us: nothing to scan /proc for
    }
    let mut orphans = children_of(nix::unistd::getpid());
    orphans.retain(|p| !spared.contains(p));
    if orphans.is_empty() {
        return 0;
    }
    let list = |pids: &[Pid]| {
        pids.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (ours, left_by_workers): (Vec<Pid>, Vec<Pid>) =
        orphans.iter().partition(|p| templates.contains(p));
    if !ours.is_empty() {
        info!(
            "stage 3: waiting for {} retired template(s) to exit (pid {}): SIGTERM, up to {}",
            ours.len(),
            list(&ours),
            ms(limit)
        );
    }
    if !left_by_workers.is_empty() {
        warn!(
            "stage 3: {} process(es) left by workers (pid {}): SIGTERM, up to {}",
            left_by_workers.len(),
            list(&left_by_workers),
            ms(limit)
        );
    }
    for p in &orphans {
        let _ = kill(*p, Signal::SIGTERM);
    }
    let deadline = Instant::now() + limit;
    let mut left = orphans;
    while !left.is_empty() {
        while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            match status.pid() {
                Some(pid) => left.retain(|p| *p != pid),
                None => break,
            }
        }
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            warn!(
                "stage 3: SIGKILL to {} process(es) still running (pid {})",
                left.len(),
                list(&left)
            );
            for p in &left {
                // A template's process group holds what its import started
                // (its workers have groups of their own): it ends with it,
                // as at its boot timeout's SIGKILL.
                if templates.contains(p) {
                    kill_group(*p);
                } else {
                    let _ = kill(*p, Signal::SIGKILL);
                }
                let _ = waitpid(*p, None);
            }
            return left.len() as u32;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if left_by_workers.is_empty() {
        info!("stage 3: the retired template(s) have exited");
    } else {
        info!("stage 3: the processes left by workers have exited");
    }
    0
}

/// Says which processes started by our workers outlive them, found by the
/// `NOTIFY_SOCKET` drover gave the workers (a path unique to this drover)
/// in their environment: only those whose environment we may read (our
/// user's, or any as root), and only while they have not changed it.
fn report_escaped(notify: &std::path::Path) {
    let needle = [
        b"NOTIFY_SOCKET=".as_slice(),
        notify.as_os_str().as_encoded_bytes(),
    ]
    .concat();
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    let escaped: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && !dying(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                // Whole variables only: one pass over each environment, not
                // a comparison at every byte (this runs at every exit).
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle))
        })
        .map(|pid| pid.to_string())
        .collect();
    if !escaped.is_empty() {
        warn!(
            "{} process(es) started by workers outlive drover (pid {}): set subreaper = true \
             for drover to end them at shutdown",
            escaped.len(),
            escaped.join(", ")
        );
    }
}

/// Whether `pid` is on its way out: a zombie, or sent SIGKILL (what a
/// dead worker left in its process group got from `sweep_group` a moment
/// ago, and may not have acted on yet). It will not outlive drover.
fn dying(pid: u32) -> bool {
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true; // gone already
    };
    status.lines().any(|line| match line.split_once(':') {
        Some(("State", state)) => matches!(state.trim().chars().next(), Some('Z' | 'X')),
        Some(("SigPnd" | "ShdPnd", mask)) => {
            u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & SIGKILL_BIT != 0)
        }
        _ => false,
    })
}

/// A worker that missed its deadline because it is stopped (`SIGSTOP`, a
/// debugger) is said to be: its SIGABRT waits for a `SIGCONT`, and only the
/// SIGKILL after `abort_grace` ends it, which the log would not explain.
fn say_if_stopped(slot: u32, pid: Pid) {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    let state = state
        .as_deref()
        .and_then(|s| s.rfind(')').and_then(|i| s.get(i + 2..i + 3)));
    if matches!(state, Some("T" | "t")) {
        warn!(
            "worker {slot} (pid {pid}) is stopped (SIGSTOP, or a debugger holds it): \
             it acts on nothing until it is continued; its process group gets SIGKILL \
             at the end of abort_grace"
        );
    }
}

/// A process's command line for the log (its first 80 bytes, spaces for
/// the NULs), or its name; `?` once it is gone.
fn process_name(pid: Pid) -> String {
    let line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let line = String::from_utf8_lossy(&line)
        .trim_end_matches('\0')
        .replace('\0', " ");
    let line = if line.is_empty() {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_else(|_| "?".into())
    } else {
        line
    };
    notify::loggable(line.trim(), 80)
}

/// Our live children, from /proc (the orphans given to us have no record
/// elsewhere).
fn children_of(parent: Pid) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                let after = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
                let mut f = after.split(' ');
                let state = f.next();
                let ppid = f.next().and_then(|p| p.parse::<i32>().ok());
                state != Some("Z") && ppid == Some(parent.as_raw())
            })
        })
        .map(Pid::from_raw)
        .collect()
}

/// Orphans of drover's children are re-parented to drover from now on
/// (`subreaper`, and `preload`, whose workers a template forks twice).
fn become_subreaper() -> Result<(), Errno> {
    // SAFETY: plain prctl on this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// `master_as_user`: the master becomes the workers' user.
fn switch_user(
    id: &spawn::Identity,
    pidfile: Option<&Pidfile>,
    control_socket: Option<&std::path::Path>,
) -> Result<(), StartError> {
    // Our files become the user's, so that we can still remove them at
    // exit, and a new master of an upgrade (running as the user) can take
    // them over. Their directory must be writable by the user too: see
    // docs/operations.md.
    let (uid, gid) = (id.uid, id.gid);
    let chowned =
        pidfile
            .map_or(Ok(()), |p| p.chown(uid, gid))
            .and_then(|_| match control_socket {
                Some(path) => std::os::unix::fs::chown(path, uid, Some(gid)),
                None => Ok(()),
            });
    if let Err(e) = chowned {
        warn!("cannot give the pidfile or control socket to uid {uid:?}, gid {gid}: {e}");
    }
    // A new master of an upgrade starts as the user already (and could not
    // call setgroups); only root switches.
    let already = uid.is_none_or(|u| u == nix::unistd::getuid().as_raw())
        && gid == nix::unistd::getgid().as_raw();
    if !already {
        id.apply_to_self()
            .map_err(|source| StartError::Identity { at: None, source })?;
    }
    info!(
        "drover {} uid {}, gid {}",
        if already {
            "already runs as"
        } else {
            "now runs as"
        },
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    Ok(())
}

impl Master {
    /// After the loop (the shutdown is complete): the workers' last lines,
    /// what they left behind, then stage 4 (`finish`). Returns the exit
    /// status.
    fn wind_up(&mut self, outcome: Outcome) -> u8 {
        self.obs.flush_output();
        self.reap_cancelled_upgrade();
        let templates: Vec<Pid> = self.templates.list.iter().map(|t| t.pid).collect();
        let mut spared = self.obs.hook_pids();
        spared.extend(self.successor);
        let killed = end_orphans(self.sup.current().s.quick_timeout.0, &spared, &templates);
        let outcome = outcome.with_killed(killed);
        if outcome.cause != Cause::Upgrade {
            // (After an upgrade the new master, started with our socket in
            // its environment, goes on: it is no escapee.)
            report_escaped(self.notify.path());
        }
        let status = self.finish(outcome);
        // Last: a service manager that does not read (its messages' last
        // wait) must not delay stage 3 nor the on_exit hook.
        self.systemd.flush_before_exit();
        self.obs.publish(crate::events::Kind::Exiting { status });
        self.obs.close();
        status
    }

    fn run_loop(&mut self) -> Outcome {
        loop {
            let now = Instant::now();
            self.settle_upgrade(now);
            if self.systemd.retry() {
                self.upgraded();
            }
            self.feed_watchdog(now);
            self.sup.tick(now);
            self.tend_templates(now);
            if let Some(outcome) = self.carry_out() {
                return outcome;
            }
            if self.sup.again() {
                continue;
            }
            let deadline = self.next_deadline(now);
            self.wait(deadline.map(|d| d.saturating_duration_since(now)));
            // Before the messages are read: a heartbeat read now starts a
            // period from now, and must not be lengthened too.
            if let Some(due) = deadline {
                let woke = Instant::now();
                self.sup
                    .woke_late(woke - now, woke.saturating_duration_since(due));
            }
            self.read_events();
            if let Some(outcome) = self.carry_out() {
                return outcome;
            }
        }
    }

    /// The nearest instant at which something is due: the supervisor's
    /// deadlines, our service manager's watchdog and the messages waiting for
    /// it, a late upgrade.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.sup
            .next_deadline(now)
            .into_iter()
            .chain(self.next_watchdog)
            .chain(self.systemd.retry_at())
            .chain(self.upgrade_deadline())
            .chain(
                self.watch
                    .as_ref()
                    .and_then(crate::watch::Watcher::deadline),
            )
            .chain(self.templates.next_deadline(self.template_wanted()))
            .chain(self.admin.as_ref().and_then(|a| a.next_deadline()))
            .chain(self.obs.next_deadline())
            .chain(self.notify_rest)
            .min()
    }

    /// We are the new master of an upgrade, and the old master has our
    /// `READY=1`: it retires.
    fn upgraded(&mut self) {
        // The old master counts it too, as it retires: only this master's
        // scrapes can show it.
        self.obs.counters.upgraded();
        self.serve_alone();
    }

    /// Ready, and no old master serves (any more): the sockets it bound are
    /// ours to close from now on, and the admin endpoint it answered on
    /// meanwhile ours to answer.
    fn serve_alone(&mut self) {
        self.sup.predecessor_listens = false;
        for (l, _) in self.sup.current().listeners.borrow().iter() {
            l.take_over();
        }
        listen::remove_files_left_by_old_master();
        if let Some(a) = self.admin.as_mut() {
            a.start_accepting();
        }
    }

    fn feed_watchdog(&mut self, now: Instant) {
        if self.next_watchdog.is_some_and(|t| t <= now) {
            self.systemd.watchdog();
            self.next_watchdog = self.systemd.watchdog.map(|w| now + w / 2);
        }
    }

    /// Blocks until a signal, a notify message, a control request, an exec
    /// report, a change under `--reload`, or `timeout`. (Another source adds
    /// its descriptor here and its reading to `read_events`.)
    fn wait(&self, timeout: Option<Duration>) {
        let timeout = match timeout {
            None => PollTimeout::NONE,
            // Round up, so that we do not wake a hair before the deadline and spin.
            Some(d) => {
                PollTimeout::try_from(d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32)
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        if self.notify_rest.is_none() {
            fds.push(PollFd::new(self.notify.as_fd(), PollFlags::POLLIN));
        }
        if let Some(c) = &self.control {
            fds.extend(c.poll_fds());
        }
        if let Some(w) = &self.watch {
            fds.push(PollFd::new(w.fd(), PollFlags::POLLIN));
        }
        fds.extend(
            self.exec_reports
                .iter()
                .map(|e| PollFd::new(e.report.as_fd(), PollFlags::POLLIN)),
        );
        fds.extend(self.templates.poll_fds());
        if let Some(a) = &self.admin {
            fds.extend(a.poll_fds());
        }
        fds.extend(self.obs.poll_fds());
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                // Cannot happen with valid descriptors; do not spin on it.
                error!("poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Reads everything that has arrived and hands it to the supervisor.
    fn read_events(&mut self) {
        let now = Instant::now();
        // Exec reports first: a child that could not exec is known as such
        // before its exit (status 127) is reaped.
        self.read_exec_reports(now);
        self.read_templates(now);
        // Messages next: a worker's last words (STOPPING=1) are heard before
        // its exit is reaped and its pid forgotten.
        self.read_notify(now);
        self.read_signals(now);
        self.read_control(now);
        // `--reload`: changes are read as they come, and acted on once the
        // files have been quiet (the debounce deadline woke us then).
        let changed = self.watch.as_mut().and_then(|w| {
            w.read(now);
            w.take_due(now)
        });
        if let Some(changed) = changed {
            self.sup.on_files_changed(&crate::watch::describe(&changed));
        }
        // Subscribers, captured output, hooks; then the admin endpoint,
        // which answers from what the master knows now.
        self.obs.on_ready(now);
        if let Some(admin) = &mut self.admin {
            let view = view::View {
                sup: &self.sup,
                obs: &self.obs,
                templates: &self.templates,
            };
            admin.on_ready(now, &view);
        }
    }

    /// The notify socket, within what is left of the window's budget
    /// ([`NOTIFY_BUDGET`]); once it is spent, the socket rests until the
    /// window ends.
    fn read_notify(&mut self, now: Instant) {
        let (began, read) = &mut self.notify_window;
        if now.saturating_duration_since(*began) >= NOTIFY_WINDOW {
            (*began, *read) = (now, 0);
            self.notify_rest = None;
            self.flood_senders = Senders::default();
        }
        if self.notify_rest.is_some() {
            return;
        }
        let (began, before) = self.notify_window;
        let open_until = began + NOTIFY_OPEN;
        let flooded = |read: usize| read >= NOTIFY_BUDGET && Instant::now() >= open_until;
        let mut senders = std::mem::take(&mut self.flood_senders);
        let read = self.read_notify_upto(|n| !flooded(before + n), &mut senders, now);
        self.notify_window.1 += read;
        if flooded(before + read) {
            self.notify_rest = Some(began + NOTIFY_WINDOW);
            self.say_flooded(&senders, now);
            senders = Senders::default();
        }
        self.flood_senders = senders;
    }

    /// Before a worker's exit is reaped, what it said before it exited is
    /// read, even while the socket rests: its `STOPPING=1` (a planned exit)
    /// or `READY=1` is in the queue, ahead of anything sent after its exit,
    /// and the queue holds at most `net.unix.max_dgram_qlen` datagrams.
    /// The loop read the socket before the signals, but a worker that spoke
    /// and exited in between (a `max_requests` recycle under load: READY=1,
    /// STOPPING=1 and the exit within a turn) was reaped unannounced, and
    /// its recycle counted as a failure, with backoff.
    fn read_last_words(&mut self, now: Instant) {
        self.read_notify(now);
        if self.notify_rest.is_some() {
            let bound = self.notify.queue_bound();
            self.read_notify_upto(|n| n < bound, &mut Senders::default(), now);
        }
    }

    /// Logs a flood of the notify socket, at most once a minute, with the
    /// sender of most of the batch.
    fn say_flooded(&mut self, senders: &Senders, now: Instant) {
        if self
            .flood_logged
            .is_some_and(|t| now.saturating_duration_since(t) < FLOOD_LOG_EVERY)
        {
            return;
        }
        self.flood_logged = Some(now);
        let Some((pid, n)) = senders.top() else {
            return;
        };
        let pool = &self.sup.pool;
        let who = match notify::descends_from(pid, |p| pool.has(p))
            .and_then(|w| pool.workers.iter().find(|x| x.pid == w))
        {
            Some(w) if w.pid == pid => format!("pid {pid} (worker {})", w.slot),
            Some(w) => format!("pid {pid} (started by worker {}, pid {})", w.slot, w.pid),
            None => format!("pid {pid} ({})", process_name(pid)),
        };
        warn!(
            "the notify socket is flooded: over {NOTIFY_BUDGET} datagrams within {}, {n} of \
             the last ones from {who}; drover reads it {} out of every {0}, and the senders \
             wait meanwhile (logged at most once a minute)",
            ms(NOTIFY_WINDOW),
            ms(NOTIFY_OPEN)
        );
    }

    /// Reads datagrams while `more(read so far)`; returns how many. Each
    /// message goes to whom its sender speaks for (the new master of an
    /// upgrade, a template, a worker, or a process one of them started).
    fn read_notify_upto(
        &mut self,
        more: impl Fn(usize) -> bool,
        senders: &mut Senders,
        now: Instant,
    ) -> usize {
        let mut read = 0;
        let mut just_ready = Vec::new();
        while more(read) {
            let Some((sender, messages)) = self.notify.recv() else {
                break;
            };
            read += 1;
            senders.count(sender);
            if self.upgrade.as_ref().is_some_and(|u| u.pid == sender) {
                self.on_upgrade_notify(messages);
                continue;
            }
            if self.templates.has(sender) {
                self.template_notify(sender, &messages);
                continue;
            }
            let pool = &self.sup.pool;
            match notify::descends_from(sender, |p| pool.has(p)) {
                Some(pid) => {
                    let readies = messages.contains(&notify::Message::Ready)
                        && !pool.workers.iter().any(|w| w.pid == pid && w.is_ready());
                    self.sup.on_notify(pid, messages, now);
                    if readies {
                        just_ready.push(pid);
                    }
                }
                None if template::forked_unknown(&messages) => {
                    // Forked by a template that was given up before it
                    // answered: no slot counts on it, and it must not serve
                    // unsupervised.
                    warn!("pid {sender} was forked by a template given up before it answered; killing it");
                    let _ = killpg(sender, Signal::SIGKILL);
                }
                // A template's child speaks for it, as a worker's does:
                // systemd-notify run by a Node.js worker started as one.
                None => match (!self.templates.list.is_empty())
                    .then(|| notify::descends_from(sender, |p| self.templates.has(p)))
                    .flatten()
                {
                    Some(t) => self.template_notify(t, &messages),
                    None if messages.contains(&notify::Message::Ready) => {
                        self.ready_from_a_stranger(sender)
                    }
                    None => debug!(
                        "notify message from pid {sender} ignored: not a worker or a descendant of one"
                    ),
                },
            }
        }
        // Once what was queued is read: a worker that has since said
        // STOPPING=1 (a --max-requests recycle, while we were slow to read)
        // may have closed its sockets already, rightly.
        for pid in just_ready {
            self.check_listeners_held(pid);
        }
        read
    }

    /// Worker `pid` just reported ready: one that holds none of its
    /// listening sockets (it closed or replaced fd 3, or binds its own)
    /// cannot accept a connection, yet its slot counts as serving.
    fn check_listeners_held(&self, pid: Pid) {
        let Some(w) = self
            .sup
            .pool
            .workers
            .iter()
            .find(|w| w.pid == pid && w.is_ready() && !w.said_stopping)
        else {
            return;
        };
        let inodes = listen::inodes(&w.gen.listeners.borrow());
        if !inodes.is_empty() && listen::held_by(pid, &inodes) == Some(false) {
            warn!(
                "worker {} (pid {pid}) reported ready, but neither it nor a process it started \
                 holds any of the {} listening socket(s) drover passed it (LISTEN_FDS, from fd 3): \
                 it closed or replaced them, so it accepts no connection (they wait for the other \
                 workers); serve on the sockets drover passes, do not bind your own",
                w.slot,
                inodes.len()
            );
        }
    }

    /// `READY=1` from a process that is neither a worker nor started by a
    /// running one: typically a worker that forked into the background
    /// (daemonized) and exited, whose server now runs unsupervised.
    fn ready_from_a_stranger(&mut self, sender: Pid) {
        self.stranger_readies += 1;
        let n = self.stranger_readies;
        if n > 8 && !n.is_power_of_two() {
            return;
        }
        let environ = std::fs::read(format!("/proc/{sender}/environ")).unwrap_or_default();
        let slot = environ
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(b"DROVER_WORKER_ID="))
            .map(|id| format!(", started for worker {}", String::from_utf8_lossy(id)))
            .unwrap_or_default();
        warn!(
            "READY=1 from pid {sender} ({}{slot}), which is neither a worker nor started by a running \
             one: a worker that forks into the background (daemonizes) and exits leaves its \
             server unsupervised; run it in the foreground ({n} such message(s) so far)",
            process_name(sender)
        );
    }

    /// A template's messages; one that does not speak the template protocol
    /// is killed, with its process group.
    fn template_notify(&mut self, template: Pid, messages: &[notify::Message]) {
        if let Some(pid) = self.templates.on_notify(template, messages) {
            kill_group(pid);
        }
    }

    /// The signal pipe: CHLD reaps here; a stop signal also cancels an
    /// upgrade under way; the supervisor decides the rest.
    fn read_signals(&mut self, now: Instant) {
        let mut batch = self.signals.drain();
        // A stop from the new master of an upgrade comes with its exit: a
        // stopped master resumed gets both at once, SIGCHLD's record first
        // (its handler interrupts SIGTERM's). Read as it came, the exit
        // failed the upgrade and the stop then found none to cancel. So
        // does an operator's stop that reached us meanwhile (the new
        // master's own merges into it): it cancels the upgrade first, as it
        // would have had we read it at once. Read after the exit, it left
        // "upgrade failed ...; this master keeps serving", then stopped us.
        let upgrade = self.upgrade.as_ref().map(|u| u.pid);
        let upgrading = self.upgrade_in_progress().is_some();
        batch.sort_by_key(|r| {
            let from_new = r.sender.is_some() && r.sender == upgrade && r.event != Event::Child;
            let stop = matches!(r.event, Event::Terminate | Event::Interrupt | Event::Quit);
            !(from_new || upgrading && stop)
        });
        for received in batch {
            let (event, sender) = (received.event, received.sender);
            self.say_sender(received);
            match event {
                Event::Child => {
                    self.read_last_words(now);
                    self.reap()
                }
                Event::Terminate | Event::Interrupt | Event::Quit => {
                    if let Some(signal) = event.signal() {
                        if self.stop_from_new_master(sender, signal) {
                            continue;
                        }
                        self.cancel_upgrade(signal);
                    }
                    self.sup.on_signal(event, now)
                }
                // Refused at once: not resumed first (after SIGWINCH), nor
                // queued behind a stopping generation, to be dropped when
                // this master retires.
                Event::Reload => match self.reload_blocked() {
                    Some(why) => self.sup.reload_refused(event.signal_name(), &why),
                    None => self.sup.on_signal(event, now),
                },
                _ => self.sup.on_signal(event, now),
            }
        }
    }

    /// Names who sent a signal that stops, reloads or upgrades drover, or
    /// pauses its workers, before the line that says what it does: a stop
    /// nobody on the team asked for is found at once, even when a worker
    /// (or a process it started) sent it. The signals that come in storms
    /// (CHLD, TTIN, TTOU, USR1) are named at debug level only.
    fn say_sender(&self, received: signals::Received) {
        let storm = matches!(
            received.event,
            Event::Child | Event::AddWorker | Event::RemoveWorker | Event::ReopenLogs
        );
        if storm && !tracing::enabled!(tracing::Level::DEBUG) {
            return; // not even /proc is read for them
        }
        let name = received.event.signal_name();
        let who = match received.sender {
            None if received.outside => "a process outside drover's PID namespace \
                                          (a container runtime: docker stop, the kubelet)"
                .to_string(),
            None => "the kernel (a terminal's key, or a hang-up)".to_string(),
            Some(pid) => {
                let pool = &self.sup.pool;
                let command = process_name(pid);
                let worker = notify::descends_from(pid, |p| pool.has(p))
                    .and_then(|w| pool.workers.iter().find(|x| x.pid == w));
                match worker {
                    Some(w) if w.pid == pid => format!("pid {pid} ({command}): worker {}", w.slot),
                    Some(w) => format!(
                        "pid {pid} ({command}), started by worker {} (pid {})",
                        w.slot, w.pid
                    ),
                    None => format!("pid {pid} ({command})"),
                }
            }
        };
        if storm {
            debug!("{name} sent by {who}");
        } else {
            info!("{name} sent by {who}");
        }
    }

    /// The control socket's requests: the supervisor's, except `events`
    /// (the connection becomes a subscriber) and `status` (which includes
    /// the templates, ours).
    fn read_control(&mut self, now: Instant) {
        let requests = self
            .control
            .as_mut()
            .map(ControlSocket::read_requests)
            .unwrap_or_default();
        for (client, command) in requests {
            match command {
                control::Command::Events => {
                    if let Some(stream) = self.control.as_mut().and_then(|c| c.take_client(client))
                    {
                        self.obs.subscribe(stream);
                    }
                }
                control::Command::Status => {
                    let answer = self.status(now);
                    self.sup.emit(Action::AnswerClient { client, answer });
                }
                command => self.sup.on_command(client, command, now),
            }
        }
    }

    fn read_exec_reports(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.exec_reports.len() {
            match self.exec_reports[i].poll() {
                None => i += 1,
                Some(report) => {
                    let started = self.exec_reports.swap_remove(i);
                    let report = report.map_err(|e| e.to_string());
                    self.sup.on_exec_report(started.pid, report, now);
                }
            }
        }
    }

    /// Carries out every decision taken so far, in order. Returns the
    /// outcome once the supervisor decided to exit.
    fn carry_out(&mut self) -> Option<Outcome> {
        while let Some(action) = self.sup.next_action() {
            tracing::trace!(action = action.name(), "{action:?}");
            match action {
                Action::Spawn { slot, generation } => self.spawn(slot, generation),
                Action::Signal {
                    slot,
                    pid,
                    signal,
                    why,
                } => {
                    if let Err(e) = kill(pid, signal) {
                        debug!("kill({pid}, {}) failed: {e}", signal.as_str());
                    }
                    if matches!(
                        why,
                        action::SignalWhy::Stop(worker::Stop::HeartbeatMissed)
                            | action::SignalWhy::BootTimeout
                    ) {
                        say_if_stopped(slot, pid);
                    }
                    if let action::SignalWhy::Stop(stop) = why {
                        self.publish_stop(slot, pid, signal, stop);
                    }
                }
                Action::KillGroup { slot, pid, .. } => {
                    if kill_group(pid) {
                        warn!(
                            "worker {slot} (pid {pid}) left its process group (setpgid): \
                             SIGKILL to it and to that group; what it started in other groups \
                             is not ended with it"
                        );
                    }
                }
                Action::RestorePriority { slot, pid, boot } => {
                    restore_priority(&format!("worker {slot}"), pid, boot)
                }
                Action::AnswerClient { client, answer } => {
                    if let Some(c) = self.control.as_mut() {
                        c.reply(client, &answer);
                    }
                }
                Action::NotifySystemd(note) => match note {
                    Note::Ready(summary) => match self.systemd.ready(&summary) {
                        Ready::Told => self.serve_alone(),
                        Ready::Upgraded => self.upgraded(),
                        // The old master's queue is full: `retry` completes it.
                        Ready::Waits => {}
                    },
                    Note::Reloading => self.systemd.reloading(),
                    Note::Status(summary) => self.systemd.status(&summary),
                    Note::Stopping(asked) => self
                        .systemd
                        .stopping(asked.map(|(pace, cause)| (pace == Pace::Quick, cause))),
                },
                Action::CloseListeners {
                    listeners,
                    handover,
                } => self.close_listeners(listeners, handover),
                Action::CloseControl => self.control = None,
                Action::LoadConfig { .. } => self.load_config(),
                Action::StartUpgrade { client } => self.begin_upgrade(client),
                Action::ReopenLog {
                    forwarded,
                    deferred,
                } => self.reopen_log(forwarded, deferred),
                Action::Exit(outcome) => return Some(outcome),
                Action::Publish(kind) => {
                    self.obs.publish(kind);
                }
            }
        }
        None
    }

    /// Starts a worker of `generation` in `slot`, unless a later decision
    /// superseded it.
    fn spawn(&mut self, slot: u32, generation: Rc<Generation>) {
        if !self.sup.wants_spawn(&generation) {
            return;
        }
        let now = Instant::now();
        if generation.s.preload {
            return self.fork_from_template(slot, generation, now);
        }
        let (mut env, fds) = self.worker_env(&generation, slot);
        let g = &generation;
        // Its scoreboard record and, with capture_output, its output pipes.
        let io = self.obs.prepare_worker(slot, true);
        for (k, v) in &io.env {
            env.set(k, v);
        }
        // The exec is confirmed later, from the loop (`read_exec_reports`):
        // meanwhile the next worker can be forked while this one execs.
        let devnull = self.devnull.as_raw_fd();
        let low = self.sup.boot_priority(g);
        match spawn::spawn_async(&g.program, &env, &fds, devnull, io.output(), low) {
            Ok(started) => {
                self.obs.worker_started(slot, started.pid, io);
                let lowered = low.is_some();
                self.sup
                    .spawned(slot, generation.clone(), started.pid, lowered, now);
                self.exec_reports.push(started);
            }
            Err(
                spawn::SpawnError::Setup(Errno::EMFILE | Errno::ENFILE)
                | spawn::SpawnError::Fork(Errno::EAGAIN),
            ) if !self.exec_reports.is_empty() => {
                self.obs.worker_not_started(io);
                self.sup.spawn_deferred(slot)
            }
            Err(e) => {
                self.obs.worker_not_started(io);
                self.sup.spawn_failed(slot, g.number, false, e, now)
            }
        }
    }

    /// The environment and listener descriptors of a worker of `g` in `slot`
    /// (slot 0: a template).
    fn worker_env(&self, g: &Generation, slot: u32) -> (spawn::Env, Vec<RawFd>) {
        let mut env = g.env.clone();
        let fds = pass_listeners(&mut env, &g.listeners.borrow());
        env.set("NOTIFY_SOCKET", self.notify.path());
        env.set("DROVER_WORKER_ID", slot.to_string());
        env.set("DROVER_GENERATION", g.number.to_string());
        env.set(
            "DROVER_GRACEFUL_TIMEOUT",
            g.s.graceful_timeout.0.as_secs_f64().to_string(),
        );
        env.set(
            "DROVER_QUICK_TIMEOUT",
            g.s.quick_timeout.0.as_secs_f64().to_string(),
        );
        // Not for a template: drover does not bound its exit.
        if g.exits_idle() && slot != 0 {
            env.set("DROVER_EXIT_PRIORITY", "idle");
        }
        if let Some(t) = g.s.timeout {
            env.set("WATCHDOG_USEC", t.0.as_micros().to_string());
            env.set_child_pid("WATCHDOG_PID");
        }
        (env, fds)
    }

    /// Why this master cannot reload now: an upgrade is under way. We retire
    /// once the new master is ready, and it serves what it read at its
    /// start: a generation started here would be lost.
    fn reload_blocked(&self) -> Option<String> {
        let pid = self.upgrade_in_progress()?;
        Some(format!(
            "an upgrade is in progress: the new master (pid {pid}) serves the configuration \
             it read at its start once it is ready; reload it then (the pidfile and the \
             control socket are already its)"
        ))
    }

    /// `Action::LoadConfig`: read the config again and build the next
    /// generation next to the current one (sharing its unchanged sockets).
    fn load_config(&mut self) {
        // A reload queued behind a stopping generation before the upgrade.
        if let Some(why) = self.reload_blocked() {
            self.sup
                .config_loaded(Err(why), &self.source.origin(), Instant::now());
            return;
        }
        let number = self.sup.rollout.next_number();
        let current = self.sup.current().clone();
        let before = current.clone();
        let next = self
            .source
            .load()
            .map_err(|e| e.to_string())
            .and_then(|loaded| {
                Generation::build(
                    number,
                    loaded,
                    Vec::new(),
                    &current.listeners.borrow(),
                    self.master_switched,
                )
                .map_err(|e| e.to_string())
            })
            .and_then(|mut next| {
                next.boot = priority::check(&next.s, next.program.identity.as_ref())?;
                Ok(next)
            });
        self.sup
            .config_loaded(next, &self.source.origin(), Instant::now());
        // Hooks and capture_output follow the generation new workers start from.
        let current = self.sup.current().clone();
        self.obs.configure(&current.s);
        if current.number == number {
            for key in changed_start_only(&before.s, &current.s) {
                warn!("{key} changed: it is read only at start; the change takes effect at the next start or upgrade");
            }
        }
    }

    fn close_listeners(&mut self, listeners: listen::Set, handover: bool) {
        if !self.sup.shutting_down() {
            listen::close_unused(listeners, handover);
            return;
        }
        // Stage 1 of the shutdown: say what went.
        let began = Instant::now();
        // With no worker left (paused, or every slot between two workers),
        // nobody holds a copy: what waits in the queues is reset now.
        let lost = (!handover && self.sup.pool.workers.is_empty())
            .then(|| listen::queued(&listeners))
            .filter(|&n| n > 0);
        let closed = listen::close_unused(listeners, handover);
        let took = ms(began.elapsed());
        if let Some(n) = lost {
            warn!(
                "{n} connection(s) waiting in the listeners' queues had no worker to take them \
                 (none was running: paused, or every slot between two workers): reset at the close"
            );
        }
        if handover && self.successor_gone {
            info!(
                "closed {closed} listener(s) in {took} (the new master they were for has exited)"
            );
        } else if handover {
            info!("released {closed} listener(s) to the new master in {took}");
        } else {
            info!("closed {closed} listener(s) in {took}");
        }
    }

    /// SIGUSR1: reopen our log file (after logrotate moved it); the
    /// workers were told to do the same (the booting ones once ready).
    fn reopen_log(&mut self, forwarded: usize, deferred: usize) {
        if let Some(log) = &self.log {
            match log.reopen() {
                Ok(()) => info!("SIGUSR1: log file reopened"),
                Err(e) => error!("SIGUSR1: cannot reopen the log file: {e}"),
            }
        }
        if deferred == 0 {
            info!("SIGUSR1: forwarded to {forwarded} worker(s)");
        } else {
            info!(
                "SIGUSR1: forwarded to {forwarded} worker(s); {deferred} booting worker(s) get it once ready"
            );
        }
    }

    /// All reaping happens here: every child that has exited, workers or not.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    self.on_child_exit(pid, status);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid failed: {e}");
                    break;
                }
            }
        }
    }

    fn on_child_exit(&mut self, pid: Pid, status: WaitStatus) {
        let now = Instant::now();
        if self.sup.pool.has(pid) {
            // A child that reported and exited between the loop's read of
            // the reports and this reaping: its report is in the pipe now
            // (or the pipe is at its end).
            if let Some(i) = self.exec_reports.iter().position(|e| e.pid == pid) {
                let started = self.exec_reports.swap_remove(i);
                // Only a failure counts: an end of file now may be the
                // child's death before its exec, not an exec.
                if let Some(Err(e)) = started.poll() {
                    self.sup.on_exec_report(pid, Err(e.to_string()), now);
                }
            }
            let slot = self.sup.pool.workers[self.sup.pool.find(pid).expect("has")].slot;
            sweep_group(slot, pid);
            self.sup.on_exit(pid, status, now);
            self.obs.worker_gone(pid);
        } else if self.templates.has(pid) {
            self.on_template_exit(pid, status, now);
        } else if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
            self.on_upgrade_exit(status);
        } else if !self.obs.reaped(pid, &describe(status, None)) {
            // An orphan re-parented to us (subreaper or PID 1).
            debug!("reaped pid {pid}: {}", describe(status, None));
        }
    }
}

impl Master {
    /// A stop drover sent a worker, as an event.
    fn publish_stop(&mut self, slot: u32, pid: Pid, signal: Signal, stop: worker::Stop) {
        let generation = self
            .sup
            .pool
            .workers
            .iter()
            .find(|w| w.pid == pid)
            .map_or(0, |w| w.generation());
        let pid = pid.as_raw();
        let kind = match stop {
            worker::Stop::HeartbeatMissed => crate::events::Kind::WorkerAborted {
                slot,
                pid,
                generation,
            },
            _ => crate::events::Kind::WorkerStopping {
                slot,
                pid,
                generation,
                reason: stop.name().to_string(),
                signal: signal.as_str().to_string(),
            },
        };
        self.obs.publish(kind);
    }
}

/// Who sent a batch of notify datagrams, for the log of a flood: the
/// first few senders, and how many each sent.
#[derive(Default)]
struct Senders(Vec<(Pid, usize)>);

impl Senders {
    fn count(&mut self, pid: Pid) {
        if let Some((_, n)) = self.0.iter_mut().find(|(p, _)| *p == pid) {
            *n += 1;
        } else if self.0.len() < 8 {
            self.0.push((pid, 1));
        }
    }

    /// The sender of most datagrams.
    fn top(&self) -> Option<(Pid, usize)> {
        self.0.iter().copied().max_by_key(|(_, n)| *n)
    }
}

/// Socket activation, as systemd does it: `listeners` at fds 3.. (their
/// descriptors, returned in that order), named in `env`, with the slot for
/// the child's own pid in `LISTEN_PID`.
fn pass_listeners(env: &mut spawn::Env, listeners: &listen::Set) -> Vec<RawFd> {
    let names: Vec<&str> = listeners.iter().map(|(_, name)| name.as_str()).collect();
    env.set("LISTEN_FDS", listeners.len().to_string());
    env.set("LISTEN_FDNAMES", names.join(":"));
    env.set_child_pid("LISTEN_PID");
    listeners.iter().map(|(l, _)| l.fd.as_raw_fd()).collect()
}

/// SIGKILL to the process group drover gave `pid` (a worker's, a
/// template's: what it started ends with it) and to `pid` itself, which may
/// have left that group (`setpgid`): the group may still hold what it
/// started before, and a failed killpg was the only sign (before, a worker
/// that left while its child stayed was never killed, and the stop never
/// ended). True if `pid` had left its group.
pub(super) fn kill_group(pid: Pid) -> bool {
    let left = nix::unistd::getpgid(Some(pid)).is_ok_and(|g| g != pid);
    let _ = killpg(pid, Signal::SIGKILL);
    // Not reaped yet (drover reaps its children itself): the pid is still its.
    let _ = kill(pid, Signal::SIGKILL);
    left
}

/// SIGKILL to what a dead worker left in its process group. They would
/// otherwise outlive it unsupervised, holding its copies of the listeners
/// (connections queued there would never be served). The group's id stays
/// reserved while it has members; with none left, the kernel would have to
/// hand the just-freed pid to a new group leader in the microseconds since
/// it was reaped, which takes a wrap of the whole pid space.
fn sweep_group(slot: u32, pid: Pid) {
    if killpg(pid, Signal::SIGKILL).is_ok() {
        warn!("worker {slot} (pid {pid}) left processes in its process group: sent them SIGKILL");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn start_only_settings_are_settings() {
        for key in super::START_ONLY {
            assert!(crate::config::KEYS.contains(key), "{key} is no setting");
        }
    }
}

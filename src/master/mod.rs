//! The master: one single-threaded loop that waits for the next event or
//! deadline, then decides. Everything it calls is a plain function.
//!
//! Each turn: act on what is overdue (boot, heartbeat and grace deadlines),
//! settle a reload in progress, restore the worker count, then wait — on the
//! signal pipe, the notify socket and the control socket, for at most the time
//! until the nearest deadline, or forever when none is due.

mod generation;
mod liveness;
mod reload;
mod shutdown;
mod status;
mod upgrade;
mod worker;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::config::{Loaded, Ready, Source};
use crate::control::{self, Command, ControlSocket};
use crate::listen;
use crate::logfile::LogFile;
use crate::notify::{self, Message, NotifySocket};
use crate::pidfile::Pidfile;
use crate::sdnotify::Systemd;
use crate::signals::{Event, SignalPipe};
use crate::spawn;
use generation::Generation;
use reload::Reload;
use shutdown::{Cause, Shutdown};
use worker::{describe, exit_code, ms, State, Why, Worker};

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
    #[error(transparent)]
    Pidfile(#[from] crate::pidfile::PidfileError),
    #[error("cannot create the notify socket: {0}")]
    Notify(std::io::Error),
    #[error("cannot open /dev/null: {0}")]
    DevNull(std::io::Error),
    #[error("cannot become a child subreaper: {0}")]
    Subreaper(Errno),
    #[error("cannot run the worker command: {0}")]
    Program(spawn::SpawnError),
    #[error("{0}")]
    Identity(spawn::SpawnError),
    #[error("control socket {path}: {source}")]
    Control {
        path: String,
        source: std::io::Error,
    },
}

impl StartError {
    pub fn exit_status(&self) -> u8 {
        match self {
            StartError::Program(_) => exit::CANNOT_BOOT,
            StartError::Identity(_) => exit::USAGE,
            _ => exit::FAILURE,
        }
    }
}

/// The workers' program as a start would prepare it from `s` (user, group
/// and `PATH` lookups included), for `drover check`.
pub fn prepare(s: &crate::config::Settings) -> Result<spawn::Program, StartError> {
    generation::prepare(s, false).map(|(_, program)| program)
}

/// The most children forked and not yet confirmed exec'd at once. Each holds
/// a descriptor in the master until its report is read, and every child
/// inherits all of them until its exec: under a tight descriptor limit,
/// fewer (one, at worst, as a serial spawn).
fn max_execing() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        (soft.saturating_sub(64) / 4).clamp(1, 64) as usize
    })
}

/// The most workers drover runs (as for the `workers` setting).
const MAX_WORKERS: u32 = 4096;

/// A slot's respawn bookkeeping.
#[derive(Debug, Default, Clone)]
struct Slot {
    /// Consecutive quick failures.
    failures: u32,
    /// No spawn in this slot before then (the backoff).
    not_before: Option<Instant>,
    /// Workers started in this slot because the previous one exited on its
    /// own (crash, kill, max_requests); replacements drover asked for
    /// (reload, recycling) do not count.
    restarts: u32,
}

/// What serves one slot (see `Master::slot_view`).
#[derive(Debug, Default, Clone, Copy)]
struct SlotView {
    current: bool,
    current_booting: bool,
    outdated: bool,
    outdated_ready: bool,
    outdated_booting: bool,
}

pub struct Master {
    source: Source,
    /// The generation new workers are started from.
    gen: Generation,
    /// During a reload: the generation being replaced (kept for a rollback).
    previous: Option<Generation>,
    /// The number the next generation gets.
    next_generation: u32,
    reload: Option<Reload>,
    /// Reload requests waiting to start (with the control clients waiting
    /// for their verdict), see `begin_reload`.
    queued_reload: Option<Vec<control::ClientId>>,
    notify: NotifySocket,
    signals: SignalPipe,
    control: Option<ControlSocket>,
    systemd: Systemd,
    log: Option<LogFile>,
    pidfile: Option<Pidfile>,
    devnull: File,
    workers: Vec<Worker>,
    slots: Vec<Slot>,
    started: Instant,
    /// Every slot has had a ready worker: start-up is over.
    booted: bool,
    /// SIGWINCH: workers stopped, the master and its sockets kept.
    paused: bool,
    shutdown: Option<Shutdown>,
    upgrade: Option<upgrade::Upgrade>,
    /// When resident memory is next checked (with max_memory).
    next_memory_check: Option<Instant>,
    /// When WATCHDOG=1 is next due to our service manager.
    next_watchdog: Option<Instant>,
    /// `master_as_user`: the master switched to the workers' user at start.
    master_switched: bool,
    exe: upgrade::Exe,
}

/// Starts drover: binds, spawns the workers and supervises them until
/// shutdown. `first` is `source` as loaded by the caller. Returns the exit
/// status.
pub fn run(source: Source, first: Loaded, log: Option<LogFile>) -> Result<u8, StartError> {
    let started = Instant::now();
    // Before anything opens a descriptor: fds 3.. may be sockets from our parent.
    let inherited = listen::take_inherited()?;
    let exe = upgrade::Exe::saved();
    // Handlers next: a signal that arrives from now on is an event, not a death.
    let signals = SignalPipe::install().map_err(StartError::Signals)?;
    let systemd = Systemd::from_env();
    if first.settings.subreaper {
        // SAFETY: plain prctl on this process.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(StartError::Subreaper(Errno::last()));
        }
        debug!("child subreaper: orphans of workers are re-parented to drover");
    }
    // Before binding: a second drover on the same pidfile must be told that
    // another one runs, not that its address is in use.
    let pidfile = first
        .settings
        .pidfile
        .as_deref()
        .map(Pidfile::create)
        .transpose()?;
    let mut gen = Generation::build(1, first, inherited, &Vec::new(), false)?;
    let notify = NotifySocket::open(gen.owner()).map_err(StartError::Notify)?;
    let control = match &gen.s.control_socket {
        Some(path) => Some(
            ControlSocket::bind(path).map_err(|source| StartError::Control {
                path: path.display().to_string(),
                source,
            })?,
        ),
        None => None,
    };
    let devnull = spawn::open_devnull().map_err(StartError::DevNull)?;
    // Everything privileged is done: sockets bound, files created.
    let master_switched = gen.s.master_as_user && gen.program.identity.is_some();
    if let Some(id) = master_switched
        .then(|| gen.program.identity.take())
        .flatten()
    {
        // Our files become the user's, so that we can still remove them at
        // exit, and a new master of an upgrade (running as the user) can
        // take them over. Their directory must be writable by the user too:
        // see docs/operations.md.
        let (uid, gid) = (id.uid, id.gid);
        let chowned = pidfile
            .as_ref()
            .map_or(Ok(()), |p| p.chown(uid, gid))
            .and_then(|_| match &gen.s.control_socket {
                Some(path) => std::os::unix::fs::chown(path, uid, Some(gid)),
                None => Ok(()),
            });
        if let Err(e) = chowned {
            warn!("cannot give the pidfile or control socket to uid {uid:?}, gid {gid}: {e}");
        }
        // A new master of an upgrade starts as the user already (and could
        // not call setgroups); only root switches.
        let already = uid.is_none_or(|u| u == nix::unistd::getuid().as_raw())
            && gid == nix::unistd::getgid().as_raw();
        if !already {
            id.apply_to_self().map_err(StartError::Identity)?;
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
    }
    let mut master = Master {
        slots: vec![Slot::default(); gen.s.workers.0 as usize],
        next_memory_check: gen
            .s
            .max_memory
            .map(|_| started + gen.s.memory_check_interval.0),
        source,
        gen,
        previous: None,
        next_generation: 2,
        reload: None,
        queued_reload: None,
        notify,
        signals,
        control,
        systemd,
        log,
        pidfile,
        devnull,
        workers: Vec::new(),
        started,
        booted: false,
        paused: false,
        shutdown: None,
        upgrade: None,
        master_switched,
        next_watchdog: None,
        exe,
    };
    master.next_watchdog = master.systemd.watchdog.map(|w| started + w / 2);
    let status = master.run_loop();
    let status = master.finish(status);
    info!(
        "exiting with status {status} after {}",
        ms(started.elapsed())
    );
    Ok(status)
}

impl Master {
    fn run_loop(&mut self) -> Shutdown {
        loop {
            let now = Instant::now();
            self.enforce_deadlines(now);
            self.settle_reload();
            self.settle_upgrade(now);
            if self.shutdown.is_none() {
                self.restore_worker_count(now);
            }
            if let Some(sd) = &self.shutdown {
                if self.workers.is_empty() {
                    return sd.clone();
                }
            }
            let timeout = self
                .next_deadline(now)
                .map(|d| d.saturating_duration_since(now));
            self.wait(timeout);
        }
    }

    /// Blocks until a signal, a notify message, a control request, or `timeout`.
    fn wait(&mut self, timeout: Option<Duration>) {
        let timeout = match timeout {
            None => PollTimeout::NONE,
            // Round up, so that we do not wake a hair before the deadline and spin.
            Some(d) => {
                PollTimeout::try_from(d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32)
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = vec![
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.notify.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(c) = &self.control {
            fds.extend(c.poll_fds());
        }
        fds.extend(
            self.workers
                .iter()
                .filter_map(|w| w.exec.as_ref())
                .map(|e| PollFd::new(e.report.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                // Cannot happen with valid descriptors; do not spin on it.
                error!("poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        drop(fds);
        // Exec reports first: a child that could not exec is known as such
        // before its exit (status 127) is reaped.
        self.read_exec_reports();
        // Messages next: a worker's last words (STOPPING=1) are heard before
        // its exit is reaped and its pid forgotten.
        while let Some((pid, messages)) = self.notify.recv() {
            self.on_notify(pid, messages);
        }
        for event in self.signals.drain() {
            self.on_signal(event);
        }
        let requests = self
            .control
            .as_mut()
            .map(ControlSocket::read_requests)
            .unwrap_or_default();
        for (client, command) in requests {
            self.on_command(client, command);
        }
    }

    fn on_signal(&mut self, event: Event) {
        let name = event.signal_name();
        match event {
            Event::Child => self.reap(),
            Event::Terminate | Event::Interrupt => {
                // The same signal again during a graceful shutdown means "hurry".
                let quick = self.shutdown.as_ref().is_some_and(|sd| !sd.quick);
                self.begin_shutdown(quick, Cause::Signal(name));
            }
            Event::Quit => self.begin_shutdown(true, Cause::Signal(name)),
            _ if self.shutdown.is_some() => info!("{name}: ignored during shutdown"),
            Event::AddWorker if self.paused => self.resume(name),
            Event::AddWorker => self.scale(self.slots.len() as u32 + 1, name),
            Event::RemoveWorker => {
                self.scale((self.slots.len() as u32).saturating_sub(1).max(1), name)
            }
            Event::Reload => self.begin_reload(name, None),
            Event::ReopenLogs => self.reopen_logs(),
            Event::Upgrade => self.begin_upgrade(None),
            Event::StopWorkers => self.pause(name),
        }
    }

    /// A request from the control socket: the same operations as the signals,
    /// with an answer.
    fn on_command(&mut self, client: control::ClientId, command: Command) {
        match command {
            Command::Status => {
                let answer = self.status();
                self.reply(client, answer);
            }
            _ if self.shutdown.is_some() => self.reply(client, control::failure("shutting down")),
            Command::Reload => self.begin_reload("control: reload", Some(client)),
            Command::Scale { workers: n } if !(1..=MAX_WORKERS).contains(&n) => {
                self.reply(
                    client,
                    control::failure(&format!(
                        "cannot scale to {n}: from 1 to {MAX_WORKERS} workers"
                    )),
                );
            }
            Command::Scale { workers: n } => {
                if self.paused {
                    self.resume("control: scale");
                }
                self.scale(n, "control: scale");
                self.reply(client, control::success(&format!("scaled to {n} workers")));
            }
            Command::Stop { quick } => {
                self.reply(
                    client,
                    control::success(if quick {
                        "quick shutdown"
                    } else {
                        "graceful shutdown"
                    }),
                );
                self.begin_shutdown(quick, Cause::Signal("control: stop"));
            }
            Command::Upgrade => self.begin_upgrade(Some(client)),
        }
    }

    fn reply(&mut self, client: control::ClientId, answer: control::Answer) {
        if let Some(c) = self.control.as_mut() {
            c.reply(client, &answer);
        }
    }

    /// SIGUSR1: reopen our log file (after logrotate moved it) and tell the
    /// workers to do the same.
    fn reopen_logs(&mut self) {
        if let Some(log) = &self.log {
            match log.reopen() {
                Ok(()) => info!("SIGUSR1: log file reopened"),
                Err(e) => error!("SIGUSR1: cannot reopen the log file: {e}"),
            }
        }
        for w in &self.workers {
            let _ = kill(w.pid, Signal::SIGUSR1);
        }
        info!("SIGUSR1: forwarded to {} worker(s)", self.workers.len());
    }

    /// SIGWINCH: stop every worker gracefully; keep the master and the sockets.
    fn pause(&mut self, why: &str) {
        // A reload cannot settle without workers: end it, with a verdict,
        // and answer those waiting for a queued one (HUP resumes and reloads).
        if self.reload.as_ref().is_some_and(|r| !r.failed) {
            self.rollback(format!("{why} stopped the workers"));
        }
        self.cancel_queued_reload(&format!(
            "{why} stopped the workers; HUP resumes and reloads"
        ));
        self.paused = true;
        let (signal, deadline) = (
            self.gen.s.stop_signal.0,
            Instant::now() + self.gen.s.graceful_timeout.0,
        );
        info!(
            "{why}: stopping all {} worker(s); the sockets stay open (SIGHUP or SIGTTIN resumes)",
            self.workers.len()
        );
        for w in self.workers.iter_mut().filter(|w| !w.is_stopping()) {
            stop(w, signal, deadline, Why::Retired);
        }
    }

    fn resume(&mut self, why: &str) {
        self.paused = false;
        info!("{why}: resuming with {} worker(s)", self.slots.len());
    }

    /// All reaping happens here: every child that has exited, workers or not.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    if let Some(i) = self.workers.iter().position(|w| w.pid == pid) {
                        let mut w = self.workers.swap_remove(i);
                        // A child that reported and exited between the loop's
                        // read of the reports and this reaping: its report
                        // is in the pipe now (or the pipe is at its end).
                        if let Some(Err(e)) = w.exec.take().and_then(|e| e.poll()) {
                            w.exec_failed = true;
                            self.spawn_failed(&w, e);
                        }
                        sweep_group(&w);
                        self.on_worker_exit(w, status);
                    } else if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
                        self.on_upgrade_exit(status);
                    } else {
                        // An orphan re-parented to us (subreaper or PID 1).
                        debug!("reaped pid {pid}: {}", describe(status, None));
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid failed: {e}");
                    break;
                }
            }
        }
    }

    fn on_worker_exit(&mut self, w: Worker, status: WaitStatus) {
        let now = Instant::now();
        let lived = now - w.started;
        let why = describe(status, w.killed);
        let (slot, pid) = (w.slot, w.pid);
        if w.exec_failed {
            debug!("worker {slot} (pid {pid}), which could not exec, {why}");
            return;
        }
        if let State::Stopping {
            why: stopped_for, ..
        } = w.state
        {
            let context = match stopped_for {
                Why::HeartbeatTimeout if w.killed.is_none() => {
                    " (heartbeat timeout: SIGABRT)".to_string()
                }
                Why::HeartbeatTimeout => String::new(),
                Why::Recycled(reason) => format!(" (recycled: {reason})"),
                Why::Retired => " (retired)".to_string(),
                Why::Shutdown => String::new(),
            };
            info!(
                "worker {slot} (pid {pid}) {why}{context} after {}",
                ms(lived)
            );
            return;
        }
        if self.shutdown.is_some() {
            info!("worker {slot} (pid {pid}) {why} after {}", ms(lived));
            return;
        }
        if w.is_booting() && self.reload.is_some() && w.generation == self.gen.number {
            self.rollback(format!(
                "worker {slot} (pid {pid}) of the new generation {why} before it was ready"
            ));
            return;
        }
        if let Some(when) = self
            .cannot_boot(&w, now)
            .filter(|_| exit_code(status) == Some(3))
        {
            error!(
                "worker {slot} (pid {pid}) cannot boot: {why} {when}; \
                 stopping (check the worker's output above)"
            );
            self.begin_shutdown(false, Cause::CannotBoot);
            return;
        }
        if slot as usize > self.slots.len() {
            info!("worker {slot} (pid {pid}) {why}; its slot was removed");
            return;
        }
        self.slots[slot as usize - 1].restarts += 1;
        // A worker that served stably, or that announced its own exit after
        // serving, is replaced at once; one that keeps failing (including
        // at boot) waits longer each time.
        let served = !w.is_booting();
        let planned = served && w.said_stopping && exit_code(status) == Some(0);
        if planned || (served && lived >= self.gen.s.respawn_reset_after.0) {
            self.slots[slot as usize - 1].failures = 0;
            warn!(
                "worker {slot} (pid {pid}) {why} after {}; respawning now",
                ms(lived)
            );
        } else {
            let (delay, failures) = self.slot_failed(slot, now);
            warn!(
                "worker {slot} (pid {pid}) {why} after {}; respawning in {} (failure {failures} in a row)",
                ms(lived),
                ms(delay),
            );
        }
    }

    /// Whether an exit with status 3 of `w` means "cannot boot" (stop with
    /// status 3 rather than respawn), and when it happened in words. With
    /// `ready = "notify"`: before `READY=1`, during start-up. With
    /// `ready = "spawn"`, where nothing is reported: within `boot_timeout`
    /// of drover's start, in the first generation (as Gunicorn halts on its
    /// workers' boot error), so that an app that cannot import does not
    /// respawn forever.
    fn cannot_boot(&self, w: &Worker, now: Instant) -> Option<String> {
        let boot_timeout = self.gen.s.boot_timeout;
        match self.gen.s.ready {
            Ready::Notify => {
                (w.is_booting() && !self.booted).then(|| "before it reported ready".to_string())
            }
            Ready::Spawn => {
                (w.generation == 1 && self.reload.is_none() && now - self.started < boot_timeout.0)
                    .then(|| {
                        format!("within boot_timeout ({boot_timeout}) of start (ready = \"spawn\")")
                    })
            }
        }
    }

    /// Counts a failure of `slot` and holds its next spawn for the backoff.
    /// Returns the delay and the number of failures in a row.
    fn slot_failed(&mut self, slot: u32, now: Instant) -> (Duration, u32) {
        let (first, max) = (self.gen.s.respawn_delay.0, self.gen.s.respawn_max_delay.0);
        let Some(s) = self.slots.get_mut(slot as usize - 1) else {
            return (Duration::ZERO, 0);
        };
        s.failures += 1;
        let delay = backoff(s.failures, first, max);
        s.not_before = Some(now + delay);
        if s.failures == self.gen.s.degraded_after.0 {
            error!(
                "slot {slot} is degraded: {} failures in a row; retrying every {} at most",
                s.failures,
                ms(max)
            );
        }
        (delay, s.failures)
    }

    fn on_notify(&mut self, sender: Pid, messages: Vec<Message>) {
        if self.upgrade.as_ref().is_some_and(|u| u.pid == sender) {
            self.on_upgrade_notify(messages);
            return;
        }
        let owner = notify::descends_from(sender, |p| self.workers.iter().any(|w| w.pid == p));
        let Some(i) = owner.and_then(|p| self.workers.iter().position(|w| w.pid == p)) else {
            debug!("notify message from pid {sender} ignored: not a worker or a descendant of one");
            return;
        };
        let timeout = self.gen.s.timeout.map(|t| t.0);
        for m in messages {
            let w = &mut self.workers[i];
            let (slot, pid) = (w.slot, w.pid);
            match m {
                Message::Ready if w.is_booting() => {
                    w.state = State::Ready {
                        heartbeat: timeout.map(|t| Instant::now() + t),
                    };
                    info!(
                        "worker {slot} (pid {pid}) ready in {}",
                        ms(w.started.elapsed())
                    );
                    self.on_ready(i);
                }
                Message::Ready => debug!("worker {slot} (pid {pid}) repeated READY=1"),
                Message::Watchdog => {
                    if let (State::Ready { heartbeat: Some(h) }, Some(t)) = (&mut w.state, timeout)
                    {
                        *h = Instant::now() + t;
                    }
                }
                Message::ExtendTimeout(by) => {
                    w.extend(Instant::now() + by);
                    debug!(
                        "worker {slot} (pid {pid}) extended its deadline by {}",
                        ms(by)
                    );
                }
                Message::Status(text) => {
                    info!("worker {slot} (pid {pid}) status: {text}");
                    w.status = Some(text);
                }
                Message::Stopping => {
                    w.said_stopping = true;
                    info!("worker {slot} (pid {pid}) is stopping");
                }
                other => debug!("worker {slot} (pid {pid}) sent {other:?}"),
            }
        }
    }

    /// Worker `i` became ready. If it belongs to the current generation, the
    /// worker it replaces (same slot: older generation, or marked for
    /// replacement) can now stop.
    fn on_ready(&mut self, i: usize) {
        let (slot, pid, generation) = (
            self.workers[i].slot,
            self.workers[i].pid,
            self.workers[i].generation,
        );
        if generation == self.gen.number {
            let deadline = Instant::now() + self.gen.s.graceful_timeout.0;
            let signal = self.gen.s.stop_signal.0;
            let current = self.gen.number;
            for old in self
                .workers
                .iter_mut()
                .filter(|w| w.slot == slot && w.pid != pid && !w.is_stopping())
            {
                let reason = old.replace.unwrap_or(if old.generation != current {
                    "reload"
                } else {
                    "replaced"
                });
                info!(
                    "worker {slot} (pid {}) replaced by pid {pid} ({reason}): sending {}",
                    old.pid,
                    signal.as_str()
                );
                stop(old, signal, deadline, Why::Recycled(reason));
            }
        }
        self.check_booted();
    }

    fn check_booted(&mut self) {
        if self.booted || self.shutdown.is_some() {
            return;
        }
        let ready = self.workers.iter().filter(|w| w.is_ready()).count();
        if ready >= self.slots.len() {
            self.booted = true;
            info!(
                "all {ready} workers ready {} after start",
                ms(self.started.elapsed())
            );
            self.systemd.ready(&self.summary());
        }
    }

    /// Gives every slot a worker of the current generation: starts one where
    /// a slot has none (after its backoff), or where its worker is outdated
    /// (older generation, or marked for replacement) — at most `max_surge`
    /// such replacements booting at once; the outdated worker keeps serving
    /// until its successor is ready. Retires workers of removed slots.
    fn restore_worker_count(&mut self, now: Instant) {
        if self.paused {
            return;
        }
        // One pass over the workers, not one per slot: with a thousand
        // workers this runs after every READY=1 of the start-up.
        let view = self.slot_view();
        let mut surging = view
            .iter()
            .filter(|v| v.current_booting && v.outdated)
            .count() as u32;
        let mut execing = self.workers.iter().filter(|w| w.exec.is_some()).count();
        for (i, v) in view.iter().enumerate() {
            let slot = i as u32 + 1;
            if v.current || self.slots[i].not_before.is_some_and(|t| t > now) {
                continue;
            }
            // Each child on its way to exec holds a descriptor here: go on
            // once some have reported (the loop wakes up for them).
            if execing >= max_execing() {
                break;
            }
            let replacing = v.outdated_ready;
            if replacing && surging >= self.gen.s.max_surge.0 {
                continue;
            }
            if v.outdated_booting {
                // An outdated worker that is not even ready serves nothing: stop it.
                let signal = self.gen.s.stop_signal.0;
                let deadline = now + self.gen.s.graceful_timeout.0;
                for w in self
                    .workers
                    .iter_mut()
                    .filter(|w| w.slot == slot && w.is_booting())
                {
                    stop(w, signal, deadline, Why::Retired);
                }
            }
            surging += replacing as u32;
            execing += 1;
            if !self.spawn_worker(slot, now) {
                break;
            }
            if self.shutdown.is_some() || self.reload.as_ref().is_some_and(|r| r.failed) {
                return;
            }
        }
        let graceful = self.gen.s.graceful_timeout.0;
        let signal = self.gen.s.stop_signal.0;
        let count = self.slots.len() as u32;
        for w in self
            .workers
            .iter_mut()
            .filter(|w| w.slot > count && !w.is_stopping())
        {
            info!(
                "worker {} (pid {}) retired: sending {}",
                w.slot,
                w.pid,
                signal.as_str()
            );
            stop(w, signal, now + graceful, Why::Retired);
        }
    }

    /// What serves each slot, from the workers not stopping. A current
    /// worker is of the current generation and not marked for replacement;
    /// any other is outdated.
    fn slot_view(&self) -> Vec<SlotView> {
        let current = self.gen.number;
        let mut view = vec![SlotView::default(); self.slots.len()];
        for w in self.workers.iter().filter(|w| !w.is_stopping()) {
            let Some(v) = view.get_mut(w.slot as usize - 1) else {
                continue;
            };
            if w.generation == current && w.replace.is_none() {
                v.current = true;
                v.current_booting |= w.is_booting();
            } else {
                v.outdated = true;
                v.outdated_ready |= w.is_ready();
                v.outdated_booting |= w.is_booting();
            }
        }
        view
    }

    /// Starts a worker in `slot`. Returns false when spawning should stop
    /// for this turn.
    fn spawn_worker(&mut self, slot: u32, now: Instant) -> bool {
        let g = &self.gen;
        let mut env = g.env.clone();
        let names: Vec<&str> = g.listeners.iter().map(|(_, name)| name.as_str()).collect();
        env.set("LISTEN_FDS", g.listeners.len().to_string());
        env.set("LISTEN_FDNAMES", names.join(":"));
        env.set_child_pid("LISTEN_PID");
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
        if let Some(t) = g.s.timeout {
            env.set("WATCHDOG_USEC", t.0.as_micros().to_string());
            env.set_child_pid("WATCHDOG_PID");
        }
        let fds: Vec<RawFd> = g.listeners.iter().map(|(l, _)| l.fd.as_raw_fd()).collect();
        // The exec is confirmed later, from the loop (`read_exec_reports`):
        // meanwhile the next worker can be forked while this one execs.
        match spawn::spawn_async(&g.program, &env, &fds, self.devnull.as_raw_fd()) {
            Ok(started) => {
                let pid = started.pid;
                // Booting until its exec is confirmed, whatever `ready` says.
                let state = State::Booting {
                    deadline: Some(now + g.s.boot_timeout.0),
                };
                info!("worker {slot} (pid {pid}) spawned, generation {}", g.number);
                let recycle_at =
                    g.s.max_age
                        .map(|age| now + age.0 + liveness::jitter(g.s.max_age_jitter.0, pid));
                let s = &mut self.slots[slot as usize - 1];
                // The backoff is over: without this, its past instant would
                // stay the nearest deadline and the loop would spin.
                s.not_before = None;
                let mut w = Worker::new(slot, pid, g.number, state, now, recycle_at);
                w.exec = Some(started);
                w.ready_on_exec = g.s.ready == Ready::Spawn;
                w.heartbeat_every = g.s.timeout.map(|t| t.0);
                self.workers.push(w);
                true
            }
            // Out of descriptors or processes while other children are on
            // their way to exec: not this worker's fault. Wait for their
            // reports (the loop wakes up for them) and go on.
            Err(
                spawn::SpawnError::Setup(Errno::EMFILE | Errno::ENFILE)
                | spawn::SpawnError::Fork(Errno::EAGAIN),
            ) if self.workers.iter().any(|w| w.exec.is_some()) => {
                debug!("worker {slot}: out of descriptors or processes; spawning the rest later");
                false
            }
            Err(e) => {
                let number = g.number;
                self.on_spawn_failure(slot, number, false, e);
                true
            }
        }
    }

    /// Reads the exec reports that have arrived: a worker that exec'd is
    /// running (and, with `ready = "spawn"`, ready); one that could not is a
    /// failed spawn.
    fn read_exec_reports(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.workers.len() {
            let w = &mut self.workers[i];
            let Some(report) = w.exec.as_ref().and_then(|e| e.poll()) else {
                i += 1;
                continue;
            };
            w.exec = None;
            match report {
                Ok(()) if w.ready_on_exec && w.is_booting() => {
                    w.state = State::Ready {
                        heartbeat: w.heartbeat_every.map(|t| now + t),
                    };
                    self.on_ready(i);
                }
                Ok(()) => {}
                Err(e) => {
                    w.exec_failed = true;
                    let w = &self.workers[i];
                    let (slot, generation, stopping) = (w.slot, w.generation, w.is_stopping());
                    self.on_spawn_failure(slot, generation, stopping, e);
                }
            }
            i += 1;
        }
    }

    fn spawn_failed(&mut self, w: &Worker, e: spawn::SpawnError) {
        self.on_spawn_failure(w.slot, w.generation, w.is_stopping(), e);
    }

    /// A worker of `slot` could not be started: roll a reload back, stop at
    /// start-up, or try again after the backoff. A worker no longer wanted
    /// (stopping, or of a generation rolled back) only says why.
    fn on_spawn_failure(
        &mut self,
        slot: u32,
        generation: u32,
        stopping: bool,
        e: spawn::SpawnError,
    ) {
        let reloading = self.reload.as_ref().is_some_and(|r| !r.failed);
        if stopping || generation != self.gen.number || self.shutdown.is_some() {
            info!("worker {slot} (generation {generation}) could not be spawned: {e}");
        } else if reloading {
            self.rollback(format!("worker {slot} cannot be spawned: {e}"));
        } else if !self.booted {
            error!("worker {slot} cannot boot: {e}");
            self.begin_shutdown(false, Cause::CannotBoot);
        } else {
            let (delay, _) = self.slot_failed(slot, Instant::now());
            error!(
                "worker {slot} cannot be spawned: {e}; retrying in {}",
                ms(delay)
            );
        }
    }

    fn scale(&mut self, count: u32, why: &str) {
        let count = count.clamp(1, MAX_WORKERS);
        info!("{why}: {} -> {count} workers", self.slots.len());
        self.slots.resize(count as usize, Slot::default());
        self.systemd.status(&self.summary());
    }
}

/// SIGKILL to what a dead worker left in its process group. They would
/// otherwise outlive it unsupervised, holding its copies of the listeners
/// (connections queued there would never be served). The group's id stays
/// reserved while it has members; with none left, the kernel would have to
/// hand the just-freed pid to a new group leader in the microseconds since
/// it was reaped, which takes a wrap of the whole pid space.
fn sweep_group(w: &Worker) {
    if killpg(w.pid, Signal::SIGKILL).is_ok() {
        warn!(
            "worker {} (pid {}) left processes in its process group: sent them SIGKILL",
            w.slot, w.pid
        );
    }
}

/// Asks a worker to stop, with a deadline after which it is killed.
fn stop(w: &mut Worker, signal: Signal, deadline: Instant, why: Why) {
    if let Err(e) = kill(w.pid, signal) {
        debug!("kill({}, {}) failed: {e}", w.pid, signal.as_str());
    }
    w.state = State::Stopping { deadline, why };
}

/// The delay before the `failures`-th consecutive respawn: doubling from
/// `first`, capped at `max`.
fn backoff(failures: u32, first: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    first.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (f, m) = (Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (1..=6).map(|n| backoff(n, f, m).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(200, f, m), m);
    }
}

//! The master: one single-threaded loop that waits for the next event or
//! deadline, then decides. Everything it calls is a plain function.
//!
//! Each turn: act on what is overdue (boot and grace deadlines), restore the
//! worker count, then wait — on the signal pipe and the notify socket, for at
//! most the time until the nearest deadline, or forever when none is due.

mod liveness;
mod shutdown;
mod worker;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use crate::config::{Ready, Settings};
use crate::listen::{self, Listener};
use crate::notify::{self, Message, NotifySocket};
use crate::pidfile::Pidfile;
use crate::signals::{Event, SignalPipe};
use crate::spawn::{self, Env, Identity, Program};
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

/// Why the master could not start.
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
}

impl StartError {
    pub fn exit_status(&self) -> u8 {
        match self {
            StartError::Program(_) => exit::CANNOT_BOOT,
            _ => exit::FAILURE,
        }
    }
}

/// A slot's respawn bookkeeping.
#[derive(Debug, Default, Clone)]
struct Slot {
    /// Consecutive quick failures.
    failures: u32,
    /// No spawn in this slot before then (the backoff).
    not_before: Option<Instant>,
}

pub struct Master {
    s: Settings,
    listeners: Vec<Listener>,
    notify: NotifySocket,
    signals: SignalPipe,
    program: Program,
    env: Env,
    devnull: File,
    workers: Vec<Worker>,
    slots: Vec<Slot>,
    generation: u32,
    started: Instant,
    /// Every slot has had a ready worker: start-up is over.
    booted: bool,
    shutdown: Option<Shutdown>,
    /// When resident memory is next checked (with max_memory).
    next_memory_check: Option<Instant>,
}

/// Starts drover with `s`: binds, spawns the workers and supervises them until
/// shutdown. Returns the exit status.
pub fn run(s: Settings, bind_was_set: bool) -> Result<u8, StartError> {
    let started = Instant::now();
    // Before anything opens a descriptor: fds 3.. may be sockets from our parent.
    let inherited = listen::take_inherited()?;
    // Handlers next: a signal that arrives from now on is an event, not a death.
    let signals = SignalPipe::install().map_err(StartError::Signals)?;
    if s.subreaper {
        // SAFETY: plain prctl on this process.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(StartError::Subreaper(Errno::last()));
        }
        debug!("child subreaper: orphans of workers are re-parented to drover");
    }
    let listeners = listen::open_all(&s, bind_was_set, inherited)?;
    for l in &listeners {
        info!("listening on {} (fd name {:?})", l.shown, l.name);
    }
    let pidfile = s.pidfile.as_deref().map(Pidfile::create).transpose()?;
    let mut env = Env::inherit(&s.env_remove);
    for (k, v) in &s.env {
        env.set(k, v);
    }
    let identity = Identity::resolve(s.user.as_deref(), s.group.as_deref()).map_err(StartError::Program)?;
    let program = Program::new(&s.command, env.get("PATH"))
        .and_then(|p| p.with(identity, s.chdir.as_deref(), s.umask.map(|m| m.0)))
        .map_err(StartError::Program)?;
    // Reachable by the workers' user only (and by us).
    let owner = program.identity.as_ref().map(|id| (id.uid.unwrap_or_else(|| nix::unistd::getuid().as_raw()), id.gid));
    let notify = NotifySocket::open(owner).map_err(StartError::Notify)?;
    let devnull = spawn::open_devnull().map_err(StartError::DevNull)?;
    let mut master = Master {
        slots: vec![Slot::default(); s.workers.0 as usize],
        s,
        listeners,
        notify,
        signals,
        program,
        env,
        devnull,
        workers: Vec::new(),
        generation: 1,
        started,
        booted: false,
        shutdown: None,
        next_memory_check: None,
    };
    master.next_memory_check = master.s.max_memory.map(|_| started + master.s.memory_check_interval.0);
    let status = master.run_loop();
    let status = master.finish(status);
    drop(pidfile);
    info!("exiting with status {status} after {}", ms(started.elapsed()));
    Ok(status)
}

impl Master {
    fn run_loop(&mut self) -> Shutdown {
        loop {
            let now = Instant::now();
            self.enforce_deadlines(now);
            if self.shutdown.is_none() {
                self.restore_worker_count(now);
            }
            if let Some(sd) = &self.shutdown {
                if self.workers.is_empty() {
                    return sd.clone();
                }
            }
            let timeout = self.next_deadline().map(|d| d.saturating_duration_since(now));
            self.wait(timeout);
        }
    }

    /// Blocks until a signal, a notify message, or `timeout`.
    fn wait(&mut self, timeout: Option<Duration>) {
        let timeout = match timeout {
            None => PollTimeout::NONE,
            // Round up, so that we do not wake a hair before the deadline and spin.
            Some(d) => PollTimeout::try_from(d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.notify.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                // Cannot happen with valid descriptors; do not spin on it.
                error!("poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Messages first: a worker's last words (STOPPING=1) are heard before
        // its exit is reaped and its pid forgotten.
        while let Some((pid, messages)) = self.notify.recv() {
            self.on_notify(pid, messages);
        }
        for event in self.signals.drain() {
            self.on_signal(event);
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
            Event::AddWorker | Event::RemoveWorker if self.shutdown.is_some() => {
                info!("{name}: ignored during shutdown");
            }
            Event::AddWorker => self.scale(self.slots.len() as u32 + 1, name),
            Event::RemoveWorker => self.scale((self.slots.len() as u32).saturating_sub(1).max(1), name),
            Event::Reload | Event::ReopenLogs | Event::Upgrade | Event::StopWorkers => {
                warn!("{name}: not implemented in this version; ignored");
            }
        }
    }

    /// All reaping happens here: every child that has exited, workers or not.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    match self.workers.iter().position(|w| w.pid == pid) {
                        Some(i) => {
                            let w = self.workers.swap_remove(i);
                            self.on_worker_exit(w, status);
                        }
                        // An orphan re-parented to us (subreaper or PID 1).
                        None => debug!("reaped pid {pid}: {}", describe(status, None)),
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
        if let State::Stopping { why: stopped_for, .. } = w.state {
            let context = match stopped_for {
                Why::HeartbeatTimeout => " (heartbeat timeout: SIGABRT)".to_string(),
                Why::Recycled(reason) => format!(" (recycled: {reason})"),
                Why::Retired => " (retired)".to_string(),
                Why::Shutdown => String::new(),
            };
            info!("worker {slot} (pid {pid}) {why}{context} after {}", ms(lived));
            return;
        }
        if self.shutdown.is_some() {
            info!("worker {slot} (pid {pid}) {why} after {}", ms(lived));
            return;
        }
        if w.is_booting() && exit_code(status) == Some(3) && !self.booted {
            error!(
                "worker {slot} (pid {pid}) cannot boot: {why} before it reported ready; \
                 stopping (check the worker's output above)"
            );
            self.begin_shutdown(false, Cause::CannotBoot);
            return;
        }
        let Some(s) = self.slots.get_mut(slot as usize - 1) else {
            info!("worker {slot} (pid {pid}) {why}; its slot was removed");
            return;
        };
        // A worker that ran stably, or that announced its own exit, is
        // replaced at once; one that keeps failing waits longer each time.
        let planned = w.said_stopping && exit_code(status) == Some(0);
        if planned || lived >= self.s.respawn_reset_after.0 {
            s.failures = 0;
            s.not_before = None;
            warn!("worker {slot} (pid {pid}) {why} after {}; respawning now", ms(lived));
        } else {
            s.failures += 1;
            let delay = backoff(s.failures, self.s.respawn_delay.0, self.s.respawn_max_delay.0);
            s.not_before = Some(now + delay);
            warn!(
                "worker {slot} (pid {pid}) {why} after {}; respawning in {} (failure {} in a row)",
                ms(lived),
                ms(delay),
                s.failures
            );
            if s.failures == self.s.degraded_after.0 {
                error!(
                    "slot {slot} is degraded: {} failures in a row; retrying every {} at most",
                    s.failures,
                    ms(self.s.respawn_max_delay.0)
                );
            }
        }
    }

    fn on_notify(&mut self, sender: Pid, messages: Vec<Message>) {
        let owner = notify::descends_from(sender, |p| self.workers.iter().any(|w| w.pid == p));
        let Some(i) = owner.and_then(|p| self.workers.iter().position(|w| w.pid == p)) else {
            debug!("notify message from pid {sender} ignored: not a worker or a descendant of one");
            return;
        };
        for m in messages {
            let w = &mut self.workers[i];
            let (slot, pid) = (w.slot, w.pid);
            match m {
                Message::Ready if w.is_booting() => {
                    w.state = State::Ready { heartbeat: self.s.timeout.map(|t| Instant::now() + t.0) };
                    info!("worker {slot} (pid {pid}) ready in {}", ms(w.started.elapsed()));
                    self.on_ready(slot, pid);
                }
                Message::Watchdog => {
                    if let State::Ready { heartbeat: Some(h) } = &mut w.state {
                        *h = Instant::now() + self.s.timeout.map_or(Duration::ZERO, |t| t.0);
                    }
                }
                Message::ExtendTimeout(by) => {
                    w.extend(Instant::now() + by);
                    debug!("worker {slot} (pid {pid}) extended its deadline by {}", ms(by));
                }
                Message::Ready => debug!("worker {slot} (pid {pid}) repeated READY=1"),
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

    /// A worker became ready: start-up may be over, and the worker it
    /// replaces (same slot, marked for replacement) can now stop.
    fn on_ready(&mut self, slot: u32, pid: Pid) {
        self.check_booted();
        let deadline = Instant::now() + self.s.graceful_timeout.0;
        let signal = self.s.stop_signal.0;
        for old in self.workers.iter_mut().filter(|w| w.slot == slot && w.pid != pid && !w.is_stopping()) {
            let reason = old.replace.unwrap_or("replaced");
            info!("worker {slot} (pid {}) replaced by pid {pid} ({reason}): sending {}", old.pid, signal.as_str());
            stop(old, signal, deadline, Why::Recycled(reason));
        }
    }

    fn check_booted(&mut self) {
        if self.booted || self.shutdown.is_some() {
            return;
        }
        let ready = self.workers.iter().filter(|w| w.is_ready()).count();
        if ready >= self.slots.len() {
            self.booted = true;
            info!("all {ready} workers ready {} after start", ms(self.started.elapsed()));
        }
    }

    /// Starts a worker in every empty slot whose backoff has passed, and
    /// retires workers whose slot no longer exists.
    fn restore_worker_count(&mut self, now: Instant) {
        for slot in 1..=self.slots.len() as u32 {
            // A slot needs a worker when it has none that is serving or
            // booting, other than one marked for replacement (it keeps serving
            // until its successor is ready: capacity never drops).
            let mut active = self.workers.iter().filter(|w| w.slot == slot && !w.is_stopping());
            let needs = match (active.next(), active.next()) {
                (None, _) => true,
                (Some(w), None) => w.replace.is_some() && w.is_ready(),
                _ => false,
            };
            let waiting = self.slots[slot as usize - 1].not_before.is_some_and(|t| t > now);
            if needs && !waiting {
                self.spawn_worker(slot, now);
                if self.shutdown.is_some() {
                    return;
                }
            }
        }
        let graceful = self.s.graceful_timeout.0;
        let signal = self.s.stop_signal.0;
        let count = self.slots.len() as u32;
        for w in self.workers.iter_mut().filter(|w| w.slot > count && !w.is_stopping()) {
            info!("worker {} (pid {}) retired: sending {}", w.slot, w.pid, signal.as_str());
            stop(w, signal, now + graceful, Why::Retired);
        }
    }

    fn spawn_worker(&mut self, slot: u32, now: Instant) {
        let mut env = self.env.clone();
        let names: Vec<&str> = self.listeners.iter().map(|l| l.name.as_str()).collect();
        env.set("LISTEN_FDS", self.listeners.len().to_string());
        env.set("LISTEN_FDNAMES", names.join(":"));
        env.set_child_pid("LISTEN_PID");
        env.set("NOTIFY_SOCKET", self.notify.path());
        env.set("DROVER_WORKER_ID", slot.to_string());
        env.set("DROVER_GENERATION", self.generation.to_string());
        env.set("DROVER_GRACEFUL_TIMEOUT", self.s.graceful_timeout.0.as_secs_f64().to_string());
        if let Some(t) = self.s.timeout {
            env.set("WATCHDOG_USEC", t.0.as_micros().to_string());
            env.set_child_pid("WATCHDOG_PID");
        }
        let fds: Vec<RawFd> = self.listeners.iter().map(|l| l.fd.as_raw_fd()).collect();
        match spawn::spawn(&self.program, &env, &fds, self.devnull.as_raw_fd()) {
            Ok(pid) => {
                let state = match self.s.ready {
                    Ready::Spawn => State::Ready { heartbeat: self.s.timeout.map(|t| now + t.0) },
                    Ready::Notify => State::Booting { deadline: Some(now + self.s.boot_timeout.0) },
                };
                info!("worker {slot} (pid {pid}) spawned, generation {}", self.generation);
                let recycle_at = self.s.max_age.map(|age| now + age.0 + liveness::jitter(self.s.max_age_jitter.0, pid));
                let ready = matches!(state, State::Ready { .. });
                self.workers.push(Worker::new(slot, pid, state, now, recycle_at));
                if ready {
                    self.on_ready(slot, pid);
                }
            }
            Err(e) if !self.booted => {
                error!("worker {slot} cannot boot: {e}");
                self.begin_shutdown(false, Cause::CannotBoot);
            }
            Err(e) => {
                let s = &mut self.slots[slot as usize - 1];
                s.failures += 1;
                let delay = backoff(s.failures, self.s.respawn_delay.0, self.s.respawn_max_delay.0);
                s.not_before = Some(now + delay);
                error!("worker {slot} cannot be spawned: {e}; retrying in {}", ms(delay));
            }
        }
    }

    fn scale(&mut self, count: u32, why: &str) {
        info!("{why}: {} -> {count} workers", self.slots.len());
        self.slots.resize(count as usize, Slot::default());
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
    let factor = 1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX);
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

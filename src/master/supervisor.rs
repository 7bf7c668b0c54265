//! The decisions. The `Supervisor` holds the master's state (the pool, the
//! rollout, the phase) and no descriptor: each event (a signal, a control
//! request, a notify message, an exec report, a worker's exit, a passed
//! deadline) is a method that changes that state and queues what to do as
//! `Action`s, which `Master::carry_out` performs. So every decision can be
//! driven and checked without a process (see the tests at the end).

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tracing::{debug, error, info, warn};

use super::action::{Action, Note, SignalWhy};
use super::generation::Generation;
use super::pool::Pool;
use super::rollout::{Rollout, Settled};
use super::shutdown::{Cause, Shutdown};
use super::worker::{
    describe, exit_code, ms, Kill, Pace, Replace, State, Stop, Worker, PRIORITY_RECHECK,
    STATUS_LINES_PER_SECOND,
};
use crate::config::{Dur, Ready, MAX_WORKERS};
use crate::control::{self, ClientId, Command};
use crate::events::{ExitCause, Kind};
use crate::notify::Message;
use crate::readiness;
use crate::signals::Event;

/// Why a worker's process ended, for the events and the metrics: what
/// drover did to it first, then how it exited.
fn exit_cause(w: &Worker, status: WaitStatus) -> ExitCause {
    let state = &w.state;
    let (killed, stopped) = match *state {
        State::Killed { kill, stopped } => (Some(kill), stopped),
        State::Stopping { why, .. } => (None, Some(why)),
        State::ExecFailed => return ExitCause::ExecFailed,
        _ => (None, None),
    };
    let leaving = matches!(state, State::Ready(r) if r.leave_by.is_some());
    match (killed, stopped) {
        (Some(Kill::BootTimeout), _) => ExitCause::BootTimeout,
        (Some(Kill::HeartbeatTimeout), _) | (_, Some(Stop::HeartbeatMissed)) => {
            ExitCause::HeartbeatTimeout
        }
        (Some(Kill::GraceExpired), _) => ExitCause::KilledAtDeadline,
        (_, Some(Stop::Replaced(Replace::MaxAge))) => ExitCause::RecycledMaxAge,
        (_, Some(Stop::Replaced(Replace::MaxMemory))) => ExitCause::RecycledMaxMemory,
        // Asked to stop, it stopped: by exiting, or of the signal it was sent.
        (_, Some(_)) if w.ended_as_asked(status) => ExitCause::Clean,
        _ => match status {
            WaitStatus::Exited(_, 0) if leaving => ExitCause::RecycledMaxRequests,
            WaitStatus::Exited(_, 0) => ExitCause::Clean,
            WaitStatus::Signaled(..) => ExitCause::Signal,
            _ => ExitCause::Crash,
        },
    }
}

/// Where the master is in its life.
#[derive(Debug)]
pub enum Phase {
    /// Not every slot has had a ready worker yet: a worker that cannot boot
    /// stops drover (status 3).
    Starting,
    Running,
    /// SIGWINCH: workers stopped, the master and its sockets kept.
    /// `booted`: whether start-up was over.
    Paused {
        booted: bool,
    },
    /// SIGTERM with `prestop_delay`: serving on, not ready, while load
    /// balancers stop sending; the shutdown begins `until`.
    PreStop {
        until: Instant,
        cause: Cause,
    },
    /// Stages 1–3 of the shutdown.
    ShuttingDown(Shutdown),
}

impl Phase {
    /// For `drover ctl status`: starting, running, paused, pre-stop, draining.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Paused { .. } => "paused",
            Phase::PreStop { .. } => "pre-stop",
            Phase::ShuttingDown(_) => "draining",
        }
    }
}

/// A stop signal repeated within this much of the one that began a graceful
/// shutdown is the same request, not a second one: it does not escalate
/// (docs/signals.md).
pub const REPEAT_WINDOW: Duration = Duration::from_secs(1);

/// How late past its deadline the master must wake for the lateness to be
/// its own absence (stopped, frozen, starved) rather than the scheduler's
/// noise: see `Supervisor::woke_late`.
pub const LATE_WAKE: Duration = Duration::from_millis(50);

pub struct Supervisor {
    pub pool: Pool,
    pub rollout: Rollout,
    pub phase: Phase,
    pub started: Instant,
    /// When resident memory is next checked (with max_memory).
    next_memory_check: Option<Instant>,
    /// Spawns decided this turn are dropped (out of descriptors, see
    /// `spawn_deferred`).
    hold_spawns: bool,
    /// The exit was decided.
    exited: bool,
    /// The last `STATUS=` told to our service manager, to tell it again
    /// only when the summary changes.
    reported: Option<String>,
    /// Why the last reload failed (rejected or rolled back), until one is
    /// applied: part of the summary.
    reload_failed: Option<String>,
    /// A decision carried out after this turn's own duties calls for
    /// another turn before waiting (a reload's generation was built, a
    /// shutdown began).
    again: bool,
    /// Resumed after a pause that stopped every worker: the slots boot
    /// again, as at start-up, until each has a ready worker. Readiness
    /// says `booting` meanwhile, not `degraded` (nothing crashed).
    rebooting: bool,
    /// We are the new master of an upgrade, not ready yet: the old master
    /// holds the listeners too, so no booting worker of ours holds their
    /// last copy (see `stop_for_shutdown`).
    pub predecessor_listens: bool,
    /// drover logs to `log_file` (read at start only), and so not where the
    /// workers' own output goes, unless captured.
    log_to_file: bool,
    out: VecDeque<Action>,
}

impl Supervisor {
    pub fn new(first: Rc<Generation>, now: Instant) -> Supervisor {
        let next_memory_check = first
            .s
            .max_memory
            .map(|_| now + first.s.memory_check_interval.0);
        Supervisor {
            pool: Pool::new(first.s.workers.0 as usize),
            log_to_file: first.s.log_file.is_some(),
            rollout: Rollout::new(first),
            phase: Phase::Starting,
            started: now,
            next_memory_check,
            hold_spawns: false,
            exited: false,
            reported: None,
            reload_failed: None,
            again: false,
            rebooting: false,
            predecessor_listens: false,
            out: VecDeque::new(),
        }
    }

    /// The generation new workers are started from.
    pub fn current(&self) -> &Rc<Generation> {
        self.rollout.current()
    }

    /// The next thing to do, in the order decided.
    pub fn next_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    pub fn emit(&mut self, a: Action) {
        if let Action::NotifySystemd(Note::Ready(s) | Note::Status(s)) = &a {
            self.reported = Some(s.clone());
        }
        self.out.push_back(a);
    }

    fn emit_all(&mut self, actions: impl IntoIterator<Item = Action>) {
        self.out.extend(actions);
    }

    pub fn shutting_down(&self) -> bool {
        matches!(self.phase, Phase::ShuttingDown(_))
    }

    fn paused(&self) -> bool {
        matches!(self.phase, Phase::Paused { .. })
    }

    /// Shutting down, or about to (the pre-stop delay): no reload, scaling
    /// or upgrade any more.
    fn stopping(&self) -> bool {
        matches!(self.phase, Phase::PreStop { .. } | Phase::ShuttingDown(_))
    }

    fn booted(&self) -> bool {
        matches!(
            self.phase,
            Phase::Running
                | Phase::Paused { booted: true }
                | Phase::PreStop { .. }
                | Phase::ShuttingDown(_)
        )
    }

    /// Whether drover should receive traffic, and why not: the one decision
    /// behind `drover ctl ready` (and the admin endpoint's `/readyz`).
    pub fn readiness(&self) -> Result<(), readiness::NotReady> {
        let mut ready = self.pool.ready_slots();
        // A slot without a ready worker that had one (since the start, or
        // since a resume) is a degradation; one that never had is booting.
        let lost = self
            .pool
            .slots
            .iter()
            .zip(&ready)
            .any(|(s, r)| s.served && !s.recycling && !r);
        let phase = match self.phase {
            Phase::Starting => readiness::Phase::Starting,
            // Resumed after a pause: the slots boot again, as at start-up.
            Phase::Running if self.rebooting && !lost => readiness::Phase::Starting,
            Phase::Running => readiness::Phase::Running,
            Phase::Paused { .. } => readiness::Phase::Paused,
            Phase::PreStop { .. } => readiness::Phase::PreStop,
            Phase::ShuttingDown(_) => readiness::Phase::Draining,
        };
        // Once started, a slot that never had a ready worker (added by a
        // scale-up or a reload, still booting) does not make drover degraded.
        if !matches!(self.phase, Phase::Starting) && !self.rebooting {
            for (r, s) in ready.iter_mut().zip(&self.pool.slots) {
                *r |= !s.served;
            }
        }
        // Nor does a slot whose worker recycled itself (max_requests) while
        // its successor boots: with recycling under load, some slot is
        // nearly always between two workers.
        for (r, s) in ready.iter_mut().zip(&self.pool.slots) {
            *r |= s.recycling;
        }
        readiness::readiness(&readiness::View {
            phase,
            slots: self.pool.slots.len() as u32,
            ready_slots: ready.iter().filter(|r| **r).count() as u32,
            share: self.current().s.ready_share.0,
        })
    }

    /// One turn's own duties: what is overdue, the rollout, the worker
    /// count, and the exit once a shutdown has no worker left.
    pub fn tick(&mut self, now: Instant) {
        if let Phase::PreStop { until, cause } = self.phase {
            if now >= until {
                info!("pre-stop delay over");
                self.begin_shutdown(Pace::Graceful, cause, now);
            }
        }
        self.on_deadlines(now);
        self.settle_rollout(now);
        if !self.shutting_down() {
            self.restore_worker_count(now);
        }
        self.report_status();
        if let Phase::ShuttingDown(sd) = &self.phase {
            if self.pool.workers.is_empty() && !self.exited {
                self.exited = true;
                let outcome = sd.outcome();
                self.emit(Action::Exit(outcome));
            }
        }
    }

    /// Tells the service manager the summary when it changed since the last
    /// `STATUS=` (a worker became ready after a scale-up, one died), once
    /// start-up is over and until the shutdown. Not during a reload: its
    /// verdict comes with `READY=1` and the summary.
    fn report_status(&mut self) {
        if !self.booted() || self.shutting_down() || self.rollout.busy() {
            return;
        }
        let summary = self.summary();
        if self.reported.as_ref() != Some(&summary) {
            self.emit(Action::NotifySystemd(Note::Status(summary)));
        }
    }

    /// The master's wait of `waited` ended `late` past the deadline it
    /// waited for. A second or so late, it was absent (stopped, frozen with
    /// its cgroup, starved of CPU) for some part of that wait, which it
    /// cannot tell: the whole wait does not count against the workers'
    /// heartbeat and boot deadlines (see `Worker::master_was_late`). That
    /// gives a worker back at most one wait (no more than its own
    /// deadline was away); less than [`LATE_WAKE`] late is the
    /// scheduler's noise.
    pub fn woke_late(&mut self, waited: Duration, late: Duration) {
        if late < LATE_WAKE {
            return;
        }
        let line = format!(
            "drover woke {} past its deadline (stopped, frozen or starved of CPU): \
             the workers' heartbeat and boot deadlines move by the {} it waited",
            ms(late),
            ms(waited)
        );
        if late >= Duration::from_secs(1) {
            warn!("{line}");
        } else {
            debug!("{line}");
        }
        for w in self.pool.workers.iter_mut() {
            w.master_was_late(waited);
        }
    }

    /// Whether to run another turn before waiting (once).
    pub fn again(&mut self) -> bool {
        std::mem::take(&mut self.again)
    }

    /// The nearest instant at which something is due, if any.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let running = !self.shutting_down();
        let respawning = running && !self.paused();
        let memory = self.next_memory_check.filter(|_| running);
        let prestop = match self.phase {
            Phase::PreStop { until, .. } => Some(until),
            _ => None,
        };
        self.pool
            .next_deadline(respawning, now)
            .into_iter()
            .chain(memory)
            .chain(prestop)
            .min()
    }

    // Signals and control requests.

    pub fn on_signal(&mut self, event: Event, now: Instant) {
        let name = event.signal_name();
        match event {
            // Reaping is the master's (it owns waitpid): see `on_exit`.
            Event::Child => {}
            Event::Terminate if self.begin_prestop(name, now) => {}
            Event::Terminate | Event::Interrupt if self.repeats_the_stop(name, now) => {
                info!(
                    "{name} again within {} of the one that began the shutdown: \
                     the same request (send it again later to hurry)",
                    ms(REPEAT_WINDOW)
                );
            }
            Event::Terminate | Event::Interrupt => {
                // The same signal again during a graceful shutdown means "hurry".
                let quick = matches!(&self.phase, Phase::ShuttingDown(sd) if !sd.quick);
                let pace = if quick { Pace::Quick } else { Pace::Graceful };
                self.begin_shutdown(pace, Cause::Signal(name), now);
            }
            Event::Quit => self.begin_shutdown(Pace::Quick, Cause::Signal(name), now),
            _ if self.stopping() => info!("{name}: ignored during shutdown"),
            Event::AddWorker if self.paused() => self.resume(name),
            Event::AddWorker => self.scale(self.pool.count() + 1, name),
            Event::RemoveWorker => self.scale(self.pool.count().saturating_sub(1), name),
            Event::Reload => self.reload(name, None),
            Event::ReopenLogs => self.reopen_logs(),
            Event::Upgrade => self.emit(Action::StartUpgrade { client: None }),
            Event::StopWorkers => self.pause(name, now),
        }
    }

    /// Whether `name` is the signal that began the graceful shutdown under
    /// way, again within [`REPEAT_WINDOW`]: one request delivered twice
    /// (GNU `timeout`, or anything that signals both a process and its
    /// group), not a second one asking to hurry.
    fn repeats_the_stop(&self, name: &'static str, now: Instant) -> bool {
        matches!(&self.phase, Phase::ShuttingDown(sd)
            if !sd.quick
                && sd.cause == Cause::Signal(name)
                && now.saturating_duration_since(sd.began) < REPEAT_WINDOW)
    }

    /// `--reload`: the watched files (`what`) changed and have been quiet
    /// since: the same reload as SIGHUP.
    pub fn on_files_changed(&mut self, what: &str) {
        let why = format!("--reload: {what} changed");
        if self.stopping() {
            info!("{why}: ignored during shutdown");
        } else {
            self.reload(&why, None);
        }
    }

    /// A request from the control socket: the same operations as the
    /// signals, with an answer.
    pub fn on_command(&mut self, client: ClientId, command: Command, now: Instant) {
        let answer = |a| Action::AnswerClient { client, answer: a };
        match command {
            Command::Ready => {
                let verdict = match self.readiness() {
                    Ok(()) => control::success(&format!("ready: {}", self.summary())),
                    Err(why) => control::failure(&format!("not ready: {why}")),
                };
                self.emit(answer(verdict));
            }
            Command::Stop { quick } => {
                self.emit(answer(control::success(if quick {
                    "quick shutdown"
                } else {
                    "graceful shutdown"
                })));
                let pace = if quick { Pace::Quick } else { Pace::Graceful };
                self.begin_shutdown(pace, Cause::Signal("control: stop"), now);
            }
            _ if self.stopping() => self.emit(answer(control::failure("shutting down"))),
            Command::Reload => self.reload("control: reload", Some(client)),
            Command::Scale { workers: n } if !(1..=MAX_WORKERS).contains(&n) => {
                self.emit(answer(control::failure(&format!(
                    "cannot scale to {n}: from 1 to {MAX_WORKERS} workers"
                ))));
            }
            Command::Scale { workers: n } => {
                if self.paused() {
                    self.resume("control: scale");
                }
                self.scale(n, "control: scale");
                self.emit(answer(control::success(&format!("scaled to {n} workers"))));
            }
            Command::Upgrade => self.emit(Action::StartUpgrade {
                client: Some(client),
            }),
            // The master answers these itself (the event stream, the
            // templates) before it gets here.
            Command::Events | Command::Status => {
                self.emit(answer(control::failure("answered by the master")))
            }
        }
    }

    fn scale(&mut self, count: u32, why: &str) {
        let wanted = count;
        let count = count.clamp(1, MAX_WORKERS);
        let from = self.pool.count();
        if from == count && wanted != count {
            let bound = if count == 1 { "minimum" } else { "maximum" };
            info!("{why}: already at the {bound}, {count} worker(s)");
        } else {
            info!("{why}: {from} -> {count} workers");
        }
        self.pool.resize(count as usize);
        if from != count {
            self.emit(Action::Publish(Kind::Scaled {
                from,
                to: count,
                trigger: why.to_string(),
            }));
        }
        let summary = self.summary();
        self.emit(Action::NotifySystemd(Note::Status(summary)));
    }

    /// SIGUSR1: reopen our log file (after logrotate moved it) and tell the
    /// workers to do the same; a booting worker is told once it is ready
    /// (`forward_reopen`), a killed one not at all.
    fn reopen_logs(&mut self) {
        let mut signals = Vec::new();
        let mut deferred = 0;
        for w in &mut self.pool.workers {
            if matches!(w.state, State::Killed { .. } | State::ExecFailed) {
                continue;
            }
            if w.is_booting() {
                w.reopen_logs = true;
                deferred += 1;
            } else {
                signals.push(reopen_signal(w));
            }
        }
        let forwarded = signals.len();
        self.emit_all(signals);
        self.emit(Action::ReopenLog {
            forwarded,
            deferred,
        });
    }

    /// SIGWINCH: stop every worker gracefully; keep the master and the sockets.
    fn pause(&mut self, why: &str, now: Instant) {
        // A reload cannot settle without workers: end it, with a verdict,
        // and answer those waiting for a queued one (HUP resumes and reloads).
        if self.rollout.rolling() {
            self.rollback(format!("{why} stopped the workers"), None, now);
        }
        self.cancel_queued(&format!(
            "{why} stopped the workers; HUP resumes and reloads"
        ));
        self.phase = Phase::Paused {
            booted: self.booted(),
        };
        // No slot serves now: after a resume, each boots again.
        for s in self.pool.slots.iter_mut() {
            s.served = false;
            s.recycling = false;
        }
        self.emit(Action::Publish(Kind::Paused {
            trigger: why.to_string(),
        }));
        let signalled = self.stop_workers(|w| !w.is_stopping(), Pace::Graceful, Stop::Paused, now);
        // Retired or recycled before: its own stop stands.
        let already = self.pool.workers.len() - signalled;
        let which = if already == 0 {
            format!("all {signalled} worker(s)")
        } else {
            format!("{signalled} worker(s), {already} already stopping (not signalled again)")
        };
        info!("{why}: stopping {which}; the sockets stay open (SIGHUP or SIGTTIN resumes)");
    }

    /// Every way out of a pause (SIGTTIN, a reload, `ctl scale`): the
    /// workers start again, and until every slot has a ready one drover is
    /// booting, as at start-up.
    fn resume(&mut self, why: &str) {
        if let Phase::Paused { booted } = self.phase {
            self.phase = if booted {
                Phase::Running
            } else {
                Phase::Starting
            };
            self.rebooting = booted;
        }
        info!("{why}: resuming with {} worker(s)", self.pool.count());
        self.emit(Action::Publish(Kind::Resumed {
            trigger: why.to_string(),
        }));
    }

    /// Stops the workers `which` selects, each with its generation's policy.
    /// Returns how many were signalled.
    fn stop_workers(
        &mut self,
        which: impl Fn(&Worker) -> bool,
        pace: Pace,
        why: Stop,
        now: Instant,
    ) -> usize {
        let stops: Vec<_> = self
            .pool
            .workers
            .iter_mut()
            .filter(|w| which(w))
            .filter_map(|w| w.stop(pace, why, now))
            .collect();
        let signalled = stops.len();
        self.emit_all(stops);
        signalled
    }

    // The rollout.

    fn reload(&mut self, why: &str, client: Option<ClientId>) {
        if self.paused() {
            self.resume(why);
        }
        match self.rollout.request(why, client, &self.pool) {
            Ok(()) => self.load_config(why),
            Err(busy) => info!("{why}: {busy}; the reload starts once that is over"),
        }
    }

    fn load_config(&mut self, why: &str) {
        self.emit(Action::NotifySystemd(Note::Reloading));
        self.emit(Action::LoadConfig {
            why: why.to_string(),
        });
    }

    /// The result of `Action::LoadConfig`: the next generation, or why there
    /// is none. `origin` names the config for the log.
    pub fn config_loaded(&mut self, next: Result<Generation, String>, origin: &str, now: Instant) {
        // The notify socket belongs to the workers' user: a new user could
        // not report ready on it, and the old workers could no longer.
        let next = next.and_then(|n| {
            if n.user_and_group() == self.current().user_and_group() {
                Ok(n)
            } else {
                Err("`user` or `group` changed: that needs a restart or an upgrade".to_string())
            }
        });
        let next = match next {
            Ok(next) => next,
            Err(e) => {
                // Nothing was started and nothing changes.
                let (why, waiters) = self.rollout.rejected();
                self.reload_refused(&why, &e);
                self.ready_again();
                self.emit_all(waiters.answer(control::failure(&format!("rejected: {e}"))));
                return;
            }
        };
        let number = next.number;
        let (workers, surge) = (next.s.workers.0, next.s.max_surge.0);
        if next.s.max_memory.is_some() && self.next_memory_check.is_none() {
            self.next_memory_check = Some(now + next.s.memory_check_interval.0);
        }
        let slots_before = self.pool.slots.len();
        self.pool.resize(workers as usize);
        let why = self.rollout.begin(Rc::new(next), slots_before, now);
        self.emit(Action::Publish(Kind::ReloadBegun {
            generation: number,
            trigger: why.to_string(),
        }));
        // Its workers are started by the next turn's `restore_worker_count`.
        self.again = true;
        info!(
            "{why}: reloading {origin} into generation {number} ({workers} worker(s), up to {surge} replaced at a time)"
        );
    }

    /// A reload refused (`why` asked for it, `e` says why not): nothing was
    /// started and nothing changes.
    pub fn reload_refused(&mut self, why: &str, e: &str) {
        error!("{why}: reload rejected, nothing changed: {e}");
        self.reload_failed = Some(format!("reload rejected: {e}"));
        self.emit(Action::Publish(Kind::ReloadRejected {
            reason: e.to_string(),
        }));
    }

    /// The new generation failed before the reload was applied (a worker
    /// failed to boot, or failed after it was ready while other slots were
    /// still being replaced): stop it and go back to the previous one.
    /// `output`: where the output of the process whose failure this is
    /// (`output_of`) says why.
    fn rollback(&mut self, cause: String, output: Option<String>, now: Instant) {
        let Some((failed, slots_before, waiters)) = self.rollout.roll_back() else {
            return;
        };
        let output = output.map(|o| format!("; {o}")).unwrap_or_default();
        warn!(
            "reload rolled back: {cause}; generation {} keeps serving{output}",
            self.current().number
        );
        self.reload_failed = Some(format!("reload rolled back: {cause}"));
        self.emit(Action::Publish(Kind::ReloadRolledBack {
            generation: failed.number,
            reason: cause.clone(),
        }));
        self.pool.resize(slots_before);
        // Booting workers of the failed generation serve nothing: stop them
        // now. Ready ones are replaced like any outdated worker.
        let number = failed.number;
        self.stop_workers(
            |w| w.generation() == number && w.is_booting(),
            Pace::Graceful,
            Stop::Outdated,
            now,
        );
        self.emit(Action::CloseListeners {
            listeners: failed.take_listeners(),
            handover: false,
        });
        self.emit_all(waiters.answer(control::failure(&format!("rolled back: {cause}"))));
    }

    /// Ends a reload that is over; starts a queued one.
    fn settle_rollout(&mut self, now: Instant) {
        if self.shutting_down() {
            return;
        }
        match self.rollout.settle(&self.pool, now) {
            None => {}
            Some((Settled::Applied { old }, waiters, took)) => {
                let current = self.current().number;
                let took = ms(took);
                info!("reload applied: generation {current} serves, in {took}");
                self.reload_failed = None;
                self.emit(Action::Publish(Kind::ReloadApplied {
                    generation: current,
                }));
                // Sockets the new config no longer names: closed now that no
                // current worker uses them (old workers may still drain theirs).
                self.emit(Action::CloseListeners {
                    listeners: old.take_listeners(),
                    handover: false,
                });
                self.emit_all(waiters.answer(control::success(&format!(
                    "applied: generation {current} in {took}"
                ))));
                self.ready_again();
            }
            Some((Settled::RolledBack, ..)) => self.ready_again(),
        }
        if let Some(why) = self.rollout.start_queued(&self.pool) {
            self.load_config(&why);
        }
    }

    fn cancel_queued(&mut self, why: &str) {
        if let Some(waiters) = self.rollout.cancel_queued() {
            info!("queued reload cancelled: {why}");
            self.emit_all(waiters.answer(control::failure(&format!("cancelled: {why}"))));
        }
    }

    // Workers: spawning, exec reports, notify messages, exits.

    /// Gives every slot a worker of the current generation: starts one where
    /// a slot has none (after its backoff), or where its worker is outdated
    /// (older generation, or marked for replacement) — at most `max_surge`
    /// such replacements booting at once; the outdated worker keeps serving
    /// until its successor is ready. Retires workers of removed slots.
    fn restore_worker_count(&mut self, now: Instant) {
        self.hold_spawns = false;
        if self.paused() {
            return;
        }
        let gen = self.current().clone();
        // One pass over the workers, not one per slot: with a thousand
        // workers this runs after every READY=1 of the start-up.
        let view = self.pool.slot_view(gen.number);
        let mut surging = view
            .iter()
            .filter(|v| v.current_booting && v.outdated)
            .count() as u32;
        let mut execing = self.pool.execing();
        for (i, v) in view.iter().enumerate() {
            let slot = i as u32 + 1;
            if v.current || self.pool.slots[i].not_before.is_some_and(|t| t > now) {
                continue;
            }
            // Each child on its way to exec holds a descriptor in the
            // master: go on once some have reported (the loop wakes up for
            // them).
            if execing >= max_execing() {
                break;
            }
            let replacing = v.outdated_ready;
            if replacing && surging >= gen.s.max_surge.0 {
                continue;
            }
            if v.outdated_booting {
                // An outdated worker that is not even ready serves nothing: stop it.
                self.stop_workers(
                    |w| w.slot == slot && w.is_booting(),
                    Pace::Graceful,
                    Stop::Outdated,
                    now,
                );
            }
            surging += replacing as u32;
            execing += 1;
            self.emit(Action::Spawn {
                slot,
                generation: gen.clone(),
            });
        }
        let count = self.pool.count();
        let retired: Vec<_> = self
            .pool
            .workers
            .iter_mut()
            .filter(|w| w.slot > count && !w.is_stopping())
            .filter_map(|w| {
                let a = w.stop(Pace::Graceful, Stop::ScaledDown, now)?;
                if let Action::Signal { signal, .. } = &a {
                    info!(
                        "worker {} (pid {}) retired: sending {}",
                        w.slot,
                        w.pid,
                        signal.as_str()
                    );
                }
                Some(a)
            })
            .collect();
        self.emit_all(retired);
    }

    /// Whether a `Spawn` decided this turn still stands: a later decision
    /// (a rollback, a shutdown, running out of descriptors) may have
    /// superseded it.
    pub fn wants_spawn(&self, generation: &Rc<Generation>) -> bool {
        !self.hold_spawns
            && Rc::ptr_eq(generation, self.current())
            && matches!(
                self.phase,
                Phase::Starting | Phase::Running | Phase::PreStop { .. }
            )
    }

    /// Out of descriptors or processes while other children are on their
    /// way to exec: not this worker's fault. The rest of this turn's spawns
    /// wait for their reports (the loop wakes up for them).
    pub fn spawn_deferred(&mut self, slot: u32) {
        debug!("worker {slot}: out of descriptors or processes; spawning the rest later");
        self.hold_spawns = true;
    }

    /// `preload`: the generation's template is not ready to fork yet. This
    /// turn's spawns wait; the loop wakes up when it is ready.
    pub fn spawn_waits(&mut self) {
        self.hold_spawns = true;
    }

    /// A fork request for `slot` got no answer (its template died or hung):
    /// a failure of the slot, which waits for its backoff.
    pub fn fork_lost(&mut self, slot: u32, now: Instant) {
        self.count_restart(slot);
        let (delay, failures) = self.slot_failed(slot, now);
        warn!(
            "worker {slot}: its fork request got no answer; respawning in {} (failure {failures} in a row)",
            ms(delay)
        );
    }

    /// The template of `generation` failed before it was ready to fork, as
    /// `cause` says (`cannot_boot`: it exited with status 3). As for a
    /// worker that cannot boot: a reload rolls back, start-up stops drover
    /// (status 3). Returns false if a new template should be tried (after
    /// the backoff).
    pub fn template_failed(
        &mut self,
        generation: u32,
        cannot_boot: bool,
        cause: &str,
        pid: Option<Pid>,
        now: Instant,
    ) -> bool {
        if generation != self.current().number || self.shutting_down() {
            info!("{cause}");
        } else if self.rollout.rolling() {
            // A template's output is never captured (docs/observability.md).
            let output = pid.map(|pid| self.output_of(pid, false));
            self.rollback(cause.to_string(), output, now);
        } else if cannot_boot && !self.booted() {
            let output = pid.map(|pid| format!("; {}", self.output_of(pid, false)));
            error!(
                "{cause}: cannot boot; stopping{}",
                output.unwrap_or_default()
            );
            self.begin_shutdown(Pace::Graceful, Cause::CannotBoot, now);
        } else {
            return false;
        }
        true
    }

    /// Where the output of `pid`, a worker or template that failed to boot,
    /// is to be read: what it printed (a traceback) says why, and the log line
    /// that names it comes after, maybe among other processes' lines.
    fn output_of(&self, pid: Pid, captured: bool) -> String {
        if captured {
            format!("its output is above, on the lines tagged (pid {pid})")
        } else if self.log_to_file {
            format!("the output of pid {pid} went to drover's standard error, not to log_file")
        } else {
            format!("the output of pid {pid}, its standard error, is above")
        }
    }

    /// The priority a worker (or template) of `generation` starts at now:
    /// its boot priority (`boot_priority`) while another worker serves, so
    /// that its start-up takes the CPU they leave idle; none (drover's own)
    /// when no worker serves (the start, after a pause or a crash of all):
    /// then no request would gain from it.
    pub fn boot_priority(&self, generation: &Generation) -> Option<crate::spawn::Low> {
        let boot = generation.boot?;
        self.pool
            .workers
            .iter()
            .any(Worker::is_serving)
            .then_some(boot.low)
    }

    /// A worker was forked (its exec is confirmed later: `on_exec_report`);
    /// `lowered`: at its generation's boot priority.
    pub fn spawned(
        &mut self,
        slot: u32,
        generation: Rc<Generation>,
        pid: Pid,
        lowered: bool,
        now: Instant,
    ) {
        info!(
            "worker {slot} (pid {pid}) spawned, generation {}",
            generation.number
        );
        if let Some(s) = self.pool.slot(slot) {
            // The backoff is over: without this, its past instant would
            // stay the nearest deadline and the loop would spin.
            s.not_before = None;
        }
        self.emit(Action::Publish(Kind::WorkerSpawned {
            slot,
            pid: pid.as_raw(),
            generation: generation.number,
        }));
        self.pool
            .workers
            .push(Worker::forked(slot, pid, generation, lowered, now));
    }

    /// A worker of `slot` could not be started (`fork`, or its exec): roll
    /// a reload back, stop at start-up, or try again after the backoff. A
    /// worker no longer wanted (stopping, or of a generation rolled back)
    /// only says why.
    pub fn spawn_failed(
        &mut self,
        slot: u32,
        generation: u32,
        stopping: bool,
        e: impl std::fmt::Display,
        now: Instant,
    ) {
        if stopping || generation != self.current().number || self.shutting_down() {
            info!("worker {slot} (generation {generation}) could not be spawned: {e}");
        } else if self.rollout.rolling() {
            self.rollback(format!("worker {slot} cannot be spawned: {e}"), None, now);
        } else if !self.booted() {
            error!("worker {slot} cannot boot: {e}");
            self.begin_shutdown(Pace::Graceful, Cause::CannotBoot, now);
        } else {
            self.count_restart(slot);
            let (delay, _) = self.slot_failed(slot, now);
            error!(
                "worker {slot} cannot be spawned: {e}; retrying in {}",
                ms(delay)
            );
        }
    }

    /// A child's exec report: it exec'd (and, with `ready = "spawn"`, is
    /// ready), or it could not.
    pub fn on_exec_report(&mut self, pid: Pid, report: Result<(), String>, now: Instant) {
        let Some(w) = self.pool.get_mut(pid) else {
            return;
        };
        match report {
            Ok(()) => {
                if w.execd(now) {
                    self.on_ready(pid, now);
                }
            }
            Err(e) => {
                let (slot, generation, stopping) = (w.slot, w.generation(), w.is_stopping());
                w.state = State::ExecFailed;
                self.spawn_failed(slot, generation, stopping, e, now);
            }
        }
    }

    /// Messages from worker `pid` (or one of its descendants).
    pub fn on_notify(&mut self, pid: Pid, messages: Vec<Message>, now: Instant) {
        for m in messages {
            let Some(w) = self.pool.get_mut(pid) else {
                return;
            };
            let slot = w.slot;
            if !matches!(m, Message::Ready) && w.announced() {
                debug!("worker {slot} (pid {pid}) speaks the notify protocol: ready at READY=1");
            }
            match m {
                Message::Ready
                    if matches!(w.state, State::Execing { .. } | State::Booting { .. }) =>
                {
                    w.become_ready(now);
                    info!("worker {slot} (pid {pid}) ready in {}", ms(now - w.started));
                    self.on_ready(pid, now);
                }
                Message::Ready => debug!("worker {slot} (pid {pid}) repeated READY=1"),
                // Its own generation's interval: a reload that changed or
                // removed `timeout` does not change what this worker promised.
                Message::Watchdog => w.heartbeat(now),
                Message::ExtendTimeout(by) => match w.extend(by, now) {
                    Some(d) => debug!(
                        "worker {slot} (pid {pid}) asked for {} more: deadline in {}",
                        ms(by),
                        ms(d.saturating_duration_since(now))
                    ),
                    None => debug!(
                        "worker {slot} (pid {pid}) asked for {} more: not extended \
                         (a quick stop, an abort, or no deadline)",
                        ms(by)
                    ),
                },
                Message::Status(text) => {
                    match w.status_log.take(now) {
                        Some(0) => info!("worker {slot} (pid {pid}) status: {text}"),
                        Some(n) => info!(
                            "worker {slot} (pid {pid}) status: {text} \
                             ({n} earlier status line(s) not logged: over {STATUS_LINES_PER_SECOND} a second)"
                        ),
                        None => {}
                    }
                    w.status = Some(text);
                }
                Message::Stopping => {
                    if let State::Ready(s) = &mut w.state {
                        s.leave_by.get_or_insert(now + w.gen.s.graceful_timeout.0);
                    }
                    if !std::mem::replace(&mut w.said_stopping, true) {
                        info!("worker {slot} (pid {pid}) is stopping");
                    }
                }
                other => debug!("worker {slot} (pid {pid}) sent {other:?}"),
            }
        }
    }

    /// Worker `pid` became ready. If it belongs to the current generation,
    /// the workers it replaces (same slot: older generation, or marked for
    /// replacement) stop now, each by its own generation's policy.
    fn on_ready(&mut self, pid: Pid, now: Instant) {
        let Some(w) = self.pool.get_mut(pid) else {
            return;
        };
        let (slot, generation) = (w.slot, w.generation());
        // Booted at a low priority: ready, it serves at the normal one.
        if let Some(boot) = w.gen.boot.filter(|_| std::mem::take(&mut w.lowered)) {
            w.recheck_priority = Some(now + PRIORITY_RECHECK);
            self.out
                .push_back(Action::RestorePriority { slot, pid, boot });
        }
        let reopen = std::mem::take(&mut w.reopen_logs).then(|| reopen_signal(w));
        self.emit_all(reopen);
        let Some(w) = self.pool.get_mut(pid) else {
            return;
        };
        if let Phase::ShuttingDown(sd) = &self.phase {
            // Booting at stage 2 while nothing served: its stop comes now,
            // by the deadline the others got.
            let until = sd.deadline;
            let stop = w.stop(Pace::Graceful, Stop::Shutdown, now);
            w.cap_deadline(until);
            if let Some(Action::Signal { signal, .. }) = &stop {
                info!(
                    "worker {slot} (pid {pid}) ready during the shutdown: sending {}",
                    signal.as_str()
                );
            }
            self.emit_all(stop);
            return;
        }
        let seconds = (now - w.started).as_secs_f64();
        // Booted or respawned during the pre-stop delay: it gets the same
        // notice as those that were serving when the delay began.
        let notice = matches!(self.phase, Phase::PreStop { .. }).then(|| prestop_notice(w));
        if let Some(s) = self.pool.slot(slot) {
            s.served = true;
            s.recycling = false;
        }
        self.emit(Action::Publish(Kind::WorkerReady {
            slot,
            pid: pid.as_raw(),
            generation,
            seconds,
        }));
        self.emit_all(notice);
        let current = self.current().number;
        if generation == current {
            let mut stops = Vec::new();
            for old in self
                .pool
                .workers
                .iter_mut()
                .filter(|w| w.slot == slot && w.pid != pid && !w.is_stopping())
            {
                let replace = match old.state {
                    State::Ready(s) if s.replace.is_some() => s.replace.unwrap(),
                    _ if old.generation() != current => Replace::Reload,
                    _ => Replace::Superseded,
                };
                if let Some(a) = old.stop(Pace::Graceful, Stop::Replaced(replace), now) {
                    if let Action::Signal { signal, .. } = &a {
                        info!(
                            "worker {slot} (pid {}) replaced by pid {pid} ({}): sending {}",
                            old.pid,
                            replace.name(),
                            signal.as_str()
                        );
                    }
                    stops.push(a);
                }
            }
            self.emit_all(stops);
        }
        if self.rebooting && self.pool.slots.iter().all(|s| s.served) {
            self.rebooting = false;
        }
        self.check_booted();
    }

    /// A reload is over (applied, rejected or rolled back): `READY=1` again
    /// for our service manager, or for the old master of an upgrade, which
    /// takes it as "every worker booted" and retires. Before start-up is
    /// over that would be a lie: only the status then, and `READY=1` once
    /// every worker is ready (`check_booted`).
    fn ready_again(&mut self) {
        let summary = self.summary();
        if self.booted() {
            self.emit(Action::NotifySystemd(Note::Ready(summary)));
        } else {
            self.emit(Action::NotifySystemd(Note::Status(summary)));
        }
    }

    fn check_booted(&mut self) {
        if self.booted() {
            return;
        }
        let ready = self.pool.ready();
        if ready >= self.pool.slots.len() {
            self.phase = match self.phase {
                Phase::Paused { .. } => Phase::Paused { booted: true },
                _ => Phase::Running,
            };
            info!(
                "all {ready} workers ready {} after start",
                ms(self.started.elapsed())
            );
            self.emit(Action::Publish(Kind::AllReady {
                workers: ready as u32,
                generation: self.current().number,
            }));
            let summary = self.summary();
            self.emit(Action::NotifySystemd(Note::Ready(summary)));
        }
    }

    /// A worker exited (reaped by the master). Returns false if `pid` is no
    /// worker.
    pub fn on_exit(&mut self, pid: Pid, status: WaitStatus, now: Instant) -> bool {
        let Some(w) = self.pool.remove(pid) else {
            return false;
        };
        let lived = now - w.started;
        let killed = match w.state {
            State::Killed { kill, .. } => Some(kill),
            _ => None,
        };
        let why = describe(status, killed);
        let slot = w.slot;
        self.emit(Action::Publish(Kind::WorkerExited {
            slot,
            pid: pid.as_raw(),
            generation: w.generation(),
            cause: exit_cause(&w, status),
            status: exit_code(status),
            signal: match status {
                WaitStatus::Signaled(_, sig, _) => Some(sig.as_str().to_string()),
                _ => None,
            },
            description: why.clone(),
        }));
        match w.state {
            State::ExecFailed => {
                debug!("worker {slot} (pid {pid}), which could not exec, {why}");
            }
            State::Stopping { why: stop, .. }
            | State::Killed {
                stopped: Some(stop),
                ..
            } => {
                self.count_replacement(slot, stop);
                let context = match stop {
                    Stop::HeartbeatMissed if killed.is_none() => {
                        " (heartbeat timeout: SIGABRT)".to_string()
                    }
                    Stop::HeartbeatMissed | Stop::Shutdown => String::new(),
                    Stop::Replaced(r) => format!(" (recycled: {})", r.name()),
                    Stop::ScaledDown | Stop::Paused | Stop::Outdated => " (retired)".to_string(),
                };
                // A death drover did not cause, or an exit status of its
                // own, is a fault even during a stop.
                if w.ended_as_asked(status) {
                    info!(
                        "worker {slot} (pid {pid}) {why}{context} after {}",
                        ms(lived)
                    );
                } else {
                    warn!(
                        "worker {slot} (pid {pid}) {why}{context} after {}",
                        ms(lived)
                    );
                }
            }
            // Not asked to stop (still booting when the shutdown began):
            // only an exit 0, or drover's own kill, is no fault.
            _ if self.shutting_down() => {
                if exit_code(status) == Some(0) || matches!(w.state, State::Killed { .. }) {
                    info!("worker {slot} (pid {pid}) {why} after {}", ms(lived));
                } else {
                    warn!("worker {slot} (pid {pid}) {why} after {}", ms(lived));
                }
            }
            _ if w.is_booting()
                && self.rollout.rolling()
                && w.generation() == self.current().number =>
            {
                let cause = if killed == Some(Kill::BootTimeout) {
                    format!(
                        "worker {slot} (pid {pid}) of the new generation was not ready within \
                         boot_timeout ({}) and {}",
                        w.gen.s.boot_timeout,
                        why.strip_suffix(" (boot timeout)").unwrap_or(&why)
                    )
                } else {
                    format!(
                        "worker {slot} (pid {pid}) of the new generation {why} before it was ready"
                    )
                };
                // Workers forked by a template write to drover's output.
                let captured = w.gen.s.capture_output && !w.gen.s.preload;
                let output = self.output_of(pid, captured);
                self.rollback(cause, Some(output), now);
            }
            _ => self.on_unplanned_exit(w, status, &why, now),
        }
        true
    }

    /// A worker drover stopped exited: its slot counts a recycle (replaced
    /// at its max_age or for its max_memory) or, unless drover is shutting
    /// down, a restart (it missed its heartbeat: its successor comes after
    /// the backoff, as a crashed worker's does).
    fn count_replacement(&mut self, slot: u32, stop: Stop) {
        let shutting_down = self.shutting_down();
        let Some(s) = self.pool.slot(slot) else {
            return;
        };
        match stop {
            Stop::Replaced(Replace::MaxAge | Replace::MaxMemory) => s.recycles += 1,
            Stop::HeartbeatMissed if !shutting_down => s.restarts += 1,
            _ => {}
        }
    }

    /// A worker that drover did not ask to stop exited: stop at start-up if
    /// it cannot boot, else respawn, now or after the backoff.
    fn on_unplanned_exit(&mut self, w: Worker, status: WaitStatus, why: &str, now: Instant) {
        let (slot, pid, lived) = (w.slot, w.pid, now - w.started);
        if let Some(when) = self
            .cannot_boot(&w, now)
            .filter(|_| exit_code(status) == Some(3))
        {
            let captured = w.gen.s.capture_output && !w.gen.s.preload;
            error!(
                "worker {slot} (pid {pid}) cannot boot: {why} {when}; stopping; {}",
                self.output_of(pid, captured)
            );
            self.begin_shutdown(Pace::Graceful, Cause::CannotBoot, now);
            return;
        }
        let reset_after = self.current().s.respawn_reset_after.0;
        let Some(s) = self.pool.slot(slot) else {
            info!("worker {slot} (pid {pid}) {why}; its slot was removed");
            return;
        };
        // A worker that served stably, or that announced its own exit after
        // serving, is replaced at once; one that keeps failing (including
        // at boot) waits longer each time.
        let planned = matches!(w.state, State::Ready(r) if r.leave_by.is_some())
            && exit_code(status) == Some(0);
        let served = !w.is_booting();
        if planned {
            // Its own decision (max_requests, say): a recycle, not a fault.
            s.recycles += 1;
            s.failures = 0;
            s.recycling = true;
            info!(
                "worker {slot} (pid {pid}) {why} after {}, as it announced (STOPPING=1); respawning now",
                ms(lived)
            );
        } else if served && lived >= reset_after {
            s.restarts += 1;
            s.failures = 0;
            warn!(
                "worker {slot} (pid {pid}) {why} after {}; respawning now",
                ms(lived)
            );
        } else {
            s.restarts += 1;
            let (delay, failures) = self.slot_failed(slot, now);
            warn!(
                "worker {slot} (pid {pid}) {why} after {}; respawning in {} (failure {failures} in a row)",
                ms(lived),
                ms(delay),
            );
        }
        // A worker of a reload's new generation that fails after it was
        // ready, while the reload is still under way: the new code fails
        // (and the slot's old worker is gone already). Without a rollback the
        // reload would wait for every slot to be ready at once, which a
        // generation whose workers keep dying may never be.
        // But one that served stably and ended itself cleanly (a recycle it
        // did not announce) is no sign against the new code.
        let stable_clean_exit = served && lived >= reset_after && exit_code(status) == Some(0);
        if !planned
            && !stable_clean_exit
            && self.rollout.rolling()
            && w.generation() == self.current().number
        {
            let captured = w.gen.s.capture_output && !w.gen.s.preload;
            let output = self.output_of(pid, captured);
            let cause =
                format!("worker {slot} (pid {pid}) of the new generation {why} after it was ready");
            self.rollback(cause, Some(output), now);
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
        let boot_timeout = w.gen.s.boot_timeout;
        match w.gen.s.ready {
            Ready::Notify | Ready::Auto if w.held_to_ready() => {
                (w.is_booting() && !self.booted()).then(|| "before it reported ready".to_string())
            }
            Ready::Notify => None,
            Ready::Spawn | Ready::Auto => {
                (w.generation() == 1 && !self.rollout.busy() && now - self.started < boot_timeout.0)
                    .then(|| {
                        format!(
                            "within boot_timeout ({boot_timeout}) of start (ready = \"{}\")",
                            w.gen.s.ready.name()
                        )
                    })
            }
        }
    }

    /// A start of `slot` failed (its exec or fork, or its template's answer):
    /// the next try is a restart, as after a crash. An operator watching
    /// `restarts` for a crash loop must see a slot that cannot even start.
    fn count_restart(&mut self, slot: u32) {
        if let Some(s) = self.pool.slot(slot) {
            s.restarts += 1;
        }
    }

    /// Counts a failure of `slot` and holds its next spawn for the backoff.
    /// Returns the delay and the number of failures in a row.
    fn slot_failed(&mut self, slot: u32, now: Instant) -> (Duration, u32) {
        let s = &self.rollout.current().s;
        let (first, max, degraded) = (s.respawn_delay.0, s.respawn_max_delay.0, s.degraded_after.0);
        let (delay, failures) = self.pool.slot_failed(slot, first, max, now);
        if failures == degraded {
            self.emit(Action::Publish(Kind::SlotDegraded { slot, failures }));
            error!(
                "slot {slot} is degraded: {failures} failures in a row; retrying every {} at most",
                ms(max)
            );
        }
        (delay, failures)
    }

    // Deadlines.

    /// Acts on everything overdue: boot deadlines, heartbeats, max_age, stop
    /// deadlines, the memory check.
    fn on_deadlines(&mut self, now: Instant) {
        let reset_after = self.current().s.respawn_reset_after.0;
        let shutdown = match &self.phase {
            Phase::ShuttingDown(sd) => Some(sd.deadline),
            _ => None,
        };
        let shutting_down = shutdown.is_some();
        let mut due = Overdue::default();
        for w in self.pool.workers.iter_mut() {
            if w.deadline().is_some_and(|d| d <= now) {
                due.act_on(w, now, shutdown, reset_after);
            }
        }
        self.emit_all(due.actions);
        for pid in due.presumed_ready {
            self.on_ready(pid, now);
        }
        if let Phase::ShuttingDown(sd) = &mut self.phase {
            sd.killed += due.killed;
        }
        // A wedged worker is a failure of its slot, like a crash: a worker that
        // always wedges is respawned ever more slowly, and its slot degraded.
        for (slot, stable, pid, generation) in due.wedged {
            if stable {
                if let Some(s) = self.pool.slot(slot) {
                    s.failures = 0;
                }
            }
            self.slot_failed(slot, now);
            // As a crash after it was ready (`on_unplanned_exit`).
            if !shutting_down && self.rollout.rolling() && generation == self.current().number {
                self.rollback(
                    format!(
                        "worker {slot} (pid {pid}) of the new generation missed its heartbeat \
                         after it was ready"
                    ),
                    None,
                    now,
                );
            }
        }
        if !shutting_down && self.next_memory_check.is_some_and(|t| t <= now) {
            self.check_memory(now);
        }
    }

    /// Marks ready workers over their generation's max_memory for
    /// replacement, and sets the next check.
    fn check_memory(&mut self, now: Instant) {
        // Disarmed once no generation alive sets max_memory.
        let watched = self.current().s.max_memory.is_some()
            || self
                .pool
                .workers
                .iter()
                .any(|w| w.gen.s.max_memory.is_some());
        let interval = self.current().s.memory_check_interval.0;
        self.next_memory_check = watched.then_some(now + interval);
        for w in self.pool.workers.iter_mut() {
            let (Some(limit), State::Ready(s)) = (w.gen.s.max_memory, &mut w.state) else {
                continue;
            };
            if s.replace.is_some() {
                continue;
            }
            let Some(rss) = crate::metrics::resident_bytes(w.pid.as_raw()) else {
                continue;
            };
            if rss > limit.0 {
                info!(
                    "worker {} (pid {}) uses {} MiB resident, over max_memory ({} MiB): starting its replacement",
                    w.slot,
                    w.pid,
                    rss >> 20,
                    limit.0 >> 20
                );
                s.replace = Some(Replace::MaxMemory);
            }
        }
    }

    // Shutdown.

    /// SIGTERM with a `prestop_delay`, while running: serve on, not ready,
    /// and begin the shutdown when the delay is over. Returns false (the
    /// shutdown begins now) with no delay, when drover is not serving
    /// (starting, paused) or is already stopping.
    fn begin_prestop(&mut self, name: &'static str, now: Instant) -> bool {
        let delay = self.current().s.prestop_delay;
        if delay.0.is_zero() || !matches!(self.phase, Phase::Running) {
            return false;
        }
        info!(
            "{name}: pre-stop: serving for {delay} more while load balancers stop sending \
             (not ready), then a graceful shutdown"
        );
        self.emit(Action::NotifySystemd(Note::Stopping(Some((
            Pace::Graceful,
            name,
        )))));
        self.emit(Action::Publish(Kind::Shutdown {
            stage: 0,
            quick: false,
            cause: name.to_string(),
        }));
        // The workers serve on, but should end keep-alive: an idle
        // connection left at the stop is one its client may reuse as the
        // worker closes it. Those not ready yet are told when they are
        // (`on_ready`): a worker that has not set up its handler could miss it.
        let notices: Vec<_> = self
            .pool
            .workers
            .iter()
            .filter(|w| w.is_ready())
            .map(prestop_notice)
            .collect();
        self.emit_all(notices);
        self.phase = Phase::PreStop {
            until: now + delay.0,
            cause: Cause::Signal(name),
        };
        true
    }

    /// Starts a shutdown, or turns a graceful one into a quick one.
    pub fn begin_shutdown(&mut self, pace: Pace, cause: Cause, now: Instant) {
        let quick = pace == Pace::Quick;
        let s = &self.current().s;
        let (signal, timeout) = if quick {
            (Signal::SIGQUIT, s.quick_timeout)
        } else {
            (s.stop_signal.0, s.graceful_timeout)
        };
        let why = cause.describe();
        match &mut self.phase {
            Phase::ShuttingDown(sd) if sd.quick || !quick => {
                info!(
                    "{why}: already shutting down ({})",
                    if sd.quick { "quick" } else { "graceful" }
                );
            }
            Phase::ShuttingDown(sd) => {
                sd.quick = true;
                sd.deadline = sd.deadline.min(now + timeout.0);
                self.emit(Action::Publish(Kind::Shutdown {
                    stage: 2,
                    quick: true,
                    cause: why.to_string(),
                }));
                let stage = format!("{why}: shutdown escalated to quick");
                self.stop_for_shutdown(&stage, pace, cause, signal, timeout, now);
            }
            _ => {
                self.stop_accepting(quick, cause, now + timeout.0, now);
                // The exit, once no worker is left, is the next turn's: it
                // must come even when nothing else will wake the loop (a
                // worker that could not be forked at start-up leaves none).
                self.again = true;
                self.emit(Action::Publish(Kind::Shutdown {
                    stage: 2,
                    quick,
                    cause: why.to_string(),
                }));
                self.stop_for_shutdown("stage 2, drain", pace, cause, signal, timeout, now);
            }
        }
    }

    /// Stage 1 of a shutdown: the listeners and the control socket go (the
    /// clients waiting on it are answered first), and the phase becomes
    /// `ShuttingDown`, until `deadline`.
    fn stop_accepting(&mut self, quick: bool, cause: Cause, deadline: Instant, now: Instant) {
        let why = cause.describe();
        let kind = if quick { "quick" } else { "graceful" };
        // A signal (or a stop) during the pre-stop delay ends it.
        let prestop = match self.phase {
            Phase::PreStop { until, .. } if until > now => {
                info!("{why}: pre-stop delay cut short, {} early", ms(until - now));
                true
            }
            Phase::PreStop { .. } => true,
            _ => false,
        };
        info!("{why}: {kind} shutdown: stage 1, stop accepting");
        self.emit(Action::Publish(Kind::Shutdown {
            stage: 1,
            quick,
            cause: why.to_string(),
        }));
        // After an upgrade the new master serves the sockets: only
        // our copies go, and the service is the new master's
        // (MAINPID=): it is not stopping. After a pre-stop delay,
        // systemd was told already.
        let handover = cause == Cause::Upgrade;
        if !handover && !prestop {
            let asked = match cause {
                Cause::Signal(name) => {
                    Some((if quick { Pace::Quick } else { Pace::Graceful }, name))
                }
                _ => None,
            };
            self.emit(Action::NotifySystemd(Note::Stopping(asked)));
        }
        // The control socket goes below: answer whoever waits on it.
        let shutting = format!("{why}: shutting down");
        let (queued, running) = self.rollout.take_waiters();
        if let Some(queued) = queued {
            info!("queued reload cancelled: {shutting}");
            self.emit_all(queued.answer(control::failure(&format!("cancelled: {shutting}"))));
        }
        self.emit_all(running.answer(control::failure(&format!("not applied: {shutting}"))));
        let mut listeners = self
            .rollout
            .previous()
            .map(|p| p.take_listeners())
            .unwrap_or_default();
        listeners.extend(self.current().take_listeners());
        self.emit(Action::CloseListeners {
            listeners,
            handover,
        });
        self.emit(Action::CloseControl);
        self.phase = Phase::ShuttingDown(Shutdown {
            quick,
            began: now,
            deadline,
            cause,
            killed: 0,
        });
    }

    /// Stage 2 of a shutdown: every worker gets `signal` (`pace`) and
    /// `timeout` to exit. Logs it as `stage` says: how many workers are
    /// signalled now, how many were already stopping (not signalled again),
    /// how many get it once ready.
    fn stop_for_shutdown(
        &mut self,
        stage: &str,
        pace: Pace,
        cause: Cause,
        signal: Signal,
        timeout: Dur,
        now: Instant,
    ) {
        // A worker still booting while no other one serves may hold the last
        // copy of the listeners, with connections queued on them: stopped now
        // (before its stop handlers even exist), its exit would reset them.
        // So it gets its stop once it is ready, within this shutdown's
        // deadline, and drains the queue then (docs/signals.md). As for the
        // workers stopped now, the stop's deadline governs it from here on,
        // in place of its boot_timeout: one still booting then gets SIGKILL,
        // as every worker left at the end of the grace period does.
        // While an upgrade's old master holds the listeners too, no booting
        // worker holds their last copy: it is stopped at once (the old
        // master stopping an upgrade that was not ready in time would
        // otherwise wait for workers that never get ready).
        let defer = pace == Pace::Graceful
            && !self.predecessor_listens
            && matches!(cause, Cause::Signal(_))
            && !self.pool.workers.iter().any(|w| w.is_serving());
        let until = now + timeout.0;
        let mut stops = Vec::new();
        let mut deferred = Vec::new();
        let mut already = 0;
        for w in self.pool.workers.iter_mut() {
            if defer && w.is_booting() && w.boot_by(until) {
                deferred.push((w.slot, w.pid));
                continue;
            }
            match w.stop(pace, Stop::Shutdown, now) {
                Some(stop) => stops.push(stop),
                // Retired, recycled, aborted or killed before: its own
                // signal was sent, and stands (or could not exec).
                None => already += 1,
            }
            // Its own deadline stands only if it is the earlier: a stop
            // begun before with a longer graceful_timeout (its generation's,
            // before a reload), the abort_grace of an abort (a missed
            // heartbeat, a boot timeout) would outlast the shutdown's.
            w.cap_deadline(until);
        }
        let signal = signal.as_str();
        let mut line = format!(
            "{stage}: {signal} to {} worker(s), up to {timeout}",
            stops.len()
        );
        if already > 0 {
            line.push_str(&format!(
                "; {already} already stopping (not signalled again)"
            ));
        }
        if !deferred.is_empty() {
            line.push_str(&format!(
                "; {} still booting (each gets {signal} once ready)",
                deferred.len()
            ));
        }
        info!("{line}");
        for (slot, pid) in deferred {
            info!(
                "worker {slot} (pid {pid}) still booting: it gets {signal} once ready, within the \
                 shutdown's {timeout} (which replaces its boot_timeout), else SIGKILL then"
            );
        }
        self.emit_all(stops);
    }

    /// A summary in one line: "3/4 workers ready, generation 2". A slot
    /// whose worker recycled itself counts as ready while its successor
    /// boots (as for `readiness`): with `max_requests` under load some slot
    /// is nearly always between two workers, and the `STATUS=` told to
    /// systemd would flap at every recycle.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}/{} workers ready, generation {}",
            self.pool.ready_or_recycling(),
            self.pool.slots.len(),
            self.current().number
        );
        if self.paused() {
            s.push_str(", paused");
        }
        if self.rollout.reloading() {
            s.push_str(", reloading");
        }
        if matches!(self.phase, Phase::PreStop { .. }) {
            s.push_str(", pre-stop");
        }
        if let Some(failed) = &self.reload_failed {
            // STATUS= is one line.
            s.push_str("; last ");
            s.push_str(&failed.replace('\n', " "));
        }
        s
    }
}

/// SIGUSR1 passed on to `w`: reopen your logs.
fn reopen_signal(w: &Worker) -> Action {
    Action::Signal {
        slot: w.slot,
        pid: w.pid,
        signal: Signal::SIGUSR1,
        why: SignalWhy::Forward,
    }
}

/// SIGWINCH to a serving worker during the pre-stop delay: the stop is
/// coming, end keep-alive (docs/protocol.md).
fn prestop_notice(w: &Worker) -> Action {
    Action::Signal {
        slot: w.slot,
        pid: w.pid,
        signal: Signal::SIGWINCH,
        why: SignalWhy::PreStop,
    }
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

/// The decisions, driven without a process: pids are made up, exits and
/// exec reports are told, and the actions are read back.
/// What the workers' passed deadlines call for, gathered while the pool is
/// borrowed and acted on after.
#[derive(Default)]
struct Overdue {
    actions: Vec<Action>,
    /// Killed at a deadline (counted in `Shutdown::killed` during a shutdown).
    killed: u32,
    /// Slots whose worker missed its heartbeat, whether it had lived
    /// `respawn_reset_after` (its slot's failures count from 0 again), its
    /// pid and its generation.
    wedged: Vec<(u32, bool, Pid, u32)>,
    /// `ready = "auto"` workers that said nothing: ready now.
    presumed_ready: Vec<Pid>,
}

impl Overdue {
    /// What `w`'s passed deadline means, by its state (`shutdown`: the
    /// shutdown's deadline, during one).
    fn act_on(
        &mut self,
        w: &mut Worker,
        now: Instant,
        shutdown: Option<Instant>,
        reset_after: Duration,
    ) {
        let (slot, pid) = (w.slot, w.pid);
        let shutting_down = shutdown.is_some();
        match w.state {
            State::Ready(_) if w.recheck_priority.is_some_and(|t| t <= now) => {
                w.recheck_priority = None;
                self.actions.extend(w.restore_priority());
            }
            State::Execing { .. } | State::Booting { .. }
                if w.lowered_until().is_some_and(|t| t <= now) =>
            {
                info!(
                    "worker {slot} (pid {pid}) still booting at half its boot_timeout ({}): \
                     back to its normal priority (boot_priority)",
                    w.gen.s.boot_timeout
                );
                w.lowered = false;
                self.actions.extend(w.restore_priority());
            }
            State::Booting { .. } if w.silent_past(now) => {
                // ready = "auto": nothing said on the notify socket, so
                // a program that does not speak the protocol.
                w.become_ready(now);
                info!(
                    "worker {slot} (pid {pid}) ready in {} (sent nothing to NOTIFY_SOCKET \
                     within announce_timeout, {}: ready = \"auto\" counts it as spawned)",
                    ms(now - w.started),
                    w.gen.s.announce_timeout
                );
                self.presumed_ready.push(pid);
            }
            State::Execing { .. } | State::Booting { .. } if shutting_down => {
                warn!(
                    "worker {slot} (pid {pid}) still booting at the shutdown's deadline; \
                     sending SIGKILL to its process group"
                );
                self.killed += 1;
                self.actions.push(w.kill(Kill::GraceExpired));
            }
            State::Execing { .. } | State::Booting { .. } => {
                error!(
                    "worker {slot} (pid {pid}) did not report READY=1 within boot_timeout ({}); \
                     SIGABRT (a Python worker prints where it hangs), then SIGKILL to its \
                     process group in {}",
                    w.gen.s.boot_timeout, w.gen.s.abort_grace
                );
                self.actions.push(w.abort_boot(now));
            }
            State::Ready(s) if s.leave_by.is_some_and(|t| t <= now) => {
                warn!(
                    "worker {slot} (pid {pid}) said STOPPING=1 {} ago and is still running \
                     (graceful_timeout); sending SIGKILL to its process group",
                    w.gen.s.graceful_timeout
                );
                self.actions.push(w.kill(Kill::GraceExpired));
            }
            State::Ready(s) if s.heartbeat.is_some_and(|h| h <= now) => {
                let t = w.gen.s.timeout.map_or(Duration::ZERO, |t| t.0);
                error!(
                    "worker {slot} (pid {pid}) missed its heartbeat (no WATCHDOG=1 for {}): \
                     SIGABRT, then SIGKILL in {}",
                    humantime::format_duration(t),
                    humantime::format_duration(w.gen.s.abort_grace.0)
                );
                // The worker may dump its state on SIGABRT; its slot is
                // refilled after the backoff, since it no longer serves.
                self.actions
                    .extend(w.stop(Pace::Abort, Stop::HeartbeatMissed, now));
                self.wedged
                    .push((slot, now - w.started >= reset_after, pid, w.generation()));
            }
            State::Ready(ref mut s) => {
                // max_age: start a successor; this one stops once it is ready.
                info!(
                    "worker {slot} (pid {pid}) reached max_age after {}: starting its replacement",
                    ms(now - w.started)
                );
                s.replace = Some(Replace::MaxAge);
            }
            State::Stopping {
                ref mut restore_at,
                deadline,
                ..
            } if deadline > now => {
                // Only `restore_at` is due: the exit may be at SCHED_IDLE.
                *restore_at = None;
                self.actions.extend(w.restore_priority());
            }
            State::Stopping { why, .. } => {
                let cause = if why == Stop::HeartbeatMissed {
                    Kill::HeartbeatTimeout
                } else {
                    Kill::GraceExpired
                };
                warn!(
                    "worker {slot} (pid {pid}) still running at its stop deadline; \
                     sending SIGKILL to its process group"
                );
                self.killed += 1;
                self.actions.push(w.kill(cause));
            }
            State::Killed { kill, .. } if w.kill_at.is_some_and(|t| t <= now) => {
                w.kill_at = None;
                if shutdown.is_some_and(|d| d <= now) {
                    warn!(
                        "worker {slot} (pid {pid}) still running at the shutdown's deadline \
                         after its SIGABRT (before its abort_grace, {}, was over); \
                         sending SIGKILL to its process group",
                        w.gen.s.abort_grace
                    );
                } else {
                    warn!(
                        "worker {slot} (pid {pid}) still running {} after its SIGABRT; \
                         sending SIGKILL to its process group",
                        w.gen.s.abort_grace
                    );
                }
                // Aborted at its boot deadline, perhaps before a shutdown: a
                // kill during one counts as the shutdown's, as for any worker.
                self.killed += 1;
                self.actions.push(Action::KillGroup { slot, pid, kill });
            }
            State::Killed { .. } | State::ExecFailed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::generation::for_test;

    use crate::master::worker::{Serving, MAX_EXTENSION};

    /// A generation of `extra` settings; `ready = "spawn"` unless `extra`
    /// says otherwise, so that a confirmed exec is a ready worker.
    fn gen(number: u32, extra: &str) -> Generation {
        let ready = if extra.contains("ready =") {
            ""
        } else {
            "ready = \"spawn\"\n"
        };
        for_test(
            number,
            &format!("command = [\"/bin/true\"]\n{ready}{extra}"),
        )
    }

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    /// Every action decided so far, in words.
    /// The actions decided so far, but the events published (see
    /// `published` for those).
    fn drain(sup: &mut Supervisor) -> Vec<String> {
        std::iter::from_fn(|| sup.next_action())
            .filter(|a| !matches!(a, Action::Publish(_)))
            .map(|a| format!("{a:?}"))
            .collect()
    }

    /// The events published among the actions decided so far.
    fn published(sup: &mut Supervisor) -> Vec<Kind> {
        std::iter::from_fn(|| sup.next_action())
            .filter_map(|a| match a {
                Action::Publish(k) => Some(k),
                _ => None,
            })
            .collect()
    }

    /// Carries out the `Spawn`s of one turn as the master would, giving the
    /// workers pids from `first_pid` and confirming their exec; returns the
    /// other actions.
    fn turn(sup: &mut Supervisor, first_pid: i32, now: Instant) -> Vec<String> {
        sup.tick(now);
        let mut others = Vec::new();
        let mut next = first_pid;
        while let Some(a) = sup.next_action() {
            match a {
                Action::Spawn { slot, generation } if sup.wants_spawn(&generation) => {
                    let lowered = sup.boot_priority(&generation).is_some();
                    sup.spawned(slot, generation, pid(next), lowered, now);
                    sup.on_exec_report(pid(next), Ok(()), now);
                    next += 1;
                }
                Action::Publish(_) => {}
                other => others.push(format!("{other:?}")),
            }
        }
        others
    }

    fn has(actions: &[String], needle: &str) -> bool {
        actions.iter().any(|a| a.contains(needle))
    }

    fn started(extra: &str, now: Instant) -> Supervisor {
        let mut sup = Supervisor::new(Rc::new(gen(1, extra)), now);
        let actions = turn(&mut sup, 11, now);
        assert!(has(&actions, "Ready"), "{actions:?}");
        assert!(matches!(sup.phase, Phase::Running));
        sup
    }

    /// A worker ready during a shutdown is stopped by the shutdown's
    /// deadline, and `EXTEND_TIMEOUT_USEC` moves it at most 5 minutes past
    /// that deadline, not past `graceful_timeout` after its own SIGTERM
    /// (2 s later here): the code before allowed t0 + 305 s.
    #[test]
    fn a_worker_ready_during_a_shutdown_extends_from_the_shutdowns_deadline() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        let g = gen(1, "ready = \"notify\"\ngraceful_timeout = \"3s\"\n");
        let mut sup = Supervisor::new(Rc::new(g), t0);
        turn(&mut sup, 11, t0);
        sup.begin_shutdown(Pace::Graceful, Cause::Signal("SIGTERM"), t0);
        let actions = drain(&mut sup);
        assert!(!has(&actions, "signal SIGTERM"), "deferred: {actions:?}");
        let t1 = t0 + Duration::from_secs(2);
        sup.on_notify(pid(11), vec![Message::Ready], t1);
        assert!(has(&drain(&mut sup), "signal SIGTERM to slot 1 pid 11"));
        let deadline = |sup: &mut Supervisor| sup.pool.get_mut(pid(11)).unwrap().deadline();
        assert_eq!(deadline(&mut sup), Some(t0 + grace));
        // Each extension as long as can be, the second one near its end.
        sup.on_notify(pid(11), vec![Message::ExtendTimeout(MAX_EXTENSION)], t1);
        let t2 = t0 + MAX_EXTENSION;
        sup.on_notify(pid(11), vec![Message::ExtendTimeout(MAX_EXTENSION)], t2);
        assert_eq!(deadline(&mut sup), Some(t0 + grace + MAX_EXTENSION));
    }

    /// A graceful shutdown's deadline bounds the workers already stopping
    /// too: one retired by a reload with its generation's 100 s stops by the
    /// shutdown's 10 s. What one asked for by `EXTEND_TIMEOUT_USEC` stands,
    /// up to 5 minutes past the shutdown's deadline. The code before left
    /// both at their own deadlines (the second one's limit at t0 + 400 s).
    #[test]
    fn a_graceful_shutdown_brings_earlier_stops_to_its_deadline_but_for_their_extensions() {
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut sup = started(
            "workers = 2\nmax_surge = 2\ngraceful_timeout = \"100s\"",
            t0,
        );
        sup.on_command(7, Command::Reload, t0);
        let next = gen(2, "workers = 2\nmax_surge = 2\ngraceful_timeout = \"10s\"");
        sup.config_loaded(Ok(next), "test.toml", t0);
        let actions = turn(&mut sup, 21, t0);
        assert!(
            has(&actions, "pid 11 (Stop(Replaced(Reload)))"),
            "{actions:?}"
        );
        assert!(
            has(&actions, "pid 12 (Stop(Replaced(Reload)))"),
            "{actions:?}"
        );
        sup.on_notify(pid(12), vec![Message::ExtendTimeout(MAX_EXTENSION)], at(1));
        sup.begin_shutdown(Pace::Graceful, Cause::Signal("SIGTERM"), at(2));
        drain(&mut sup);
        let deadline = |sup: &mut Supervisor, p| sup.pool.get_mut(pid(p)).unwrap().deadline();
        assert_eq!(deadline(&mut sup, 11), Some(at(12)));
        assert_eq!(deadline(&mut sup, 12), Some(at(301)));
        sup.on_notify(
            pid(12),
            vec![Message::ExtendTimeout(MAX_EXTENSION)],
            at(100),
        );
        assert_eq!(deadline(&mut sup, 12), Some(at(12) + MAX_EXTENSION));
    }

    #[test]
    fn a_reload_replaces_each_worker_with_its_own_generations_stop_policy() {
        let now = Instant::now();
        let mut sup = started(
            "workers = 2\nmax_surge = 1\nstop_signal = \"SIGINT\"\ngraceful_timeout = \"10s\"",
            now,
        );
        sup.on_command(7, Command::Reload, now);
        assert_eq!(
            drain(&mut sup),
            ["notify_systemd Reloading", "load_config (control: reload)"]
        );
        let next = gen(2, "workers = 2\nmax_surge = 1\ngraceful_timeout = \"1s\"");
        sup.config_loaded(Ok(next), "test.toml", now);
        // max_surge = 1: one slot at a time; the old worker of slot 1 gets
        // generation 1's SIGINT, with generation 1's 10 s.
        let actions = turn(&mut sup, 21, now);
        assert_eq!(
            actions,
            ["signal SIGINT to slot 1 pid 11 (Stop(Replaced(Reload)))"]
        );
        let old = &sup.pool.workers[sup.pool.find(pid(11)).unwrap()];
        assert_eq!(old.deadline(), Some(now + Duration::from_secs(10)));
        assert!(sup.on_exit(pid(11), WaitStatus::Exited(pid(11), 0), now));
        let actions = turn(&mut sup, 22, now);
        assert_eq!(
            actions,
            ["signal SIGINT to slot 2 pid 12 (Stop(Replaced(Reload)))"]
        );
        sup.on_exit(pid(12), WaitStatus::Exited(pid(12), 0), now);
        let actions = turn(&mut sup, 23, now);
        assert!(has(&actions, "close_listeners"), "{actions:?}");
        assert!(
            has(&actions, "answer_client 7 ok: applied: generation 2"),
            "{actions:?}"
        );
        assert!(!sup.rollout.busy());
    }

    #[test]
    fn heartbeats_follow_the_workers_own_generation() {
        let now = Instant::now();
        let mut sup = started("workers = 1\ntimeout = \"1s\"", now);
        sup.on_signal(Event::Reload, now);
        drain(&mut sup);
        let next = gen(2, "workers = 1\nready = \"notify\"");
        sup.config_loaded(Ok(next), "test.toml", now);
        turn(&mut sup, 21, now);
        // The old worker keeps its 1 s promise while its successor boots.
        let later = now + Duration::from_millis(900);
        sup.on_notify(pid(11), vec![Message::Watchdog], later);
        let w = &sup.pool.workers[sup.pool.find(pid(11)).unwrap()];
        assert_eq!(w.deadline(), Some(later + Duration::from_secs(1)));
        let actions = turn(&mut sup, 31, now + Duration::from_millis(1500));
        assert!(!has(&actions, "HeartbeatMissed"), "{actions:?}");
        // The new generation has no timeout: no heartbeat deadline.
        sup.on_notify(pid(21), vec![Message::Ready], later);
        let w = &sup.pool.workers[sup.pool.find(pid(21)).unwrap()];
        assert!(matches!(
            w.state,
            State::Ready(Serving {
                heartbeat: None,
                ..
            })
        ));
    }

    #[test]
    fn a_new_worker_that_dies_booting_rolls_the_reload_back() {
        let now = Instant::now();
        let mut sup = started("workers = 2", now);
        sup.on_command(7, Command::Reload, now);
        drain(&mut sup);
        let next = gen(2, "workers = 3\nready = \"notify\"");
        sup.config_loaded(Ok(next), "test.toml", now);
        assert_eq!(sup.pool.count(), 3);
        turn(&mut sup, 21, now);
        sup.on_exit(pid(21), WaitStatus::Exited(pid(21), 3), now);
        let actions = drain(&mut sup);
        assert_eq!(sup.current().number, 1, "generation 1 is current again");
        assert_eq!(sup.pool.count(), 2, "the worker count before the reload");
        assert!(has(&actions, "Stop(Outdated)"), "{actions:?}");
        assert!(
            has(&actions, "answer_client 7 failed: rolled back: worker 1 (pid 21) of the new generation exited with status 3"),
            "{actions:?}"
        );
        // The old workers were never touched.
        assert!(!has(&actions, "pid 11"), "{actions:?}");
        // Once the failed generation is gone, the rollout is over.
        for p in [22, 23] {
            sup.on_exit(pid(p), WaitStatus::Exited(pid(p), 0), now);
        }
        let actions = turn(&mut sup, 31, now);
        assert!(has(&actions, "notify_systemd Ready"), "{actions:?}");
        assert!(!sup.rollout.busy());
    }

    #[test]
    fn extensions_lengthen_a_graceful_stop_up_to_the_maximum_and_never_a_quick_one() {
        let now = Instant::now();
        let mut sup = started(
            "workers = 1\ngraceful_timeout = \"10s\"\nquick_timeout = \"2s\"",
            now,
        );
        sup.on_signal(Event::Terminate, now);
        drain(&mut sup);
        let extend = |sup: &mut Supervisor, secs: u64, at: Instant| {
            let by = Duration::from_secs(secs);
            sup.on_notify(pid(11), vec![Message::ExtendTimeout(by)], at);
            sup.next_deadline(at)
        };
        // A graceful stop: lengthened, up to the maximum past its deadline.
        assert_eq!(
            extend(&mut sup, 20, now),
            Some(now + Duration::from_secs(20))
        );
        let cap = now + Duration::from_secs(10) + MAX_EXTENSION;
        assert_eq!(
            extend(&mut sup, 3600, now + Duration::from_secs(15)),
            Some(cap)
        );
        assert_eq!(
            extend(&mut sup, 3600, now + Duration::from_secs(200)),
            Some(cap)
        );
        // Hurried (after the repeat window): the quick deadline holds.
        let later = now + Duration::from_secs(2);
        sup.on_signal(Event::Terminate, later);
        drain(&mut sup);
        let quick = later + Duration::from_secs(2);
        assert_eq!(sup.next_deadline(later), Some(quick));
        assert_eq!(extend(&mut sup, 60, later), Some(quick));
    }

    #[test]
    fn a_reload_rejected_before_every_worker_booted_does_not_say_ready() {
        let now = Instant::now();
        let mut sup = Supervisor::new(Rc::new(gen(1, "workers = 2\nready = \"notify\"")), now);
        let actions = turn(&mut sup, 11, now);
        assert!(!has(&actions, "Ready"), "{actions:?}");
        // A new master of an upgrade told to reload while its workers boot:
        // the old code said READY=1 here, and the old master retired.
        sup.on_signal(Event::Reload, now);
        drain(&mut sup);
        sup.config_loaded(Err("test.toml:1:1: broken".into()), "test.toml", now);
        let actions = drain(&mut sup);
        assert!(!has(&actions, "notify_systemd Ready"), "{actions:?}");
        assert!(has(&actions, "notify_systemd Status"), "{actions:?}");
        sup.on_notify(pid(11), vec![Message::Ready], now);
        assert!(!has(&drain(&mut sup), "notify_systemd Ready"));
        sup.on_notify(pid(12), vec![Message::Ready], now);
        assert!(has(&drain(&mut sup), "notify_systemd Ready"));
    }

    #[test]
    fn a_second_sigterm_escalates_and_the_deadline_kills() {
        let now = Instant::now();
        let mut sup = started(
            "workers = 2\ngraceful_timeout = \"30s\"\nquick_timeout = \"5s\"",
            now,
        );
        sup.on_signal(Event::Terminate, now);
        let actions = drain(&mut sup);
        assert_eq!(
            actions,
            [
                "notify_systemd Stopping(Some((Graceful, \"SIGTERM\")))",
                "close_listeners 0 (handover: false)",
                "close_control",
                "signal SIGTERM to slot 1 pid 11 (Stop(Shutdown))",
                "signal SIGTERM to slot 2 pid 12 (Stop(Shutdown))",
            ]
        );
        // The same signal again at once (GNU timeout, a signal to the
        // process and its group): the same request.
        sup.on_signal(Event::Terminate, now + Duration::from_millis(1));
        assert_eq!(drain(&mut sup), Vec::<String>::new());
        // Once the window has passed, a deliberate second one hurries.
        let now = now + REPEAT_WINDOW;
        sup.on_signal(Event::Terminate, now);
        let actions = drain(&mut sup);
        assert_eq!(
            actions,
            [
                "signal SIGQUIT to slot 1 pid 11 (Stop(Shutdown))",
                "signal SIGQUIT to slot 2 pid 12 (Stop(Shutdown))",
            ]
        );
        assert_eq!(sup.next_deadline(now), Some(now + Duration::from_secs(5)));
        sup.on_exit(pid(11), WaitStatus::Exited(pid(11), 0), now);
        let actions = turn(&mut sup, 0, now + Duration::from_secs(5));
        assert_eq!(actions, ["kill_group slot 2 pid 12 (GraceExpired)"]);
        sup.on_exit(
            pid(12),
            WaitStatus::Signaled(pid(12), Signal::SIGKILL, false),
            now,
        );
        let actions = turn(&mut sup, 0, now + Duration::from_secs(5));
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert!(
            actions[0].starts_with("exit Outcome { status: 4, quick: true, killed: 1"),
            "{actions:?}"
        );
    }

    #[test]
    fn a_crashing_worker_is_respawned_ever_more_slowly() {
        let now = Instant::now();
        let mut sup = started(
            "workers = 1\nrespawn_delay = \"100ms\"\nrespawn_max_delay = \"400ms\"\n\
             respawn_reset_after = \"10s\"\ndegraded_after = 3",
            now,
        );
        let mut t = now;
        let mut p = 11;
        let mut delays = Vec::new();
        for _ in 0..4 {
            sup.on_exit(pid(p), WaitStatus::Exited(pid(p), 1), t);
            let due = sup.next_deadline(t).expect("a respawn time");
            delays.push((due - t).as_millis());
            // Nothing is spawned before the backoff has passed (systemd
            // may be told the new summary).
            let actions = turn(&mut sup, 99, t);
            assert!(
                actions
                    .iter()
                    .all(|a| a.starts_with("notify_systemd Status(\"0/1 workers ready")),
                "{actions:?}"
            );
            assert!(sup.pool.workers.is_empty());
            t = due;
            p += 1;
            turn(&mut sup, p, t);
            assert!(sup.pool.has(pid(p)));
        }
        assert_eq!(delays, [100, 200, 400, 400]);
        let status = sup.status(t).status.unwrap();
        assert_eq!(status["slots"][0]["failures_in_a_row"], 4);
        assert_eq!(status["slots"][0]["restarts"], 4);
        assert_eq!(status["slots"][0]["degraded"], true);
    }

    #[test]
    fn a_worker_that_cannot_boot_at_start_up_stops_drover_with_status_3() {
        let now = Instant::now();
        let mut sup = Supervisor::new(Rc::new(gen(1, "workers = 2\nready = \"notify\"")), now);
        turn(&mut sup, 11, now);
        sup.on_exit(pid(11), WaitStatus::Exited(pid(11), 3), now);
        let actions = drain(&mut sup);
        assert!(
            has(&actions, "signal SIGTERM to slot 2 pid 12 (Stop(Shutdown))"),
            "{actions:?}"
        );
        sup.on_exit(pid(12), WaitStatus::Exited(pid(12), 0), now);
        let actions = turn(&mut sup, 0, now);
        assert!(
            actions[0].starts_with("exit Outcome { status: 3"),
            "{actions:?}"
        );
    }

    /// What an operator reads in the event stream: a crash with its cause
    /// and status, the slot degraded, a reload rolled back with its reason.
    #[test]
    fn decisions_are_published_as_events() {
        let now = Instant::now();
        let mut sup = started("workers = 1\ndegraded_after = 1", now);
        sup.on_exit(pid(11), WaitStatus::Exited(pid(11), 1), now);
        let events = published(&mut sup);
        assert!(
            events.iter().any(|e| matches!(
                e,
                Kind::WorkerExited {
                    slot: 1,
                    pid: 11,
                    cause: ExitCause::Crash,
                    status: Some(1),
                    ..
                }
            )),
            "{events:?}"
        );
        assert!(
            events.contains(&Kind::SlotDegraded {
                slot: 1,
                failures: 1
            }),
            "{events:?}"
        );
        // A reload whose new worker dies booting: begun, then rolled back.
        let t = now + Duration::from_secs(60);
        turn(&mut sup, 12, t);
        sup.on_command(7, Command::Reload, t);
        drain(&mut sup);
        sup.config_loaded(
            Ok(gen(2, "workers = 1\nready = \"notify\"")),
            "test.toml",
            t,
        );
        assert_eq!(
            published(&mut sup),
            [Kind::ReloadBegun {
                generation: 2,
                trigger: "control: reload".into()
            }]
        );
        let actions = turn(&mut sup, 21, t);
        assert!(actions.is_empty(), "{actions:?}");
        sup.on_exit(pid(21), WaitStatus::Exited(pid(21), 2), t);
        let events = published(&mut sup);
        assert!(events.iter().any(|e| matches!(e,
            Kind::ReloadRolledBack { generation: 2, reason } if reason.contains("exited with status 2"))),
            "{events:?}");
    }

    #[test]
    fn ready_auto_holds_an_announced_worker_to_ready_1_and_counts_a_silent_one_as_spawned() {
        let now = Instant::now();
        let mut sup = Supervisor::new(
            Rc::new(gen(
                1,
                "workers = 2\nready = \"auto\"\nannounce_timeout = \"1s\"",
            )),
            now,
        );
        turn(&mut sup, 11, now);
        assert_eq!(sup.pool.ready(), 0, "nobody is ready at its exec");
        // Worker 11 announces itself; 12 says nothing.
        let later = now + Duration::from_millis(100);
        sup.on_notify(
            pid(11),
            vec![Message::Other("X_DROVER_WILL_NOTIFY=1".into())],
            later,
        );
        let past = now + Duration::from_millis(1001);
        turn(&mut sup, 20, past);
        assert_eq!(sup.pool.ready(), 1, "the silent worker counts as ready");
        assert!(sup.pool.get_mut(pid(12)).unwrap().is_ready());
        assert!(!sup.pool.get_mut(pid(11)).unwrap().is_ready());
        assert!(matches!(sup.phase, Phase::Starting));
        sup.on_notify(pid(11), vec![Message::Ready], past);
        assert_eq!(sup.pool.ready(), 2);
        assert!(matches!(sup.phase, Phase::Running));
    }

    /// `boot_priority`: no worker serves at the start, so none boots at the
    /// low priority; during a reload each new worker does, and gets its
    /// priority back when it is ready (before its predecessor is asked to
    /// stop), whether by `READY=1` or, with `ready = "spawn"`, at its exec.
    #[test]
    fn a_worker_boots_at_low_priority_only_while_others_serve() {
        let now = Instant::now();
        let mut sup = running_notify_with("boot_priority = 10", now);
        assert!(sup.pool.workers.iter().all(|w| !w.lowered));
        assert!(!has(&drain(&mut sup), "restore_priority"));
        sup.on_signal(Event::Reload, now);
        drain(&mut sup);
        let next = gen(2, "workers = 2\nready = \"notify\"\nboot_priority = 10");
        sup.config_loaded(Ok(next), "test.toml", now);
        assert!(!has(&turn(&mut sup, 21, now), "restore_priority"));
        assert!(sup.pool.get_mut(pid(21)).unwrap().lowered);
        sup.on_notify(pid(21), vec![Message::Ready], now);
        assert_eq!(
            drain(&mut sup),
            [
                "restore_priority slot 1 pid 21 (nice 10 to 0)",
                "signal SIGTERM to slot 1 pid 11 (Stop(Replaced(Reload)))"
            ]
        );
        sup.on_notify(pid(21), vec![Message::Ready], now);
        assert!(!has(&drain(&mut sup), "restore_priority"), "only once");
        // Once more a moment later, for a thread that was being created.
        let later = now + PRIORITY_RECHECK;
        assert_eq!(sup.next_deadline(now), Some(later));
        assert!(has(
            &turn(&mut sup, 30, later),
            "restore_priority slot 1 pid 21 (nice 10 to 0)"
        ));
        assert!(!has(
            &turn(&mut sup, 30, later + PRIORITY_RECHECK),
            "restore_priority"
        ));

        // ready = "spawn": ready, and restored, at the exec report.
        let mut sup = started("workers = 1\nboot_priority = 5", now);
        sup.on_signal(Event::Reload, now);
        drain(&mut sup);
        sup.config_loaded(
            Ok(gen(2, "workers = 1\nboot_priority = 5")),
            "test.toml",
            now,
        );
        let actions = turn(&mut sup, 21, now);
        assert_eq!(
            actions[..2],
            [
                "restore_priority slot 1 pid 21 (nice 5 to 0)",
                "signal SIGTERM to slot 1 pid 11 (Stop(Replaced(Reload)))"
            ]
        );
        // Still booting at half its boot_timeout (30 s): restored then, and
        // not killed before its deadline.
        let mut sup = running_notify_with("boot_priority = 10", now);
        sup.on_signal(Event::Reload, now);
        drain(&mut sup);
        let next = gen(2, "workers = 2\nready = \"notify\"\nboot_priority = 10");
        sup.config_loaded(Ok(next), "test.toml", now);
        turn(&mut sup, 21, now);
        let half = now + Duration::from_secs(15);
        assert_eq!(sup.next_deadline(now), Some(half));
        assert!(turn(&mut sup, 30, half - Duration::from_millis(1)).is_empty());
        assert_eq!(
            turn(&mut sup, 30, half),
            ["restore_priority slot 1 pid 21 (nice 10 to 0)"]
        );
        assert_eq!(sup.next_deadline(half), Some(now + Duration::from_secs(30)));
        sup.on_notify(pid(21), vec![Message::Ready], half);
        assert!(!has(&drain(&mut sup), "restore_priority"), "only once");
        // SCHED_IDLE, restored the same way.
        let mut sup = started("workers = 1\nboot_priority = \"idle\"", now);
        sup.on_signal(Event::Reload, now);
        drain(&mut sup);
        let next = gen(2, "workers = 1\nboot_priority = \"idle\"");
        sup.config_loaded(Ok(next), "test.toml", now);
        assert!(has(
            &turn(&mut sup, 21, now),
            "restore_priority slot 1 pid 21 (SCHED_IDLE to nice 0)"
        ));
        // Off: nothing to restore.
        let mut sup = started("workers = 1", now);
        sup.on_signal(Event::Reload, now);
        drain(&mut sup);
        sup.config_loaded(Ok(gen(2, "workers = 1")), "test.toml", now);
        assert!(!has(&turn(&mut sup, 21, now), "restore_priority"));
    }

    /// Two workers with `ready = "notify"`, both ready (pids 11, 12).
    fn running_notify(now: Instant) -> Supervisor {
        running_notify_with("", now)
    }

    fn running_notify_with(extra: &str, now: Instant) -> Supervisor {
        let settings = format!("workers = 2\nready = \"notify\"\n{extra}");
        let mut sup = Supervisor::new(Rc::new(gen(1, &settings)), now);
        turn(&mut sup, 11, now);
        sup.on_notify(pid(11), vec![Message::Ready], now);
        sup.on_notify(pid(12), vec![Message::Ready], now);
        drain(&mut sup);
        assert!(matches!(sup.phase, Phase::Running));
        sup
    }

    fn readiness_word(sup: &Supervisor) -> &'static str {
        sup.readiness().err().map_or("ready", |e| e.word())
    }

    #[test]
    fn after_a_pause_every_way_to_resume_boots_again_not_degraded() {
        let now = Instant::now();
        type Resume = fn(&mut Supervisor, Instant);
        let ways: [(&str, Resume); 4] = [
            ("SIGTTIN", |sup, now| sup.on_signal(Event::AddWorker, now)),
            ("SIGHUP", |sup, now| {
                sup.on_signal(Event::Reload, now);
                sup.config_loaded(
                    Ok(gen(2, "workers = 2\nready = \"notify\"")),
                    "test.toml",
                    now,
                );
            }),
            ("ctl reload", |sup, now| {
                sup.on_command(7, Command::Reload, now);
                sup.config_loaded(
                    Ok(gen(2, "workers = 2\nready = \"notify\"")),
                    "test.toml",
                    now,
                );
            }),
            ("ctl scale", |sup, now| {
                sup.on_command(7, Command::Scale { workers: 2 }, now)
            }),
        ];
        for (way, resume) in ways {
            let mut sup = running_notify(now);
            sup.on_signal(Event::StopWorkers, now);
            assert_eq!(readiness_word(&sup), "paused", "{way}");
            for p in [11, 12] {
                sup.on_exit(pid(p), WaitStatus::Exited(pid(p), 0), now);
            }
            turn(&mut sup, 20, now);
            assert!(sup.pool.workers.is_empty(), "{way}: paused, none started");
            resume(&mut sup, now);
            turn(&mut sup, 21, now);
            assert_eq!(sup.pool.workers.len(), 2, "{way}: both slots boot");
            // The old code said "degraded" here: the slots had served before.
            let e = sup.readiness().unwrap_err();
            assert_eq!(
                e.to_string(),
                "booting: 0/2 slots have a ready worker, 2 needed",
                "{way}"
            );
            sup.on_notify(pid(21), vec![Message::Ready], now);
            assert_eq!(readiness_word(&sup), "booting", "{way}");
            sup.on_notify(pid(22), vec![Message::Ready], now);
            assert_eq!(readiness_word(&sup), "ready", "{way}");
            // Booted again: a slot that loses its worker now is degraded.
            sup.on_exit(pid(21), WaitStatus::Exited(pid(21), 1), now);
            assert_eq!(readiness_word(&sup), "degraded", "{way}");
        }
    }

    #[test]
    fn a_slot_that_served_since_the_resume_and_lost_its_worker_is_degraded() {
        let now = Instant::now();
        let mut sup = running_notify(now);
        sup.on_signal(Event::StopWorkers, now);
        for p in [11, 12] {
            sup.on_exit(pid(p), WaitStatus::Exited(pid(p), 0), now);
        }
        sup.on_signal(Event::AddWorker, now);
        turn(&mut sup, 21, now);
        sup.on_notify(pid(21), vec![Message::Ready], now);
        assert_eq!(readiness_word(&sup), "booting");
        // Slot 1 served since the resume, and crashed: that is no boot.
        sup.on_exit(pid(21), WaitStatus::Exited(pid(21), 1), now);
        assert_eq!(readiness_word(&sup), "degraded");
    }

    #[test]
    fn a_worker_ready_during_the_prestop_delay_gets_the_notice_too() {
        let now = Instant::now();
        let mut sup = running_notify_with("prestop_delay = \"5s\"\nrespawn_delay = \"1ms\"", now);
        sup.on_signal(Event::Terminate, now);
        let actions = drain(&mut sup);
        assert!(
            has(&actions, "signal SIGWINCH to slot 1 pid 11"),
            "{actions:?}"
        );
        assert!(
            has(&actions, "signal SIGWINCH to slot 2 pid 12"),
            "{actions:?}"
        );
        // Worker 11 crashes; its successor boots during the delay: no
        // notice while it boots (it may not handle SIGWINCH yet), one when
        // it is ready. The old code never sent it one.
        sup.on_exit(pid(11), WaitStatus::Exited(pid(11), 1), now);
        let later = now + Duration::from_millis(10);
        let actions = turn(&mut sup, 21, later);
        assert!(!has(&actions, "SIGWINCH"), "{actions:?}");
        assert!(sup.pool.has(pid(21)));
        sup.on_notify(pid(21), vec![Message::Ready], later);
        assert_eq!(
            drain(&mut sup),
            ["signal SIGWINCH to slot 1 pid 21 (PreStop)"]
        );
        // A repeated READY=1 is no second notice.
        sup.on_notify(pid(21), vec![Message::Ready], later);
        assert!(drain(&mut sup).is_empty());
    }
}

//! One worker as the master sees it: a state machine over the life of one
//! process, bound to the generation it was started from.
//!
//! ```text
//!            exec'd                 READY=1 (or exec'd, ready = "spawn")
//!  Execing ─────────▶ Booting ─────────────────────▶ Ready
//!     │                 │                              │
//!     │ exec failed     │ boot deadline                │ stop (graceful, quick, abort)
//!     ▼                 ▼                              ▼
//!  ExecFailed        Killed ◀──── stop deadline ──── Stopping
//! ```
//!
//! Each state is entered by one method of `Worker`, and carries the deadline
//! at which the master must act on it; every setting a decision needs (the
//! heartbeat interval, the stop signal and timeouts, the ready mode,
//! max_age, max_memory) is read from the worker's own `Generation`.

use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::action::Action;
use super::generation::Generation;
use crate::config::Ready;

/// The most `EXTEND_TIMEOUT_USEC` can add to a deadline drover set
/// (docs/protocol.md).
pub const MAX_EXTENSION: Duration = Duration::from_secs(300);

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Forked; its exec not yet confirmed (the master reads its report).
    /// Killed if still not ready at the boot deadline.
    Execing { deadline: Instant },
    /// Exec'd, no `READY=1` yet; killed if still booting at the deadline.
    /// With `ready = "auto"`, until it has said something on the notify
    /// socket: counted as ready at `announce_by` if it still has not.
    Booting {
        deadline: Instant,
        announce_by: Option<Instant>,
    },
    /// Serving.
    Ready(Serving),
    /// Asked to stop; its process group is killed at the deadline.
    /// `EXTEND_TIMEOUT_USEC` may move the deadline up to `limit`; a quick
    /// stop or an abort has none.
    Stopping {
        why: Stop,
        deadline: Instant,
        limit: Option<Instant>,
        /// `boot_priority = "idle"`: the worker may run its exit (after
        /// its cleanup) at `SCHED_IDLE` (`DROVER_EXIT_PRIORITY`); drover
        /// gives it its normal priority back at half its stop timeout, so
        /// that a busy machine cannot starve it into its deadline.
        restore_at: Option<Instant>,
    },
    /// Sent SIGKILL: its exit is due, nothing else. Or sent SIGABRT at its
    /// boot deadline (`abort_boot`): SIGKILL at `Worker::kill_at`.
    Killed { kill: Kill, stopped: Option<Stop> },
    /// Could not exec (already dealt with): its exit (127) says nothing more.
    ExecFailed,
}

/// A serving worker's deadlines and marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Serving {
    /// Aborted if no `WATCHDOG=1` arrives by then (its generation's `timeout`).
    pub heartbeat: Option<Instant>,
    /// When it reaches max_age.
    pub recycle_at: Option<Instant>,
    /// A successor is wanted: this worker stops once it is ready.
    pub replace: Option<Replace>,
    /// It sent `STOPPING=1`: an exit that follows is its own decision, due
    /// within its `graceful_timeout`; still running then, it is killed (a
    /// worker that announced its exit and hangs would hold its slot for
    /// ever).
    pub leave_by: Option<Instant>,
}

/// Why drover asked a worker to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// drover is shutting down.
    Shutdown,
    /// One worker less (SIGTTOU, a reload to fewer workers).
    ScaledDown,
    /// SIGWINCH: every worker stops, the master stays.
    Paused,
    /// Outdated and not even ready (an older generation still booting, or a
    /// generation rolled back): it serves nothing.
    Outdated,
    /// A successor of the current generation is ready.
    Replaced(Replace),
    /// It missed its heartbeat: sent SIGABRT.
    HeartbeatMissed,
}

/// Why a worker is replaced by a successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// It belongs to an older generation.
    Reload,
    MaxAge,
    MaxMemory,
    /// Of the current generation, superseded in its slot all the same.
    Superseded,
}

impl Stop {
    /// The `reason` of a `worker_stopping` event.
    pub fn name(self) -> &'static str {
        match self {
            Stop::Shutdown => "shutdown",
            Stop::ScaledDown => "retired",
            Stop::Paused => "paused",
            Stop::Outdated => "outdated",
            Stop::Replaced(r) => r.name(),
            Stop::HeartbeatMissed => "heartbeat_timeout",
        }
    }
}

impl Replace {
    pub fn name(self) -> &'static str {
        match self {
            Replace::Reload => "reload",
            Replace::MaxAge => "max_age",
            Replace::MaxMemory => "max_memory",
            Replace::Superseded => "replaced",
        }
    }
}

/// Why drover sent a worker's process group SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    BootTimeout,
    /// `abort_grace` after the SIGABRT of a missed heartbeat.
    HeartbeatTimeout,
    /// The end of a graceful or quick stop.
    GraceExpired,
}

/// How a worker is asked to stop, each with its generation's signal and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// `stop_signal`, `graceful_timeout`.
    Graceful,
    /// SIGQUIT, `quick_timeout`; never extends a deadline already set.
    Quick,
    /// SIGABRT, `abort_grace` (a missed heartbeat).
    Abort,
}

#[derive(Debug)]
pub struct Worker {
    pub slot: u32,
    pub pid: Pid,
    /// The generation it was started from: every setting it follows.
    pub gen: Rc<Generation>,
    pub state: State,
    pub started: Instant,
    /// The last `STATUS=` it sent.
    pub status: Option<String>,
    /// How much of its `STATUS=` the log took this second.
    pub status_log: LogBudget,
    /// A SIGUSR1 came while it booted: forwarded once it is ready, since
    /// a program has its handler for it only then (SIGUSR1's default
    /// action ends a process that is still importing its app).
    pub reopen_logs: bool,
    /// Started at its generation's boot priority (`boot_priority`): its
    /// normal priority is restored when it becomes ready.
    pub lowered: bool,
    /// Restored: when to look once more for a thread at the boot priority
    /// (see [`PRIORITY_RECHECK`]).
    pub recheck_priority: Option<Instant>,
    /// Sent SIGABRT at its boot deadline: its process group gets SIGKILL
    /// then (`abort_grace` later) if it is still running.
    pub kill_at: Option<Instant>,
    /// The signals drover sent it to stop (a bit per signal number): its
    /// death by one of them is the stop it was asked for, by another one
    /// is not (see [`Worker::ended_as_asked`]).
    stop_signals: u64,
    /// It said `STOPPING=1`: the log says so once, however often it repeats it.
    pub said_stopping: bool,
}

/// How long after restoring a worker's priority drover restores it once
/// more: a thread whose creation began (inheriting the boot priority) before
/// its creator was restored, and which was still being created when the
/// restore's last pass listed the threads, shows up only then. (Its
/// creator, preempted inside `clone` on a busy machine, may stay there for
/// milliseconds.)
pub const PRIORITY_RECHECK: Duration = Duration::from_millis(200);

/// The most `STATUS=` lines of one worker logged in a second; the rest are
/// counted, and the count logged with the next line let through.
pub const STATUS_LINES_PER_SECOND: u32 = 10;

/// A per-second budget of log lines.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogBudget {
    second: Option<Instant>,
    used: u32,
    dropped: u64,
}

impl LogBudget {
    /// Whether a line may be logged now; `Some(n)` with the lines dropped
    /// since the last one logged, to say so.
    pub fn take(&mut self, now: Instant) -> Option<u64> {
        if self
            .second
            .is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1))
        {
            self.second = Some(now);
            self.used = 0;
        }
        if self.used >= STATUS_LINES_PER_SECOND {
            self.dropped += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.dropped))
    }
}

impl Worker {
    /// A worker just forked: execing, with its generation's boot deadline.
    pub fn forked(slot: u32, pid: Pid, gen: Rc<Generation>, lowered: bool, now: Instant) -> Worker {
        let deadline = now + gen.s.boot_timeout.0;
        Worker {
            slot,
            pid,
            gen,
            state: State::Execing { deadline },
            started: now,
            status: None,
            status_log: LogBudget::default(),
            reopen_logs: false,
            lowered,
            recheck_priority: None,
            kill_at: None,
            stop_signals: 0,
            said_stopping: false,
        }
    }

    pub fn generation(&self) -> u32 {
        self.gen.number
    }

    /// Its exec is confirmed: ready at once with `ready = "spawn"`, else
    /// booting until `READY=1`. Returns whether it became ready.
    pub fn execd(&mut self, now: Instant) -> bool {
        let State::Execing { deadline } = self.state else {
            return false;
        };
        let announce_by = match self.gen.s.ready {
            Ready::Spawn => {
                self.become_ready(now);
                return true;
            }
            Ready::Notify => None,
            Ready::Auto if self.gen.notifies => None,
            Ready::Auto => Some(now + self.gen.s.announce_timeout.0),
        };
        self.state = State::Booting {
            deadline,
            announce_by,
        };
        false
    }

    /// It said something on the notify socket: with `ready = "auto"`, it
    /// speaks the protocol, so it is held to `READY=1` from now on.
    pub fn announced(&mut self) -> bool {
        match &mut self.state {
            State::Booting { announce_by, .. } => announce_by.take().is_some(),
            _ => false,
        }
    }

    /// Whether it is booting silently past its `announce_timeout`
    /// (`ready = "auto"`): a program that does not speak the protocol.
    pub fn silent_past(&self, now: Instant) -> bool {
        matches!(self.state, State::Booting { announce_by: Some(t), .. } if t <= now)
    }

    /// Whether it has ever been held to `READY=1` (not a silent worker under
    /// `ready = "auto"`, nor `ready = "spawn"`).
    pub fn held_to_ready(&self) -> bool {
        match self.gen.s.ready {
            Ready::Spawn => false,
            Ready::Notify => true,
            Ready::Auto => matches!(
                self.state,
                State::Booting {
                    announce_by: None,
                    ..
                }
            ),
        }
    }

    /// Enters `Ready`, with its generation's heartbeat and max_age.
    pub fn become_ready(&mut self, now: Instant) {
        let s = &self.gen.s;
        let recycle_at = s
            .max_age
            .map(|age| self.started + age.0 + jitter(s.max_age_jitter.0, self.pid));
        self.state = State::Ready(Serving {
            heartbeat: s.timeout.map(|t| now + t.0),
            recycle_at,
            replace: None,
            leave_by: None,
        });
    }

    /// `WATCHDOG=1`: the next heartbeat is due one interval of its own
    /// generation from now.
    pub fn heartbeat(&mut self, now: Instant) {
        if let (State::Ready(s), Some(t)) = (&mut self.state, self.gen.s.timeout) {
            s.heartbeat = Some(now + t.0);
        }
    }

    /// The master was absent for up to `late` (stopped, frozen with its
    /// cgroup, starved of CPU): what the worker sent meanwhile may reach
    /// it only now (a sender blocks while the notify socket's queue is
    /// full; a worker frozen with the master sends once thawed). The
    /// deadlines judged on its messages move by `late`, so that it is not
    /// blamed for the master's absence.
    pub fn master_was_late(&mut self, late: Duration) {
        match &mut self.state {
            State::Execing { deadline } => *deadline += late,
            State::Booting {
                deadline,
                announce_by,
            } => {
                *deadline += late;
                if let Some(by) = announce_by {
                    *by += late;
                }
            }
            State::Ready(Serving {
                heartbeat: Some(due),
                ..
            }) => *due += late,
            _ => {}
        }
    }

    /// The only way drover asks a worker to stop: its generation's signal
    /// and deadline for `pace`. Returns the signal to send, or None if a
    /// stopping worker is left alone (a graceful stop of one already
    /// stopping).
    pub fn stop(&mut self, pace: Pace, why: Stop, now: Instant) -> Option<Action> {
        let s = &self.gen.s;
        let (signal, timeout) = match pace {
            Pace::Graceful => (s.stop_signal.0, s.graceful_timeout.0),
            Pace::Quick => (Signal::SIGQUIT, s.quick_timeout.0),
            Pace::Abort => (Signal::SIGABRT, s.abort_grace.0),
        };
        let mut deadline = now + timeout;
        let mut restore_at = self.gen.exits_idle().then(|| now + timeout / 2);
        let mut why = why;
        match self.state {
            State::ExecFailed => return None,
            // Aborted at its boot deadline, its SIGKILL due at `kill_at`
            // (abort_grace): a quick stop brings that forward to its own
            // deadline, as for a stopping worker. Nothing more to send.
            State::Killed { .. } => {
                if pace == Pace::Quick {
                    self.kill_at = self.kill_at.map(|k| k.min(deadline));
                }
                return None;
            }
            // Already stopping (retired, recycled, aborted): it keeps its own
            // reason and deadline, and is hurried only by a quick stop.
            State::Stopping {
                why: own,
                deadline: d,
                restore_at: r,
                ..
            } => {
                if pace != Pace::Quick {
                    return None;
                }
                why = own;
                deadline = deadline.min(d);
                restore_at = restore_at.min(r);
            }
            // A quick stop never extends a deadline already set.
            _ if pace == Pace::Quick => {
                if let Some(d) = self.deadline().filter(|d| *d < deadline) {
                    deadline = d;
                }
            }
            _ => {}
        }
        // Only a graceful stop may be extended, and not for ever.
        let limit = (pace == Pace::Graceful).then(|| deadline + MAX_EXTENSION);
        self.state = State::Stopping {
            why,
            deadline,
            limit,
            restore_at,
        };
        self.stop_signals |= 1 << signal as i32;
        Some(Action::Signal {
            slot: self.slot,
            pid: self.pid,
            signal,
            why: super::action::SignalWhy::Stop(why),
        })
    }

    /// SIGKILL to its process group: enters `Killed`.
    pub fn kill(&mut self, kill: Kill) -> Action {
        let stopped = match self.state {
            State::Stopping { why, .. } => Some(why),
            _ => None,
        };
        self.state = State::Killed { kill, stopped };
        Action::KillGroup {
            slot: self.slot,
            pid: self.pid,
            kill,
        }
    }

    /// Still booting at its `boot_timeout`: SIGABRT, so that a program that
    /// dumps its state on it says where it hangs (a Python worker with
    /// `faulthandler`: the traceback of its import), then SIGKILL to its
    /// process group `abort_grace` later if it is still running.
    pub fn abort_boot(&mut self, now: Instant) -> Action {
        self.state = State::Killed {
            kill: Kill::BootTimeout,
            stopped: None,
        };
        self.kill_at = Some(now + self.gen.s.abort_grace.0);
        Action::Signal {
            slot: self.slot,
            pid: self.pid,
            signal: Signal::SIGABRT,
            why: super::action::SignalWhy::BootTimeout,
        }
    }

    /// Its threads back at drover's priority, if its generation boots
    /// workers at a lower one (`boot_priority`).
    pub fn restore_priority(&self) -> Option<Action> {
        self.gen.boot.map(|boot| Action::RestorePriority {
            slot: self.slot,
            pid: self.pid,
            boot,
        })
    }

    /// Whether `status` is how a worker drover asked to stop ends: exit 0,
    /// the death by a signal drover sent it to stop (its default action; or
    /// exit 128+N for it, as a shell or the JVM reports it), or by drover's
    /// SIGKILL. Anything else is a fault during its stop: a crash
    /// (SIGSEGV), the OOM killer's or an operator's SIGKILL, an exit status
    /// of its own.
    pub fn ended_as_asked(&self, status: WaitStatus) -> bool {
        let sent = |n: i32| (1..64).contains(&n) && self.stop_signals & (1 << n) != 0;
        match status {
            WaitStatus::Exited(_, 0) => true,
            WaitStatus::Exited(_, code) => sent(code - 128),
            WaitStatus::Signaled(_, Signal::SIGKILL, _) => {
                matches!(self.state, State::Killed { .. })
            }
            WaitStatus::Signaled(_, signal, _) => sent(signal as i32),
            _ => false,
        }
    }

    /// Asked to stop (killed since, or not).
    pub fn is_stopping(&self) -> bool {
        matches!(
            self.state,
            State::Stopping { .. }
                | State::Killed {
                    stopped: Some(_),
                    ..
                }
        )
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready(_))
    }

    /// Started, not serving, not asked to stop: execing, booting, or on
    /// its way out from there (killed at its boot deadline, failed to
    /// exec). It holds its slot until it is reaped.
    pub fn is_booting(&self) -> bool {
        matches!(
            self.state,
            State::Execing { .. }
                | State::Booting { .. }
                | State::Killed { stopped: None, .. }
                | State::ExecFailed
        )
    }

    /// Ready, and not on its way out by its own decision (`STOPPING=1`,
    /// e.g. recycling after max_requests): it takes from the listeners.
    pub fn is_serving(&self) -> bool {
        matches!(self.state, State::Ready(s) if s.leave_by.is_none())
    }

    /// A shutdown holds a worker still booting (execing or booting, not
    /// yet killed) to its deadline `until`, in place of its boot deadline:
    /// earlier or later. Returns whether it was booting so.
    pub fn boot_by(&mut self, until: Instant) -> bool {
        match &mut self.state {
            State::Execing { deadline } | State::Booting { deadline, .. } => {
                *deadline = until;
                true
            }
            _ => false,
        }
    }

    /// Brings the deadline drover set for its stop forward to `until`
    /// (never later): its stop counts from then on as if it had begun that
    /// much earlier, the most `EXTEND_TIMEOUT_USEC` may add and the restore
    /// of its priority too (a worker stopped late in a shutdown gets what is
    /// left of it). What it asked for by `EXTEND_TIMEOUT_USEC` stands, up to
    /// that most. Aborted at its boot deadline: its SIGKILL comes by `until`.
    pub fn cap_deadline(&mut self, until: Instant) {
        match &mut self.state {
            State::Stopping {
                deadline,
                limit,
                restore_at,
                ..
            } => {
                let set = limit.map_or(*deadline, |l| l - MAX_EXTENSION);
                let early = set.saturating_duration_since(until);
                for t in [&mut *limit, restore_at].into_iter().flatten() {
                    // (Before the clock's start only for a restore due long
                    // ago, on a machine up for less than half the timeout.)
                    *t = t.checked_sub(early).unwrap_or(until);
                }
                *deadline = match *limit {
                    Some(l) if *deadline > set => (*deadline).min(l),
                    _ => *deadline - early,
                };
            }
            State::Killed { .. } => self.kill_at = self.kill_at.map(|k| k.min(until)),
            _ => {}
        }
    }

    pub fn is_execing(&self) -> bool {
        matches!(self.state, State::Execing { .. })
    }

    /// Marked for replacement (or of an older generation than `current`).
    pub fn outdated(&self, current: u32) -> bool {
        self.generation() != current
            || matches!(
                self.state,
                State::Ready(Serving {
                    replace: Some(_),
                    ..
                })
            )
    }

    /// When a worker still booting at its boot priority gets the normal one
    /// all the same: at half its `boot_timeout`, so that serving
    /// workers that keep the CPU busy cannot starve it into its deadline.
    pub fn lowered_until(&self) -> Option<Instant> {
        let booting = matches!(self.state, State::Execing { .. } | State::Booting { .. });
        (self.lowered && booting).then(|| self.started + self.gen.s.boot_timeout.0 / 2)
    }

    /// The next instant at which the master must act on this worker.
    pub fn deadline(&self) -> Option<Instant> {
        let lowered = self.lowered_until();
        match self.state {
            State::Execing { deadline } => Some(lowered.map_or(deadline, |l| l.min(deadline))),
            State::Stopping {
                deadline,
                restore_at,
                ..
            } => Some(restore_at.map_or(deadline, |r| r.min(deadline))),
            State::Booting {
                deadline,
                announce_by,
            } => [Some(deadline), announce_by, lowered]
                .into_iter()
                .flatten()
                .min(),
            State::Ready(s) => {
                let recycle = s.recycle_at.filter(|_| s.replace.is_none());
                s.heartbeat
                    .into_iter()
                    .chain(recycle)
                    .chain(self.recheck_priority)
                    .chain(s.leave_by)
                    .min()
            }
            State::Killed { .. } => self.kill_at,
            State::ExecFailed => None,
        }
    }

    /// `EXTEND_TIMEOUT_USEC`: pushes the current deadline to at least `by`
    /// from now, within [`MAX_EXTENSION`] past the deadline drover set (a
    /// boot: `boot_timeout` after the spawn; a graceful stop: its
    /// `graceful_timeout`; a heartbeat: from now). A quick stop or an abort
    /// is never extended. Returns the deadline now in force, or None if the
    /// state has none this message may move.
    pub fn extend(&mut self, by: Duration, now: Instant) -> Option<Instant> {
        let until = now + by.min(MAX_EXTENSION);
        let boot_limit = self.started + self.gen.s.boot_timeout.0 + MAX_EXTENSION;
        match &mut self.state {
            State::Execing { deadline: d } | State::Booting { deadline: d, .. } => {
                *d = (*d).max(until.min(boot_limit));
                Some(*d)
            }
            State::Ready(Serving {
                heartbeat: Some(d), ..
            }) => {
                *d = (*d).max(until);
                Some(*d)
            }
            State::Stopping {
                deadline: d,
                limit: Some(limit),
                ..
            } => {
                *d = (*d).max(until.min(*limit));
                Some(*d)
            }
            _ => None,
        }
    }

    /// The state's name in `drover ctl status` and the metrics. A worker
    /// that said `STOPPING=1` is stopping, as systemd has a service that
    /// said it deactivating: it takes no new work, whoever decided.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Ready(Serving {
                leave_by: Some(_), ..
            }) => "stopping",
            State::Ready(Serving {
                replace: Some(_), ..
            }) => "replacing",
            State::Ready(_) => "ready",
            _ if self.is_booting() => "booting",
            _ => "stopping",
        }
    }
}

/// A wait status in words: "exited with status 1", "killed by SIGSEGV (core dumped)".
pub fn describe(status: WaitStatus, killed: Option<Kill>) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            let core = if core { " (core dumped)" } else { "" };
            let cause = match (sig, killed) {
                (Signal::SIGKILL | Signal::SIGABRT, Some(Kill::BootTimeout)) => " (boot timeout)",
                (Signal::SIGKILL, Some(Kill::HeartbeatTimeout)) => " (heartbeat timeout)",
                (Signal::SIGKILL, Some(Kill::GraceExpired)) => " (grace period expired)",
                (Signal::SIGKILL, None) => " (not sent by drover: the OOM killer or an operator)",
                _ => "",
            };
            format!("killed by {}{core}{cause}", sig.as_str())
        }
        other => format!("changed state: {other:?}"),
    }
}

/// The exit code, if the process exited normally.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        _ => None,
    }
}

/// Milliseconds, for log lines.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A pseudo-random part of `max`, different for each worker, so that workers
/// started together do not all reach max_age together.
pub fn jitter(max: Duration, pid: Pid) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    // SplitMix64 finaliser over the pid and the clock.
    let mut x = (pid.as_raw() as u64) ^ nanos.rotate_left(32);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    max.mul_f64((x >> 11) as f64 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        let max = Duration::from_secs(10);
        for p in 1..200 {
            assert!(jitter(max, Pid::from_raw(p)) <= max);
        }
        assert_eq!(jitter(Duration::ZERO, Pid::from_raw(1)), Duration::ZERO);
    }
}

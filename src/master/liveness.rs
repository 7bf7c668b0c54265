//! Deadlines: what the master does when one passes, and which one is next.
//!
//! Every timed duty is a deadline: a boot timeout, a heartbeat, a stop's grace
//! period, max_age, a respawn backoff, the next memory check. The loop sleeps
//! until the nearest one; nothing runs on a fixed tick.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use tracing::{debug, error, info, warn};

use super::worker::{ms, resident_bytes, Kill, State, Why, Worker};
use super::{stop, Master};

impl Master {
    /// Acts on everything overdue.
    pub(super) fn enforce_deadlines(&mut self, now: Instant) {
        let (timeout, abort_grace) = (self.gen.s.timeout, self.gen.s.abort_grace.0);
        let reset_after = self.gen.s.respawn_reset_after.0;
        let mut wedged = Vec::new();
        for w in self.workers.iter_mut() {
            if w.deadline().is_none_or(|d| d > now) {
                continue;
            }
            let (slot, pid) = (w.slot, w.pid);
            match w.state {
                State::Booting { .. } => {
                    error!(
                        "worker {slot} (pid {pid}) did not report READY=1 within boot_timeout ({}); \
                         killing its process group",
                        self.gen.s.boot_timeout
                    );
                    kill_group(w, Kill::BootTimeout);
                }
                State::Ready { heartbeat: Some(h) } if h <= now => {
                    let t = timeout.map_or(Duration::ZERO, |t| t.0);
                    error!(
                        "worker {slot} (pid {pid}) missed its heartbeat (no WATCHDOG=1 for {}): \
                         SIGABRT, then SIGKILL in {}",
                        humantime::format_duration(t),
                        humantime::format_duration(abort_grace)
                    );
                    // The worker may dump its state on SIGABRT; its slot is
                    // refilled after the backoff, since it no longer serves.
                    stop(w, Signal::SIGABRT, now + abort_grace, Why::HeartbeatTimeout);
                    wedged.push((slot, now - w.started >= reset_after));
                }
                State::Ready { .. } => {
                    // max_age: start a successor; this one stops once it is ready.
                    info!(
                        "worker {slot} (pid {pid}) reached max_age after {}: starting its replacement",
                        ms(now - w.started)
                    );
                    w.replace = Some("max_age");
                }
                State::Stopping { why, .. } => {
                    let cause = if why == Why::HeartbeatTimeout {
                        Kill::HeartbeatTimeout
                    } else {
                        Kill::GraceExpired
                    };
                    warn!(
                        "worker {slot} (pid {pid}) still running at its stop deadline; \
                         sending SIGKILL to its process group"
                    );
                    if let Some(sd) = self.shutdown.as_mut() {
                        sd.killed += 1;
                    }
                    kill_group(w, cause);
                }
            }
        }
        // A wedged worker is a failure of its slot, like a crash: a worker that
        // always wedges is respawned ever more slowly, and its slot degraded.
        for (slot, stable) in wedged {
            if stable {
                if let Some(s) = self.slots.get_mut(slot as usize - 1) {
                    s.failures = 0;
                }
            }
            self.slot_failed(slot, now);
        }
        if self.next_memory_check.is_some_and(|t| t <= now) {
            self.check_memory();
            // Disarmed when a reload (or a rollback) removed max_memory.
            let interval = self.gen.s.memory_check_interval.0;
            self.next_memory_check = self.gen.s.max_memory.map(|_| now + interval);
        }
        if self.next_watchdog.is_some_and(|t| t <= now) {
            self.systemd.watchdog();
            self.next_watchdog = self.systemd.watchdog.map(|w| now + w / 2);
        }
    }

    /// Marks ready workers over max_memory for replacement.
    fn check_memory(&mut self) {
        let Some(limit) = self.gen.s.max_memory else {
            return;
        };
        for w in self
            .workers
            .iter_mut()
            .filter(|w| w.is_ready() && w.replace.is_none())
        {
            let Some(rss) = resident_bytes(w.pid) else {
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
                w.replace = Some("max_memory");
            }
        }
    }

    /// The nearest instant at which something is due, if any.
    pub(super) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let workers = self.workers.iter().filter_map(Worker::deadline);
        let running = self.shutdown.is_none();
        // A backoff that has passed is no longer a deadline: its slot was
        // refilled this turn, or waits for an event (a successor's READY=1
        // under max_surge, a resume after SIGWINCH). Waking for it would spin.
        let respawns = self
            .slots
            .iter()
            .filter(|_| running && !self.paused)
            .filter_map(|s| s.not_before)
            .filter(|t| *t > now);
        let memory = self.next_memory_check.filter(|_| running);
        workers
            .chain(respawns)
            .chain(memory)
            .chain(self.next_watchdog)
            .chain(self.upgrade_deadline())
            .min()
    }
}

/// SIGKILL to the worker's process group: the worker leads it, so this also
/// takes whatever it started that is still in the group.
fn kill_group(w: &mut Worker, cause: Kill) {
    w.killed = Some(cause);
    if let Err(e) = killpg(w.pid, Signal::SIGKILL) {
        let _ = kill(w.pid, Signal::SIGKILL);
        debug!("killpg({}) failed ({e}); killed the worker alone", w.pid);
    }
}

/// A pseudo-random part of `max`, different for each worker, so that workers
/// started together do not all reach max_age together.
pub(super) fn jitter(max: Duration, pid: nix::unistd::Pid) -> Duration {
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
            assert!(jitter(max, nix::unistd::Pid::from_raw(p)) <= max);
        }
        assert_eq!(
            jitter(Duration::ZERO, nix::unistd::Pid::from_raw(1)),
            Duration::ZERO
        );
    }
}

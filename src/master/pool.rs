//! The pool: the workers alive and the slots they fill, with the
//! bookkeeping of both (who serves which slot, respawn backoff, restarts).
//! It decides nothing on its own; the `Supervisor` asks it.

use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::worker::Worker;

/// A slot's respawn bookkeeping.
#[derive(Debug, Default, Clone)]
pub struct Slot {
    /// Consecutive quick failures.
    pub failures: u32,
    /// No spawn in this slot before then (the backoff).
    pub not_before: Option<Instant>,
    /// Workers started in this slot because the previous one failed: it
    /// exited unasked (a crash, a kill, a boot timeout), missed its
    /// heartbeat, or could not be started (its exec or fork failed).
    /// Recycles and replacements drover asked for (a reload) do not count.
    pub restarts: u32,
    /// Workers of this slot that were recycled: ended themselves as they
    /// announced (`STOPPING=1`, then exit 0: `max_requests`, or a limit of
    /// the worker's own), or were replaced at their `max_age` or for their
    /// `max_memory`. Not a fault: counted apart from `restarts`.
    pub recycles: u32,
    /// A worker has been ready in this slot: losing it is a degradation
    /// (a slot added by a scale-up or a reload is not, while it boots).
    pub served: bool,
    /// Its worker ended itself as it announced (`STOPPING=1`, then exit 0:
    /// `max_requests`) and the successor boots: a recycle, not a fault, so
    /// the slot counts as ready (as the old workers of a reload do) until
    /// the successor is ready, or fails.
    pub recycling: bool,
}

/// What serves one slot (see `Pool::slot_view`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SlotView {
    pub current: bool,
    pub current_booting: bool,
    pub outdated: bool,
    pub outdated_ready: bool,
    pub outdated_booting: bool,
}

#[derive(Debug, Default)]
pub struct Pool {
    pub workers: Vec<Worker>,
    pub slots: Vec<Slot>,
}

impl Pool {
    pub fn new(count: usize) -> Pool {
        Pool {
            workers: Vec::new(),
            slots: vec![Slot::default(); count],
        }
    }

    pub fn count(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Sets the worker count (the slots); workers of removed slots are
    /// retired by the caller.
    pub fn resize(&mut self, count: usize) {
        self.slots.resize(count, Slot::default());
    }

    pub fn slot(&mut self, slot: u32) -> Option<&mut Slot> {
        self.slots.get_mut(slot as usize - 1)
    }

    pub fn find(&self, pid: Pid) -> Option<usize> {
        self.workers.iter().position(|w| w.pid == pid)
    }

    pub fn has(&self, pid: Pid) -> bool {
        self.find(pid).is_some()
    }

    pub fn get_mut(&mut self, pid: Pid) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.pid == pid)
    }

    pub fn remove(&mut self, pid: Pid) -> Option<Worker> {
        self.find(pid).map(|i| self.workers.swap_remove(i))
    }

    pub fn ready(&self) -> usize {
        self.workers.iter().filter(|w| w.is_ready()).count()
    }

    /// For each slot, whether it has a ready worker (one pass over the
    /// workers: this runs for every readiness probe).
    pub fn ready_slots(&self) -> Vec<bool> {
        let mut ready = vec![false; self.slots.len()];
        for w in self.workers.iter().filter(|w| w.is_ready()) {
            if let Some(r) = ready.get_mut(w.slot as usize - 1) {
                *r = true;
            }
        }
        ready
    }

    /// Ready workers, plus the slots between two workers of a recycle
    /// (`Slot::recycling`: the old one ended as it announced, the
    /// successor boots).
    pub fn ready_or_recycling(&self) -> usize {
        let ready = self.ready_slots();
        let between = self.slots.iter().zip(&ready);
        self.ready() + between.filter(|(s, r)| s.recycling && !**r).count()
    }

    pub fn execing(&self) -> usize {
        self.workers.iter().filter(|w| w.is_execing()).count()
    }

    /// Whether a worker of another generation than `current` lives.
    pub fn other_generation_alive(&self, current: u32) -> bool {
        self.workers.iter().any(|w| w.generation() != current)
    }

    /// Whether a worker of another generation than `current` still serves
    /// (is not stopping).
    pub fn other_generation_serving(&self, current: u32) -> bool {
        self.workers
            .iter()
            .any(|w| w.generation() != current && !w.is_stopping())
    }

    /// Whether every slot has a ready worker of generation `current`.
    pub fn every_slot_ready(&self, current: u32) -> bool {
        // One pass over the workers (this runs every turn of a reload).
        let mut served = vec![false; self.slots.len()];
        for w in self
            .workers
            .iter()
            .filter(|w| w.generation() == current && w.is_ready())
        {
            if let Some(s) = served.get_mut(w.slot as usize - 1) {
                *s = true;
            }
        }
        served.iter().all(|s| *s)
    }

    /// What serves each slot, from the workers not stopping. A current
    /// worker is of generation `current` and not marked for replacement;
    /// any other is outdated.
    pub fn slot_view(&self, current: u32) -> Vec<SlotView> {
        let mut view = vec![SlotView::default(); self.slots.len()];
        for w in self.workers.iter().filter(|w| !w.is_stopping()) {
            let Some(v) = view.get_mut(w.slot as usize - 1) else {
                continue;
            };
            if !w.outdated(current) {
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

    /// Counts a failure of `slot` and holds its next spawn for the backoff
    /// (doubling from `first`, capped at `max`). Returns the delay and the
    /// number of failures in a row.
    pub fn slot_failed(
        &mut self,
        slot: u32,
        first: Duration,
        max: Duration,
        now: Instant,
    ) -> (Duration, u32) {
        let Some(s) = self.slot(slot) else {
            return (Duration::ZERO, 0);
        };
        s.failures += 1;
        s.recycling = false;
        let delay = backoff(s.failures, first, max);
        s.not_before = Some(now + delay);
        (delay, s.failures)
    }

    /// The nearest deadline of a worker, or of a slot's backoff still to
    /// come (with `respawning`). A backoff that has passed is no longer a
    /// deadline: its slot was refilled this turn, or waits for an event (a
    /// successor's READY=1 under max_surge, a resume after SIGWINCH).
    /// Waking for it would spin.
    pub fn next_deadline(&self, respawning: bool, now: Instant) -> Option<Instant> {
        let workers = self.workers.iter().filter_map(Worker::deadline);
        let respawns = self
            .slots
            .iter()
            .filter(|_| respawning)
            .filter_map(|s| s.not_before)
            .filter(|t| *t > now);
        workers.chain(respawns).min()
    }
}

/// The delay before the `failures`-th consecutive respawn: doubling from
/// `first`, capped at `max`.
pub fn backoff(failures: u32, first: Duration, max: Duration) -> Duration {
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

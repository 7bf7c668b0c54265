//! What the master reports about itself: the full status for `drover ctl
//! status` (the one-line summary is `Supervisor::summary`).

use std::time::Instant;

use serde_json::json;

use super::supervisor::{Phase, Supervisor};
use super::Master;
use crate::control;
use crate::metrics::resident_bytes;

impl Master {
    /// The supervisor's status, with the preload templates (not workers:
    /// they serve no request and hold no slot).
    pub(super) fn status(&self, now: Instant) -> control::Answer {
        let mut answer = self.sup.status(now);
        let current = self.sup.current();
        let preloading = (current.s.preload && !self.sup.shutting_down()).then_some(current.number);
        if let Some(status) = answer.status.as_mut() {
            status["templates"] = self.templates.status(preloading, now).into();
        }
        answer
    }
}

impl Supervisor {
    /// Master and every worker: slot, pid, generation, state, uptime,
    /// restarts, recycles, last notify status, resident memory.
    pub fn status(&self, now: Instant) -> control::Answer {
        let degraded_after = self.current().s.degraded_after.0;
        let mut workers: Vec<_> = self.pool.workers.iter().collect();
        workers.sort_by_key(|w| (w.slot, w.started));
        let workers: Vec<_> = workers
            .into_iter()
            .map(|w| {
                let slot = self.pool.slots.get(w.slot as usize - 1);
                let failures = slot.map_or(0, |_| self.failures_now(w.slot, now));
                json!({
                    "slot": w.slot,
                    "pid": w.pid.as_raw(),
                    "generation": w.generation(),
                    "state": w.state_name(),
                    "uptime_s": (now - w.started).as_secs(),
                    "restarts": slot.map_or(0, |s| s.restarts),
                    "recycles": slot.map_or(0, |s| s.recycles),
                    "degraded": failures >= degraded_after,
                    "status": w.status,
                    "rss_bytes": resident_bytes(w.pid.as_raw()),
                })
            })
            .collect();
        // Slots, with or without a worker: a failing slot waiting out its
        // backoff has no worker to show, but is what the operator looks for.
        let slots: Vec<_> = self
            .pool
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let failures = self.failures_now(i as u32 + 1, now);
                json!({
                    "slot": i + 1,
                    "restarts": s.restarts,
                    "recycles": s.recycles,
                    "failures_in_a_row": failures,
                    "degraded": failures >= degraded_after,
                    // Only while the backoff holds: once it is over the
                    // slot has its next worker (on trial: still degraded
                    // until it has served `respawn_reset_after`).
                    "respawn_in_ms": s.not_before.filter(|t| *t > now).map(|t| (t - now).as_millis() as u64),
                })
            })
            .collect();
        let status = json!({
            "master": {
                "pid": std::process::id(),
                "uptime_s": (now - self.started).as_secs(),
                "generation": self.current().number,
                "workers": self.pool.slots.len(),
                "paused": matches!(self.phase, Phase::Paused { .. }),
                "phase": self.phase.name(),
                "prestop_left_ms": match self.phase {
                    Phase::PreStop { until, .. } => Some(until.saturating_duration_since(now).as_millis() as u64),
                    _ => None,
                },
                "reloading": self.rollout.reloading(),
                "rss_bytes": resident_bytes(std::process::id() as i32),
            },
            "workers": workers,
            "slots": slots,
        });
        control::Answer {
            ok: true,
            message: self.summary(),
            status: Some(status),
        }
    }

    /// A slot's failures in a row as its next exit would find them: none
    /// once its ready worker has run `respawn_reset_after` (the count is
    /// reset when that worker exits; until then the slot serves, it is not
    /// degraded).
    fn failures_now(&self, slot: u32, now: Instant) -> u32 {
        let reset_after = self.current().s.respawn_reset_after.0;
        let stable = self
            .pool
            .workers
            .iter()
            .any(|w| w.slot == slot && w.is_ready() && now - w.started >= reset_after);
        match self.pool.slots.get(slot as usize - 1) {
            Some(s) if !stable => s.failures,
            _ => 0,
        }
    }
}

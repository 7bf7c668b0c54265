//! What the master reports about itself: a one-line summary (logs, systemd's
//! STATUS=) and the full status for `drover ctl status`.

use std::time::Instant;

use serde_json::json;

use super::worker::{resident_bytes, State};
use super::{control, Master};

impl Master {
    /// One line: "3/4 workers ready, generation 2".
    pub(super) fn summary(&self) -> String {
        let ready = self.workers.iter().filter(|w| w.is_ready()).count();
        let mut s = format!(
            "{ready}/{} workers ready, generation {}",
            self.slots.len(),
            self.gen.number
        );
        if self.paused {
            s.push_str(", paused");
        }
        if self.reload.is_some() {
            s.push_str(", reloading");
        }
        s
    }

    /// Master and every worker: slot, pid, generation, state, uptime,
    /// restarts, last notify status, resident memory.
    pub(super) fn status(&self) -> control::Answer {
        let now = Instant::now();
        let mut workers: Vec<_> = self.workers.iter().collect();
        workers.sort_by_key(|w| (w.slot, w.started));
        let workers: Vec<_> = workers
            .into_iter()
            .map(|w| {
                let state = match w.state {
                    State::Booting { .. } => "booting",
                    State::Ready { .. } if w.replace.is_some() => "replacing",
                    State::Ready { .. } => "ready",
                    State::Stopping { .. } => "stopping",
                };
                let slot = self.slots.get(w.slot as usize - 1);
                json!({
                    "slot": w.slot,
                    "pid": w.pid.as_raw(),
                    "generation": w.generation,
                    "state": state,
                    "uptime_s": (now - w.started).as_secs(),
                    "restarts": slot.map_or(0, |s| s.restarts),
                    "degraded": slot.is_some_and(|s| s.failures >= self.gen.s.degraded_after.0),
                    "status": w.status,
                    "rss_bytes": resident_bytes(w.pid),
                })
            })
            .collect();
        // Slots, with or without a worker: a failing slot waiting out its
        // backoff has no worker to show, but is what the operator looks for.
        let degraded_after = self.gen.s.degraded_after.0;
        let slots: Vec<_> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({
                    "slot": i + 1,
                    "restarts": s.restarts,
                    "failures_in_a_row": s.failures,
                    "degraded": s.failures >= degraded_after,
                    "respawn_in_ms": s.not_before.map(|t| t.saturating_duration_since(now).as_millis() as u64),
                })
            })
            .collect();
        let status = json!({
            "master": {
                "pid": std::process::id(),
                "uptime_s": (now - self.started).as_secs(),
                "generation": self.gen.number,
                "workers": self.slots.len(),
                "paused": self.paused,
                "reloading": self.reload.is_some(),
                "rss_bytes": resident_bytes(nix::unistd::Pid::this()),
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
}

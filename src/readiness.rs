//! Whether drover should receive traffic: the one decision behind `/readyz`,
//! `drover ctl ready` and the pre-stop delay. A pure function of a small view
//! of the master, so every caller answers the same way.

use std::fmt;

/// Where the master is in its life, as readiness sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not every slot has had a ready worker yet.
    Starting,
    Running,
    /// SIGWINCH: workers stopped, sockets kept.
    Paused,
    /// A shutdown was asked for; workers still serve while load balancers
    /// notice (the pre-stop delay).
    PreStop,
    /// Stopping: listeners closed or closing, workers draining.
    Draining,
}

/// What readiness needs to know.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    pub phase: Phase,
    /// Slots wanted (the worker count).
    pub slots: u32,
    /// Slots with at least one ready worker.
    pub ready_slots: u32,
    /// The share of slots that must have a ready worker, in (0, 1]
    /// (the `ready_share` setting).
    pub share: f64,
}

/// Why drover is not ready: one line for an operator or a load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    Booting {
        ready: u32,
        wanted: u32,
        needed: u32,
    },
    Degraded {
        ready: u32,
        wanted: u32,
        needed: u32,
    },
    Paused,
    PreStop,
    Draining,
}

impl NotReady {
    /// The reason's one word: booting, degraded, paused, pre-stop, draining.
    pub fn word(&self) -> &'static str {
        match self {
            NotReady::Booting { .. } => "booting",
            NotReady::Degraded { .. } => "degraded",
            NotReady::Paused => "paused",
            NotReady::PreStop => "pre-stop",
            NotReady::Draining => "draining",
        }
    }
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            NotReady::Booting {
                ready,
                wanted,
                needed,
            }
            | NotReady::Degraded {
                ready,
                wanted,
                needed,
            } => write!(
                f,
                "{}: {ready}/{wanted} slots have a ready worker, {needed} needed",
                self.word()
            ),
            NotReady::Paused => f.write_str("paused: workers stopped (SIGWINCH)"),
            NotReady::PreStop => f.write_str("pre-stop: shutting down soon"),
            NotReady::Draining => f.write_str("draining: shutting down"),
        }
    }
}

/// The slots that must have a ready worker: `share` of `slots`, rounded up,
/// at least one.
pub fn needed(slots: u32, share: f64) -> u32 {
    let n = (f64::from(slots) * share.clamp(0.0, 1.0)).ceil() as u32;
    n.clamp(1, slots.max(1))
}

/// Ready when enough slots have a ready worker and drover is neither
/// paused nor shutting down.
pub fn readiness(v: &View) -> Result<(), NotReady> {
    let needed = needed(v.slots, v.share);
    let (ready, wanted) = (v.ready_slots, v.slots);
    match v.phase {
        Phase::Paused => Err(NotReady::Paused),
        Phase::PreStop => Err(NotReady::PreStop),
        Phase::Draining => Err(NotReady::Draining),
        _ if ready >= needed => Ok(()),
        Phase::Starting => Err(NotReady::Booting {
            ready,
            wanted,
            needed,
        }),
        Phase::Running => Err(NotReady::Degraded {
            ready,
            wanted,
            needed,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(phase: Phase, slots: u32, ready_slots: u32, share: f64) -> View {
        View {
            phase,
            slots,
            ready_slots,
            share,
        }
    }

    #[test]
    fn every_slot_by_default() {
        assert_eq!(readiness(&view(Phase::Running, 4, 4, 1.0)), Ok(()));
        let e = readiness(&view(Phase::Running, 4, 3, 1.0)).unwrap_err();
        assert_eq!(e.word(), "degraded");
        assert_eq!(
            e.to_string(),
            "degraded: 3/4 slots have a ready worker, 4 needed"
        );
        let e = readiness(&view(Phase::Starting, 4, 1, 1.0)).unwrap_err();
        assert_eq!(e.word(), "booting");
    }

    #[test]
    fn a_share_rounds_up_and_needs_at_least_one() {
        assert_eq!(needed(4, 0.5), 2);
        assert_eq!(needed(3, 0.5), 2);
        assert_eq!(needed(4, 0.01), 1);
        assert_eq!(needed(0, 1.0), 1);
        assert_eq!(readiness(&view(Phase::Running, 4, 2, 0.5)), Ok(()));
        // Starting with enough slots ready is ready: a share lets traffic in
        // before the last worker boots.
        assert_eq!(readiness(&view(Phase::Starting, 4, 2, 0.5)), Ok(()));
    }

    #[test]
    fn pause_and_shutdown_win_over_ready_workers() {
        for (phase, word) in [
            (Phase::Paused, "paused"),
            (Phase::PreStop, "pre-stop"),
            (Phase::Draining, "draining"),
        ] {
            assert_eq!(readiness(&view(phase, 2, 2, 1.0)).unwrap_err().word(), word);
        }
    }
}

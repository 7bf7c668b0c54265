//! The staged shutdown's record, and its end: the `on_exit` hook and the
//! exit status. Stages 1 and 2 (stop accepting, ask every worker to stop)
//! are `Supervisor::begin_shutdown`; the deadlines kill what is left.

use std::time::Instant;

use tracing::{info, warn};

use super::worker::ms;
use super::{exit, Master};
use crate::hooks;

/// Why the master is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Signal(&'static str),
    CannotBoot,
    /// A new master is ready and serves the sockets.
    Upgrade,
}

impl Cause {
    /// For the log: the signal's name, or what happened.
    pub fn describe(self) -> &'static str {
        match self {
            Cause::Signal(name) => name,
            Cause::CannotBoot => "a worker that cannot boot",
            Cause::Upgrade => "upgrade",
        }
    }

    /// A stop asked for by `name` (a stop signal's, or `control: stop`), as
    /// the new master of an upgrade reports it to the old one.
    pub fn asked(name: &str) -> Cause {
        const ASKED: [&str; 4] = ["SIGTERM", "SIGINT", "SIGQUIT", "control: stop"];
        Cause::Signal(
            ASKED
                .into_iter()
                .find(|n| *n == name)
                .unwrap_or("control: stop"),
        )
    }

    /// For the `on_exit` hook's environment.
    fn name(self) -> &'static str {
        match self {
            Cause::Signal(name) => name,
            Cause::CannotBoot => "cannot-boot",
            Cause::Upgrade => "upgrade",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Shutdown {
    pub quick: bool,
    pub began: Instant,
    /// `graceful_timeout` after it began (quick: `quick_timeout`, or the
    /// earlier of the two after an escalation): no worker's SIGKILL comes
    /// later, whatever deadline it had before (a stop begun earlier, the
    /// `abort_grace` of an abort), except what `EXTEND_TIMEOUT_USEC` adds.
    pub deadline: Instant,
    pub cause: Cause,
    /// Workers that had to be killed at their deadline.
    pub killed: u32,
}

/// How a shutdown ended: what the exit hook is told, and the exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub quick: bool,
    pub killed: u32,
    pub cause: Cause,
    pub began: Instant,
    /// Of `killed`, those killed at the end of stage 3: processes left by
    /// workers, retired templates.
    pub left_over: u32,
}

impl Shutdown {
    /// The exit status: 3 for a start-up failure, 4 if a worker was killed
    /// at its deadline, else 0.
    pub fn outcome(&self) -> Outcome {
        let status = match self.cause {
            Cause::CannotBoot => exit::CANNOT_BOOT,
            _ if self.killed > 0 => exit::KILLED,
            _ => exit::OK,
        };
        Outcome {
            status,
            quick: self.quick,
            killed: self.killed,
            cause: self.cause,
            began: self.began,
            left_over: 0,
        }
    }
}

impl Outcome {
    /// `n` more had to be killed after the loop (templates, and processes
    /// left by workers, still running at the end of stage 3): a clean stop
    /// becomes status 4, as for a worker killed at its deadline.
    pub fn with_killed(mut self, n: u32) -> Outcome {
        self.killed += n;
        self.left_over += n;
        if self.status == exit::OK && self.killed > 0 {
            self.status = exit::KILLED;
        }
        self
    }
}

impl Master {
    /// After every worker is gone: the hook (stage 4), and the exit status.
    pub(super) fn finish(&mut self, o: Outcome) -> u8 {
        let of_them = match o.left_over {
            0 => String::new(),
            n => format!(": {} worker(s), {n} left over", o.killed - n),
        };
        info!(
            "stage 3 done: all workers stopped {} after the shutdown began ({} killed{of_them})",
            ms(o.began.elapsed()),
            o.killed
        );
        self.obs.publish(crate::events::Kind::Shutdown {
            stage: 3,
            quick: o.quick,
            cause: o.cause.describe().to_string(),
        });
        let s = &self.sup.current().s;
        if !s.on_exit.is_empty() {
            let outcome = hooks::Outcome {
                status: o.status,
                quick: o.quick,
                killed: o.killed,
                cause: o.cause.name(),
            };
            self.obs.publish(crate::events::Kind::Shutdown {
                stage: 4,
                quick: o.quick,
                cause: o.cause.describe().to_string(),
            });
            let began = Instant::now();
            match hooks::run_on_exit(&s.on_exit, &outcome, s.hook_timeout.0, &self.signals) {
                Ok(how) => info!("stage 4, on_exit hook: {how} ({})", ms(began.elapsed())),
                Err(e) => warn!("stage 4, on_exit hook failed: {e}"),
            }
        }
        // Orphans that exited while the hook ran.
        self.reap();
        o.status
    }
}

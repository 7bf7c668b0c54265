//! The staged shutdown: stop accepting, ask every worker to stop, wait for
//! them until the deadline (the loop kills what is left), then run the
//! `on_exit` hook and pick the exit status.

use std::time::Instant;

use nix::sys::signal::Signal;
use tracing::{info, warn};

use super::worker::{ms, State, Why};
use super::{exit, stop, Master};
use crate::hooks;

/// Why the master is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Signal(&'static str),
    CannotBoot,
    /// A new master is ready and serves the sockets.
    Upgrade,
}

#[derive(Debug, Clone)]
pub struct Shutdown {
    pub quick: bool,
    pub began: Instant,
    pub cause: Cause,
    /// Workers that had to be killed at their deadline.
    pub killed: u32,
}

impl Master {
    /// Starts a shutdown, or turns a graceful one into a quick one.
    pub(super) fn begin_shutdown(&mut self, quick: bool, cause: Cause) {
        let now = Instant::now();
        let (signal, timeout) = if quick {
            (Signal::SIGQUIT, self.gen.s.quick_timeout)
        } else {
            (self.gen.s.stop_signal.0, self.gen.s.graceful_timeout)
        };
        let why = match cause {
            Cause::Signal(name) => name,
            Cause::CannotBoot => "a worker that cannot boot",
            Cause::Upgrade => "upgrade",
        };
        match &mut self.shutdown {
            Some(sd) if sd.quick || !quick => {
                info!(
                    "{why}: already shutting down ({})",
                    if sd.quick { "quick" } else { "graceful" }
                );
                return;
            }
            Some(sd) => {
                sd.quick = true;
                info!(
                    "{why}: shutdown escalated to quick: SIGQUIT to the workers, up to {timeout}"
                );
            }
            None => {
                let kind = if quick { "quick" } else { "graceful" };
                info!("{why}: {kind} shutdown: stage 1, stop accepting");
                // After an upgrade the new master serves the sockets: only our
                // copies go. Otherwise new connections are refused from now on.
                let handover = cause == Cause::Upgrade;
                // After an upgrade the service is the new master's (MAINPID=):
                // it is not stopping.
                if !handover {
                    self.systemd.stopping();
                }
                // The control socket goes below: answer whoever waits on it.
                self.answer_reload_waiters(&format!("{why}: shutting down"));
                let mut closed = self
                    .previous
                    .take()
                    .map_or(0, |p| crate::listen::close_unused(p.listeners, handover));
                closed +=
                    crate::listen::close_unused(std::mem::take(&mut self.gen.listeners), handover);
                self.control = None;
                let took = ms(now.elapsed());
                if handover {
                    info!("released {closed} listener(s) to the new master in {took}");
                } else {
                    info!("closed {closed} listener(s) in {took}");
                }
                self.shutdown = Some(Shutdown {
                    quick,
                    began: now,
                    cause,
                    killed: 0,
                });
                info!(
                    "stage 2, drain: {} to {} worker(s), up to {timeout}",
                    signal.as_str(),
                    self.workers.len()
                );
            }
        }
        let deadline = now + timeout.0;
        for w in self.workers.iter_mut() {
            match w.state {
                // Already stopping (retired, recycled, aborted): it keeps its
                // own deadline, and gets SIGQUIT only to hurry it.
                State::Stopping { deadline: own, why } => {
                    if quick {
                        stop(w, signal, own.min(deadline), why);
                    }
                }
                _ => {
                    // A quick stop never extends a deadline already set.
                    let deadline = match w.deadline() {
                        Some(d) if quick && d < deadline => d,
                        _ => deadline,
                    };
                    stop(w, signal, deadline, Why::Shutdown);
                }
            }
        }
    }

    /// After every worker is gone: the hook, and the exit status.
    pub(super) fn finish(&mut self, sd: Shutdown) -> u8 {
        info!(
            "stage 3 done: all workers stopped {} after the shutdown began ({} killed)",
            ms(sd.began.elapsed()),
            sd.killed
        );
        let status = match sd.cause {
            Cause::CannotBoot => exit::CANNOT_BOOT,
            _ if sd.killed > 0 => exit::KILLED,
            _ => exit::OK,
        };
        if !self.gen.s.on_exit.is_empty() {
            let outcome = hooks::Outcome {
                status,
                quick: sd.quick,
                killed: sd.killed,
                cause: match sd.cause {
                    Cause::Signal(name) => name,
                    Cause::CannotBoot => "cannot-boot",
                    Cause::Upgrade => "upgrade",
                },
            };
            let began = Instant::now();
            match hooks::run_on_exit(
                &self.gen.s.on_exit,
                &outcome,
                self.gen.s.hook_timeout.0,
                &self.signals,
            ) {
                Ok(how) => info!("stage 4, on_exit hook: {how} ({})", ms(began.elapsed())),
                Err(e) => warn!("stage 4, on_exit hook failed: {e}"),
            }
        }
        // Orphans that exited while the hook ran.
        self.reap();
        status
    }
}

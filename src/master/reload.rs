//! Reload (SIGHUP, `drover ctl reload`): re-read the config, start the next
//! generation next to the current one, and retire old workers only as new ones
//! report ready. Any failure before that rolls back: the new generation stops
//! and the old one goes on serving.

use std::time::Instant;

use tracing::{error, info, warn};

use super::generation::Generation;
use super::worker::ms;
use super::{control, stop, Master, Why};
use crate::listen;

/// A reload in progress.
pub struct Reload {
    began: Instant,
    /// Control clients waiting for the verdict.
    waiters: Vec<control::ClientId>,
    /// The worker count before, restored by a rollback (it may have been
    /// scaled since the config was read).
    slots_before: usize,
    /// Set by a rollback, so that the loop stops spawning for it.
    pub failed: bool,
}

impl Master {
    pub(super) fn begin_reload(&mut self, why: &str, client: Option<control::ClientId>) {
        if self.paused {
            self.resume(why);
        }
        // Never more than two generations alive: a reload asked for while one
        // is in progress, or while the generation it replaced still drains,
        // waits for that to end. Requests pile up into one: the newest config
        // wins, and every client waiting gets its verdict.
        let busy = if self.reload.is_some() {
            Some("a reload is in progress")
        } else if self.old_generation_alive() {
            Some("the previous generation is still stopping")
        } else {
            None
        };
        if let Some(busy) = busy {
            info!("{why}: {busy}; the reload starts once that is over");
            self.queued_reload
                .get_or_insert_with(Vec::new)
                .extend(client);
            return;
        }
        self.start_reload(why, client.into_iter().collect());
    }

    /// Starts a queued reload once nothing holds it back.
    fn start_queued_reload(&mut self) {
        if self.reload.is_some() || self.shutdown.is_some() || self.old_generation_alive() {
            return;
        }
        if let Some(waiters) = self.queued_reload.take() {
            self.start_reload("queued reload", waiters);
        }
    }

    /// Answers everyone waiting for a queued reload, which will not run.
    pub(super) fn cancel_queued_reload(&mut self, why: &str) {
        if let Some(waiters) = self.queued_reload.take() {
            info!("queued reload cancelled: {why}");
            for c in waiters {
                self.reply(c, control::failure(&format!("cancelled: {why}")));
            }
        }
    }

    /// Answers every control client waiting for a reload's verdict: drover
    /// is shutting down.
    pub(super) fn answer_reload_waiters(&mut self, why: &str) {
        self.cancel_queued_reload(why);
        if let Some(r) = self.reload.as_mut() {
            for c in std::mem::take(&mut r.waiters) {
                if let Some(ctl) = self.control.as_mut() {
                    ctl.reply(c, &control::failure(&format!("not applied: {why}")));
                }
            }
        }
    }

    /// Whether a worker of another generation than the current one lives.
    fn old_generation_alive(&self) -> bool {
        self.workers.iter().any(|w| w.generation != self.gen.number)
    }

    fn start_reload(&mut self, why: &str, waiters: Vec<control::ClientId>) {
        let began = Instant::now();
        self.systemd.reloading();
        let number = self.next_generation;
        let next = self
            .source
            .load()
            .map_err(|e| e.to_string())
            .and_then(|loaded| {
                Generation::build(
                    number,
                    loaded,
                    Vec::new(),
                    &self.gen.listeners,
                    self.master_switched,
                )
                .map_err(|e| e.to_string())
            });
        // The notify socket belongs to the workers' user: a new user could
        // not report ready on it, and the old workers could no longer.
        let next = next.and_then(|n| match n.user_and_group() == self.gen.user_and_group() {
            true => Ok(n),
            false => {
                Err("`user` or `group` changed: that needs a restart or an upgrade".to_string())
            }
        });
        let next = match next {
            Ok(next) => next,
            Err(e) => {
                // Nothing was started and nothing changes.
                error!("{why}: reload rejected, nothing changed: {e}");
                self.systemd.ready(&self.summary());
                for c in waiters {
                    self.reply(c, control::failure(&format!("rejected: {e}")));
                }
                return;
            }
        };
        self.next_generation += 1;
        info!(
            "{why}: reloading {} into generation {number} ({} worker(s), up to {} replaced at a time)",
            self.source.origin(),
            next.s.workers.0,
            next.s.max_surge.0
        );
        let slots_before = self.slots.len();
        self.slots
            .resize(next.s.workers.0 as usize, Default::default());
        if next.s.max_memory.is_some() && self.next_memory_check.is_none() {
            self.next_memory_check = Some(began + next.s.memory_check_interval.0);
        }
        self.previous = Some(std::mem::replace(&mut self.gen, next));
        self.reload = Some(Reload {
            began,
            waiters,
            slots_before,
            failed: false,
        });
    }

    /// Ends the reload once every slot is served by a ready worker of the new
    /// generation (or, after a rollback, of the old one again) and no worker
    /// of another generation still serves; then starts a queued one.
    pub(super) fn settle_reload(&mut self) {
        let Some(r) = &self.reload else {
            self.start_queued_reload();
            return;
        };
        let current = self.gen.number;
        let ready = r.failed || {
            // One pass over the workers (this runs every turn of a reload).
            let mut served = vec![false; self.slots.len()];
            for w in self
                .workers
                .iter()
                .filter(|w| w.generation == current && w.is_ready())
            {
                if let Some(s) = served.get_mut(w.slot as usize - 1) {
                    *s = true;
                }
            }
            served.iter().all(|s| *s)
        };
        let others_serve = self
            .workers
            .iter()
            .any(|w| w.generation != current && !w.is_stopping());
        if !ready || others_serve || self.shutdown.is_some() {
            return;
        }
        let r = self.reload.take().expect("checked above");
        if !r.failed {
            let took = ms(r.began.elapsed());
            info!("reload applied: generation {current} serves, in {took}");
            if let Some(old) = self.previous.take() {
                // Sockets the new config no longer names: closed now that no
                // current worker uses them (old workers may still drain theirs).
                listen::close_unused(old.listeners, false);
            }
            for c in r.waiters {
                self.reply(
                    c,
                    control::success(&format!("applied: generation {current} in {took}")),
                );
            }
        }
        self.systemd.ready(&self.summary());
        self.start_queued_reload();
    }

    /// The new generation failed before it was ready: stop it and go back to
    /// the previous one.
    pub(super) fn rollback(&mut self, cause: String) {
        let Some(previous) = self.previous.take() else {
            return;
        };
        let failed = std::mem::replace(&mut self.gen, previous);
        warn!(
            "reload rolled back: {cause}; generation {} keeps serving",
            self.gen.number
        );
        let slots_before = self.reload.as_ref().map(|r| r.slots_before);
        self.slots.resize(
            slots_before.unwrap_or(self.gen.s.workers.0 as usize),
            Default::default(),
        );
        // Booting workers of the failed generation serve nothing: stop them
        // now. Ready ones are replaced like any outdated worker.
        let (signal, deadline) = (
            failed.s.stop_signal.0,
            Instant::now() + failed.s.graceful_timeout.0,
        );
        for w in self
            .workers
            .iter_mut()
            .filter(|w| w.generation == failed.number && w.is_booting())
        {
            stop(w, signal, deadline, Why::Retired);
        }
        listen::close_unused(failed.listeners, false);
        if let Some(r) = self.reload.as_mut() {
            r.failed = true;
            for c in std::mem::take(&mut r.waiters) {
                if let Some(ctl) = self.control.as_mut() {
                    ctl.reply(c, &control::failure(&format!("rolled back: {cause}")));
                }
            }
        }
    }
}

//! The rollout: which generation new workers are started from, and the
//! reload (SIGHUP, `drover ctl reload`) that moves to the next one.
//!
//! ```text
//!          reload                 config read, generation built
//!   Idle ───────────▶ Loading ─────────────────────────────────▶ Rolling { from }
//!    ▲  (busy: queued)    │ rejected                               │      │
//!    │                    ▼                                        │      │ a new worker failed
//!    ├──────────────── verdict ◀── every slot served by the new ───┘      ▼   before it was ready
//!    │                             generation, no old one serving      RolledBack { failed }
//!    └──────────────────────────────────────────── no worker of it serving ─┘
//! ```
//!
//! Never more than two generations alive: a reload asked for while another
//! is under way, or while the generation it replaced still drains, is
//! queued. Queued requests pile up into one (the newest config wins), and
//! every client waiting gets its verdict. All of this state lives here and
//! changes only through these methods.

use std::rc::Rc;
use std::time::Instant;

use super::action::Action;
use super::generation::Generation;
use super::pool::Pool;
use crate::control::{self, ClientId};

/// Control clients waiting for a verdict (a reload's, an upgrade's).
#[derive(Debug, Default)]
pub struct Waiters(Vec<ClientId>);

impl Waiters {
    pub fn one(client: Option<ClientId>) -> Waiters {
        Waiters(client.into_iter().collect())
    }

    pub fn add(&mut self, client: Option<ClientId>) {
        self.0.extend(client);
    }

    /// The same answer to every one of them.
    pub fn answer(self, answer: control::Answer) -> impl Iterator<Item = Action> {
        self.0.into_iter().map(move |client| Action::AnswerClient {
            client,
            answer: answer.clone(),
        })
    }
}

#[derive(Debug)]
pub enum Stage {
    Idle,
    /// `Action::LoadConfig` is out: the next generation is being built.
    Loading {
        why: String,
        waiters: Waiters,
    },
    /// The current generation replaces `from`, `max_surge` slots at a time.
    Rolling {
        from: Rc<Generation>,
        began: Instant,
        waiters: Waiters,
        /// The worker count before, restored by a rollback (it may have
        /// been scaled since the config was read).
        slots_before: usize,
    },
    /// The new generation failed before it was ready; `current` is the old
    /// one again, and the failed one's workers are on their way out.
    RolledBack,
}

pub struct Rollout {
    /// The generation new workers are started from.
    current: Rc<Generation>,
    phase: Stage,
    /// Reload requests waiting for this one (and the old generation) to end.
    queued: Option<Waiters>,
    next_number: u32,
}

/// How a call to `Rollout::settle` ended.
pub enum Settled {
    /// Every slot is served by the new generation: the old one's sockets
    /// that the new one does not use can go.
    Applied { old: Rc<Generation> },
    /// A rollback is over.
    RolledBack,
}

impl Rollout {
    pub fn new(first: Rc<Generation>) -> Rollout {
        let next_number = first.number + 1;
        Rollout {
            current: first,
            phase: Stage::Idle,
            queued: None,
            next_number,
        }
    }

    pub fn current(&self) -> &Rc<Generation> {
        &self.current
    }

    /// The generation being replaced, during a reload.
    pub fn previous(&self) -> Option<&Rc<Generation>> {
        match &self.phase {
            Stage::Rolling { from, .. } => Some(from),
            _ => None,
        }
    }

    /// A reload is under way (being loaded, rolling, or rolled back and
    /// draining).
    pub fn busy(&self) -> bool {
        !matches!(self.phase, Stage::Idle)
    }

    /// What status reports as reloading: a reload under way, or one asked
    /// for (and acknowledged in the log) that waits for it or for the old
    /// generation to stop. Without the queued one, status said "not
    /// reloading" between a reload's verdict and the queued one's start,
    /// and the worker count it showed was about to be set back.
    pub fn reloading(&self) -> bool {
        self.busy() || self.queued.is_some()
    }

    /// Rolling forward: spawning for the new generation.
    pub fn rolling(&self) -> bool {
        matches!(self.phase, Stage::Rolling { .. })
    }

    /// A reload request. Returns whether to load the config now; otherwise
    /// it is queued (and `busy` says why).
    pub fn request(
        &mut self,
        why: &str,
        client: Option<ClientId>,
        pool: &Pool,
    ) -> Result<(), &'static str> {
        let busy = if self.busy() {
            Some("a reload is in progress")
        } else if pool.other_generation_alive(self.current.number) {
            Some("the previous generation is still stopping")
        } else {
            None
        };
        if let Some(busy) = busy {
            self.queued.get_or_insert_with(Waiters::default).add(client);
            return Err(busy);
        }
        self.phase = Stage::Loading {
            why: why.to_string(),
            waiters: Waiters::one(client),
        };
        Ok(())
    }

    /// Starts a queued reload once nothing holds it back; returns its `why`.
    pub fn start_queued(&mut self, pool: &Pool) -> Option<String> {
        if self.busy() || pool.other_generation_alive(self.current.number) {
            return None;
        }
        let waiters = self.queued.take()?;
        self.phase = Stage::Loading {
            why: "queued reload".to_string(),
            waiters,
        };
        Some("queued reload".to_string())
    }

    /// The number the generation being loaded gets.
    pub fn next_number(&self) -> u32 {
        self.next_number
    }

    /// The config could not be read or built: nothing changes. Returns the
    /// reload's `why` and its waiters.
    pub fn rejected(&mut self) -> (String, Waiters) {
        match std::mem::replace(&mut self.phase, Stage::Idle) {
            Stage::Loading { why, waiters } => (why, waiters),
            other => {
                self.phase = other;
                (String::new(), Waiters::default())
            }
        }
    }

    /// The next generation is built: it becomes current. Returns the
    /// reload's `why`.
    pub fn begin(&mut self, next: Rc<Generation>, slots_before: usize, now: Instant) -> String {
        let (why, waiters) = self.rejected();
        self.next_number = next.number + 1;
        let from = std::mem::replace(&mut self.current, next);
        self.phase = Stage::Rolling {
            from,
            began: now,
            waiters,
            slots_before,
        };
        why
    }

    /// The new generation failed before it was ready: the previous one is
    /// current again. Returns the failed generation, the worker count to go
    /// back to, and the waiters (to be told).
    pub fn roll_back(&mut self) -> Option<(Rc<Generation>, usize, Waiters)> {
        let Stage::Rolling { .. } = self.phase else {
            return None;
        };
        let Stage::Rolling {
            from,
            waiters,
            slots_before,
            ..
        } = std::mem::replace(&mut self.phase, Stage::RolledBack)
        else {
            unreachable!("checked above")
        };
        let failed = std::mem::replace(&mut self.current, from);
        Some((failed, slots_before, waiters))
    }

    /// Ends the reload once every slot is served by a ready worker of the
    /// new generation (or, after a rollback, of the old one again) and no
    /// worker of another generation still serves. Returns how it ended,
    /// with the waiters and how long it took.
    pub fn settle(
        &mut self,
        pool: &Pool,
        now: Instant,
    ) -> Option<(Settled, Waiters, std::time::Duration)> {
        let current = self.current.number;
        let served = match &self.phase {
            Stage::Rolling { .. } => pool.every_slot_ready(current),
            Stage::RolledBack => true,
            _ => return None,
        };
        if !served || pool.other_generation_serving(current) {
            return None;
        }
        match std::mem::replace(&mut self.phase, Stage::Idle) {
            Stage::Rolling {
                from,
                began,
                waiters,
                ..
            } => Some((Settled::Applied { old: from }, waiters, now - began)),
            _ => Some((Settled::RolledBack, Waiters::default(), Default::default())),
        }
    }

    /// Takes every client waiting: the queued ones, and the reload's.
    pub fn take_waiters(&mut self) -> (Option<Waiters>, Waiters) {
        let queued = self.queued.take();
        let running = match &mut self.phase {
            Stage::Loading { waiters, .. } | Stage::Rolling { waiters, .. } => {
                std::mem::take(waiters)
            }
            _ => Waiters::default(),
        };
        (queued, running)
    }

    /// The queued requests, which will not run.
    pub fn cancel_queued(&mut self) -> Option<Waiters> {
        self.queued.take()
    }
}

//! What the master decided to do, as values. The `Supervisor` decides and
//! returns these; `Master::carry_out` does them, in order. Each is named for
//! what an operator would want to read, with the fields that say to whom and
//! why, so that an event stream can publish them as they are.

use std::rc::Rc;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::generation::Generation;
use super::priority::Boot;
use super::worker::{Kill, Pace, Stop};
use crate::control::{Answer, ClientId};
use crate::listen::Set;

pub enum Action {
    /// Start a worker in `slot` from `generation`. (Where a new kind of
    /// start plugs in: a fork from a preloaded template instead of an exec
    /// would be a field of the generation, read by `Master::spawn`.)
    Spawn {
        slot: u32,
        generation: Rc<Generation>,
    },
    /// Send `signal` to one worker.
    Signal {
        slot: u32,
        pid: Pid,
        signal: Signal,
        why: SignalWhy,
    },
    /// SIGKILL to a worker's process group.
    KillGroup { slot: u32, pid: Pid, kill: Kill },
    /// A worker that booted at its generation's boot priority is ready (or
    /// has booted for half its `boot_timeout`): every thread of it (and of
    /// its children) gets the normal one back.
    RestorePriority { slot: u32, pid: Pid, boot: Boot },
    /// Answer a control client.
    AnswerClient { client: ClientId, answer: Answer },
    /// Tell our service manager (systemd) something.
    NotifySystemd(Note),
    /// Close the sockets of `listeners` that no generation uses any more
    /// (with `handover`, only release our copies: a new master serves them).
    CloseListeners { listeners: Set, handover: bool },
    /// Stop answering on the control socket (shutdown).
    CloseControl,
    /// Read the configuration and build the next generation (a reload);
    /// the result goes to `Supervisor::config_loaded`.
    LoadConfig { why: String },
    /// Start the new master of a binary upgrade.
    StartUpgrade { client: Option<ClientId> },
    /// Reopen our log file (SIGUSR1), which was `forwarded` to that many
    /// workers, and is `deferred` for that many booting ones.
    ReopenLog { forwarded: usize, deferred: usize },
    /// Every worker is gone after a shutdown: run the exit hook and exit.
    Exit(super::shutdown::Outcome),
    /// Tell the world: the event stream, its hooks, the metrics, the JSON log.
    Publish(crate::events::Kind),
}

/// Why a worker is sent a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalWhy {
    Stop(Stop),
    /// SIGUSR1 passed on: reopen your logs.
    Forward,
    /// SIGWINCH: drover's pre-stop delay began; end keep-alive.
    PreStop,
    /// SIGABRT at the boot deadline: say where you hang (SIGKILL follows).
    BootTimeout,
}

/// A message to our own service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// `READY=1` with the summary as `STATUS=`.
    Ready(String),
    /// `RELOADING=1`.
    Reloading,
    /// `STATUS=` only.
    Status(String),
    /// `STOPPING=1`; with the pace and the cause when the stop was asked
    /// for (a signal, `drover ctl stop`), none when drover stops on its own
    /// (a worker that cannot boot).
    Stopping(Option<(Pace, &'static str)>),
}

impl Action {
    /// The action's name, as an event stream would publish it.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Spawn { .. } => "spawn",
            Action::Signal { .. } => "signal",
            Action::KillGroup { .. } => "kill_group",
            Action::RestorePriority { .. } => "restore_priority",
            Action::AnswerClient { .. } => "answer_client",
            Action::NotifySystemd(_) => "notify_systemd",
            Action::CloseListeners { .. } => "close_listeners",
            Action::CloseControl => "close_control",
            Action::LoadConfig { .. } => "load_config",
            Action::StartUpgrade { .. } => "start_upgrade",
            Action::ReopenLog { .. } => "reopen_log",
            Action::Exit(_) => "exit",
            Action::Publish(_) => "publish",
        }
    }
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Spawn { slot, generation } => {
                write!(f, "spawn slot {slot} generation {}", generation.number)
            }
            Action::Signal {
                slot,
                pid,
                signal,
                why,
            } => write!(
                f,
                "signal {} to slot {slot} pid {pid} ({why:?})",
                signal.as_str()
            ),
            Action::KillGroup { slot, pid, kill } => {
                write!(f, "kill_group slot {slot} pid {pid} ({kill:?})")
            }
            Action::RestorePriority { slot, pid, boot } => {
                write!(f, "restore_priority slot {slot} pid {pid} ({boot})")
            }
            Action::AnswerClient { client, answer } => write!(
                f,
                "answer_client {client} {}: {}",
                if answer.ok { "ok" } else { "failed" },
                answer.message
            ),
            Action::NotifySystemd(n) => write!(f, "notify_systemd {n:?}"),
            Action::CloseListeners {
                listeners,
                handover,
            } => write!(
                f,
                "close_listeners {} (handover: {handover})",
                listeners.len()
            ),
            Action::CloseControl => write!(f, "close_control"),
            Action::LoadConfig { why } => write!(f, "load_config ({why})"),
            Action::StartUpgrade { client } => write!(f, "start_upgrade {client:?}"),
            Action::ReopenLog {
                forwarded,
                deferred,
            } => write!(
                f,
                "reopen_log (forwarded to {forwarded}, deferred for {deferred})"
            ),
            Action::Exit(o) => write!(f, "exit {o:?}"),
            Action::Publish(k) => write!(f, "publish {}", k.name()),
        }
    }
}

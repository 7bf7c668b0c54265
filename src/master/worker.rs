//! One worker as the master sees it, and the words for how it ended.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Spawned, not yet ready; killed if still booting at the deadline.
    Booting { deadline: Option<Instant> },
    /// Serving.
    Ready,
    /// Asked to stop; killed if still running at the deadline.
    Stopping { deadline: Instant },
}

/// Why drover sent a worker SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    BootTimeout,
    GraceExpired,
}

#[derive(Debug)]
pub struct Worker {
    pub slot: u32,
    pub pid: Pid,
    pub state: State,
    pub started: Instant,
    /// The last `STATUS=` it sent.
    pub status: Option<String>,
    /// It sent `STOPPING=1`: an exit that follows is its own decision.
    pub said_stopping: bool,
    pub killed: Option<Kill>,
}

impl Worker {
    pub fn new(slot: u32, pid: Pid, state: State, now: Instant) -> Worker {
        Worker {
            slot,
            pid,
            state,
            started: now,
            status: None,
            said_stopping: false,
            killed: None,
        }
    }

    pub fn is_stopping(&self) -> bool {
        matches!(self.state, State::Stopping { .. })
    }

    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// The next instant at which the master must act on this worker.
    pub fn deadline(&self) -> Option<Instant> {
        if self.killed.is_some() {
            return None;
        }
        match self.state {
            State::Booting { deadline } => deadline,
            State::Ready => None,
            State::Stopping { deadline } => Some(deadline),
        }
    }
}

/// A wait status in words: "exited with status 1", "killed by SIGSEGV (core dumped)".
pub fn describe(status: WaitStatus, killed: Option<Kill>) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            let core = if core { " (core dumped)" } else { "" };
            let cause = match (sig, killed) {
                (Signal::SIGKILL, Some(Kill::BootTimeout)) => " (boot timeout)",
                (Signal::SIGKILL, Some(Kill::GraceExpired)) => " (grace period expired)",
                (Signal::SIGKILL, None) => " (not sent by drover: the OOM killer or an operator)",
                _ => "",
            };
            format!("killed by {}{core}{cause}", sig.as_str())
        }
        other => format!("changed state: {other:?}"),
    }
}

/// The exit code, if the process exited normally.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        _ => None,
    }
}

/// Milliseconds, for log lines.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

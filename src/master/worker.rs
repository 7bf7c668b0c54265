//! One worker as the master sees it, and the words for how it ended.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

/// Where a worker is in its life. Each state carries the instant at which the
/// master must act on it, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Spawned, not yet ready; killed if still booting at the deadline.
    Booting { deadline: Option<Instant> },
    /// Serving; aborted if no heartbeat arrives by `heartbeat`.
    Ready { heartbeat: Option<Instant> },
    /// Asked to stop; killed if still running at the deadline.
    Stopping { deadline: Instant, why: Why },
}

/// Why drover asked a worker to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Shutdown,
    /// One worker less (SIGTTOU).
    Retired,
    /// Replaced by a ready successor (max_age, max_memory).
    Recycled(&'static str),
    /// Sent SIGABRT: it missed its heartbeat.
    HeartbeatTimeout,
}

/// Why drover sent a worker SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    BootTimeout,
    /// `abort_grace` after the SIGABRT of a heartbeat timeout.
    HeartbeatTimeout,
    /// The end of a graceful or quick stop.
    GraceExpired,
}

#[derive(Debug)]
pub struct Worker {
    pub slot: u32,
    pub pid: Pid,
    pub generation: u32,
    pub state: State,
    pub started: Instant,
    /// When it reaches max_age, if set.
    pub recycle_at: Option<Instant>,
    /// Marked for replacement: a successor is started, and this worker is
    /// stopped once the successor is ready.
    pub replace: Option<&'static str>,
    /// The last `STATUS=` it sent.
    pub status: Option<String>,
    /// It sent `STOPPING=1`: an exit that follows is its own decision.
    pub said_stopping: bool,
    pub killed: Option<Kill>,
    /// Forked, and its exec not yet confirmed: the report pipe to read.
    pub exec: Option<crate::spawn::Started>,
    /// Its exec failed (already dealt with): its exit says nothing more.
    pub exec_failed: bool,
    /// Ready once its exec is confirmed (`ready = "spawn"` in its generation).
    pub ready_on_exec: bool,
    /// Its generation's heartbeat interval (`timeout`), if any.
    pub heartbeat_every: Option<Duration>,
}

impl Worker {
    pub fn new(
        slot: u32,
        pid: Pid,
        generation: u32,
        state: State,
        now: Instant,
        recycle_at: Option<Instant>,
    ) -> Worker {
        Worker {
            slot,
            pid,
            generation,
            state,
            started: now,
            recycle_at,
            replace: None,
            status: None,
            said_stopping: false,
            killed: None,
            exec: None,
            exec_failed: false,
            ready_on_exec: false,
            heartbeat_every: None,
        }
    }

    pub fn is_stopping(&self) -> bool {
        matches!(self.state, State::Stopping { .. })
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready { .. })
    }

    pub fn is_booting(&self) -> bool {
        matches!(self.state, State::Booting { .. })
    }

    /// The next instant at which the master must act on this worker.
    pub fn deadline(&self) -> Option<Instant> {
        // Killed, or failed to exec: its exit is on its way, nothing is due.
        if self.killed.is_some() || self.exec_failed {
            return None;
        }
        match self.state {
            State::Booting { deadline } => deadline,
            State::Ready { heartbeat } => {
                let recycle = self.recycle_at.filter(|_| self.replace.is_none());
                heartbeat.into_iter().chain(recycle).min()
            }
            State::Stopping { deadline, .. } => Some(deadline),
        }
    }

    /// Pushes the current deadline to at least `now + by` (`EXTEND_TIMEOUT_USEC`).
    pub fn extend(&mut self, until: Instant) {
        match &mut self.state {
            State::Booting { deadline: Some(d) }
            | State::Ready { heartbeat: Some(d) }
            | State::Stopping { deadline: d, .. } => *d = (*d).max(until),
            _ => {}
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
                (Signal::SIGKILL, Some(Kill::HeartbeatTimeout)) => " (heartbeat timeout)",
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

/// Resident memory of a process, in bytes, from /proc.
pub fn resident_bytes(pid: Pid) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split(' ').nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(pages * page)
}

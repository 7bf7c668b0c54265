//! Hooks: operator commands drover runs at points of its life. Each is an
//! argv (no shell), runs with a bounded time, and is told the outcome
//! through its environment.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tracing::info;

use crate::signals::{Event, SignalPipe};

/// How the master's run ended, as the `on_exit` hook sees it.
pub struct Outcome {
    pub status: u8,
    pub quick: bool,
    pub killed: u32,
    pub cause: &'static str,
}

/// Runs the `on_exit` hook and waits for it at most `timeout`, then kills
/// its process group. Returns how it ended, in words.
pub fn run_on_exit(
    argv: &[String],
    outcome: &Outcome,
    timeout: Duration,
    signals: &SignalPipe,
) -> io::Result<String> {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .process_group(0)
        .env("DROVER_EXIT_STATUS", outcome.status.to_string())
        .env(
            "DROVER_SHUTDOWN",
            if outcome.quick { "quick" } else { "graceful" },
        )
        .env("DROVER_KILLED", outcome.killed.to_string())
        .env("DROVER_CAUSE", outcome.cause)
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", argv[0])))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.to_string());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            child.wait()?;
            return Ok(format!(
                "killed at its hook_timeout ({})",
                humantime::format_duration(timeout)
            ));
        }
        // Wake on SIGCHLD (through the signal pipe) or at the deadline.
        let ms = left.as_millis().min(i32::MAX as u128) as i32 + 1;
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        );
        for event in signals.drain() {
            if event != Event::Child {
                info!(
                    "{}: ignored while the on_exit hook runs",
                    event.signal_name()
                );
            }
        }
    }
}

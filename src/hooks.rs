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

/// A hook's command: its argv (no shell), in a process group of its own
/// (killed whole at its `hook_timeout`), with nothing on its standard input.
fn hook_command(argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null()).process_group(0);
    cmd
}

/// Runs the `on_exit` hook and waits for it at most `timeout`, then kills
/// its process group. Returns how it ended, in words.
pub fn run_on_exit(
    argv: &[String],
    outcome: &Outcome,
    timeout: Duration,
    signals: &SignalPipe,
) -> io::Result<String> {
    let mut child = hook_command(argv)
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
        for event in signals.drain().into_iter().map(|r| r.event) {
            if event != Event::Child {
                info!(
                    "{}: ignored while the on_exit hook runs",
                    event.signal_name()
                );
            }
        }
    }
}

/// The most event hooks running at once, so that a burst of events cannot
/// fork a burst of processes: an event beyond that waits for one of them
/// to end.
pub const MAX_RUNNING_HOOKS: usize = 8;

/// The most events waiting for a hook to end; one beyond that runs no hook
/// (with a warning): hooks that cannot keep up must not grow the master's
/// memory without bound.
pub const MAX_WAITING_HOOKS: usize = 1024;

/// One running event hook.
struct RunningHook {
    pid: Pid,
    event: &'static str,
    deadline: Instant,
}

/// A hook's command, ready to start, waiting for a running one to end.
struct WaitingHook {
    cmd: Command,
    event: &'static str,
    seq: u64,
}

/// The `event_hooks` setting at work: starts a hook's command for each event
/// it names, without waiting; its exit is reaped by the master's loop and
/// handed to [`EventHooks::reaped`]; at `hook_timeout` its process group is
/// killed ([`EventHooks::enforce`]).
#[derive(Default)]
pub struct EventHooks {
    /// Event name → argv.
    commands: std::collections::BTreeMap<String, Vec<String>>,
    timeout: Duration,
    running: Vec<RunningHook>,
    /// In the order of their events, started as running hooks end.
    waiting: std::collections::VecDeque<WaitingHook>,
}

impl EventHooks {
    pub fn new(
        commands: std::collections::BTreeMap<String, Vec<String>>,
        timeout: Duration,
    ) -> EventHooks {
        EventHooks {
            commands,
            timeout,
            ..EventHooks::default()
        }
    }

    /// Replaces the commands (a reload); running hooks go on.
    pub fn configure(
        &mut self,
        commands: std::collections::BTreeMap<String, Vec<String>>,
        timeout: Duration,
    ) {
        self.commands = commands;
        self.timeout = timeout;
    }

    /// Starts the hook for `event`, if one is set. The event is in the
    /// hook's environment: `DROVER_EVENT` (its name), `DROVER_EVENT_JSON`
    /// (the whole line), and each scalar field as `DROVER_EVENT_<KEY>`.
    pub fn fire(&mut self, event: &crate::events::Event, now: Instant) {
        let name = event.kind.name();
        let Some(argv) = self.commands.get(name).filter(|a| !a.is_empty()) else {
            return;
        };
        if self.waiting.len() >= MAX_WAITING_HOOKS {
            tracing::warn!(
                "event hook for {name} (seq {}) not run: {MAX_RUNNING_HOOKS} hooks running and \
                 {MAX_WAITING_HOOKS} waiting",
                event.seq
            );
            return;
        }
        let json = serde_json::to_value(event).unwrap_or_default();
        let mut cmd = hook_command(argv);
        cmd.env("DROVER_EVENT", name)
            .env("DROVER_EVENT_JSON", json.to_string());
        for (key, value) in json.as_object().into_iter().flatten() {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => continue,
            };
            cmd.env(format!("DROVER_EVENT_{}", key.to_uppercase()), text);
        }
        self.waiting.push_back(WaitingHook {
            cmd,
            event: name,
            seq: event.seq,
        });
        self.start_waiting(now);
    }

    /// Starts the waiting hooks, oldest first, while fewer than
    /// MAX_RUNNING_HOOKS run.
    fn start_waiting(&mut self, now: Instant) {
        while self.running.len() < MAX_RUNNING_HOOKS {
            let Some(mut h) = self.waiting.pop_front() else {
                return;
            };
            match h.cmd.spawn() {
                Ok(child) => self.running.push(RunningHook {
                    pid: Pid::from_raw(child.id() as i32),
                    event: h.event,
                    deadline: now + self.timeout,
                }),
                Err(e) => tracing::warn!(
                    "event hook for {} (seq {}): {}: {e}",
                    h.event,
                    h.seq,
                    h.cmd.get_program().to_string_lossy()
                ),
            }
        }
    }

    /// A reaped pid: true if it was a hook (now forgotten, and the next
    /// waiting one started).
    pub fn reaped(&mut self, pid: Pid, how: &str) -> bool {
        let Some(i) = self.running.iter().position(|h| h.pid == pid) else {
            return false;
        };
        let h = self.running.swap_remove(i);
        tracing::debug!("event hook for {} (pid {pid}) {how}", h.event);
        self.start_waiting(Instant::now());
        true
    }

    /// The earliest hook deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.running.iter().map(|h| h.deadline).min()
    }

    /// Kills the process group of every hook past its deadline (reaped later).
    pub fn enforce(&mut self, now: Instant) {
        for h in self.running.iter_mut().filter(|h| h.deadline <= now) {
            tracing::warn!(
                "event hook for {} (pid {}) killed at its hook_timeout",
                h.event,
                h.pid
            );
            let _ = killpg(h.pid, Signal::SIGKILL);
            // Killed: nothing more is due; its exit arrives as SIGCHLD.
            h.deadline = now + Duration::from_secs(3600 * 24 * 365);
        }
    }

    /// The pids of the hooks running.
    pub fn pids(&self) -> Vec<Pid> {
        self.running.iter().map(|h| h.pid).collect()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// At drover's exit: the hooks still running get what is left of their
    /// `hook_timeout`, then their process groups are killed; the waiting
    /// ones run as those end, each within its own, but none starts later
    /// than one `hook_timeout` after this began (so the exit waits two at
    /// most, however many wait). All are reaped before this returns, so that
    /// none outlives drover.
    pub fn finish(&mut self) {
        if self.running.is_empty() {
            return;
        }
        info!(
            "waiting for {} event hook(s) still running and {} waiting (each within its hook_timeout)",
            self.running.len(),
            self.waiting.len()
        );
        let last_start = Instant::now() + self.timeout;
        loop {
            self.running.retain(|h| still_running(h.pid));
            let now = Instant::now();
            if now < last_start {
                self.start_waiting(now);
            } else if !self.waiting.is_empty() {
                tracing::warn!(
                    "{} event hook(s) not run: drover exits (one hook_timeout passed)",
                    self.waiting.len()
                );
                self.waiting.clear();
            }
            let Some(next) = self.next_deadline() else {
                return;
            };
            let now = Instant::now();
            if next <= now {
                let (due, rest) = std::mem::take(&mut self.running)
                    .into_iter()
                    .partition(|h| h.deadline <= now);
                self.running = due;
                self.enforce(now);
                for h in std::mem::replace(&mut self.running, rest) {
                    let _ = nix::sys::wait::waitpid(h.pid, None);
                }
                continue;
            }
            wait_for_any(&self.running, next - now);
        }
    }
}

/// Whether hook `pid` has not exited yet; one that has is reaped.
fn still_running(pid: Pid) -> bool {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    matches!(
        waitpid(pid, Some(WaitPidFlag::WNOHANG)),
        Ok(WaitStatus::StillAlive)
    )
}

/// Waits until one of `hooks` exits, or `at_most`: on their pidfds, or,
/// where a pidfd cannot be had, 10 ms at a time.
fn wait_for_any(hooks: &[RunningHook], at_most: Duration) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let pidfds: Vec<OwnedFd> = hooks
        .iter()
        .filter_map(|h| {
            // SAFETY: pidfd_open takes a pid and flags; a descriptor it
            // returns is ours alone.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, h.pid.as_raw(), 0) };
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
        })
        .collect();
    let at_most = if pidfds.len() < hooks.len() {
        at_most.min(Duration::from_millis(10))
    } else {
        at_most
    };
    let mut fds: Vec<PollFd> = pidfds
        .iter()
        .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
        .collect();
    let ms = at_most.as_millis().min(i32::MAX as u128) as i32 + 1;
    let _ = poll(
        &mut fds,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, Kind};
    use nix::sys::wait::{waitpid, WaitStatus};

    fn event() -> Event {
        Event {
            seq: 3,
            ts: "t".into(),
            kind: Kind::SlotDegraded {
                slot: 2,
                failures: 5,
            },
        }
    }

    #[test]
    fn a_hook_gets_the_event_in_its_environment_and_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "echo \"$DROVER_EVENT $DROVER_EVENT_SEQ $DROVER_EVENT_SLOT $DROVER_EVENT_FAILURES\" > {}; echo \"$DROVER_EVENT_JSON\" >> {}",
            out.display(),
            out.display()
        );
        let mut hooks = EventHooks::new(
            [(
                "slot_degraded".to_string(),
                vec!["sh".into(), "-c".into(), script],
            )]
            .into(),
            Duration::from_secs(5),
        );
        hooks.fire(&event(), Instant::now());
        assert_eq!(hooks.running(), 1);
        let pid = hooks.running[0].pid;
        let status = waitpid(pid, None).unwrap();
        assert!(matches!(status, WaitStatus::Exited(_, 0)));
        assert!(hooks.reaped(pid, "exited"));
        assert_eq!(hooks.running(), 0);
        let text = std::fs::read_to_string(&out).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("slot_degraded 3 2 5"));
        let v: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(v["event"], "slot_degraded");
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed() {
        let mut hooks = EventHooks::new(
            [(
                "slot_degraded".to_string(),
                vec!["sleep".into(), "30".into()],
            )]
            .into(),
            Duration::from_millis(50),
        );
        let start = Instant::now();
        hooks.fire(&event(), start);
        let deadline = hooks.next_deadline().unwrap();
        assert!(deadline <= start + Duration::from_millis(50));
        hooks.enforce(deadline);
        let pid = hooks.running[0].pid;
        let status = waitpid(pid, None).unwrap();
        assert!(matches!(
            status,
            WaitStatus::Signaled(_, Signal::SIGKILL, _)
        ));
        assert!(start.elapsed() < Duration::from_secs(10));
        // Events without a hook run nothing.
        let mut none = EventHooks::default();
        none.fire(&event(), start);
        assert_eq!(none.running(), 0);
    }

    /// A burst of events beyond MAX_RUNNING_HOOKS: the hooks past it wait
    /// and run as the running ones end, never more than the limit at once
    /// (the code before ran none of them: a Prometheus `mark_process_dead`
    /// hook missed 15 of 156 worker exits under `--max-requests`).
    #[test]
    fn hooks_beyond_the_running_limit_wait_and_all_run_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("echo $DROVER_EVENT_SEQ >> {}", out.display());
        let mut hooks = EventHooks::new(
            [(
                "slot_degraded".to_string(),
                vec!["sh".into(), "-c".into(), script],
            )]
            .into(),
            Duration::from_secs(30),
        );
        let burst = MAX_RUNNING_HOOKS + 5;
        for seq in 0..burst as u64 {
            hooks.fire(&Event { seq, ..event() }, Instant::now());
        }
        assert_eq!(hooks.running(), MAX_RUNNING_HOOKS);
        let mut ran = 0;
        while hooks.running() > 0 {
            assert!(hooks.running() <= MAX_RUNNING_HOOKS);
            let pid = hooks.running[0].pid;
            assert!(matches!(waitpid(pid, None), Ok(WaitStatus::Exited(_, 0))));
            assert!(hooks.reaped(pid, "exited"));
            ran += 1;
        }
        assert_eq!(ran, burst);
        let seqs: Vec<u64> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(sorted, (0..burst as u64).collect::<Vec<_>>());
    }

    /// At drover's exit the waiting hooks start only within one
    /// hook_timeout: 8 running and 24 waiting hooks that never end make 2
    /// rounds (the running ones, killed at their timeout, and the 8 started
    /// then), not 4, and the rest are dropped.
    #[test]
    fn at_the_exit_waiting_hooks_start_only_within_one_hook_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("echo $DROVER_EVENT_SEQ >> {}; exec sleep 30", out.display());
        let mut hooks = EventHooks::new(
            [(
                "slot_degraded".to_string(),
                vec!["sh".into(), "-c".into(), script],
            )]
            .into(),
            Duration::from_millis(300),
        );
        for seq in 0..4 * MAX_RUNNING_HOOKS as u64 {
            hooks.fire(&Event { seq, ..event() }, Instant::now());
        }
        hooks.finish();
        assert_eq!((hooks.running(), hooks.waiting.len()), (0, 0));
        let started = std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count();
        assert!(started <= 2 * MAX_RUNNING_HOOKS, "{started} hooks started");
    }
}

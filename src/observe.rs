//! What the master shows the world, in one place: every event goes through
//! [`Observer::publish`] (counted for the metrics, written to the
//! subscribers, handed to the event hooks, logged in a JSON log); the
//! scoreboard and the `capture_output` pipes are given to each worker here.
//! The master keeps one `Observer` and the admin endpoint next to it, and
//! waits on their descriptors with its own.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Instant, SystemTime};

use nix::poll::{PollFd, PollFlags};
use nix::unistd::Pid;
use tracing::warn;

use crate::capture::{self, Capture};
use crate::config::Settings;
use crate::events::{Bus, Event, Kind};
use crate::hooks::EventHooks;
use crate::metrics::{Counters, SlotRequests};
use crate::scoreboard::Scoreboard;

/// What a worker about to be spawned gets from the observer.
#[derive(Default)]
pub struct WorkerIo {
    /// Its scoreboard record.
    pub record: Option<u32>,
    /// Variables for its environment.
    pub env: Vec<(String, String)>,
    /// With capture_output: (stdout, stderr) pipes, read end and write end.
    pipes: Option<[(OwnedFd, OwnedFd); 2]>,
}

impl WorkerIo {
    /// The write ends to put at the worker's fds 1 and 2, if captured.
    pub fn output(&self) -> Option<(std::os::fd::RawFd, std::os::fd::RawFd)> {
        self.pipes
            .as_ref()
            .map(|[o, e]| (o.1.as_raw_fd(), e.1.as_raw_fd()))
    }
}

pub struct Observer {
    bus: Bus,
    hooks: EventHooks,
    pub counters: Counters,
    scoreboard: Option<Scoreboard>,
    /// Worker pid → its scoreboard record.
    records: std::collections::HashMap<Pid, u32>,
    capture: Option<Capture>,
    capture_output: bool,
    /// When the master started, by the wall clock: taken once, so that
    /// `drover_start_time_seconds` is the same at every scrape (a restart
    /// or an upgrade is what changes it).
    pub started_at: SystemTime,
}

impl Observer {
    /// `dir` is drover's private directory (the notify socket's), where the
    /// scoreboard file goes; `owner` the workers' user, who must write it.
    pub fn new(s: &Settings, dir: &Path, owner: Option<(u32, u32)>) -> Observer {
        let scoreboard = Scoreboard::create(dir, owner)
            .map_err(|e| warn!("no scoreboard (request metrics are off): {e}"))
            .ok();
        let mut o = Observer {
            bus: Bus::default(),
            hooks: EventHooks::default(),
            counters: Counters::default(),
            scoreboard,
            records: std::collections::HashMap::new(),
            capture: None,
            capture_output: false,
            started_at: SystemTime::now(),
        };
        o.configure(s);
        o
    }

    /// Takes the settings of a new generation (a reload).
    pub fn configure(&mut self, s: &Settings) {
        self.hooks
            .configure(s.event_hooks.0.clone(), s.hook_timeout.0);
        self.capture_output = s.capture_output;
        if s.capture_output && s.preload {
            // Not built yet: say so, rather than leave raw worker lines in the log.
            warn!(
                "capture_output does not apply with preload = true yet: the template and the \
                 workers forked from it write to drover's own standard output and error"
            );
        }
        if s.capture_output && self.capture.is_none() {
            match Capture::new() {
                Ok(c) => self.capture = Some(c),
                Err(e) => warn!("capture_output: cannot create the epoll descriptor: {e}"),
            }
        }
    }

    /// One event: counted, written to subscribers, logged (JSON log), and
    /// its hook started.
    pub fn publish(&mut self, kind: Kind) -> Event {
        self.counters.observe(&kind);
        let event = self.bus.publish(kind);
        if crate::logformat::is_json() {
            crate::logformat::log_event(&String::from_utf8_lossy(&event.line()));
        }
        self.hooks.fire(&event, Instant::now());
        event
    }

    /// A control client that asked for events: from now on it gets them.
    pub fn subscribe(&mut self, stream: UnixStream) {
        let answer = crate::control::success("following events");
        let mut greeting = serde_json::to_vec(&answer).unwrap_or_default();
        greeting.push(b'\n');
        if let Err(stream) = self.bus.subscribe(stream, &greeting) {
            let refused = crate::control::failure(&format!(
                "too many event subscribers (at most {})",
                crate::events::MAX_SUBSCRIBERS
            ));
            let mut line = serde_json::to_vec(&refused).unwrap_or_default();
            line.push(b'\n');
            let _ = stream.set_nonblocking(true);
            let _ = std::io::Write::write(&mut &stream, &line);
        }
    }

    /// At exit: the subscribers get what is pending (at most 100 ms in all).
    /// At exit: the event stream's last lines out, and no hook left running.
    pub fn close(&mut self) {
        self.hooks.finish();
        self.bus.close(std::time::Duration::from_millis(100));
    }

    /// What to wait on: subscribers, and the capture pipes (one epoll fd),
    /// unless their output is held (read at most every `READ_INTERVAL`).
    pub fn poll_fds(&self) -> Vec<PollFd<'_>> {
        let mut fds = self.bus.poll_fds();
        if let Some(c) = self.capture.as_ref().filter(|c| c.wants_poll()) {
            fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
        }
        fds
    }

    /// After a wait: subscribers written to, worker output logged, hooks
    /// past their time killed. Never blocks.
    pub fn on_ready(&mut self, now: Instant) {
        self.bus.on_ready();
        if let Some(c) = &mut self.capture {
            c.on_ready(now, &mut capture::log);
        }
        self.hooks.enforce(now);
    }

    /// At exit, once every worker is gone: their last lines, which the
    /// pipes may hold (they are read at most every `READ_INTERVAL`).
    pub fn flush_output(&mut self) {
        if let Some(c) = &mut self.capture {
            c.flush(Instant::now(), &mut capture::log);
        }
    }

    /// The earliest hook deadline, or held output's.
    pub fn next_deadline(&self) -> Option<Instant> {
        let held = self.capture.as_ref().and_then(Capture::next_deadline);
        self.hooks.next_deadline().into_iter().chain(held).min()
    }

    /// The event hooks still running: our children, but no process left by
    /// a worker.
    pub fn hook_pids(&self) -> Vec<Pid> {
        self.hooks.pids()
    }

    /// A reaped pid: true if it was an event hook's.
    pub fn reaped(&mut self, pid: Pid, how: &str) -> bool {
        self.hooks.reaped(pid, how)
    }

    /// Prepares what a worker of `slot` gets: its scoreboard record and,
    /// with capture_output and `pipes` (an exec'd worker; one forked from a
    /// template keeps the template's output), its pipes.
    pub fn prepare_worker(&mut self, slot: u32, pipes: bool) -> WorkerIo {
        let mut io = WorkerIo::default();
        if let Some(sb) = &mut self.scoreboard {
            if let Some(i) = sb.claim(slot) {
                io.env
                    .push(("DROVER_SCOREBOARD".into(), sb.path().display().to_string()));
                io.env
                    .push(("DROVER_SCOREBOARD_INDEX".into(), i.to_string()));
                io.record = Some(i);
            }
        }
        if pipes && self.capture_output && self.capture.is_some() {
            match (capture::pipe(), capture::pipe()) {
                (Ok(out), Ok(err)) => io.pipes = Some([out, err]),
                (Err(e), _) | (_, Err(e)) => {
                    warn!("worker {slot}: no capture pipes ({e}): its output goes to drover's")
                }
            }
        }
        io
    }

    /// The worker was forked with `io`: its pipes are read from now on
    /// (our copies of the write ends are closed here).
    pub fn worker_started(&mut self, slot: u32, pid: Pid, io: WorkerIo) {
        if let Some(i) = io.record {
            self.records.insert(pid, i);
        }
        if let (Some([(out, _), (err, _)]), Some(c)) = (io.pipes, self.capture.as_mut()) {
            for (read, stream) in [
                (out, capture::Stream::Stdout),
                (err, capture::Stream::Stderr),
            ] {
                if let Err(e) = c.add(slot, pid, stream, read) {
                    warn!(
                        "worker {slot} (pid {pid}): cannot read its {}: {e}",
                        stream.as_str()
                    );
                }
            }
        }
    }

    /// A spawn that did not happen: the record goes back.
    pub fn worker_not_started(&mut self, io: WorkerIo) {
        if let (Some(sb), Some(i)) = (&mut self.scoreboard, io.record) {
            sb.release(i);
        }
    }

    /// A worker is reaped: its scoreboard record is folded into its slot's
    /// totals and freed.
    pub fn worker_gone(&mut self, pid: Pid) {
        if let (Some(sb), Some(i)) = (&mut self.scoreboard, self.records.remove(&pid)) {
            sb.release(i);
        }
    }

    /// Per slot request figures, for a scrape.
    pub fn requests(&self) -> Vec<SlotRequests> {
        self.scoreboard
            .as_ref()
            .map(Scoreboard::slots)
            .unwrap_or_default()
    }
}

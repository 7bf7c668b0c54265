//! The event stream: what the master decided, as JSON lines with a timestamp
//! and a sequence number. Published to `drover ctl events` subscribers (each
//! with a bounded buffer: a slow reader is dropped, never waited for), to the
//! event hooks, to the metrics' counters and to the JSON log.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::SystemTime;

use nix::poll::{PollFd, PollFlags};
use serde::Serialize;
use tracing::warn;

/// Why a worker's process ended, as the metrics count it (label `cause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitCause {
    /// Exited with status 0 on its own or when asked to (reload, shutdown,
    /// one worker less).
    Clean,
    /// Exited with a non-zero status nobody asked for.
    Crash,
    /// Killed by a signal drover did not send as a kill (an operator, the
    /// OOM killer, a segfault).
    Signal,
    /// Missed its heartbeat: sent SIGABRT, perhaps SIGKILL after.
    HeartbeatTimeout,
    /// Killed for not reporting ready within `boot_timeout`.
    BootTimeout,
    /// Replaced at its `max_age`.
    RecycledMaxAge,
    /// Replaced for exceeding `max_memory`.
    RecycledMaxMemory,
    /// Replaced after `max_requests`.
    RecycledMaxRequests,
    /// Killed with SIGKILL when its stop deadline passed.
    KilledAtDeadline,
    /// Its exec failed (a missing program, a bad `chdir`).
    ExecFailed,
}

impl ExitCause {
    pub const ALL: [ExitCause; 10] = [
        ExitCause::Clean,
        ExitCause::Crash,
        ExitCause::Signal,
        ExitCause::HeartbeatTimeout,
        ExitCause::BootTimeout,
        ExitCause::RecycledMaxAge,
        ExitCause::RecycledMaxMemory,
        ExitCause::RecycledMaxRequests,
        ExitCause::KilledAtDeadline,
        ExitCause::ExecFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExitCause::Clean => "clean",
            ExitCause::Crash => "crash",
            ExitCause::Signal => "signal",
            ExitCause::HeartbeatTimeout => "heartbeat_timeout",
            ExitCause::BootTimeout => "boot_timeout",
            ExitCause::RecycledMaxAge => "recycled_max_age",
            ExitCause::RecycledMaxMemory => "recycled_max_memory",
            ExitCause::RecycledMaxRequests => "recycled_max_requests",
            ExitCause::KilledAtDeadline => "killed_at_deadline",
            ExitCause::ExecFailed => "exec_failed",
        }
    }
}

/// How a reload or an upgrade ended (label `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    RolledBack,
    Rejected,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Applied, Outcome::RolledBack, Outcome::Rejected];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::RolledBack => "rolled_back",
            Outcome::Rejected => "rejected",
        }
    }
}

/// One thing that happened. The variant's name is the event's `event` key
/// (snake case); its fields are the event's other keys. These names are a
/// stable interface: hooks, log queries and tests match on them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Kind {
    /// The master is up: sockets bound, first workers being started.
    Started {
        pid: u32,
        workers: u32,
        generation: u32,
    },
    WorkerSpawned {
        slot: u32,
        pid: i32,
        generation: u32,
    },
    WorkerReady {
        slot: u32,
        pid: i32,
        generation: u32,
        /// From spawn to ready.
        seconds: f64,
    },
    /// Every slot has a ready worker for the first time (Gunicorn's
    /// `when_ready`): once per master, at the end of its start-up (or of the
    /// resume that completes a start-up a SIGWINCH interrupted). A reload
    /// ends with `reload_applied`, `reload_rolled_back` or `reload_rejected`.
    AllReady {
        workers: u32,
        generation: u32,
    },
    /// drover asked a worker to stop.
    WorkerStopping {
        slot: u32,
        pid: i32,
        generation: u32,
        /// shutdown, retired, reload, max_age, max_memory, max_requests, …
        reason: String,
        signal: String,
    },
    /// A worker missed its heartbeat and was sent SIGABRT (Gunicorn's
    /// `worker_abort`).
    WorkerAborted {
        slot: u32,
        pid: i32,
        generation: u32,
    },
    /// A worker's process ended (Gunicorn's `child_exit`).
    WorkerExited {
        slot: u32,
        pid: i32,
        generation: u32,
        cause: ExitCause,
        /// The exit status, when it exited.
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<i32>,
        /// The signal's name, when a signal ended it.
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
        /// As the log says it: "killed by SIGABRT (boot timeout)".
        description: String,
    },
    /// A preload template was started (`preload = true`): it loads the
    /// application, then forks the workers of its generation.
    TemplateSpawned {
        pid: i32,
        generation: u32,
    },
    /// It is ready to fork.
    TemplateReady {
        pid: i32,
        generation: u32,
        /// From spawn to ready.
        seconds: f64,
    },
    /// A template's process ended. `cause`: `retired` (its generation has no
    /// worker left), `boot_failed` (it exited before it was ready to fork),
    /// `boot_timeout`, `hung` (it did not answer a fork request: killed),
    /// `not_a_template` (the command does not speak the template protocol:
    /// killed), `exited` (on its own, after it was ready).
    TemplateExited {
        pid: i32,
        generation: u32,
        cause: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
        description: String,
    },
    /// A slot failed `degraded_after` times in a row.
    SlotDegraded {
        slot: u32,
        failures: u32,
    },
    ReloadBegun {
        generation: u32,
        trigger: String,
    },
    ReloadApplied {
        generation: u32,
    },
    ReloadRolledBack {
        generation: u32,
        reason: String,
    },
    /// The new configuration could not be loaded: nothing changed.
    ReloadRejected {
        reason: String,
    },
    /// The worker count changed (Gunicorn's `nworkers_changed`).
    Scaled {
        from: u32,
        to: u32,
        trigger: String,
    },
    Paused {
        trigger: String,
    },
    Resumed {
        trigger: String,
    },
    UpgradeBegun {
        pid: i32,
    },
    UpgradeApplied {
        pid: i32,
    },
    /// An upgrade was refused before anything started (drover is PID 1, a
    /// reload or another upgrade is under way).
    UpgradeRejected {
        reason: String,
    },
    UpgradeFailed {
        reason: String,
    },
    /// A shutdown stage: 0 the pre-stop delay begins (`prestop_delay`), 1
    /// stop accepting, 2 stop workers, 3 all workers gone, 4 the on_exit
    /// hook (see docs/signals.md).
    Shutdown {
        stage: u8,
        quick: bool,
        cause: String,
    },
    /// The master exits with this status.
    Exiting {
        status: u8,
    },
}

impl Kind {
    /// The `event` key of this kind.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Started { .. } => "started",
            Kind::WorkerSpawned { .. } => "worker_spawned",
            Kind::WorkerReady { .. } => "worker_ready",
            Kind::AllReady { .. } => "all_ready",
            Kind::WorkerStopping { .. } => "worker_stopping",
            Kind::WorkerAborted { .. } => "worker_aborted",
            Kind::WorkerExited { .. } => "worker_exited",
            Kind::TemplateSpawned { .. } => "template_spawned",
            Kind::TemplateReady { .. } => "template_ready",
            Kind::TemplateExited { .. } => "template_exited",
            Kind::SlotDegraded { .. } => "slot_degraded",
            Kind::ReloadBegun { .. } => "reload_begun",
            Kind::ReloadApplied { .. } => "reload_applied",
            Kind::ReloadRolledBack { .. } => "reload_rolled_back",
            Kind::ReloadRejected { .. } => "reload_rejected",
            Kind::Scaled { .. } => "scaled",
            Kind::Paused { .. } => "paused",
            Kind::Resumed { .. } => "resumed",
            Kind::UpgradeBegun { .. } => "upgrade_begun",
            Kind::UpgradeApplied { .. } => "upgrade_applied",
            Kind::UpgradeRejected { .. } => "upgrade_rejected",
            Kind::UpgradeFailed { .. } => "upgrade_failed",
            Kind::Shutdown { .. } => "shutdown",
            Kind::Exiting { .. } => "exiting",
        }
    }
}

/// Every event name, for validating the `event_hooks` setting.
pub const NAMES: &[&str] = &[
    "started",
    "worker_spawned",
    "worker_ready",
    "all_ready",
    "worker_stopping",
    "worker_aborted",
    "worker_exited",
    "template_spawned",
    "template_ready",
    "template_exited",
    "slot_degraded",
    "reload_begun",
    "reload_applied",
    "reload_rolled_back",
    "reload_rejected",
    "scaled",
    "paused",
    "resumed",
    "upgrade_begun",
    "upgrade_applied",
    "upgrade_rejected",
    "upgrade_failed",
    "shutdown",
    "exiting",
];

/// An event as published: the kind with its sequence number and time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// 1, 2, 3, … in the order the master decided; a gap seen by a
    /// subscriber cannot happen (it is dropped instead).
    pub seq: u64,
    /// UTC, RFC 3339 with milliseconds.
    pub ts: String,
    #[serde(flatten)]
    pub kind: Kind,
}

impl Event {
    /// One JSON object and a newline.
    pub fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// `t` as `2026-12-04T12:26:05.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Bytes a subscriber may have pending before it is dropped as too slow.
pub const SUBSCRIBER_BUFFER: usize = 256 * 1024;
/// At most this many subscribers at once; more are refused.
pub const MAX_SUBSCRIBERS: usize = 16;

struct Subscriber {
    stream: UnixStream,
    pending: Vec<u8>,
    /// The head of `pending` is the rest of a line already partly sent.
    mid_line: bool,
}

impl Subscriber {
    /// Writes what it can without blocking. Err: the reader is gone.
    fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.mid_line = self.pending[n - 1] != b'\n';
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The publisher: numbers events and hands them to the subscribers.
pub struct Bus {
    seq: u64,
    subscribers: Vec<Subscriber>,
    limit: usize,
}

impl Default for Bus {
    fn default() -> Self {
        Bus::new(SUBSCRIBER_BUFFER)
    }
}

impl Bus {
    /// A bus whose subscribers may fall `limit` bytes behind.
    pub fn new(limit: usize) -> Bus {
        Bus {
            seq: 0,
            subscribers: Vec::new(),
            limit,
        }
    }

    /// Adds a subscriber (a control-socket client that asked for events).
    /// `greeting` is sent first (the control answer). Refused, with a
    /// one-line answer, when there are too many.
    pub fn subscribe(&mut self, stream: UnixStream, greeting: &[u8]) -> Result<(), UnixStream> {
        if self.subscribers.len() >= MAX_SUBSCRIBERS || stream.set_nonblocking(true).is_err() {
            return Err(stream);
        }
        let mut s = Subscriber {
            stream,
            pending: greeting.to_vec(),
            mid_line: false,
        };
        if s.flush().is_ok() {
            self.subscribers.push(s);
        }
        Ok(())
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.len()
    }

    /// Numbers `kind`, queues it to every subscriber (dropping those too far
    /// behind) and writes what the sockets take now.
    pub fn publish(&mut self, kind: Kind) -> Event {
        self.seq += 1;
        let event = Event {
            seq: self.seq,
            ts: rfc3339(SystemTime::now()),
            kind,
        };
        if self.subscribers.is_empty() {
            return event;
        }
        let line = event.line();
        let limit = self.limit;
        let seq = self.seq;
        self.subscribers.retain_mut(|s| {
            if s.pending.len() + line.len() > limit {
                drop_slow(s, seq);
                return false;
            }
            s.pending.extend_from_slice(&line);
            s.flush().is_ok()
        });
        event
    }

    /// What to wait on: writable for subscribers with pending bytes,
    /// readable otherwise (to notice a reader that went away: end of file).
    pub fn poll_fds(&self) -> Vec<PollFd<'_>> {
        self.subscribers
            .iter()
            .map(|s| {
                let flags = if s.pending.is_empty() {
                    PollFlags::POLLIN
                } else {
                    PollFlags::POLLOUT
                };
                PollFd::new(s.stream.as_fd(), flags)
            })
            .collect()
    }

    /// At exit: gives each subscriber up to `limit` to take what is pending
    /// (the last events, `exiting` among them), then closes it.
    pub fn close(&mut self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        for mut s in self.subscribers.drain(..) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if s.pending.is_empty() || left.is_zero() {
                continue;
            }
            let _ = s.stream.set_nonblocking(false);
            let _ = s.stream.set_write_timeout(Some(left));
            let _ = s.stream.write_all(&s.pending);
        }
    }

    /// After a wait: writes pending bytes, forgets readers that left.
    pub fn on_ready(&mut self) {
        self.subscribers.retain_mut(|s| {
            let mut scratch = [0u8; 256];
            // Readers send nothing after their request: end of file (or an
            // error) is a reader gone; bytes are ignored.
            let gone = loop {
                match (&s.stream).read(&mut scratch) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            };
            !gone && s.flush().is_ok()
        });
    }
}

/// `drover ctl events`: asks the master at `path` for its events and prints
/// each as one JSON line, as it comes, until drover exits (status 0, after
/// its `exiting` event), the subscription is refused, dropped for reading
/// too slowly or cut (status 1), or the user interrupts. With `json`, the
/// control answer that opens the stream is printed first, as `ctl --json`
/// prints answers. A binary upgrade does not end it: when the old master
/// exits after `upgrade_applied`, it follows the new one, which holds the
/// control socket by then (its `seq` starts again at 1).
pub fn follow(path: &std::path::Path, json: bool) -> u8 {
    let mut first = true;
    loop {
        let lines = match subscribe(path, json && first) {
            Ok(lines) => lines,
            Err(status) => return status,
        };
        first = false;
        match relay(lines) {
            Ended::Exited => return 0,
            Ended::Status(status) => return status,
            Ended::Upgraded(pid) => {
                eprintln!("drover ctl: drover was upgraded: following the new master (pid {pid})")
            }
        }
    }
}

type Lines = io::Lines<io::BufReader<UnixStream>>;

/// Connects and asks for the events; the lines that follow the answer, or
/// the exit status after saying why not.
fn subscribe(path: &std::path::Path, print_answer: bool) -> Result<Lines, u8> {
    use std::io::BufRead;
    let stream = UnixStream::connect(path).map_err(|e| {
        eprintln!("drover ctl: {}: {e}", path.display());
        1
    })?;
    if (&stream).write_all(b"{\"command\":\"events\"}\n").is_err() {
        eprintln!(
            "drover ctl: {}: the master closed the connection",
            path.display()
        );
        return Err(1);
    }
    let mut lines = io::BufReader::new(stream).lines();
    let answer: serde_json::Value = match lines.next() {
        Some(Ok(line)) => serde_json::from_str(&line).unwrap_or_default(),
        _ => {
            eprintln!("drover ctl: {}: no answer", path.display());
            return Err(1);
        }
    };
    if answer["ok"] != true {
        eprintln!(
            "drover ctl: {}",
            answer["message"].as_str().unwrap_or("refused")
        );
        return Err(1);
    }
    if print_answer {
        let _ = writeln!(io::stdout().lock(), "{answer}");
    }
    Ok(lines)
}

/// How one master's stream ended.
enum Ended {
    /// With `exiting`: drover is gone.
    Exited,
    /// With `exiting` after `upgrade_applied`: the new master (pid) serves.
    Upgraded(i64),
    /// Anything else, with the exit status (the reason said already).
    Status(u8),
}

/// Prints the events of one master until its stream ends.
fn relay(lines: Lines) -> Ended {
    let out = io::stdout();
    // drover's last event is `exiting`: a stream that ends without it was
    // cut (dropped with no room left for the notice, or drover killed).
    let (mut exited, mut successor) = (false, None);
    for line in lines.map_while(Result::ok) {
        let dropped = line.starts_with("{\"event\":\"dropped\"");
        let event = serde_json::from_str::<serde_json::Value>(&line).unwrap_or_default();
        exited = event["event"] == "exiting";
        if event["event"] == "upgrade_applied" {
            successor = event["pid"].as_i64();
        }
        let mut o = out.lock();
        // A reader that went away (a closed pipe): stop quietly.
        if writeln!(o, "{line}").and_then(|_| o.flush()).is_err() {
            return Ended::Status(0);
        }
        if dropped {
            eprintln!("drover ctl: dropped by drover: this reader was too slow");
            return Ended::Status(1);
        }
    }
    match (exited, successor) {
        (true, Some(pid)) => Ended::Upgraded(pid),
        (true, None) => Ended::Exited,
        (false, _) => {
            eprintln!(
                "drover ctl: the event stream ended before drover exited: this reader \
                 was dropped as too slow, or drover was killed"
            );
            Ended::Status(1)
        }
    }
}

/// Tells a subscriber why it is cut off (if its socket takes one more line)
/// and closes it.
fn drop_slow(s: &mut Subscriber, seq: u64) {
    warn!(
        "events: a subscriber fell {} bytes behind: dropped",
        s.pending.len()
    );
    let notice = serde_json::json!({
        "event": "dropped",
        "seq": seq,
        "ts": rfc3339(SystemTime::now()),
        "reason": "too slow: more than the subscriber buffer pending",
    });
    // The notice replaces what is pending, after the end of a line the
    // reader has only part of. If the socket has no room even for that, the
    // reader sees a cut line, then the end of the stream.
    let mut out = Vec::new();
    if s.mid_line {
        let end = s.pending.iter().position(|b| *b == b'\n').unwrap_or(0);
        out.extend_from_slice(&s.pending[..=end]);
    }
    out.extend(serde_json::to_vec(&notice).unwrap_or_default());
    out.push(b'\n');
    let _ = (&s.stream).write(&out);
    let _ = s.stream.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn names_match_the_serialized_tag() {
        let k = Kind::WorkerExited {
            slot: 2,
            pid: 42,
            generation: 1,
            cause: ExitCause::HeartbeatTimeout,
            status: None,
            signal: Some("SIGKILL".into()),
            description: "killed by SIGKILL (heartbeat timeout)".into(),
        };
        let v = serde_json::to_value(Event {
            seq: 7,
            ts: "x".into(),
            kind: k.clone(),
        })
        .unwrap();
        assert_eq!(v["event"], k.name());
        assert_eq!(v["seq"], 7);
        assert_eq!(v["cause"], "heartbeat_timeout");
        assert!(v.get("status").is_none());
        assert!(NAMES.contains(&k.name()));
        assert_eq!(NAMES.len(), 24);
        for k in [
            Kind::TemplateSpawned {
                pid: 5,
                generation: 1,
            },
            Kind::TemplateReady {
                pid: 5,
                generation: 1,
                seconds: 0.2,
            },
            Kind::TemplateExited {
                pid: 5,
                generation: 1,
                cause: "exited".into(),
                status: None,
                signal: Some("SIGKILL".into()),
                description: "killed by SIGKILL".into(),
            },
        ] {
            let v = serde_json::to_value(&k).unwrap();
            assert_eq!(v["event"], k.name());
            assert!(NAMES.contains(&k.name()));
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_796_387_165_123);
        assert_eq!(rfc3339(t), "2026-12-04T12:26:05.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn subscribers_get_numbered_lines_in_order() {
        let mut bus = Bus::default();
        let (ours, theirs) = UnixStream::pair().unwrap();
        bus.subscribe(ours, b"{\"ok\":true}\n").unwrap();
        bus.publish(Kind::Paused {
            trigger: "SIGWINCH".into(),
        });
        bus.publish(Kind::Resumed {
            trigger: "SIGTTIN".into(),
        });
        drop(bus);
        let lines: Vec<String> = BufReader::new(theirs).lines().map(Result::unwrap).collect();
        assert_eq!(lines[0], "{\"ok\":true}");
        let a: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        let b: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!((a["seq"].as_u64(), b["seq"].as_u64()), (Some(1), Some(2)));
        assert_eq!(a["event"], "paused");
        assert_eq!(b["trigger"], "SIGTTIN");
    }

    #[test]
    fn a_reader_that_stops_reading_is_dropped_not_waited_for() {
        let mut bus = Bus::new(64 * 1024);
        let (ours, theirs) = UnixStream::pair().unwrap();
        bus.subscribe(ours, b"").unwrap();
        let start = std::time::Instant::now();
        for _ in 0..10_000 {
            bus.publish(Kind::ReloadRejected {
                reason: "x".repeat(100),
            });
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(bus.subscribers(), 0, "the slow reader is dropped");
        // What it receives is whole lines in sequence, except perhaps a cut
        // last one (the socket was full).
        let mut all = String::new();
        BufReader::new(theirs).read_to_string(&mut all).unwrap();
        let whole = all.rsplit_once('\n').map_or("", |(w, _)| w);
        for (i, line) in whole.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["seq"], i as u64 + 1);
        }
        assert!(whole.lines().count() > 100);
    }

    #[test]
    fn a_reader_that_left_is_forgotten() {
        let mut bus = Bus::default();
        let (ours, theirs) = UnixStream::pair().unwrap();
        bus.subscribe(ours, b"").unwrap();
        drop(theirs);
        bus.on_ready();
        assert_eq!(bus.subscribers(), 0);
    }
}

//! Prometheus metrics: the text exposition writer, the counters the master
//! keeps (counted from its events), the kernel's view of each listener's
//! accept queue, and `render`, which writes the whole set from a snapshot
//! taken at scrape time. Every name is listed in docs/observability.md.

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, SystemTime};

use crate::events::{ExitCause, Kind, Outcome};

/// Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The text exposition being written.
#[derive(Default)]
pub struct Text {
    out: String,
}

impl Text {
    pub fn into_string(self) -> String {
        self.out
    }

    /// Starts a metric family: `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        push_value(&mut self.out, value);
        self.out.push('\n');
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The `_bucket`, `_sum` and `_count` samples of one histogram.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0u64;
        let bucket = format!("{name}_bucket");
        for (i, count) in h.counts.iter().enumerate() {
            cumulative += count;
            let le = h
                .bounds
                .get(i)
                .map_or("+Inf".to_string(), |b| fmt_value(*b));
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, cumulative as f64);
    }
}

fn fmt_value(v: f64) -> String {
    let mut s = String::new();
    push_value(&mut s, v);
    s
}

fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

/// A histogram with fixed bucket bounds (upper bounds, `+Inf` implied).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub bounds: &'static [f64],
    /// Per bucket, not cumulative; one more than `bounds` (the `+Inf` one).
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.iter().position(|b| v <= *b);
        self.counts[i.unwrap_or(self.bounds.len())] += 1;
        self.sum += v;
    }

    /// Adds another histogram with the same bounds.
    pub fn add(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Spawn-to-ready buckets, in seconds.
pub const BOOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// What the master counts, from its events.
#[derive(Debug, Clone)]
pub struct Counters {
    pub worker_starts: u64,
    /// Preload templates started.
    pub template_starts: u64,
    pub exits: [u64; ExitCause::ALL.len()],
    pub reloads: [u64; Outcome::ALL.len()],
    pub upgrades: [u64; Outcome::ALL.len()],
    pub degraded: u64,
    pub spawn_to_ready: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            worker_starts: 0,
            template_starts: 0,
            exits: [0; ExitCause::ALL.len()],
            reloads: [0; Outcome::ALL.len()],
            upgrades: [0; Outcome::ALL.len()],
            degraded: 0,
            spawn_to_ready: Histogram::new(BOOT_BUCKETS),
        }
    }
}

impl Counters {
    /// The new master of an upgrade is ready: the upgrade is applied.
    pub fn upgraded(&mut self) {
        let applied = Outcome::ALL.iter().position(|x| *x == Outcome::Applied);
        self.upgrades[applied.unwrap_or(0)] += 1;
    }

    /// Counts one event.
    pub fn observe(&mut self, kind: &Kind) {
        let outcome = |o: Outcome| Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0);
        match kind {
            Kind::WorkerSpawned { .. } => self.worker_starts += 1,
            Kind::TemplateSpawned { .. } => self.template_starts += 1,
            Kind::WorkerReady { seconds, .. } => self.spawn_to_ready.observe(*seconds),
            Kind::WorkerExited { cause, .. } => {
                let i = ExitCause::ALL.iter().position(|c| c == cause).unwrap_or(0);
                self.exits[i] += 1;
            }
            Kind::SlotDegraded { .. } => self.degraded += 1,
            Kind::ReloadApplied { .. } => self.reloads[outcome(Outcome::Applied)] += 1,
            Kind::ReloadRolledBack { .. } => self.reloads[outcome(Outcome::RolledBack)] += 1,
            Kind::ReloadRejected { .. } => self.reloads[outcome(Outcome::Rejected)] += 1,
            Kind::UpgradeApplied { .. } => self.upgrades[outcome(Outcome::Applied)] += 1,
            // The old master goes on serving: the upgrade is rolled back.
            Kind::UpgradeFailed { .. } => self.upgrades[outcome(Outcome::RolledBack)] += 1,
            Kind::UpgradeRejected { .. } => self.upgrades[outcome(Outcome::Rejected)] += 1,
            _ => {}
        }
    }
}

/// A listener's accept queue as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    /// Connections accepted by the kernel, not yet by a worker.
    pub depth: u32,
    /// The queue's capacity (the effective listen backlog).
    pub max: u32,
}

/// The accept queue of a listening socket: `TCP_INFO` for TCP (as uWSGI and
/// Gunicorn read it), `sock_diag` for Unix sockets. `None` for anything
/// else or when the kernel does not tell.
pub fn accept_queue(fd: BorrowedFd<'_>) -> Option<Queue> {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `domain`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    match domain {
        libc::AF_INET | libc::AF_INET6 => tcp_queue(fd),
        libc::AF_UNIX => unix_queue(fd),
        _ => None,
    }
}

/// For a listening socket, `tcpi_unacked` is the accept queue's length and
/// `tcpi_sacked` its capacity.
fn tcp_queue(fd: BorrowedFd<'_>) -> Option<Queue> {
    // SAFETY: tcp_info is plain data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // 10 is TCP_LISTEN: on other states the fields mean something else.
    (r == 0 && info.tcpi_state == 10).then_some(Queue {
        depth: info.tcpi_unacked,
        max: info.tcpi_sacked,
    })
}

// sock_diag (linux/sock_diag.h, linux/unix_diag.h).
const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;
const NLMSG_ERROR: u16 = 2;

#[repr(C)]
struct UnixDiagRequest {
    // struct nlmsghdr
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    // struct unix_diag_req
    family: u8,
    protocol: u8,
    pad: u16,
    states: u32,
    ino: u32,
    show: u32,
    cookie: [u32; 2],
}

/// Asks the kernel about one Unix socket by inode: for a listener,
/// `UNIX_DIAG_RQLEN` holds the queue's length and its capacity.
fn unix_queue(fd: BorrowedFd<'_>) -> Option<Queue> {
    let ino = nix::sys::stat::fstat(fd).ok()?.st_ino as u32;
    // SAFETY: a plain socket(2); the descriptor is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let req = UnixDiagRequest {
        len: std::mem::size_of::<UnixDiagRequest>() as u32,
        kind: SOCK_DIAG_BY_FAMILY,
        flags: libc::NLM_F_REQUEST as u16,
        seq: 1,
        pid: 0,
        family: libc::AF_UNIX as u8,
        protocol: 0,
        pad: 0,
        states: 1 << 10,
        ino,
        show: UDIAG_SHOW_RQLEN,
        // INET_DIAG_NOCOOKIE: match by inode only.
        cookie: [!0, !0],
    };
    // SAFETY: sends the bytes of a repr(C) struct to the kernel (port 0).
    let sent = unsafe {
        libc::send(
            sock.as_raw_fd(),
            (&req as *const UnixDiagRequest).cast(),
            req.len as usize,
            0,
        )
    };
    if sent < 0 {
        return None;
    }
    let mut buf = [0u8; 1024];
    // The kernel answers within send(): nothing to wait for.
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    parse_unix_diag(buf.get(..usize::try_from(n).ok()?)?)
}

fn parse_unix_diag(msg: &[u8]) -> Option<Queue> {
    let u16_at = |o: usize| Some(u16::from_ne_bytes(msg.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_ne_bytes(msg.get(o..o + 4)?.try_into().ok()?));
    let len = u32_at(0)? as usize;
    if u16_at(4)? == NLMSG_ERROR || len > msg.len() {
        return None;
    }
    // nlmsghdr (16 bytes), unix_diag_msg (16 bytes), then attributes.
    let mut at = 32;
    while at + 4 <= len {
        let (alen, akind) = (u16_at(at)? as usize, u16_at(at + 2)?);
        if alen < 4 {
            return None;
        }
        if akind == UNIX_DIAG_RQLEN {
            return Some(Queue {
                depth: u32_at(at + 4)?,
                max: u32_at(at + 8)?,
            });
        }
        at += (alen + 3) & !3;
    }
    None
}

/// One worker as the metrics show it.
#[derive(Debug, Clone)]
pub struct WorkerSample {
    pub slot: u32,
    pub pid: i32,
    pub generation: u32,
    /// booting, ready, replacing, stopping.
    pub state: &'static str,
}

/// One listener as the metrics show it.
pub struct ListenerSample<'a> {
    /// Its name in `LISTEN_FDNAMES`.
    pub name: String,
    pub fd: BorrowedFd<'a>,
}

/// The request figures of one slot, from the scoreboard.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotRequests {
    pub slot: u32,
    /// Requests in progress now.
    pub busy: u64,
    /// Requests completed (by the slot's current and past workers).
    pub requests: u64,
    pub latency: Histogram,
}

/// What a scrape shows: taken from the master when a scrape arrives.
pub struct Snapshot<'a> {
    pub version: &'static str,
    pub start_time: SystemTime,
    pub uptime: Duration,
    pub generation: u32,
    /// The worker count wanted.
    pub slots: u32,
    pub ready: bool,
    /// With `preload`: whether the current generation's template is ready
    /// to fork. None without preload.
    pub template_up: Option<bool>,
    pub workers: Vec<WorkerSample>,
    pub listeners: Vec<ListenerSample<'a>>,
    pub counters: &'a Counters,
    /// Slots whose workers fill the scoreboard.
    pub requests: Vec<SlotRequests>,
}

/// States a worker can be in, for zero-valued series.
const STATES: [&str; 4] = ["booting", "ready", "replacing", "stopping"];

/// Writes every metric.
pub fn render(s: &Snapshot<'_>) -> String {
    let mut t = Text::default();
    t.family(
        "drover_build_info",
        "gauge",
        "Always 1; the version of drover.",
    );
    t.sample("drover_build_info", &[("version", s.version)], 1.0);
    let start = s
        .start_time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    t.single(
        "drover_start_time_seconds",
        "gauge",
        "When the master started, in seconds since the Unix epoch.",
        start.as_secs_f64(),
    );
    t.single(
        "drover_uptime_seconds",
        "gauge",
        "How long the master has run.",
        s.uptime.as_secs_f64(),
    );
    t.single(
        "drover_generation",
        "gauge",
        "The configuration generation new workers start from.",
        f64::from(s.generation),
    );
    t.single(
        "drover_workers_desired",
        "gauge",
        "The worker count drover maintains (slots).",
        f64::from(s.slots),
    );
    t.single(
        "drover_ready",
        "gauge",
        "1 when /readyz answers 200, else 0.",
        f64::from(u8::from(s.ready)),
    );
    workers_by_state(&mut t, s);
    if let Some(up) = s.template_up {
        t.single(
            "drover_template_up",
            "gauge",
            "With preload: 1 when the current generation's template is ready to fork, else 0.",
            f64::from(u8::from(up)),
        );
    }
    counters(&mut t, s.counters);
    listeners(&mut t, &s.listeners);
    memory(&mut t, &s.workers);
    requests(&mut t, &s.requests);
    t.into_string()
}

fn workers_by_state(t: &mut Text, s: &Snapshot<'_>) {
    t.family(
        "drover_workers",
        "gauge",
        "Worker processes by state and generation.",
    );
    let mut groups: Vec<(u32, &str, u32)> =
        STATES.iter().map(|st| (s.generation, *st, 0)).collect();
    for w in &s.workers {
        match groups
            .iter_mut()
            .find(|(g, st, _)| *g == w.generation && *st == w.state)
        {
            Some(g) => g.2 += 1,
            None => groups.push((w.generation, w.state, 1)),
        }
    }
    groups.sort_by_key(|(g, st, _)| (*g, *st));
    for (generation, state, n) in groups {
        let generation = generation.to_string();
        t.sample(
            "drover_workers",
            &[("state", state), ("generation", &generation)],
            f64::from(n),
        );
    }
}

fn counters(t: &mut Text, c: &Counters) {
    t.single(
        "drover_worker_starts_total",
        "counter",
        "Worker processes started.",
        c.worker_starts as f64,
    );
    t.single(
        "drover_template_starts_total",
        "counter",
        "Preload template processes started.",
        c.template_starts as f64,
    );
    t.family(
        "drover_worker_exits_total",
        "counter",
        "Worker processes that ended, by cause.",
    );
    for (cause, n) in ExitCause::ALL.iter().zip(c.exits) {
        t.sample(
            "drover_worker_exits_total",
            &[("cause", cause.as_str())],
            n as f64,
        );
    }
    t.single(
        "drover_slot_degraded_total",
        "counter",
        "Times a slot reached degraded_after failures in a row.",
        c.degraded as f64,
    );
    for (name, help, counts) in [
        (
            "drover_reloads_total",
            "Configuration reloads, by outcome.",
            c.reloads,
        ),
        (
            "drover_upgrades_total",
            "Binary upgrades, by outcome.",
            c.upgrades,
        ),
    ] {
        t.family(name, "counter", help);
        for (o, n) in Outcome::ALL.iter().zip(counts) {
            t.sample(name, &[("outcome", o.as_str())], n as f64);
        }
    }
    t.family(
        "drover_worker_boot_seconds",
        "histogram",
        "Time from a worker's spawn to its readiness.",
    );
    t.histogram("drover_worker_boot_seconds", &[], &c.spawn_to_ready);
}

fn listeners(t: &mut Text, ls: &[ListenerSample<'_>]) {
    let queues: Vec<_> = ls
        .iter()
        .filter_map(|l| accept_queue(l.fd).map(|q| (l.name.as_str(), q)))
        .collect();
    t.family(
        "drover_listen_queue_length",
        "gauge",
        "Connections waiting in a listener's accept queue.",
    );
    for (name, q) in &queues {
        t.sample(
            "drover_listen_queue_length",
            &[("listener", name)],
            f64::from(q.depth),
        );
    }
    t.family(
        "drover_listen_queue_max",
        "gauge",
        "The capacity of a listener's accept queue (its backlog).",
    );
    for (name, q) in &queues {
        t.sample(
            "drover_listen_queue_max",
            &[("listener", name)],
            f64::from(q.max),
        );
    }
}

/// Per slot, not per process: a `pid` label would make a new series at
/// every replacement (thousands an hour with `max_requests`), which
/// Prometheus keeps for hours each; by slot, a leak is one continuous line
/// across recycles. While two workers overlap in a slot (a replacement), the
/// larger counts: the one to compare with `max_memory`.
fn memory(t: &mut Text, workers: &[WorkerSample]) {
    t.family(
        "drover_worker_resident_memory_bytes",
        "gauge",
        "Resident memory of a slot's worker process (the larger of two during a replacement).",
    );
    let mut slots: Vec<(u32, u64)> = Vec::new();
    for w in workers {
        let Some(rss) = resident_bytes(w.pid) else {
            continue;
        };
        match slots.iter_mut().find(|(slot, _)| *slot == w.slot) {
            Some((_, max)) => *max = (*max).max(rss),
            None => slots.push((w.slot, rss)),
        }
    }
    slots.sort_unstable();
    for (slot, rss) in slots {
        t.sample(
            "drover_worker_resident_memory_bytes",
            &[("slot", &slot.to_string())],
            rss as f64,
        );
    }
    if let Some(rss) = resident_bytes(std::process::id() as i32) {
        t.single(
            "drover_master_resident_memory_bytes",
            "gauge",
            "Resident memory of the master.",
            rss as f64,
        );
    }
}

fn requests(t: &mut Text, slots: &[SlotRequests]) {
    if slots.is_empty() {
        return;
    }
    t.family(
        "drover_worker_busy",
        "gauge",
        "Requests in progress in a slot's workers (from the scoreboard).",
    );
    for s in slots {
        t.sample(
            "drover_worker_busy",
            &[("slot", &s.slot.to_string())],
            s.busy as f64,
        );
    }
    t.family(
        "drover_requests_total",
        "counter",
        "Requests completed by a slot's workers (from the scoreboard).",
    );
    for s in slots {
        t.sample(
            "drover_requests_total",
            &[("slot", &s.slot.to_string())],
            s.requests as f64,
        );
    }
    t.family(
        "drover_request_duration_seconds",
        "histogram",
        "Request latency in a slot's workers (from the scoreboard).",
    );
    for s in slots {
        t.histogram(
            "drover_request_duration_seconds",
            &[("slot", &s.slot.to_string())],
            &s.latency,
        );
    }
}

/// Resident memory of a process, in bytes, from /proc.
pub fn resident_bytes(pid: i32) -> Option<u64> {
    use std::io::Read;
    // One read into a stack buffer: this runs for every worker of a scrape.
    let mut f = std::fs::File::open(format!("/proc/{pid}/statm")).ok()?;
    let mut buf = [0u8; 128];
    let n = f.read(&mut buf).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let pages: u64 = text.split(' ').nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(pages * page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn labels_and_help_are_escaped_and_values_formatted() {
        let mut t = Text::default();
        t.family("x_total", "counter", "a \\ b\nc");
        t.sample("x_total", &[("a", "q\"\\\n")], 1.0);
        t.sample("x_total", &[], 0.25);
        t.sample("x_total", &[], f64::INFINITY);
        assert_eq!(
            t.into_string(),
            "# HELP x_total a \\\\ b\\nc\n# TYPE x_total counter\n\
             x_total{a=\"q\\\"\\\\\\n\"} 1\nx_total 0.25\nx_total +Inf\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_an_inf_bucket() {
        static B: &[f64] = &[0.1, 1.0];
        let mut h = Histogram::new(B);
        for v in [0.05, 0.5, 0.7, 3.0] {
            h.observe(v);
        }
        let mut t = Text::default();
        t.histogram("h", &[("slot", "1")], &h);
        assert_eq!(
            t.into_string(),
            "h_bucket{slot=\"1\",le=\"0.1\"} 1\nh_bucket{slot=\"1\",le=\"1\"} 3\n\
             h_bucket{slot=\"1\",le=\"+Inf\"} 4\nh_sum{slot=\"1\"} 4.25\nh_count{slot=\"1\"} 4\n"
        );
    }

    #[test]
    fn events_are_counted() {
        let mut c = Counters::default();
        c.observe(&Kind::WorkerSpawned {
            slot: 1,
            pid: 2,
            generation: 1,
        });
        c.observe(&Kind::WorkerReady {
            slot: 1,
            pid: 2,
            generation: 1,
            seconds: 0.2,
        });
        c.observe(&Kind::WorkerExited {
            slot: 1,
            pid: 2,
            generation: 1,
            cause: ExitCause::Crash,
            status: Some(1),
            signal: None,
            description: "exited with status 1".into(),
        });
        c.observe(&Kind::ReloadRolledBack {
            generation: 2,
            reason: "x".into(),
        });
        assert_eq!(c.worker_starts, 1);
        assert_eq!(c.exits[1], 1);
        assert_eq!(c.reloads, [0, 1, 0]);
        c.observe(&Kind::UpgradeRejected {
            reason: "a reload is in progress".into(),
        });
        c.observe(&Kind::UpgradeFailed { reason: "x".into() });
        assert_eq!(c.upgrades, [0, 1, 1]);
        assert_eq!(c.spawn_to_ready.count(), 1);
    }

    #[test]
    fn a_tcp_listener_reports_its_queue() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let before = accept_queue(l.as_fd()).expect("TCP_INFO on a listener");
        assert_eq!(before.depth, 0);
        assert!(before.max >= 1, "{before:?}");
        let _a = std::net::TcpStream::connect(addr).unwrap();
        let _b = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(accept_queue(l.as_fd()).unwrap().depth, 2);
        // Not a listener: nothing.
        assert_eq!(accept_queue(_a.as_fd()), None);
    }

    #[test]
    fn a_unix_listener_reports_its_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let Some(before) = accept_queue(l.as_fd()) else {
            panic!("sock_diag gave nothing for a Unix listener (is unix_diag available?)");
        };
        assert_eq!(before.depth, 0);
        let _a = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert_eq!(accept_queue(l.as_fd()).unwrap().depth, 1);
    }

    #[test]
    fn resident_memory_of_this_process() {
        assert!(resident_bytes(std::process::id() as i32).unwrap() > 0);
        assert_eq!(resident_bytes(-5), None);
    }
}

//! drover's own readiness, for a service manager that started it with
//! `NOTIFY_SOCKET` (systemd `Type=notify`, or an old drover during an
//! upgrade). The protocol is the worker SDK's: one implementation serves
//! both sides.
//!
//! The master's loop must never wait for the receiver: a service manager
//! that does not read (PID 1 busy with a `daemon-reload`, or hung) fills its
//! socket's queue (`net.unix.max_dgram_qlen`, 10 datagrams by default
//! outside systemd's own settings), and a blocking send would then stop the
//! supervision. So the sends never block. When the queue is full, a
//! periodic message (`STATUS=`, `WATCHDOG=1`) is dropped: the next one
//! replaces it. A change of state (`READY=1`, `RELOADING=1`, `STOPPING=1`,
//! `MAINPID=`) must arrive, in order: missing, systemd fails the start at
//! `TimeoutStartSec`, or an upgrade's old master never retires. Those wait,
//! and are sent again each turn of the loop (every [`RETRY`] at least)
//! until the receiver takes them.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

/// The key of the new master's message to the old one during an upgrade:
/// it was asked to stop (`graceful:CAUSE` or `quick:CAUSE`).
pub const UPGRADE_STOP: &str = "DROVER_STOP";

/// How often a change of state is offered again to a receiver whose queue
/// was full.
pub const RETRY: Duration = Duration::from_millis(100);

/// At drover's exit, how long it waits for the receiver to take the
/// changes of state still waiting (a `MAINPID=` that hands the service to
/// a new master, the last `STOPPING=1`).
const LAST_WAIT: Duration = Duration::from_secs(1);

/// Periodic messages dropped are logged at most this often, with a count:
/// a receiver stuck for minutes dropped a `WATCHDOG=1` at every tick, and
/// each was a warning of its own.
pub const DROPPED_EVERY: Duration = Duration::from_secs(1);

/// Where to send, if anywhere; a no-op otherwise.
pub struct Systemd {
    socket: Option<OsString>,
    /// During an upgrade, `socket` is the old master's; this is the service
    /// manager's, used once the old master has been told we are ready.
    after_ready: Option<OsString>,
    /// `WATCHDOG_USEC` meant for us: send `WATCHDOG=1` at half this interval.
    pub watchdog: Option<Duration>,
    /// `MAINPID=` named a new master: the service is its, and we stay silent.
    handed_over: bool,
    /// We are the new master of an upgrade, not ready yet: our first
    /// `READY=1` completes it (the old master retires on it).
    upgrading: bool,
    /// The old master of that upgrade (our parent), which our stop must
    /// reach (`flush_before_exit`).
    old_master: Option<i32>,
    /// Non-blocking, made once (a socket per message fails once a flood
    /// took every descriptor).
    sender: Option<UnixDatagram>,
    /// Changes of state not taken yet (the receiver's queue was full), in
    /// order.
    waiting: VecDeque<Waiting>,
    /// When to offer them again.
    retry_at: Option<Instant>,
    /// Periodic messages dropped and not counted in a warning yet.
    dropped: u64,
    /// When dropped messages were last logged.
    dropped_logged: Option<Instant>,
}

/// A change of state the receiver has not taken yet.
struct Waiting {
    to: OsString,
    message: String,
    /// Our `READY=1` to the old master of an upgrade: taken, it completes
    /// the upgrade.
    completes_upgrade: bool,
}

/// What our `READY=1` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// To the service manager (if any): nothing more.
    Told,
    /// We are the new master of an upgrade, and the old master was told:
    /// it retires, and what it holds is ours.
    Upgraded,
    /// ... but the old master's queue is full: the upgrade completes when
    /// it takes the message ([`Systemd::retry`]).
    Waits,
}

/// The value of [`UPGRADE_STOP`] in `message`, if it is a stop of ours.
fn upgrade_stop(message: &str) -> Option<String> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(UPGRADE_STOP)?.strip_prefix('='))
        .map(str::to_string)
}

/// A message as the log names it: its first line.
fn first_line(state: &str) -> &str {
    state.lines().next().unwrap_or("")
}

impl Systemd {
    /// Takes `NOTIFY_SOCKET` (and `WATCHDOG_USEC`) from the environment and
    /// removes them, so that no worker inherits our channel. (An upgrade
    /// passes the watchdog on to the new master explicitly.)
    pub fn from_env() -> Systemd {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let after_ready = std::env::var_os("DROVER_SERVICE_NOTIFY_SOCKET");
        let watchdog = drover_worker::watchdog_interval();
        let old_master = std::env::var("DROVER_UPGRADE_FROM")
            .ok()
            .and_then(|pid| pid.parse().ok());
        let upgrading = std::env::var_os("DROVER_UPGRADE_FROM").is_some();
        for var in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "DROVER_SERVICE_NOTIFY_SOCKET",
            "DROVER_UPGRADE_FROM",
        ] {
            std::env::remove_var(var);
        }
        let sender = socket.as_ref().and_then(|socket| {
            let made = UnixDatagram::unbound().and_then(|s| s.set_nonblocking(true).map(|()| s));
            made.map_err(|e| warn!("cannot notify {socket:?}: no socket to send from: {e}"))
                .ok()
        });
        Systemd {
            socket,
            after_ready,
            watchdog,
            handed_over: false,
            upgrading,
            old_master,
            sender,
            waiting: VecDeque::new(),
            retry_at: None,
            dropped: 0,
            dropped_logged: None,
        }
    }

    /// We are the new master of an upgrade that is not complete yet.
    pub fn upgrading(&self) -> bool {
        self.upgrading
    }

    /// The service manager's socket, for a new master to report to later.
    pub fn socket(&self) -> Option<&OsString> {
        self.after_ready.as_ref().or(self.socket.as_ref())
    }

    /// A periodic message: dropped if the receiver's queue is full, or
    /// while changes of state wait (the next one replaces it).
    fn send(&mut self, state: &str) {
        let Some(socket) = self.socket.clone().filter(|_| !self.handed_over) else {
            return;
        };
        let why = if !self.waiting.is_empty() {
            "earlier messages still wait"
        } else {
            match self.try_send(&socket, state) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => "its queue is full",
                _ => return self.report_dropped(false),
            }
        };
        self.dropped += 1;
        let now = Instant::now();
        if self
            .dropped_logged
            .is_some_and(|t| now.saturating_duration_since(t) < DROPPED_EVERY)
        {
            return;
        }
        self.dropped_logged = Some(now);
        let more = match std::mem::take(&mut self.dropped) {
            1 => String::new(),
            n => format!("; {n} periodic messages dropped since the last warning"),
        };
        warn!(
            "NOTIFY_SOCKET {socket:?} is not reading: {} dropped ({why}){more}",
            first_line(state)
        );
    }

    /// The periodic messages dropped since the last warning, once the
    /// receiver reads again (at most once per [`DROPPED_EVERY`]: the next
    /// warning counts them otherwise), or at exit (`last`).
    fn report_dropped(&mut self, last: bool) {
        let recent = self
            .dropped_logged
            .is_some_and(|t| t.elapsed() < DROPPED_EVERY);
        if self.dropped == 0 || (recent && !last) {
            return;
        }
        let n = std::mem::take(&mut self.dropped);
        self.dropped_logged = Some(Instant::now());
        if let Some(socket) = &self.socket {
            warn!(
                "NOTIFY_SOCKET {socket:?}: {n} more periodic message(s) dropped since the last \
                 warning"
            );
        }
    }

    /// A change of state: sent after those still waiting, and kept to be
    /// sent again if the receiver's queue is full.
    /// Returns false if it waits.
    fn send_surely(&mut self, state: String) -> bool {
        let Some(socket) = self.socket.clone().filter(|_| !self.handed_over) else {
            return true;
        };
        if self.waiting.is_empty() {
            match self.try_send(&socket, &state) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                _ => return true,
            }
        }
        warn!(
            "NOTIFY_SOCKET {socket:?} is not reading: {} waits, sent again every {} until it is \
             taken",
            first_line(&state),
            humantime::format_duration(RETRY)
        );
        self.waiting.push_back(Waiting {
            to: socket,
            message: state,
            completes_upgrade: false,
        });
        self.retry_at.get_or_insert_with(|| Instant::now() + RETRY);
        false
    }

    /// One send; an error other than a full queue is logged here (the
    /// receiver is gone, or the address is bad: nothing to wait for).
    fn try_send(&self, socket: &OsString, state: &str) -> io::Result<()> {
        let Some(sender) = &self.sender else {
            return Ok(());
        };
        let sent = drover_worker::notify::notify_from(sender, socket, state);
        match &sent {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                debug!("cannot notify {socket:?}: {e}")
            }
            _ => {}
        }
        sent
    }

    /// Offers the changes of state that wait again, in order. Each turn of
    /// the loop; `retry_at` says when one is due without any other event.
    /// True when this completed an upgrade (see [`Ready::Waits`]).
    pub fn retry(&mut self) -> bool {
        let mut upgraded = false;
        while let Some(w) = self.waiting.front() {
            match self.try_send(&w.to, &w.message) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.retry_at = Some(Instant::now() + RETRY);
                    return upgraded;
                }
                Ok(()) => info!(
                    "NOTIFY_SOCKET {:?} took {} at last",
                    w.to,
                    first_line(&w.message)
                ),
                // Gone: nothing to wait for (an old master that died has
                // nothing left to hand over either).
                Err(_) => {}
            }
            if self
                .waiting
                .pop_front()
                .is_some_and(|w| w.completes_upgrade)
            {
                upgraded |= self.complete_upgrade();
            }
        }
        self.retry_at = None;
        upgraded
    }

    /// When the changes of state that wait are offered again, if any wait.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// At exit: the changes of state that still wait get [`LAST_WAIT`] to
    /// be taken, then are dropped, each with an error. A stop of the new
    /// master of an upgrade that the old master did not take (stuck, or
    /// stopped with SIGSTOP) is then sent to it as a signal, pending until
    /// it runs again: dropped, the old master served on alone and logged
    /// that the new one had failed.
    pub fn flush_before_exit(&mut self) {
        self.report_dropped(true);
        let mut stop_dropped = None;
        let until = Instant::now() + LAST_WAIT;
        if let Some(s) = self.sender.as_ref().filter(|_| !self.waiting.is_empty()) {
            let _ = s.set_nonblocking(false);
        }
        while let Some(Waiting {
            to: socket,
            message: state,
            ..
        }) = self.waiting.pop_front()
        {
            let left = until.saturating_duration_since(Instant::now());
            let waited = self.sender.as_ref().is_some_and(|s| {
                !left.is_zero()
                    && s.set_write_timeout(Some(left)).is_ok()
                    && !matches!(self.try_send(&socket, &state),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            });
            if !waited {
                error!(
                    "NOTIFY_SOCKET {socket:?} did not take {} within {} of drover's exit: \
                     dropped",
                    first_line(&state),
                    humantime::format_duration(LAST_WAIT)
                );
                stop_dropped = stop_dropped.or_else(|| upgrade_stop(&state));
            }
        }
        if let Some(stop) = stop_dropped {
            self.signal_old_master(&stop);
        }
    }

    /// Our stop, as a signal to the old master (`stop` is the value of
    /// [`UPGRADE_STOP`]): `SIGQUIT` for a quick one, `SIGTERM` otherwise.
    /// Only while it is still our parent: a pid that outlived it may be
    /// another process's.
    fn signal_old_master(&self, stop: &str) {
        let Some(old) = self.old_master.filter(|_| self.upgrading) else {
            return;
        };
        if nix::unistd::getppid().as_raw() != old {
            return;
        }
        let (pace, cause) = stop.split_once(':').unwrap_or(("graceful", stop));
        let signal = if pace == "quick" {
            nix::sys::signal::Signal::SIGQUIT
        } else {
            nix::sys::signal::Signal::SIGTERM
        };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), signal);
        warn!(
            "upgrade cancelled: the old master (pid {old}) did not read this stop ({cause}): \
             sent it {}, so that it stops its workers too",
            signal.as_str()
        );
    }

    /// `READY=1` with the status. As the new master of an upgrade, to the
    /// old master, which retires on it: until it has taken it, we are
    /// still upgrading, and speak to it.
    pub fn ready(&mut self, summary: &str) -> Ready {
        let sent = self.send_surely(format!(
            "READY=1\nSTATUS={summary}\nMAINPID={}",
            std::process::id()
        ));
        if !self.upgrading {
            Ready::Told
        } else if sent && self.complete_upgrade() {
            Ready::Upgraded
        } else {
            if let Some(w) = self.waiting.back_mut() {
                w.completes_upgrade = true;
            }
            Ready::Waits
        }
    }

    /// The old master has our `READY=1`: from now on we speak to the
    /// service manager. False if it had it already.
    fn complete_upgrade(&mut self) -> bool {
        // The count is the old master's: said before we speak to another.
        self.report_dropped(true);
        if let Some(service) = self.after_ready.take() {
            self.socket = Some(service);
        }
        std::mem::take(&mut self.upgrading)
    }

    pub fn reloading(&mut self) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the struct we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        self.send_surely(format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading"
        ));
    }

    pub fn status(&mut self, summary: &str) {
        self.send(&format!("STATUS={summary}"));
    }

    /// `STOPPING=1`. As the new master of an upgrade not complete yet, we
    /// speak to the old master, and hold the pidfile and the control socket
    /// meanwhile: a stop asked of us (`asked`: quick or not, and the cause)
    /// was asked of drover, and the old master stops too on
    /// [`UPGRADE_STOP`]. A stop of our own (a worker that cannot boot) only
    /// fails the upgrade, which our exit tells it.
    pub fn stopping(&mut self, asked: Option<(bool, &str)>) {
        if !self.upgrading {
            self.send_surely("STOPPING=1\nSTATUS=stopping".to_string());
        } else if let Some((quick, cause)) = asked {
            // A READY=1 the old master has not taken yet is withdrawn: we
            // will not serve, and taken first it would make the old master
            // retire for a new master that stops.
            let before = self.waiting.len();
            self.waiting.retain(|w| !w.completes_upgrade);
            if self.waiting.len() < before {
                info!("upgrade: READY=1 withdrawn: asked to stop before the old master took it");
            }
            let pace = if quick { "quick" } else { "graceful" };
            self.send_surely(format!("STOPPING=1\n{UPGRADE_STOP}={pace}:{cause}"));
        }
    }

    /// Hands the service over to the master `pid`: our last message. With
    /// `NotifyAccess=all`, a later `STOPPING=1` of ours would stop the service.
    pub fn main_pid(&mut self, pid: i32) {
        self.send_surely(format!("MAINPID={pid}"));
        self.handed_over = true;
    }

    /// Only to the service manager: before a new master of an upgrade is
    /// ready, `socket` is the old master's, which needs no heartbeat.
    pub fn watchdog(&mut self) {
        if self.after_ready.is_none() {
            self.send("WATCHDOG=1");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Fills `path`'s queue, as a receiver that does not read lets it
    /// fill: full once a fresh sender cannot send one datagram (each
    /// sender is bounded by its own send buffer too).
    fn fill(path: &Path) {
        let full = (0..1000).any(|_| {
            let sender = UnixDatagram::unbound().unwrap();
            sender.set_nonblocking(true).unwrap();
            let mut sent = 0;
            while sender.send_to(b"FILLER=1", path).is_ok() {
                sent += 1;
            }
            sent == 0
        });
        assert!(full, "the queue of {path:?} never filled");
    }

    /// What `r` has received, but the filler.
    fn read(r: &UnixDatagram) -> Vec<String> {
        r.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        std::iter::from_fn(|| {
            let n = r.recv(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .filter(|m| m != "FILLER=1")
        .collect()
    }

    fn systemd(socket: &Path, after_ready: Option<&Path>) -> Systemd {
        let sender = UnixDatagram::unbound().unwrap();
        sender.set_nonblocking(true).unwrap();
        Systemd {
            socket: Some(socket.into()),
            after_ready: after_ready.map(Into::into),
            watchdog: None,
            handed_over: false,
            upgrading: after_ready.is_some(),
            old_master: None,
            sender: Some(sender),
            waiting: VecDeque::new(),
            retry_at: None,
            dropped: 0,
            dropped_logged: None,
        }
    }

    #[test]
    fn a_full_queue_drops_a_status_and_keeps_the_changes_of_state_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let r = UnixDatagram::bind(&path).unwrap();
        fill(&path);
        let mut sd = systemd(&path, None);
        sd.status("dropped");
        assert_eq!(sd.retry_at(), None);
        assert_eq!(sd.ready("2/2"), Ready::Told);
        assert!(sd.retry_at().is_some());
        sd.status("dropped too: READY=1 waits");
        sd.stopping(None);
        assert!(!sd.retry());
        assert_eq!(read(&r), Vec::<String>::new());
        assert!(!sd.retry());
        assert_eq!(sd.retry_at(), None);
        let pid = std::process::id();
        assert_eq!(
            read(&r),
            [
                format!("READY=1\nSTATUS=2/2\nMAINPID={pid}"),
                "STOPPING=1\nSTATUS=stopping".to_string()
            ]
        );
        sd.status("sent");
        assert_eq!(read(&r), ["STATUS=sent"]);
    }

    /// The new master of an upgrade whose `READY=1` the old master has not
    /// taken yet is still upgrading; the upgrade completes when the old
    /// master takes it.
    #[test]
    fn an_upgrade_completes_when_the_old_master_takes_ready_1() {
        let dir = tempfile::tempdir().unwrap();
        let (old, service) = (dir.path().join("old"), dir.path().join("service"));
        let (r_old, r_service) = (
            UnixDatagram::bind(&old).unwrap(),
            UnixDatagram::bind(&service).unwrap(),
        );
        fill(&old);
        let mut sd = systemd(&old, Some(&service));
        assert_eq!(sd.ready("2/2"), Ready::Waits);
        assert!(sd.upgrading());
        assert_eq!(read(&r_old), Vec::<String>::new());
        assert!(sd.retry(), "the upgrade completes");
        assert!(!sd.upgrading());
        let pid = std::process::id();
        assert_eq!(
            read(&r_old),
            [format!("READY=1\nSTATUS=2/2\nMAINPID={pid}")]
        );
        sd.status("now to the service manager");
        assert_eq!(read(&r_service), ["STATUS=now to the service manager"]);
    }

    /// A stop asked of the new master while its `READY=1` waits withdraws
    /// it: the old master, taking it first, would retire for a master that
    /// stops. The stop goes to the old master alone.
    #[test]
    fn a_stop_withdraws_a_ready_1_that_waits() {
        let dir = tempfile::tempdir().unwrap();
        let (old, service) = (dir.path().join("old"), dir.path().join("service"));
        let r_old = UnixDatagram::bind(&old).unwrap();
        fill(&old);
        let mut sd = systemd(&old, Some(&service));
        assert_eq!(sd.ready("2/2"), Ready::Waits);
        sd.stopping(Some((false, "SIGTERM")));
        assert_eq!(read(&r_old), Vec::<String>::new());
        assert!(!sd.retry(), "no upgrade to complete");
        assert!(sd.upgrading());
        assert_eq!(
            read(&r_old),
            [format!("STOPPING=1\n{UPGRADE_STOP}=graceful:SIGTERM")]
        );
    }
}

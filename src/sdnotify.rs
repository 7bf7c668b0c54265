//! drover's own readiness, for a service manager that started it with
//! `NOTIFY_SOCKET` (systemd `Type=notify`, or an old drover during an
//! upgrade). The sending is the worker SDK's: one implementation of the
//! protocol serves both sides.

use std::ffi::OsString;
use std::time::Duration;

use tracing::debug;

/// The key of the new master's message to the old one during an upgrade:
/// it was asked to stop (`graceful:CAUSE` or `quick:CAUSE`).
pub const UPGRADE_STOP: &str = "DROVER_STOP";

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
}

impl Systemd {
    /// Takes `NOTIFY_SOCKET` (and `WATCHDOG_USEC`) from the environment and
    /// removes them, so that no worker inherits our channel. (An upgrade
    /// passes the watchdog on to the new master explicitly.)
    pub fn from_env() -> Systemd {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let after_ready = std::env::var_os("DROVER_SERVICE_NOTIFY_SOCKET");
        let watchdog = drover_worker::watchdog_interval();
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
        Systemd {
            socket,
            after_ready,
            watchdog,
            handed_over: false,
            upgrading,
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

    pub fn send(&self, state: &str) {
        if self.handed_over {
            return;
        }
        let Some(socket) = &self.socket else { return };
        if let Err(e) = drover_worker::notify::notify_to(socket, state) {
            debug!("cannot notify {socket:?}: {e}");
        }
    }

    /// `READY=1` with the status; true when it completes an upgrade (we
    /// are the new master, and the old one retires on it).
    pub fn ready(&mut self, summary: &str) -> bool {
        self.send(&format!(
            "READY=1\nSTATUS={summary}\nMAINPID={}",
            std::process::id()
        ));
        if let Some(service) = self.after_ready.take() {
            self.socket = Some(service);
        }
        std::mem::take(&mut self.upgrading)
    }

    pub fn reloading(&self) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the struct we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading"
        ));
    }

    pub fn status(&self, summary: &str) {
        self.send(&format!("STATUS={summary}"));
    }

    /// `STOPPING=1`. As the new master of an upgrade not complete yet, we
    /// speak to the old master, and hold the pidfile and the control socket
    /// meanwhile: a stop asked of us (`asked`: quick or not, and the cause)
    /// was asked of drover, and the old master stops too on
    /// [`UPGRADE_STOP`]. A stop of our own (a worker that cannot boot) only
    /// fails the upgrade, which our exit tells it.
    pub fn stopping(&self, asked: Option<(bool, &str)>) {
        if !self.upgrading {
            self.send("STOPPING=1\nSTATUS=stopping");
        } else if let Some((quick, cause)) = asked {
            let pace = if quick { "quick" } else { "graceful" };
            self.send(&format!("STOPPING=1\n{UPGRADE_STOP}={pace}:{cause}"));
        }
    }

    /// Hands the service over to the master `pid`: our last message. With
    /// `NotifyAccess=all`, a later `STOPPING=1` of ours would stop the service.
    pub fn main_pid(&mut self, pid: i32) {
        self.send(&format!("MAINPID={pid}"));
        self.handed_over = true;
    }

    /// Only to the service manager: before a new master of an upgrade is
    /// ready, `socket` is the old master's, which needs no heartbeat.
    pub fn watchdog(&self) {
        if self.after_ready.is_none() {
            self.send("WATCHDOG=1");
        }
    }
}

//! Binary upgrade (SIGUSR2, `drover ctl upgrade`): start the binary found at
//! the path drover was started with, handing it the listeners as systemd
//! would (`LISTEN_FDS`) and this master's notify socket. The new master starts
//! its own workers; once it reports `READY=1`, this master retires its
//! workers gracefully and exits. If the new master fails first, this one
//! keeps serving and says why.

use std::os::fd::AsRawFd;
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::shutdown::Cause;
use super::worker::{describe, ms};
use super::{control, Master};
use crate::control::ControlSocket;
use crate::notify::Message;
use crate::pidfile::Pidfile;
use crate::spawn::{self, Env, Program};

/// An upgrade in progress: the new master, not yet ready.
pub struct Upgrade {
    pub pid: Pid,
    began: Instant,
    deadline: Instant,
    waiters: Vec<control::ClientId>,
}

/// What drover was started as, saved at start-up (the binary at that path may
/// be replaced by the time of an upgrade: that is the point).
pub struct Exe {
    path: std::path::PathBuf,
    args: Vec<String>,
}

impl Exe {
    pub fn saved() -> Exe {
        let path = std::env::current_exe().unwrap_or_else(|_| "drover".into());
        // /proc/self/exe names a replaced binary "PATH (deleted)": the path is what we want.
        let shown = path.to_string_lossy();
        let path = shown
            .strip_suffix(" (deleted)")
            .map_or(path.clone(), Into::into);
        Exe {
            path,
            args: std::env::args().collect(),
        }
    }
}

impl Master {
    pub(super) fn begin_upgrade(&mut self, client: Option<control::ClientId>) {
        let busy = if std::process::id() == 1 {
            Some("drover is PID 1: its namespace would end with it, and the new master with it")
        } else if self.upgrade.is_some() {
            Some("an upgrade is already in progress")
        } else if self.reload.is_some() {
            Some("a reload is in progress")
        } else {
            None
        };
        if let Some(why) = busy {
            warn!("upgrade refused: {why}");
            if let Some(c) = client {
                self.reply(c, control::failure(why));
            }
            return;
        }
        let mut argv = vec![self.exe.path.display().to_string()];
        argv.extend(self.exe.args.iter().skip(1).cloned());
        let program = match Program::new(&argv, None) {
            Ok(p) => p,
            Err(e) => return self.upgrade_failed(client.into_iter().collect(), format!("{e}")),
        };
        let mut env = Env::inherit(&[]);
        let names: Vec<&str> = self.gen.listeners.iter().map(|(_, n)| n.as_str()).collect();
        env.set("LISTEN_FDS", self.gen.listeners.len().to_string());
        env.set("LISTEN_FDNAMES", names.join(":"));
        env.set_child_pid("LISTEN_PID");
        env.set("NOTIFY_SOCKET", self.notify.path());
        env.set("DROVER_UPGRADE_FROM", std::process::id().to_string());
        if let Some(service) = self.systemd.socket() {
            env.set("DROVER_SERVICE_NOTIFY_SOCKET", service);
        }
        // Hand over what only one master may hold: the pidfile lock and the
        // control socket's path. Taken back if the upgrade fails.
        self.pidfile = None;
        if let Some(c) = self.control.as_mut() {
            c.close_listener();
        }
        let fds: Vec<_> = self
            .gen
            .listeners
            .iter()
            .map(|(l, _)| l.fd.as_raw_fd())
            .collect();
        // The new master must outlive us: no parent-death signal.
        match spawn::spawn(&program, &env, &fds, self.devnull.as_raw_fd(), false) {
            Ok(pid) => {
                let now = Instant::now();
                let deadline = now + self.gen.s.boot_timeout.0 + std::time::Duration::from_secs(5);
                info!(
                    "upgrade: started {} as pid {pid}; waiting for it to report ready",
                    self.exe.path.display()
                );
                self.upgrade = Some(Upgrade {
                    pid,
                    began: now,
                    deadline,
                    waiters: client.into_iter().collect(),
                });
            }
            Err(e) => self.upgrade_failed(client.into_iter().collect(), format!("{e}")),
        }
    }

    pub(super) fn on_upgrade_notify(&mut self, messages: Vec<Message>) {
        if !messages.contains(&Message::Ready) {
            return;
        }
        let Some(u) = self.upgrade.take() else { return };
        info!(
            "upgrade: new master pid {} ready in {}; retiring this one",
            u.pid,
            ms(u.began.elapsed())
        );
        self.systemd.main_pid(u.pid.as_raw());
        for c in u.waiters {
            self.reply(
                c,
                control::success(&format!("upgraded: new master pid {}", u.pid)),
            );
        }
        self.control = None;
        self.begin_shutdown(false, Cause::Upgrade);
    }

    pub(super) fn on_upgrade_exit(&mut self, status: WaitStatus) {
        let Some(u) = self.upgrade.take() else { return };
        let why = format!(
            "the new master (pid {}) {} before it was ready",
            u.pid,
            describe(status, None)
        );
        self.upgrade_failed(u.waiters, why);
    }

    /// Kills a new master that did not report ready in time; its exit is
    /// then reported as the failure.
    pub(super) fn settle_upgrade(&mut self, now: Instant) {
        if let Some(u) = &self.upgrade {
            if u.deadline <= now {
                error!(
                    "upgrade: the new master (pid {}) was not ready in time; killing it",
                    u.pid
                );
                let _ = kill(u.pid, Signal::SIGKILL);
                if let Some(u) = self.upgrade.as_mut() {
                    u.deadline = now + std::time::Duration::from_secs(3600);
                }
            }
        }
    }

    pub(super) fn upgrade_deadline(&self) -> Option<Instant> {
        self.upgrade.as_ref().map(|u| u.deadline)
    }

    fn upgrade_failed(&mut self, waiters: Vec<control::ClientId>, why: String) {
        error!("upgrade failed: {why}; this master keeps serving");
        if let Some(path) = self.gen.s.pidfile.clone() {
            match Pidfile::create(&path) {
                Ok(p) => self.pidfile = Some(p),
                Err(e) => error!("cannot take the pidfile back: {e}"),
            }
        }
        if let (Some(c), Some(path)) = (self.control.as_mut(), self.gen.s.control_socket.clone()) {
            match ControlSocket::bind(&path) {
                Ok(fresh) => c.take_listener(fresh),
                Err(e) => error!("cannot take the control socket back: {e}"),
            }
        }
        for c in waiters {
            self.reply(c, control::failure(&format!("upgrade failed: {why}")));
        }
    }
}

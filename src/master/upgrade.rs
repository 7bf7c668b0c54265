//! Binary upgrade (SIGUSR2, `drover ctl upgrade`): start the binary found at
//! the path drover was started with, handing it the listeners as systemd
//! would (`LISTEN_FDS`) and this master's notify socket. The new master starts
//! its own workers; once it reports `READY=1`, this master retires its
//! workers gracefully and exits. If the new master fails first, this one
//! keeps serving and says why.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::rollout::Waiters;
use super::shutdown::Cause;
use super::worker::{describe, ms, Pace};
use super::{control, exit, Master};
use crate::control::ControlSocket;
use crate::notify::Message;
use crate::pidfile::Pidfile;
use crate::spawn::{self, Env, Program};

/// An upgrade in progress: the new master, not yet ready.
pub struct Upgrade {
    pub pid: Pid,
    began: Instant,
    deadline: Instant,
    /// How long the new master was given to be ready.
    limit: Duration,
    /// The new master was not ready by its deadline: drover stopped it
    /// (SIGTERM), and `deadline` is now when it is killed if still there.
    timed_out: bool,
    /// ... and it was still there: drover killed it (SIGKILL).
    killed: bool,
    /// A stop arrived before the new master was ready: it was told to stop
    /// too, and its `READY=1` no longer hands anything over.
    cancelled: bool,
    /// The longest the new master's own shutdown may take, from its config:
    /// how long it is waited for once told to stop (a cancel, or its
    /// deadline), before SIGKILL.
    stop_limit: Duration,
    /// When it was told to stop (a cancelled upgrade).
    cancelled_at: Option<Instant>,
    /// Its READY=1 was read after it had crashed: its exit, reaped next, is
    /// the failure.
    ready_unread: bool,
    waiters: Waiters,
}

/// What a new master's shutdown may take once told to stop: its workers'
/// drain, then its stage 3 (the processes left by workers: `quick_timeout`),
/// its `on_exit` hook and the event hooks still running or waiting at its
/// exit (two `hook_timeout`s at most), and a margin for its own exit.
fn stop_limit(s: &crate::config::Settings) -> Duration {
    let hook = s.hook_timeout.0;
    let on_exit = if s.on_exit.is_empty() {
        Duration::ZERO
    } else {
        hook
    };
    let events = if s.event_hooks.0.is_empty() {
        Duration::ZERO
    } else {
        2 * hook
    };
    s.graceful_timeout.0 + s.quick_timeout.0 + on_exit + events + Duration::from_secs(1)
}

/// The time a new master gets on top of its workers' `boot_timeout`: its
/// own start (config, sockets) before it spawns them.
const MASTER_START_MARGIN: Duration = Duration::from_secs(5);

/// What drover was started as, saved at start-up (the binary at that path may
/// be replaced by the time of an upgrade: that is the point).
pub struct Exe {
    path: PathBuf,
    args: Vec<String>,
}

impl Exe {
    /// The path drover was started with (`argv[0]`), not the binary it
    /// resolves to: deploying by repointing a symlink, or by replacing the
    /// file, must upgrade to the new target. Call it before any `chdir`.
    pub fn saved() -> Exe {
        let args: Vec<String> = std::env::args().collect();
        let path = args
            .first()
            .and_then(|arg0| {
                started_as(
                    arg0,
                    std::env::current_dir().ok()?,
                    std::env::var_os("PATH"),
                )
            })
            .unwrap_or_else(|| {
                // Only when argv[0] names no program (exec'd with a made-up
                // name): the binary itself is the best we have.
                let exe = std::env::current_exe().unwrap_or_else(|_| "drover".into());
                // /proc/self/exe names a replaced binary "PATH (deleted)".
                let shown = exe.to_string_lossy();
                shown
                    .strip_suffix(" (deleted)")
                    .map_or(exe.clone(), Into::into)
            });
        Exe { path, args }
    }
}

/// The file `arg0` named when we were started: relative to `cwd` if it has a
/// '/', else looked up in `path_var` as the shell did. `None` if no such file.
fn started_as(arg0: &str, cwd: PathBuf, path_var: Option<OsString>) -> Option<PathBuf> {
    let found = if arg0.contains('/') {
        cwd.join(arg0)
    } else {
        std::env::split_paths(&path_var?)
            .map(|dir| cwd.join(dir).join(arg0))
            .find(|p| executable(p))?
    };
    executable(&found).then_some(found)
}

fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Master {
    pub(super) fn begin_upgrade(&mut self, client: Option<control::ClientId>) {
        let busy = if std::process::id() == 1 {
            Some("drover is PID 1: its namespace would end with it, and the new master with it")
        } else if self.upgrade.is_some() {
            Some("an upgrade is already in progress")
        } else if self.systemd.upgrading() {
            // It holds the control socket and the pidfile meanwhile, so the
            // request reached it: a third master would be the child of one
            // that may yet fail, and would serve on beside the old one.
            Some("this master is the new master of an upgrade, not ready yet")
        } else if self.sup.rollout.busy() {
            Some("a reload is in progress")
        } else {
            None
        };
        if let Some(why) = busy {
            warn!("upgrade refused: {why}");
            self.obs.publish(crate::events::Kind::UpgradeRejected {
                reason: why.to_string(),
            });
            self.answer(Waiters::one(client), control::failure(why));
            return;
        }
        let mut argv = vec![self.exe.path.display().to_string()];
        argv.extend(self.exe.args.iter().skip(1).cloned());
        let program = match Program::new(&argv, None) {
            Ok(p) => p,
            Err(e) => return self.upgrade_failed(Waiters::one(client), format!("{e}")),
        };
        // The new master reads the config as it is now: give it the
        // boot_timeout it will apply to its workers (ours if it cannot be
        // read; the new master will then fail on it anyway).
        // Its stop budget too, for a stop that cancels the upgrade.
        let current = self.sup.current().clone();
        let loaded = self.source.load().ok();
        let new_settings = loaded.as_ref().map_or(&current.s, |l| &l.settings);
        let boot_timeout = new_settings.boot_timeout.0;
        let stop_limit = stop_limit(new_settings);
        let (env, fds) = self.upgrade_env(&current.listeners.borrow());
        // Hand over what only one master may hold: the pidfile lock (the
        // file stays, naming us until the new master writes its pid) and the
        // control socket's path. Taken back if the upgrade fails.
        if let Some(p) = self.pidfile.take() {
            p.release();
        }
        if let Some(c) = self.control.as_mut() {
            c.close_listener();
        }
        // The new master must outlive us: no parent-death signal.
        match spawn::spawn(&program, &env, &fds, self.devnull.as_raw_fd(), false, None) {
            Ok(pid) => {
                let now = Instant::now();
                let limit = boot_timeout + MASTER_START_MARGIN;
                info!(
                    "upgrade: started {} as pid {pid}; waiting up to {} for it to report ready",
                    self.exe.path.display(),
                    humantime::format_duration(limit)
                );
                self.obs
                    .publish(crate::events::Kind::UpgradeBegun { pid: pid.as_raw() });
                self.upgrade = Some(Upgrade {
                    pid,
                    began: now,
                    deadline: now + limit,
                    limit,
                    timed_out: false,
                    killed: false,
                    cancelled: false,
                    stop_limit,
                    cancelled_at: None,
                    ready_unread: false,
                    waiters: Waiters::one(client),
                });
            }
            Err(e) => self.upgrade_failed(Waiters::one(client), format!("{e}")),
        }
    }

    /// The new master's environment (ours) and descriptors: the sockets,
    /// as systemd would pass them, and which of them we bound; our notify
    /// socket for its `READY=1`; our service manager's socket and watchdog;
    /// the admin endpoint's socket after the listeners.
    fn upgrade_env(&self, listeners: &crate::listen::Set) -> (Env, Vec<RawFd>) {
        let mut env = Env::inherit(&[]);
        let mut fds = super::pass_listeners(&mut env, listeners);
        // Which of them we bound: the new master's shutdown must refuse new
        // connections on those, and remove their socket files, as ours would.
        let bound: Vec<String> = listeners.iter().map(|(l, _)| l.handover_entry()).collect();
        env.set(crate::listen::UPGRADE_BOUND, bound.join(":"));
        env.set("NOTIFY_SOCKET", self.notify.path());
        env.set("DROVER_UPGRADE_FROM", std::process::id().to_string());
        if let Some(service) = self.systemd.socket() {
            env.set("DROVER_SERVICE_NOTIFY_SOCKET", service);
            // The service's watchdog, as systemd would pass it: the new
            // master keeps it fed once it is the main pid.
            if let Some(w) = self.systemd.watchdog {
                env.set("WATCHDOG_USEC", w.as_micros().to_string());
                env.set_child_pid("WATCHDOG_PID");
            }
        }
        // We answer on the admin endpoint until the new master is ready,
        // then it does (a probe must not hear "booting" from the new master
        // while we serve).
        if let Some(a) = &self.admin {
            env.set(crate::listen::UPGRADE_ADMIN_FD, (3 + fds.len()).to_string());
            fds.push(a.listener_fd().as_raw_fd());
        }
        (env, fds)
    }

    /// The new master's pid, while an upgrade runs and was not cancelled.
    pub(super) fn upgrade_in_progress(&self) -> Option<Pid> {
        self.upgrade
            .as_ref()
            .filter(|u| !u.cancelled)
            .map(|u| u.pid)
    }

    /// A stop (SIGTERM, SIGINT, SIGQUIT) during an upgrade. Before the new
    /// master is ready, the upgrade is cancelled: the new master is given
    /// the same signal (its sockets are inherited, so it attaches no filter)
    /// and this master stops as usual. After, this master is already
    /// retiring and the new one serves: nothing to cancel (docs/operations.md).
    pub(super) fn cancel_upgrade(&mut self, signal: Signal) {
        let Some(pid) = self.upgrade_in_progress() else {
            return;
        };
        warn!(
            "{}: upgrade cancelled: the new master (pid {pid}) was not ready yet; \
             sending it {} and stopping this one",
            signal.as_str(),
            signal.as_str()
        );
        let _ = kill(pid, signal);
        self.mark_cancelled(&format!("cancelled by {}", signal.as_str()));
    }

    /// A stop signal from the new master itself: it was asked to stop and
    /// we had not read its `DROVER_STOP=` by its exit (stopped, or stuck),
    /// so it sent the stop as a signal (`Systemd::flush_before_exit`). We
    /// stop as for `DROVER_STOP=`, without signalling it back; once the
    /// upgrade is cancelled we are stopping already, and a second stop would
    /// escalate our shutdown. True if it was the new master's.
    pub(super) fn stop_from_new_master(&mut self, sender: Option<Pid>, signal: Signal) -> bool {
        let Some(u) = self.upgrade.as_ref().filter(|u| Some(u.pid) == sender) else {
            return false;
        };
        if !u.cancelled {
            let pace = if signal == Signal::SIGQUIT {
                "quick"
            } else {
                "graceful"
            };
            self.on_new_master_stopping(&format!("{pace}:{}", signal.as_str()));
        }
        true
    }

    /// The new master, not ready yet, was asked to stop (`DROVER_STOP=`):
    /// it holds the control socket and the pidfile meanwhile, so `drover
    /// ctl stop` or a signal to the pid in the pidfile reaches it, not us.
    /// The stop was asked of drover: we stop too, as for a stop sent to us
    /// (`cancel_upgrade`), without signalling it again (that would escalate
    /// its shutdown). Before, it stopped alone and we served on.
    fn on_new_master_stopping(&mut self, stop: &str) {
        let Some(pid) = self.upgrade_in_progress() else {
            return;
        };
        let (pace, cause) = stop.split_once(':').unwrap_or(("graceful", stop));
        let pace = if pace == "quick" {
            Pace::Quick
        } else {
            Pace::Graceful
        };
        let cause = Cause::asked(cause);
        warn!(
            "upgrade cancelled: the new master (pid {pid}) was asked to stop ({}) before it \
             was ready; stopping this one too",
            cause.describe()
        );
        self.mark_cancelled(&format!(
            "cancelled: the new master was asked to stop ({})",
            cause.describe()
        ));
        self.sup.begin_shutdown(pace, cause, Instant::now());
    }

    /// The upgrade is cancelled: its new master stops (it was told to, or
    /// was asked to), and is waited for at our exit.
    fn mark_cancelled(&mut self, reason: &str) {
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        u.cancelled = true;
        u.cancelled_at = Some(Instant::now());
        let waiters = std::mem::take(&mut u.waiters);
        self.obs.publish(crate::events::Kind::UpgradeFailed {
            reason: reason.to_string(),
        });
        self.answer(
            waiters,
            control::failure(&format!("upgrade {reason}: both masters stop")),
        );
    }

    /// At exit, a cancelled upgrade's new master is waited for (it stops
    /// its own workers) for as long as its shutdown may take from the
    /// cancel, then killed: no master of ours outlives this one. (Killed
    /// earlier, it left its pidfile and its workers' orphans behind.)
    pub(super) fn reap_cancelled_upgrade(&mut self) {
        if !self.upgrade.as_ref().is_some_and(|u| u.cancelled) {
            return;
        }
        let Some(u) = self.upgrade.take() else { return };
        let deadline = u.cancelled_at.unwrap_or_else(Instant::now) + u.stop_limit;
        loop {
            match nix::sys::wait::waitpid(u.pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    warn!(
                        "upgrade: the new master (pid {}) did not stop in time: SIGKILL",
                        u.pid
                    );
                    let _ = kill(u.pid, Signal::SIGKILL);
                    let _ = nix::sys::wait::waitpid(u.pid, None);
                    break;
                }
                Ok(status) => {
                    info!(
                        "upgrade: the new master (pid {}) {}",
                        u.pid,
                        describe(status, None)
                    );
                    break;
                }
                Err(_) => break,
            }
        }
        self.take_pidfile_back();
    }

    pub(super) fn on_upgrade_notify(&mut self, messages: Vec<Message>) {
        // Past its deadline it is being stopped: nothing it says counts.
        if self.upgrade.as_ref().is_some_and(|u| u.timed_out) {
            return;
        }
        let stop = messages.iter().find_map(|m| match m {
            Message::Other(line) => line
                .strip_prefix(crate::sdnotify::UPGRADE_STOP)
                .and_then(|rest| rest.strip_prefix('=')),
            _ => None,
        });
        if let Some(stop) = stop {
            return self.on_new_master_stopping(stop);
        }
        if !messages.contains(&Message::Ready) {
            return;
        }
        if self.upgrade.as_ref().is_some_and(|u| u.cancelled) {
            return;
        }
        let Some(u) = self.upgrade.take() else { return };
        // Its READY=1 went into our queue while we did not read (stopped,
        // or busy): for it the upgrade was complete, it spoke to the service
        // manager from then on, and a stop asked of it since was the
        // service's. Exited already, it takes nothing over. Stopped (status
        // 0, or 4 with kills), the service was stopped: we stop as we would
        // have, but say so rather than "retiring" for it. Any other end (a
        // crash, the OOM killer) stopped nothing: we serve on, and its exit,
        // reaped next, is reported as the upgrade's failure.
        let gone = waitid(
            Id::Pid(u.pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        )
        .ok()
        .filter(|s| *s != WaitStatus::StillAlive);
        let stopped = |c: i32| c == i32::from(exit::OK) || c == i32::from(exit::KILLED);
        if gone.is_some_and(|s| !matches!(s, WaitStatus::Exited(_, c) if stopped(c))) {
            self.upgrade = Some(Upgrade {
                ready_unread: true,
                ..u
            });
            return;
        }
        self.successor_gone = gone.is_some();
        match gone {
            None => info!(
                "upgrade: new master pid {} ready in {}; retiring this one",
                u.pid,
                ms(u.began.elapsed())
            ),
            Some(status) => warn!(
                "upgrade: new master pid {} reported ready in {}, but {} before this master \
                 read it, having taken the service over: stopping this one too; nothing \
                 serves the sockets now",
                u.pid,
                ms(u.began.elapsed()),
                describe(status, None)
            ),
        }
        // From now on the new master speaks to the service manager: no
        // STOPPING=1 or WATCHDOG=1 of ours may be taken for its.
        self.systemd.main_pid(u.pid.as_raw());
        self.successor = Some(u.pid);
        self.obs.publish(crate::events::Kind::UpgradeApplied {
            pid: u.pid.as_raw(),
        });
        self.next_watchdog = None;
        if let Some(a) = self.admin.as_mut() {
            a.hand_over();
        }
        let answer = match gone {
            None => control::success(&format!("upgraded: new master pid {}", u.pid)),
            Some(status) => control::failure(&format!(
                "upgrade did not complete: the new master (pid {}) {} after it reported \
                 ready; both masters stop",
                u.pid,
                describe(status, None)
            )),
        };
        self.answer(u.waiters, answer);
        self.sup
            .begin_shutdown(Pace::Graceful, Cause::Upgrade, Instant::now());
    }

    pub(super) fn on_upgrade_exit(&mut self, status: WaitStatus) {
        let Some(u) = self.upgrade.take() else { return };
        if u.cancelled {
            info!(
                "upgrade: the new master (pid {}) {}",
                u.pid,
                describe(status, None)
            );
            self.take_pidfile_back();
            return;
        }
        let why = if u.timed_out {
            format!(
                "the new master (pid {}) was not ready within {} (its workers' boot_timeout + {}); drover {} it",
                u.pid,
                humantime::format_duration(u.limit),
                humantime::format_duration(MASTER_START_MARGIN),
                if u.killed { "killed" } else { "stopped" }
            )
        } else {
            format!(
                "the new master (pid {}) {} {}",
                u.pid,
                describe(status, None),
                if u.ready_unread {
                    "after it reported ready, before this master read it"
                } else {
                    "before it was ready"
                }
            )
        };
        self.upgrade_failed(u.waiters, why);
    }

    /// Stops a new master that did not report ready in time, with a
    /// graceful shutdown (SIGTERM: its workers that are ready serve the
    /// sockets too, and drain what they took; the booting ones stop at once),
    /// and kills it if it is still there when that may have ended; its exit
    /// is then reported as the failure. A SIGKILL at once cut their requests
    /// and left what its workers had started (their process groups, which
    /// only the new master sweeps) running after it, and its pidfile.
    pub(super) fn settle_upgrade(&mut self, now: Instant) {
        let Some(u) = self
            .upgrade
            .as_mut()
            .filter(|u| !u.killed && !u.cancelled && u.deadline <= now)
        else {
            return;
        };
        if !u.timed_out {
            error!(
                "upgrade: the new master (pid {}) was not ready within {}; stopping it \
                 (SIGTERM, SIGKILL if still running in {})",
                u.pid,
                humantime::format_duration(u.limit),
                humantime::format_duration(u.stop_limit)
            );
            let _ = kill(u.pid, Signal::SIGTERM);
            u.timed_out = true;
            u.deadline = now + u.stop_limit;
        } else {
            warn!(
                "upgrade: the new master (pid {}) did not stop in time: SIGKILL",
                u.pid
            );
            // Its workers die with it (parent-death signal).
            let _ = kill(u.pid, Signal::SIGKILL);
            u.killed = true;
        }
    }

    pub(super) fn upgrade_deadline(&self) -> Option<Instant> {
        // Once killed, the new master's exit (SIGCHLD) is all we wait for;
        // once cancelled, our exit waits for it (`reap_cancelled_upgrade`).
        self.upgrade
            .as_ref()
            .filter(|u| !u.killed && !u.cancelled)
            .map(|u| u.deadline)
    }

    fn upgrade_failed(&mut self, waiters: Waiters, why: String) {
        // The pidfile and the control socket first: whoever acts on the
        // line below (a script, a test) finds them this master's again.
        self.take_pidfile_back();
        let control_socket = self.sup.current().s.control_socket.clone();
        if let (Some(c), Some(path)) = (self.control.as_mut(), control_socket) {
            match ControlSocket::bind(&path) {
                Ok(fresh) => c.take_listener(fresh),
                Err(e) => error!("cannot take the control socket back: {e}"),
            }
        }
        error!("upgrade failed: {why}; this master keeps serving");
        self.obs.publish(crate::events::Kind::UpgradeFailed {
            reason: why.clone(),
        });
        self.answer(waiters, control::failure(&format!("upgrade failed: {why}")));
    }

    /// The new master is gone without the upgrade: the pidfile (released
    /// to it at the start) is ours again, to serve on with or to remove at
    /// our exit. A new master that died before writing its pid (a stop
    /// that cancelled the upgrade as it started) left the file naming us,
    /// unlocked, after our exit.
    fn take_pidfile_back(&mut self) {
        let Some(path) = self.sup.current().s.pidfile.clone() else {
            return;
        };
        match Pidfile::create(&path) {
            Ok(p) => self.pidfile = Some(p),
            Err(e) => error!("cannot take the pidfile back: {e}"),
        }
    }

    /// Answers at once (the upgrade's verdicts are the master's own, not
    /// the supervisor's decisions).
    fn answer(&mut self, waiters: Waiters, answer: control::Answer) {
        for a in waiters.answer(answer) {
            if let super::Action::AnswerClient { client, answer } = a {
                if let Some(c) = self.control.as_mut() {
                    c.reply(client, &answer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_started_with_is_kept_not_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let real = std::env::current_exe().unwrap();
        std::os::unix::fs::symlink(&real, bin.join("drover")).unwrap();
        let cwd = dir.path().to_path_buf();
        // Relative: against the start-up directory; the symlink stays.
        assert_eq!(
            started_as("bin/drover", cwd.clone(), None),
            Some(cwd.join("bin/drover"))
        );
        // A bare name: found in PATH, as the shell found it.
        let path = Some(OsString::from(format!("/nonexistent:{}", bin.display())));
        assert_eq!(
            started_as("drover", cwd.clone(), path),
            Some(bin.join("drover"))
        );
        // A name that was never a file: the caller falls back.
        assert_eq!(started_as("drover: master", cwd, None), None);
    }
}

//! `boot_priority`: a worker that boots while others serve runs at a lower
//! CPU priority (`SCHED_IDLE`, or a higher nice value), so that its
//! start-up (a Python import: a third of a second of CPU or more) takes the
//! CPU the serving workers leave idle; at `READY=1` every thread of it gets
//! its normal priority back.
//!
//! The child takes the low priority before exec (`spawn`), so every thread
//! it starts inherits it. Giving it back (lowering a nice value, leaving
//! `SCHED_IDLE`) Linux allows only with `CAP_SYS_NICE` or a high enough
//! `RLIMIT_NICE`: drover checks that it can (`check`, with a real process)
//! before it lowers any worker's priority, and refuses the setting
//! otherwise, rather than leave a ready worker at a low priority.

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::sys::wait::waitpid;
use nix::unistd::{pipe2, Pid};

use crate::config::{BootPriority, Settings};
use crate::spawn::{set_low, Identity, Low};

/// A generation's two priorities: a booting worker's and a ready one's
/// (drover's own nice value, `SCHED_OTHER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boot {
    pub low: Low,
    pub normal: i32,
}

impl std::fmt::Display for Boot {
    /// "nice 10 to 0", "SCHED_IDLE to nice 0".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.low {
            Low::Nice(n) => write!(f, "nice {n} to {}", self.normal),
            Low::Idle => write!(f, "SCHED_IDLE to nice {}", self.normal),
        }
    }
}

/// How many passes over a worker's threads a restore makes at most: each
/// pass after the first is for threads started during the one before by a
/// thread not yet restored (they inherited its nice value).
const MAX_PASSES: usize = 20;

/// What `restore` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Threads set back to the normal nice value.
    pub threads: usize,
    /// Passes over the threads, the last of which found none to restore.
    pub passes: usize,
}

/// The priorities of generation `s` (with its workers running as
/// `identity`, `None`: as drover), if `boot_priority` is not "normal" and
/// makes a difference; an error if drover could not give a worker its
/// priority back. drover's own nice value is the workers' normal one.
pub fn check(s: &Settings, identity: Option<&Identity>) -> Result<Option<Boot>, String> {
    let normal = own_nice();
    let low = match s.boot_priority {
        BootPriority::Normal => return Ok(None),
        BootPriority::Idle => Low::Idle,
        BootPriority::Nice(n) => Low::Nice((normal + n as i32).min(19)),
    };
    if low == Low::Nice(normal) {
        return Ok(None);
    }
    let boot = Boot { low, normal };
    let setting = match s.boot_priority {
        BootPriority::Nice(n) => n.to_string(),
        _ => "\"idle\"".into(),
    };
    let at = crate::config::located(&s.places.of("boot_priority").cloned());
    probe(boot, identity)
        .map(|()| Some(boot))
        .map_err(|e| format!("{at}{}", cannot_restore(&setting, boot, identity, e)))
}

/// The refusal, with what to change.
fn cannot_restore(setting: &str, boot: Boot, identity: Option<&Identity>, e: ProbeError) -> String {
    let why = match e {
        ProbeError::Setup(what) => {
            return format!(
                "boot_priority = {setting}: cannot check that drover may give a worker its \
                 priority back: {what}"
            )
        }
        ProbeError::Denied(errno) => errno,
    };
    let other_user = identity.is_some_and(|id| id.uid.is_some());
    let fix = if why == Errno::EPERM && other_user {
        "drover needs CAP_SYS_NICE to change the priority of workers that run as another user \
         (`user`)"
            .to_string()
    } else {
        format!(
            "drover needs CAP_SYS_NICE, or an RLIMIT_NICE of at least {limit} (systemd: \
             LimitNICE={limit}; docker run --cap-add SYS_NICE, or --ulimit nice={limit})",
            limit = 20 - boot.normal
        )
    };
    format!(
        "boot_priority = {setting}: drover could not give a worker its priority back at \
         READY=1 (from {boot}: {why}): {fix}; or set boot_priority = \"normal\""
    )
}

/// drover's own nice value. (getpriority cannot fail for the calling
/// process, so -1 is the value, not an error.)
fn own_nice() -> i32 {
    // SAFETY: getpriority has no memory effects.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

#[derive(Debug)]
enum ProbeError {
    /// The probe could not be run.
    Setup(String),
    /// The priority could not be given back.
    Denied(Errno),
}

/// Does once what a restore does, to a process made for it: a child at the
/// boot nice value, running as the workers' user, which drover then tries
/// to set back to the normal value. Linux checks drover's `CAP_SYS_NICE`
/// (in the initial user namespace: a container's root may not have it), the
/// child's `RLIMIT_NICE` (inherited from drover) and, without the
/// capability, whether the child runs as drover's user: a real process is
/// the one reliable test of all three.
fn probe(boot: Boot, identity: Option<&Identity>) -> Result<(), ProbeError> {
    let (ready_r, ready_w): (OwnedFd, OwnedFd) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| ProbeError::Setup(format!("pipe: {e}")))?;
    let uid = identity.and_then(|id| id.uid);
    let gid = identity.map(|id| id.gid);
    // Every signal blocked across the fork and in the child: none of
    // drover's handlers may run there (they write to the master's pipe).
    let mut saved = SigSet::empty();
    nix::sys::signal::sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut saved),
    )
    .map_err(|e| ProbeError::Setup(format!("sigprocmask: {e}")))?;
    // SAFETY: the child makes only async-signal-safe calls, then waits to
    // be killed.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above.
        unsafe { probe_child(boot.low, gid, uid, ready_w.as_raw_fd()) }
    }
    let fork_errno = Errno::last();
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&saved), None);
    drop(ready_w);
    if pid < 0 {
        return Err(ProbeError::Setup(format!("fork: {fork_errno}")));
    }
    let child = Pid::from_raw(pid);
    // One byte once it is at the boot nice value, as the workers' user;
    // end of file if it could not get there.
    let mut byte = [0u8; 1];
    let got = loop {
        match nix::unistd::read(&ready_r, &mut byte) {
            Err(Errno::EINTR) => continue,
            other => break other,
        }
    };
    let result = match got {
        Ok(1) => set_normal(child, boot).map_err(ProbeError::Denied),
        Ok(_) => Err(ProbeError::Setup(
            "the probe process could not take the workers' user and the boot priority".into(),
        )),
        Err(e) => Err(ProbeError::Setup(format!("read: {e}"))),
    };
    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    let _ = waitpid(child, None);
    result
}

/// The probe's child: the boot priority, then the workers' user, then one
/// byte to say so, then wait for SIGKILL (every signal is blocked).
unsafe fn probe_child(
    low: Low,
    gid: Option<libc::gid_t>,
    uid: Option<libc::uid_t>,
    ready: libc::c_int,
) -> ! {
    if set_low(low) != 0 {
        libc::_exit(1);
    }
    if let Some(gid) = gid {
        if libc::setgid(gid) != 0 {
            libc::_exit(1);
        }
    }
    if let Some(uid) = uid {
        if libc::setuid(uid) != 0 {
            libc::_exit(1);
        }
    }
    // Never outlive drover (set after setuid, which clears it).
    libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    );
    libc::write(ready, [1u8].as_ptr().cast(), 1);
    loop {
        libc::pause();
    }
}

/// Gives thread `tid` its normal priority back: drover's nice value, or
/// `SCHED_OTHER` (its nice value is still drover's: `SCHED_IDLE` did not
/// change it).
fn set_normal(tid: Pid, boot: Boot) -> Result<(), Errno> {
    // SAFETY: plain system calls with no memory effects but the parameter
    // read. On Linux, both act on the one thread `tid` names.
    let r = unsafe {
        match boot.low {
            Low::Nice(_) => {
                libc::setpriority(libc::PRIO_PROCESS, tid.as_raw() as libc::id_t, boot.normal)
            }
            Low::Idle => {
                let param = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(tid.as_raw(), libc::SCHED_OTHER, &param)
            }
        }
    };
    Errno::result(r).map(drop)
}

/// Whether a thread is still at the boot priority.
fn at_boot(pid: i32, tid: i32, low: Low) -> bool {
    let Some(stat) = thread_stat(pid, tid) else {
        return false;
    };
    match low {
        Low::Nice(n) => stat.nice == n,
        Low::Idle => stat.policy == libc::SCHED_IDLE,
    }
}

/// Gives worker `pid`, every thread of it and of the processes it started,
/// its normal priority back: each thread still at the boot priority, in
/// passes until one finds none (a thread started meanwhile by one not yet
/// restored inherited the boot priority). Threads the program set to
/// another priority itself are left alone. An error is the first one met;
/// the other threads are restored all the same.
pub fn restore(pid: Pid, boot: Boot) -> Result<Restored, (Errno, Restored)> {
    let mut done = Restored::default();
    let mut failed: BTreeSet<i32> = BTreeSet::new();
    let mut first_error = None;
    while done.passes < MAX_PASSES {
        done.passes += 1;
        let mut found = 0;
        for (process, tid) in threads_of_tree(pid) {
            if failed.contains(&tid) || !at_boot(process, tid, boot.low) {
                continue;
            }
            found += 1;
            match set_normal(Pid::from_raw(tid), boot) {
                Ok(()) => done.threads += 1,
                // It exited meanwhile.
                Err(Errno::ESRCH) => {}
                Err(e) => {
                    failed.insert(tid);
                    first_error.get_or_insert(e);
                }
            }
        }
        if found == 0 {
            break;
        }
    }
    match first_error {
        Some(e) => Err((e, done)),
        None => Ok(done),
    }
}

/// The threads (process id, thread id) of `pid` and of its descendants
/// (through `/proc/PID/task/TID/children`; only `pid`'s own where the
/// kernel lacks that file).
fn threads_of_tree(pid: Pid) -> Vec<(i32, i32)> {
    let mut threads = Vec::new();
    let mut processes = vec![pid.as_raw()];
    let mut seen = BTreeSet::new();
    while let Some(p) = processes.pop() {
        if !seen.insert(p) {
            continue;
        }
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            threads.push((p, tid));
            if let Ok(children) = fs::read_to_string(format!("/proc/{p}/task/{tid}/children")) {
                processes.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
    }
    threads
}

/// What `/proc/PID/task/TID/stat` says of a thread's priority.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    /// Field 19.
    nice: i32,
    /// Field 41: SCHED_OTHER 0, SCHED_IDLE 5, ….
    policy: i32,
}

fn thread_stat(pid: i32, tid: i32) -> Option<Stat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'. Field 3 is the first after it.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some(Stat {
        nice: fields.get(19 - 3)?.parse().ok()?,
        policy: fields.get(41 - 3)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread of this test process at the boot priority is set back by
    /// `restore` (when the test may: root, or a high RLIMIT_NICE), for
    /// either kind of boot priority.
    #[test]
    fn a_thread_at_the_boot_priority_is_restored() {
        let normal = own_nice();
        let me = std::process::id() as i32;
        for low in [Low::Nice((normal + 7).min(19)), Low::Idle] {
            let boot = Boot { low, normal };
            let (tx, rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
            let t = std::thread::spawn(move || {
                assert_eq!(set_low(low), 0);
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = stop_rx.recv();
            });
            let tid = rx.recv().unwrap();
            assert!(at_boot(me, tid, low));
            match restore(Pid::this(), boot) {
                Ok(done) => {
                    let normal_stat = Stat {
                        nice: normal,
                        policy: libc::SCHED_OTHER,
                    };
                    assert_eq!(thread_stat(me, tid), Some(normal_stat));
                    assert!(done.threads == 1 && done.passes == 2, "{done:?}");
                }
                Err((e, _)) => assert!(matches!(e, Errno::EACCES | Errno::EPERM), "{e}"),
            }
            stop_tx.send(()).unwrap();
            t.join().unwrap();
        }
    }

    #[test]
    fn the_priority_is_read_from_proc() {
        let me = std::process::id() as i32;
        let stat = thread_stat(me, me).unwrap();
        assert_eq!(
            stat,
            Stat {
                nice: own_nice(),
                policy: libc::SCHED_OTHER
            }
        );
    }
}

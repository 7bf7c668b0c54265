//! Signals become events at once: each handler writes its signal number and
//! its sender's pid (one record of [`RECORD`] bytes, written whole or not at
//! all) into a non-blocking pipe, and the master loop reads them in order.
//! Handlers do nothing else.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal as Raw};
use nix::unistd::{pipe2, read};

/// What the master is asked to do, decoded from a raw signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM: graceful shutdown (quick if already stopping).
    Terminate,
    /// SIGINT: as SIGTERM (Ctrl+C).
    Interrupt,
    /// SIGQUIT: quick shutdown.
    Quit,
    /// SIGHUP: reload.
    Reload,
    /// SIGTTIN: one worker more.
    AddWorker,
    /// SIGTTOU: one worker less.
    RemoveWorker,
    /// SIGUSR1: reopen logs.
    ReopenLogs,
    /// SIGUSR2: binary upgrade.
    Upgrade,
    /// SIGWINCH: stop the workers, keep the master.
    StopWorkers,
    /// SIGCHLD: some child changed state; reap.
    Child,
}

const TABLE: &[(Raw, Event)] = &[
    (Raw::SIGTERM, Event::Terminate),
    (Raw::SIGINT, Event::Interrupt),
    (Raw::SIGQUIT, Event::Quit),
    (Raw::SIGHUP, Event::Reload),
    (Raw::SIGTTIN, Event::AddWorker),
    (Raw::SIGTTOU, Event::RemoveWorker),
    (Raw::SIGUSR1, Event::ReopenLogs),
    (Raw::SIGUSR2, Event::Upgrade),
    (Raw::SIGWINCH, Event::StopWorkers),
    (Raw::SIGCHLD, Event::Child),
];

impl Event {
    fn from_raw(n: u8) -> Option<Event> {
        TABLE
            .iter()
            .find(|(s, _)| *s as i32 == n as i32)
            .map(|(_, e)| *e)
    }

    /// The signal this event comes from.
    pub fn signal(self) -> Option<Raw> {
        TABLE.iter().find(|(_, e)| *e == self).map(|(s, _)| *s)
    }

    /// The signal's name, for logs.
    pub fn signal_name(self) -> &'static str {
        TABLE
            .iter()
            .find(|(_, e)| *e == self)
            .map_or("?", |(s, _)| s.as_str())
    }
}

/// One signal in the pipe: its number, then the sender's pid (0 when the
/// kernel sent it: a terminal's Ctrl+C, a parent-death signal; [`OUTSIDE`]
/// for a process outside our PID namespace), native endian. Under
/// `PIPE_BUF`, so written and read whole.
const RECORD: usize = 5;

/// The pid recorded for a process that sent a signal from outside drover's
/// PID namespace: the kernel gives its pid as 0 (it has none here), as for
/// its own signals, but with a process's `si_code`. That is how a container
/// runtime or the kubelet stops a drover that is PID 1 of its container.
const OUTSIDE: i32 = -1;

/// A signal received, and who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub event: Event,
    /// The sending process, `None` when the kernel sent it or the sender is
    /// outside drover's PID namespace (`outside`).
    pub sender: Option<nix::unistd::Pid>,
    /// Sent by a process outside drover's PID namespace.
    pub outside: bool,
}

/// The read end of the signal pipe.
pub struct SignalPipe {
    read: OwnedFd,
}

impl SignalPipe {
    /// Installs the handlers. Call once, before any child is started.
    pub fn install() -> io::Result<SignalPipe> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // The write end lives as long as the handlers: for the whole process.
        let write = write.into_raw_fd();
        for (sig, _) in TABLE {
            let number = *sig as u8;
            // SAFETY: the action only reads the siginfo and calls write(2),
            // which is async-signal-safe; a full pipe drops the record whole
            // (and errno is restored by signal-hook).
            unsafe {
                signal_hook_registry::register_sigaction(*sig as i32, move |info| {
                    let mut record = [0u8; RECORD];
                    record[0] = number;
                    let by_process = [libc::SI_USER, libc::SI_QUEUE, libc::SI_TKILL];
                    let pid = match info.si_pid() {
                        0 if by_process.contains(&info.si_code) => OUTSIDE,
                        pid => pid,
                    };
                    record[1..].copy_from_slice(&pid.to_ne_bytes());
                    let _ = libc::write(write, record.as_ptr().cast(), RECORD);
                })?;
            }
        }
        // A parent may have started us with some of them blocked (the mask
        // survives exec): then SIGTERM would never arrive and no child would
        // ever be reaped. Ours are the handlers now; let them in.
        let mut ours = SigSet::empty();
        for (sig, _) in TABLE {
            ours.add(*sig);
        }
        sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&ours), None)?;
        Ok(SignalPipe { read })
    }

    /// Every signal received since the last call, in arrival order.
    pub fn drain(&self) -> Vec<Received> {
        let mut received = Vec::new();
        // Whole records only: each was written whole, and a read of a
        // multiple of their size takes whole ones.
        let mut buf = [0u8; RECORD * 64];
        loop {
            match read(&self.read, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend(buf[..n].chunks_exact(RECORD).filter_map(|r| {
                    let pid = i32::from_ne_bytes([r[1], r[2], r[3], r[4]]);
                    Some(Received {
                        event: Event::from_raw(r[0])?,
                        sender: (pid > 0).then(|| nix::unistd::Pid::from_raw(pid)),
                        outside: pid == OUTSIDE,
                    })
                })),
            }
        }
        received
    }
}

impl AsFd for SignalPipe {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

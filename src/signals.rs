//! Signals become events at once: each handler writes its signal number as one
//! byte into a non-blocking pipe, and the master loop reads them in order.
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
            let byte = *sig as u8;
            // SAFETY: the action only calls write(2), which is async-signal-safe;
            // a full pipe drops the byte (and errno is restored by signal-hook).
            unsafe {
                signal_hook::low_level::register(*sig as i32, move || {
                    let _ = libc::write(write, (&byte as *const u8).cast(), 1);
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
    pub fn drain(&self) -> Vec<Event> {
        let mut events = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match read(&self.read, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => events.extend(buf[..n].iter().filter_map(|b| Event::from_raw(*b))),
            }
        }
        events
    }
}

impl AsFd for SignalPipe {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

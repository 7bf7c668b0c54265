//! The worker→master channel: systemd's notify protocol on one datagram socket
//! in a private directory. The kernel stamps each datagram with its sender's
//! pid (`SO_PASSCRED`), which is how the master knows which worker spoke.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixCredentials,
};
use nix::unistd::Pid;

/// One line of a notify datagram that the master acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ready,
    Stopping,
    Reloading,
    Watchdog,
    Status(String),
    ExtendTimeout(Duration),
    /// Anything else (`MAINPID=`, `ERRNO=`, unknown keys): logged and ignored.
    Other(String),
}

/// The largest datagram drover reads, as systemd does. A longer one is
/// refused whole, with a warning: reading part of it would silently lose
/// the lines after the cut (a `READY=1` after a long `STATUS=`).
pub const MAX_DATAGRAM: usize = 4096;

/// The most of a `STATUS=` text drover keeps (and logs); the rest is
/// replaced by a note of how much was dropped.
pub const MAX_STATUS: usize = 256;

/// Parses one datagram: newline-separated `KEY=VALUE` assignments.
pub fn parse(datagram: &[u8]) -> Vec<Message> {
    String::from_utf8_lossy(datagram)
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(|line| match line.split_once('=') {
            Some(("READY", "1")) => Message::Ready,
            Some(("STOPPING", "1")) => Message::Stopping,
            Some(("RELOADING", "1")) => Message::Reloading,
            Some(("WATCHDOG", "1")) => Message::Watchdog,
            Some(("STATUS", text)) => Message::Status(loggable(text, MAX_STATUS)),
            Some(("EXTEND_TIMEOUT_USEC", n)) => match n.parse() {
                Ok(us) => Message::ExtendTimeout(Duration::from_micros(us)),
                Err(_) => Message::Other(loggable(line, MAX_STATUS)),
            },
            _ => Message::Other(loggable(line, MAX_STATUS)),
        })
        .collect()
}

/// `text` made safe for a log line: control characters (a terminal escape,
/// a carriage return) replaced, and cut at `max` bytes with a note of what
/// was dropped.
pub fn loggable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for (i, c) in text.char_indices() {
        let c = if c.is_control() { '\u{fffd}' } else { c };
        if out.len() + c.len_utf8() > max {
            out.push_str(&format!("... ({} more bytes dropped)", text.len() - i));
            break;
        }
        out.push(c);
    }
    out
}

/// A new `drover-XXXXXX` directory in memory where one can be had: under
/// `$XDG_RUNTIME_DIR` (a tmpfs where systemd sets it), else under
/// `/dev/shm`, and only else in the temp directory. The scoreboard goes
/// there too, a shared mapping the workers write at every request: on a
/// disk (`/tmp` often is one) its pages are written back there for nothing,
/// and drover's exit, which removes and unmaps it, may wait for that
/// writeback behind whatever else the disk is writing: the one wait for a
/// disk between drover's last log line and its exit.
fn private_dir() -> io::Result<tempfile::TempDir> {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir());
    let make = |base: &Path| tempfile::Builder::new().prefix("drover-").tempdir_in(base);
    for base in runtime
        .iter()
        .map(PathBuf::as_path)
        .chain([Path::new("/dev/shm")])
    {
        if let Ok(dir) = make(base) {
            return Ok(dir);
        }
    }
    make(&std::env::temp_dir())
}

/// The master's end: a bound socket in a 0700 directory removed on drop.
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
    /// Datagrams refused for their size.
    oversized: std::cell::Cell<u64>,
    /// The most datagrams its queue holds (see [`NotifySocket::queue_bound`]).
    queue_bound: usize,
}

impl NotifySocket {
    /// Creates the socket under `$XDG_RUNTIME_DIR`, else under `/dev/shm`,
    /// else in the temp directory (see `private_dir`). With `owner`, the
    /// directory and socket belong to the workers' user so that they, and no
    /// other user, can reach it.
    pub fn open(owner: Option<(u32, u32)>) -> io::Result<NotifySocket> {
        let dir = private_dir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path)?;
        sock.set_nonblocking(true)?;
        setsockopt(&sock, sockopt::PassCred, &true)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        Ok(NotifySocket {
            sock,
            path,
            _dir: dir,
            oversized: Default::default(),
            queue_bound: queue_bound(),
        })
    }

    /// The private directory the socket is in (0700, the workers' user's):
    /// the scoreboard goes there too.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// The most datagrams its queue can hold at once: reading that many
    /// reaches every datagram queued now, however fast senders add more
    /// behind them.
    pub fn queue_bound(&self) -> usize {
        self.queue_bound
    }

    /// The value of `NOTIFY_SOCKET` for workers.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next datagram and its sender's pid, or `None` when there is none.
    /// A datagram over [`MAX_DATAGRAM`] bytes yields no message and a warning.
    pub fn recv(&self) -> Option<(Pid, Vec<Message>)> {
        loop {
            let mut buf = [0u8; MAX_DATAGRAM];
            let mut iov = [IoSliceMut::new(&mut buf)];
            // Room for the credentials only: descriptors sent along
            // (FDSTORE=1) do not fit, and the kernel closes them
            // (MSG_CTRUNC), so a sender cannot use up our descriptors.
            let mut cmsg = nix::cmsg_space!(UnixCredentials);
            // MSG_TRUNC: the datagram's real length, even when cut.
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_TRUNC;
            let (bytes, pid) =
                match recvmsg::<()>(self.sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                    Ok(msg) => {
                        let mut pid = None;
                        for c in msg.cmsgs().into_iter().flatten() {
                            match c {
                                ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
                                ControlMessageOwned::ScmRights(fds) => {
                                    fds.into_iter().for_each(|fd| {
                                        // SAFETY: the kernel just gave us these descriptors.
                                        drop(unsafe { OwnedFd::from_raw_fd(fd) })
                                    })
                                }
                                _ => {}
                            }
                        }
                        (msg.bytes, pid)
                    }
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return None,
                };
            let Some(pid) = pid else { continue };
            let pid = Pid::from_raw(pid);
            if bytes > MAX_DATAGRAM {
                self.oversized(pid, bytes);
                return Some((pid, Vec::new()));
            }
            return Some((pid, parse(&buf[..bytes])));
        }
    }

    /// Says that a datagram was refused, for the first few and then for
    /// every power of two, so that a flood does not flood the log.
    fn oversized(&self, pid: Pid, bytes: usize) {
        let n = self.oversized.get() + 1;
        self.oversized.set(n);
        if n <= 8 || n.is_power_of_two() {
            tracing::warn!(
                "notify datagram of {bytes} bytes from pid {pid} ignored whole: \
                 over the {MAX_DATAGRAM}-byte limit ({n} so far)"
            );
        }
    }
}

impl AsFd for NotifySocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// The kernel queues at most `net.unix.max_dgram_qlen` datagrams on a
/// datagram socket (read when it is created), plus one: senders check the
/// length without a lock, so a few racing ones may add one each; the
/// margin covers them. 512 (systemd's setting) if it cannot be read.
fn queue_bound() -> usize {
    let qlen = std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(512);
    qlen.saturating_mul(2).saturating_add(64)
}

/// Whether `pid` is `ancestor` or one of its descendants, by walking the
/// parent chain in /proc (bounded, since a pid can be reused mid-walk).
pub fn descends_from(pid: Pid, is_ancestor: impl Fn(Pid) -> bool) -> Option<Pid> {
    let mut cur = pid;
    for _ in 0..64 {
        if is_ancestor(cur) {
            return Some(cur);
        }
        let stat = std::fs::read_to_string(format!("/proc/{cur}/stat")).ok()?;
        // The command name may contain spaces and parentheses: parse after the last ')'.
        let after = &stat[stat.rfind(')')? + 2..];
        let ppid: i32 = after.split(' ').nth(1)?.parse().ok()?;
        if ppid <= 1 {
            return None;
        }
        cur = Pid::from_raw(ppid);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_messages_the_master_acts_on() {
        let m =
            parse(b"READY=1\nSTATUS=serving 3 clients\nEXTEND_TIMEOUT_USEC=2500000\nMAINPID=7\n");
        assert_eq!(
            m,
            vec![
                Message::Ready,
                Message::Status("serving 3 clients".into()),
                Message::ExtendTimeout(Duration::from_millis(2500)),
                Message::Other("MAINPID=7".into()),
            ]
        );
        assert_eq!(parse(b"READY=0"), vec![Message::Other("READY=0".into())]);
    }

    #[test]
    fn datagrams_carry_the_sender_pid() {
        let n = NotifySocket::open(None).unwrap();
        let c = UnixDatagram::unbound().unwrap();
        c.send_to(b"READY=1\nSTATUS=hi", n.path()).unwrap();
        let (pid, msgs) = n.recv().unwrap();
        assert_eq!(pid.as_raw() as u32, std::process::id());
        assert_eq!(msgs, vec![Message::Ready, Message::Status("hi".into())]);
        assert!(n.recv().is_none());
    }

    #[test]
    fn an_oversized_datagram_is_refused_whole_and_the_next_is_read() {
        let n = NotifySocket::open(None).unwrap();
        let c = UnixDatagram::unbound().unwrap();
        // The old code read 16384 bytes of this and lost its READY=1 silently.
        let long = format!("STATUS={}\nREADY=1", "x".repeat(20_000));
        c.send_to(long.as_bytes(), n.path()).unwrap();
        let fits = format!("STATUS={}\nREADY=1", "y".repeat(MAX_DATAGRAM - 16));
        c.send_to(fits.as_bytes(), n.path()).unwrap();
        assert_eq!(n.recv().unwrap().1, vec![]);
        let msgs = n.recv().unwrap().1;
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert_eq!(msgs[1], Message::Ready);
        assert!(n.recv().is_none());
    }

    #[test]
    fn status_text_is_cut_and_cleaned_for_the_log() {
        let m = parse(format!("STATUS={}", "é".repeat(300)).as_bytes());
        let Message::Status(text) = &m[0] else {
            panic!("{m:?}")
        };
        assert!(text.len() <= MAX_STATUS + 40, "{}", text.len());
        assert!(text.ends_with("... (344 more bytes dropped)"), "{text}");
        let m = parse(b"STATUS=a\x1b[2Jb\rc");
        assert_eq!(m, vec![Message::Status("a\u{fffd}[2Jb\u{fffd}c".into())]);
    }

    #[test]
    fn our_own_pid_descends_from_our_parent() {
        let me = Pid::this();
        let parent = nix::unistd::getppid();
        assert_eq!(descends_from(me, |p| p == parent), Some(parent));
        assert_eq!(descends_from(me, |_| false), None);
    }
}

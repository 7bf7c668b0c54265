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
            Some(("STATUS", text)) => Message::Status(text.to_string()),
            Some(("EXTEND_TIMEOUT_USEC", n)) => match n.parse() {
                Ok(us) => Message::ExtendTimeout(Duration::from_micros(us)),
                Err(_) => Message::Other(line.to_string()),
            },
            _ => Message::Other(line.to_string()),
        })
        .collect()
}

/// The master's end: a bound socket in a 0700 directory removed on drop.
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    /// Creates the socket under `$XDG_RUNTIME_DIR` (or the temp directory).
    /// With `owner`, the directory and socket belong to the workers' user so
    /// that they, and no other user, can reach it.
    pub fn open(owner: Option<(u32, u32)>) -> io::Result<NotifySocket> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("drover-")
            .tempdir_in(base)?;
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
        })
    }

    /// The private directory the socket is in (0700, the workers' user's):
    /// the scoreboard goes there too.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// The value of `NOTIFY_SOCKET` for workers.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next datagram and its sender's pid, or `None` when there is none.
    pub fn recv(&self) -> Option<(Pid, Vec<Message>)> {
        loop {
            // systemd accepts notify datagrams of up to 4 KiB of text, more
            // with file descriptors; STATUS lines stay far below this.
            let mut buf = [0u8; 16384];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!(UnixCredentials);
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
            let (bytes, pid) =
                match recvmsg::<()>(self.sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                    Ok(msg) => {
                        let mut pid = None;
                        for c in msg.cmsgs().into_iter().flatten() {
                            match c {
                                ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
                                // Descriptors (FDSTORE=1) are not kept: close them.
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
            return Some((Pid::from_raw(pid), parse(&buf[..bytes])));
        }
    }
}

impl AsFd for NotifySocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
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
    fn our_own_pid_descends_from_our_parent() {
        let me = Pid::this();
        let parent = nix::unistd::getppid();
        assert_eq!(descends_from(me, |p| p == parent), Some(parent));
        assert_eq!(descends_from(me, |_| false), None);
    }
}

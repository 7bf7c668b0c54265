//! Listening sockets passed with systemd socket activation.
//!
//! drover (like systemd) binds the sockets once, in the master, and hands them
//! to every worker as inherited file descriptors 3, 4, … with
//! `LISTEN_FDS=<count>`, `LISTEN_PID=<the worker's pid>` and
//! `LISTEN_FDNAMES=<name>:<name>…`. Workers never bind: that is what lets the
//! master restart, reload and upgrade them without refusing a connection.
//!
//! `LISTEN_PID` exists because environment variables are inherited: a worker
//! that runs a child process would otherwise let the child believe fds 3.. are
//! its listeners. So [`listeners`] refuses the sockets when `LISTEN_PID` is not
//! our pid, and once it has taken them it unsets the three variables and marks
//! the fds close-on-exec, so that nothing the worker starts later sees them.

use std::error::Error;
use std::fmt;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::log::log;

/// The first inherited listening fd (`SD_LISTEN_FDS_START` in libsystemd).
pub const LISTEN_FDS_START: RawFd = 3;

/// Name given to a socket when `LISTEN_FDNAMES` is not set (as libsystemd does).
pub const UNKNOWN_NAME: &str = "unknown";

/// Set once [`listeners`] has taken the fds, which are then ours alone.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why the inherited sockets cannot be used.
#[derive(Debug)]
pub enum ListenError {
    /// The activation variables are not set: the program was not started by
    /// drover or systemd. `missing` names the variables that are absent.
    NotActivated {
        /// The names of the variables that are not set.
        missing: Vec<&'static str>,
    },
    /// `LISTEN_PID` names another process (`expected`), not us (`actual`): the
    /// variables were inherited from a parent and the fds are not ours.
    WrongPid {
        /// The pid in `LISTEN_PID`.
        expected: u32,
        /// Our own pid.
        actual: u32,
    },
    /// [`listeners`] already took the sockets in this process.
    AlreadyTaken,
    /// A variable has a value that cannot be understood.
    Invalid {
        /// The variable's name.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An inherited fd is not an open socket.
    Socket {
        /// The descriptor number.
        fd: RawFd,
        /// What asking it for its socket type answered.
        error: io::Error,
    },
    /// An inherited fd is a socket this SDK cannot serve (not TCP or Unix stream).
    Unsupported {
        /// The descriptor number.
        fd: RawFd,
        /// What kind of socket it is.
        reason: String,
    },
    /// [`listeners_or_bind`] could not bind its development fallback address.
    Bind {
        /// The address given to [`listeners_or_bind`].
        addr: String,
        /// Why binding it failed.
        error: io::Error,
    },
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::NotActivated { missing } => write!(
                f,
                "no listening sockets were passed to this process ({} not set): \
                 it must run under drover (or systemd socket activation), \
                 which binds the sockets and passes them at fd 3 and up",
                missing.join(" and ")
            ),
            ListenError::WrongPid { expected, actual } => write!(
                f,
                "LISTEN_PID is {expected} but this process is {actual}: the sockets \
                 were passed to another process (inherited environment), refusing to use them"
            ),
            ListenError::AlreadyTaken => {
                write!(
                    f,
                    "the inherited listening sockets were already taken by this process"
                )
            }
            ListenError::Invalid { var, value, reason } => {
                write!(f, "invalid {var}={value:?}: {reason}")
            }
            ListenError::Socket { fd, error } => {
                write!(f, "inherited fd {fd} is not a usable socket: {error}")
            }
            ListenError::Unsupported { fd, reason } => {
                write!(f, "inherited fd {fd} is not supported: {reason}")
            }
            ListenError::Bind { addr, error } => {
                write!(f, "cannot bind fallback address {addr}: {error}")
            }
        }
    }
}

impl Error for ListenError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            ListenError::Socket { error, .. } | ListenError::Bind { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Checks the activation variables and returns one name per inherited fd
/// (fd `3 + i` has name `i`). Pure: takes the variables' values and our pid,
/// touches no fd, so that the rules can be tested without a process.
///
/// The rules are libsystemd's: `LISTEN_FDS` and `LISTEN_PID` must both be set,
/// `LISTEN_PID` must be our pid, and `LISTEN_FDNAMES`, when set, must have
/// exactly one colon-separated name per fd.
pub fn parse_activation(
    listen_fds: Option<&str>,
    listen_pid: Option<&str>,
    listen_fdnames: Option<&str>,
    our_pid: u32,
) -> Result<Vec<String>, ListenError> {
    let mut missing = Vec::new();
    if listen_fds.is_none() {
        missing.push("LISTEN_FDS");
    }
    if listen_pid.is_none() {
        missing.push("LISTEN_PID");
    }
    let (Some(fds), Some(pid)) = (listen_fds, listen_pid) else {
        return Err(ListenError::NotActivated { missing });
    };
    let invalid = |var, value: &str, reason: &str| ListenError::Invalid {
        var,
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let expected: u32 = pid
        .trim()
        .parse()
        .map_err(|_| invalid("LISTEN_PID", pid, "not a process id"))?;
    if expected != our_pid {
        return Err(ListenError::WrongPid {
            expected,
            actual: our_pid,
        });
    }
    let count: usize = fds
        .trim()
        .parse()
        .map_err(|_| invalid("LISTEN_FDS", fds, "not a number of file descriptors"))?;
    if count > (i32::MAX - LISTEN_FDS_START) as usize {
        return Err(invalid("LISTEN_FDS", fds, "too many file descriptors"));
    }
    match listen_fdnames {
        None => Ok(vec![UNKNOWN_NAME.to_owned(); count]),
        Some("") if count == 0 => Ok(Vec::new()),
        Some(names) => {
            let names: Vec<String> = names.split(':').map(str::to_owned).collect();
            if names.len() != count {
                return Err(invalid(
                    "LISTEN_FDNAMES",
                    listen_fdnames.unwrap_or_default(),
                    &format!("{} names for LISTEN_FDS={count}", names.len()),
                ));
            }
            Ok(names)
        }
    }
}

/// Takes the listening sockets passed by drover (or systemd).
///
/// On success the fds become close-on-exec and `LISTEN_FDS`, `LISTEN_PID` and
/// `LISTEN_FDNAMES` are removed from the environment, so that processes the
/// worker starts later do not take them again. Call it early in `main`,
/// before starting threads (changing the environment is not thread-safe with
/// respect to other threads reading it).
///
/// Errors: [`ListenError::NotActivated`] when the variables are missing (the
/// program was not started by drover), [`ListenError::WrongPid`] when they
/// belong to another process: in both cases, and any other, fd 3.. are left
/// alone. A worker should exit with status 3 ("cannot boot") on error.
pub fn listeners() -> Result<Vec<Listener>, ListenError> {
    if TAKEN.load(Ordering::SeqCst) {
        return Err(ListenError::AlreadyTaken);
    }
    let fds = env_var("LISTEN_FDS")?;
    let pid = env_var("LISTEN_PID")?;
    let names = env_var("LISTEN_FDNAMES")?;
    let names = parse_activation(
        fds.as_deref(),
        pid.as_deref(),
        names.as_deref(),
        std::process::id(),
    )?;
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ListenError::AlreadyTaken);
    }
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    take_fds(names)
}

/// Like [`listeners`], but when the program was not started by drover it binds
/// `fallback` (a TCP address such as `127.0.0.1:8000`) itself, so that the
/// worker can be run by hand during development. It says so on stderr.
/// A `LISTEN_PID` mismatch is still an error: those fds belong to someone else.
pub fn listeners_or_bind(fallback: &str) -> Result<Vec<Listener>, ListenError> {
    match listeners() {
        Err(ListenError::NotActivated { missing }) => {
            log!(
                "not started by drover ({} not set); binding {fallback} for development",
                missing.join(" and ")
            );
            let listener = TcpListener::bind(fallback).map_err(|error| ListenError::Bind {
                addr: fallback.to_owned(),
                error,
            })?;
            Ok(vec![Listener::Tcp(listener, "fallback".to_owned())])
        }
        other => other,
    }
}

fn env_var(name: &'static str) -> Result<Option<String>, ListenError> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(value)) => Err(ListenError::Invalid {
            var: name,
            value: value.to_string_lossy().into_owned(),
            reason: "not valid UTF-8".to_owned(),
        }),
    }
}

/// Wraps fds `3..3+names.len()` as listeners (the caller vouches that they are
/// ours: [`parse_activation`] said so).
pub(crate) fn take_fds(names: Vec<String>) -> Result<Vec<Listener>, ListenError> {
    let mut out = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let fd = LISTEN_FDS_START + i as RawFd;
        let kind = classify(fd)?;
        set_cloexec(fd).map_err(|error| ListenError::Socket { fd, error })?;
        // SAFETY: the fd is an open stream socket that nothing else in this
        // process owns (the activation protocol hands it to us alone).
        out.push(unsafe {
            match kind {
                Kind::Tcp => Listener::Tcp(TcpListener::from_raw_fd(fd), name),
                Kind::Unix => Listener::Unix(UnixListener::from_raw_fd(fd), name),
            }
        });
    }
    Ok(out)
}

enum Kind {
    Tcp,
    Unix,
}

/// Tells a TCP socket from a Unix one by its address family, and refuses
/// anything that is not a stream socket.
fn classify(fd: RawFd) -> Result<Kind, ListenError> {
    // SAFETY: plain syscalls on an integer fd with correctly sized out-buffers.
    unsafe {
        let mut addr: libc::sockaddr_storage = mem::zeroed();
        let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len) != 0 {
            return Err(ListenError::Socket {
                fd,
                error: io::Error::last_os_error(),
            });
        }
        let mut ty: libc::c_int = 0;
        let mut ty_len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            &mut ty as *mut _ as *mut libc::c_void,
            &mut ty_len,
        ) != 0
        {
            return Err(ListenError::Socket {
                fd,
                error: io::Error::last_os_error(),
            });
        }
        if ty != libc::SOCK_STREAM {
            return Err(ListenError::Unsupported {
                fd,
                reason: format!("socket type {ty} is not SOCK_STREAM"),
            });
        }
        match addr.ss_family as libc::c_int {
            libc::AF_INET | libc::AF_INET6 => Ok(Kind::Tcp),
            libc::AF_UNIX => Ok(Kind::Unix),
            family => Err(ListenError::Unsupported {
                fd,
                reason: format!("address family {family} is neither TCP nor Unix"),
            }),
        }
    }
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an integer fd.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One listening socket and its name (from `LISTEN_FDNAMES`, i.e. the name
/// given in drover's config; `"unknown"` when none was given).
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket (IPv4 or IPv6) and its name.
    Tcp(TcpListener, String),
    /// A Unix stream socket and its name.
    Unix(UnixListener, String),
}

impl Listener {
    /// The socket's name from `LISTEN_FDNAMES`.
    pub fn name(&self) -> &str {
        match self {
            Listener::Tcp(_, name) | Listener::Unix(_, name) => name,
        }
    }

    /// Accepts one connection. The new socket is close-on-exec and blocking
    /// (on Linux, accepted sockets do not inherit `O_NONBLOCK`).
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l, _) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    /// Sets `O_NONBLOCK`, as event loops and async runtimes need.
    ///
    /// Note: the flag belongs to the open socket, which every worker shares
    /// with the master, so it changes for all of them. Non-blocking is what
    /// pre-fork servers use (poll, then accept until `WouldBlock`) because
    /// another worker may take a connection between the poll and the accept.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l, _) => l.set_nonblocking(nonblocking),
            Listener::Unix(l, _) => l.set_nonblocking(nonblocking),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l, _) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

/// `tcp 127.0.0.1:8000 (web)`, `unix /run/app.sock (admin)`: for log lines.
impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Tcp(l, name) => match l.local_addr() {
                Ok(addr) => write!(f, "tcp {addr} ({name})"),
                Err(_) => write!(f, "tcp ? ({name})"),
            },
            Listener::Unix(l, name) => {
                let addr = l.local_addr().ok();
                match addr.as_ref().and_then(|a| a.as_pathname()) {
                    Some(path) => write!(f, "unix {} ({name})", path.display()),
                    None => write!(f, "unix {} ({name})", abstract_name(addr.as_ref())),
                }
            }
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_name(addr: Option<&std::os::unix::net::SocketAddr>) -> String {
    use std::os::linux::net::SocketAddrExt;
    match addr.and_then(|a| a.as_abstract_name()) {
        Some(name) => format!("@{}", String::from_utf8_lossy(name)),
        None => "(unnamed)".to_owned(),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_name(_addr: Option<&std::os::unix::net::SocketAddr>) -> String {
    "(unnamed)".to_owned()
}

/// An accepted connection on either kind of listener.
#[derive(Debug)]
pub enum Stream {
    /// Accepted on a [`Listener::Tcp`].
    Tcp(TcpStream),
    /// Accepted on a [`Listener::Unix`].
    Unix(UnixStream),
}

impl Stream {
    /// `TCP_NODELAY` for TCP (responses written in one call should leave at
    /// once); a no-op for Unix sockets, which have no Nagle algorithm.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(nodelay),
            Stream::Unix(_) => Ok(()),
        }
    }

    /// Non-blocking mode of this connection (`O_NONBLOCK`).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(nonblocking),
            Stream::Unix(s) => s.set_nonblocking(nonblocking),
        }
    }

    /// `SO_RCVTIMEO`: a blocking read fails with `WouldBlock` after `timeout`.
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    /// `SO_SNDTIMEO`: a blocking write fails with `WouldBlock` after `timeout`.
    pub fn set_write_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    /// Shuts down the read half, the write half or both (`shutdown(2)`).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// Another handle to the same connection (`dup(2)`).
    pub fn try_clone(&self) -> io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reading through a shared reference, as `&TcpStream` allows, so that one
/// thread can read while another writes.
impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
            Stream::Unix(s) => (&*s).write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_activated_names_missing_variables() {
        let err = parse_activation(None, None, None, 42).unwrap_err();
        match &err {
            ListenError::NotActivated { missing } => {
                assert_eq!(missing, &["LISTEN_FDS", "LISTEN_PID"])
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("drover"), "{text}");
        assert!(text.contains("LISTEN_FDS and LISTEN_PID"), "{text}");

        let err = parse_activation(Some("1"), None, None, 42).unwrap_err();
        assert!(
            matches!(err, ListenError::NotActivated { ref missing } if missing == &["LISTEN_PID"])
        );
    }

    #[test]
    fn wrong_pid_is_refused() {
        let err = parse_activation(Some("2"), Some("41"), Some("a:b"), 42).unwrap_err();
        assert!(
            matches!(
                err,
                ListenError::WrongPid {
                    expected: 41,
                    actual: 42
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("refusing"));
        let err = parse_activation(Some("2"), Some("x"), None, 42).unwrap_err();
        assert!(
            matches!(
                err,
                ListenError::Invalid {
                    var: "LISTEN_PID",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn fdnames_are_split_on_colons() {
        let names = parse_activation(Some("3"), Some("42"), Some("web:admin:"), 42).unwrap();
        assert_eq!(names, ["web", "admin", ""]);
        let names = parse_activation(Some("2"), Some("42"), None, 42).unwrap();
        assert_eq!(names, ["unknown", "unknown"]);
        let names = parse_activation(Some("0"), Some("42"), Some(""), 42).unwrap();
        assert!(names.is_empty());
        let names = parse_activation(Some("1"), Some("42"), Some(""), 42).unwrap();
        assert_eq!(names, [""]);
    }

    /// The whole path with real fds, in a child process started the way
    /// drover starts a worker: sockets at fd 3 and 4, `LISTEN_PID` = its pid
    /// (`sh` sets it to its own pid, `$$`, and then execs the test binary).
    #[test]
    fn takes_inherited_sockets() {
        if !crate::testutil::in_child("takes_inherited_sockets") {
            let dir = crate::notify::tests::temp_dir("listen");
            let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
            let unix = UnixListener::bind(dir.join("admin.sock")).unwrap();
            let exe = std::env::current_exe().unwrap();
            let mut cmd = crate::testutil::child_command("listen::tests::takes_inherited_sockets");
            let child_args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
            let envs: Vec<_> = cmd
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
                .collect();
            cmd = std::process::Command::new("/bin/sh");
            cmd.arg("-c")
                .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
                .arg(exe)
                .args(child_args);
            for (k, v) in envs {
                cmd.env(k, v.unwrap());
            }
            cmd.env("LISTEN_FDS", "2")
                .env("LISTEN_FDNAMES", "web:admin")
                .env("TEST_TCP_ADDR", tcp.local_addr().unwrap().to_string());
            let (t, u) = (tcp.as_raw_fd(), unix.as_raw_fd());
            // SAFETY: only fcntl/dup2 (async-signal-safe) between fork and exec.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(move || {
                    let t2 = libc::fcntl(t, libc::F_DUPFD_CLOEXEC, 100);
                    let u2 = libc::fcntl(u, libc::F_DUPFD_CLOEXEC, 100);
                    if t2 < 0 || u2 < 0 || libc::dup2(t2, 3) < 0 || libc::dup2(u2, 4) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            crate::testutil::check(cmd.output().unwrap());
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
        assert_eq!(
            std::env::var("LISTEN_PID").unwrap(),
            std::process::id().to_string()
        );
        let listeners = listeners().unwrap();
        assert_eq!(listeners.len(), 2);
        assert!(matches!(&listeners[0], Listener::Tcp(_, name) if name == "web"));
        assert!(matches!(&listeners[1], Listener::Unix(_, name) if name == "admin"));
        assert_eq!(listeners[1].name(), "admin");
        for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            assert!(std::env::var_os(var).is_none(), "{var} still set");
        }
        for fd in [3, 4] {
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert!(flags & libc::FD_CLOEXEC != 0, "fd {fd} not close-on-exec");
        }
        assert!(matches!(self::listeners(), Err(ListenError::AlreadyTaken)));
        assert!(
            listeners[0].to_string().starts_with("tcp 127.0.0.1:"),
            "{}",
            listeners[0]
        );
        assert!(
            listeners[1].to_string().ends_with("admin.sock (admin)"),
            "{}",
            listeners[1]
        );

        let addr = std::env::var("TEST_TCP_ADDR").unwrap();
        let mut client = TcpStream::connect(addr).unwrap();
        let mut conn = listeners[0].accept().unwrap();
        conn.set_nodelay(true).unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        (&conn).write_all(b"pong").unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[test]
    fn refuses_sockets_of_another_process() {
        if !crate::testutil::in_child("refuses_sockets_of_another_process") {
            crate::testutil::run_child(
                "listen::tests::refuses_sockets_of_another_process",
                &[("LISTEN_FDS", "1"), ("LISTEN_PID", "1")],
            );
            return;
        }
        let err = listeners().unwrap_err();
        assert!(
            matches!(err, ListenError::WrongPid { expected: 1, .. }),
            "{err:?}"
        );
        let err = listeners_or_bind("127.0.0.1:0").unwrap_err();
        assert!(matches!(err, ListenError::WrongPid { .. }), "{err:?}");
        assert_eq!(std::env::var("LISTEN_FDS").unwrap(), "1", "left alone");
    }

    #[test]
    fn falls_back_to_binding_when_not_activated() {
        if !crate::testutil::in_child("falls_back_to_binding_when_not_activated") {
            let mut cmd = crate::testutil::child_command(
                "listen::tests::falls_back_to_binding_when_not_activated",
            );
            cmd.env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
            crate::testutil::check(cmd.output().unwrap());
            return;
        }
        assert!(matches!(listeners(), Err(ListenError::NotActivated { .. })));
        let l = listeners_or_bind("127.0.0.1:0").unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].name(), "fallback");
    }

    #[test]
    fn fdnames_count_must_match() {
        let err = parse_activation(Some("2"), Some("42"), Some("web"), 42).unwrap_err();
        assert!(
            matches!(
                err,
                ListenError::Invalid {
                    var: "LISTEN_FDNAMES",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = parse_activation(Some("two"), Some("42"), None, 42).unwrap_err();
        assert!(
            matches!(
                err,
                ListenError::Invalid {
                    var: "LISTEN_FDS",
                    ..
                }
            ),
            "{err:?}"
        );
    }
}

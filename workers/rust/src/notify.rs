//! Messages to the master, with the systemd `sd_notify` protocol.
//!
//! The master tells each worker where to write in `$NOTIFY_SOCKET`: a Unix
//! datagram socket given as a filesystem path, or as `@name` for Linux's
//! abstract namespace. Each message is one datagram of `KEY=VALUE` lines, sent
//! from an unbound socket made at the first message and kept (a socket per
//! message, as `sd_notify` makes, fails with `EMFILE` once a flood of
//! connections took every descriptor, and a heartbeat that cannot be sent
//! gets a worker that still serves killed); the master learns which worker sent it from the
//! kernel-supplied credentials, so nothing identifies the sender in the text.
//! Because this is systemd's protocol, the same worker also works under
//! systemd (`Type=notify`) and with any library that speaks it.
//!
//! Without `NOTIFY_SOCKET` every function here is a no-op returning `Ok(false)`,
//! so a worker run by hand needs no special case.
//!
//! A send never waits for long: the receiver (drover's master, or systemd)
//! queues only a few datagrams (`net.unix.max_dgram_qlen`, 10), and a send to
//! a full queue waited for as long as it did not read, so that a stalled
//! master held a worker's stop at its `STOPPING=1` and an async runtime's
//! thread at a heartbeat. A periodic message (only `WATCHDOG=1` and
//! `STATUS=` lines, as drover's master treats its own) is dropped at once
//! when the queue is full; any other waits up to [`NOTIFY_WAIT`]. Both fail
//! with [`io::ErrorKind::WouldBlock`] then. `READY=1` alone waits until it is
//! taken: a worker whose `READY=1` is lost is killed at `boot_timeout`,
//! serving or not. The same rules as the Python SDK.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// How long a change of state (`READY=1`, `STOPPING=1`, ...) waits while the
/// receiver's queue is full before it fails.
pub const NOTIFY_WAIT: Duration = Duration::from_secs(1);

/// Sends `state` (e.g. `"READY=1"`, or several lines) to `$NOTIFY_SOCKET`.
///
/// Returns `Ok(false)` when `NOTIFY_SOCKET` is unset or empty (not supervised),
/// `Ok(true)` when the datagram was sent.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends one datagram to the socket named like `NOTIFY_SOCKET` (an absolute
/// path, or `@name` for the abstract namespace). The lower half of [`notify`],
/// for callers (and tests) that have the address at hand.
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let periodic = is_periodic(state);
    let made;
    let sender = match kept_sender(periodic) {
        Some(kept) => kept,
        None => {
            made = sender(periodic)?;
            &made
        }
    };
    // READY=1 waits for as long as the receiver does not read, as before
    // NOTIFY_WAIT: dropped, it got a worker that serves killed at
    // boot_timeout once the master ran again. Until it is taken the worker
    // does not count as booted, so waiting costs nothing.
    let mut sent = notify_from(sender, socket, state);
    while is_ready(state) && matches!(&sent, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
        sent = notify_from(sender, socket, state);
    }
    sent.map_err(|e| {
        if e.kind() != io::ErrorKind::WouldBlock {
            return e;
        }
        let what = state.replace('\n', " ");
        let why = if periodic {
            format!("the notify socket's queue is full (its receiver is not reading): {what} dropped")
        } else {
            format!(
                "the notify socket's queue stayed full for {:.1}s (its receiver is not reading): {what} not sent",
                NOTIFY_WAIT.as_secs_f64()
            )
        };
        io::Error::new(io::ErrorKind::WouldBlock, why)
    })
}

/// Only `WATCHDOG=1` and `STATUS=` lines: a message the next one replaces.
fn is_periodic(state: &str) -> bool {
    let mut lines = state.split('\n').filter(|l| !l.is_empty()).peekable();
    lines.peek().is_some() && lines.all(|l| l == "WATCHDOG=1" || l.starts_with("STATUS="))
}

/// A `READY=1` line: the one message a worker cannot do without.
fn is_ready(state: &str) -> bool {
    state.split('\n').any(|l| l == "READY=1")
}

/// A socket to send from: non-blocking for periodic messages, else one
/// whose sends wait at most [`NOTIFY_WAIT`] for room in the receiver's queue
/// (`SO_SNDTIMEO`, which a datagram send to a full Unix socket honours).
fn sender(periodic: bool) -> io::Result<UnixDatagram> {
    let sock = UnixDatagram::unbound()?;
    if periodic {
        sock.set_nonblocking(true)?;
    } else {
        sock.set_write_timeout(Some(NOTIFY_WAIT))?;
    }
    Ok(sock)
}

/// [`notify_to`] from a socket of the caller's: a non-blocking one fails
/// with `WouldBlock` instead of waiting while the receiver's queue is full
/// (drover's master, which must not stall on its service manager).
pub fn notify_from(sender: &UnixDatagram, socket: &OsStr, state: &str) -> io::Result<()> {
    let bytes = socket.as_bytes();
    let sent = match bytes.first() {
        Some(b'/') => sender.send_to(state.as_bytes(), socket)?,
        Some(b'@') => send_abstract(sender, &bytes[1..], state.as_bytes())?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "NOTIFY_SOCKET={:?} is neither an absolute path nor @abstract",
                    socket
                ),
            ))
        }
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!(
                "notify message truncated: sent {sent} of {} bytes",
                state.len()
            ),
        ));
    }
    Ok(())
}

/// The socket this process sends from (one for periodic messages, one for
/// the others: see [`sender`]; both made at its first message, so that a
/// heartbeat has its socket once descriptors run out). None in a child
/// forked since (it sends from a socket of its own, one per message) or when
/// no socket can be made.
fn kept_sender(periodic: bool) -> Option<&'static UnixDatagram> {
    type Kept = (u32, UnixDatagram, UnixDatagram);
    static SENDERS: std::sync::OnceLock<Option<Kept>> = std::sync::OnceLock::new();
    let (owner, periodic_sender, other_sender) = SENDERS
        .get_or_init(|| Some((std::process::id(), sender(true).ok()?, sender(false).ok()?)))
        .as_ref()?;
    (*owner == std::process::id()).then_some(if periodic {
        periodic_sender
    } else {
        other_sender
    })
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(sender: &UnixDatagram, name: &[u8], msg: &[u8]) -> io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sender.send_to_addr(msg, &addr)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_sender: &UnixDatagram, _name: &[u8], _msg: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract Unix sockets (NOTIFY_SOCKET=@…) exist only on Linux",
    ))
}

/// `READY=1`: the worker is accepting; the master counts it as booted (and,
/// during a reload, may now retire an old worker).
pub fn ready() -> io::Result<bool> {
    notify("READY=1")
}

/// `WATCHDOG=1`: "still alive". Send it at least every
/// [`watchdog_interval`] / 2 when the master configured a heartbeat timeout.
pub fn heartbeat() -> io::Result<bool> {
    notify("WATCHDOG=1")
}

/// `STATUS=<text>`: a one-line human-readable state, shown by the master.
/// Newlines would end the field, so they are replaced by spaces.
pub fn status(text: &str) -> io::Result<bool> {
    notify(&status_message(text))
}

/// `STOPPING=1`: the worker has stopped accepting and is draining.
pub fn stopping() -> io::Result<bool> {
    notify("STOPPING=1")
}

/// `EXTEND_TIMEOUT_USEC=…`: asks for `extra` more time for the current phase
/// (boot or drain) than the master's timeout allows.
pub fn extend_timeout(extra: Duration) -> io::Result<bool> {
    notify(&format!("EXTEND_TIMEOUT_USEC={}", extra.as_micros()))
}

fn status_message(text: &str) -> String {
    format!("STATUS={}", text.replace(['\n', '\r'], " "))
}

/// The heartbeat interval the master expects, from `WATCHDOG_USEC`, when it is
/// meant for us (`WATCHDOG_PID` unset or our pid). `None`: no heartbeat needed.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// The rules of [`watchdog_interval`] on explicit values (testable without env).
pub fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != our_pid {
            return None;
        }
    }
    match usec?.trim().parse::<u64>().ok()? {
        0 => None,
        usec => Some(Duration::from_micros(usec)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh private directory under the system temp dir (std only).
    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "drover-worker-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path() {
        let dir = temp_dir("notify");
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1").unwrap();
        assert_eq!(recv(&sock), "READY=1");
        notify_to(path.as_os_str(), &status_message("a\nb")).unwrap();
        assert_eq!(recv(&sock), "STATUS=a b");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("drover-worker-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "WATCHDOG=1").unwrap();
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }

    /// A worker whose descriptors a flood of connections took still sends
    /// its heartbeat (in a child process: it uses them all up).
    #[test]
    fn a_process_out_of_descriptors_still_notifies() {
        if !crate::testutil::in_child("a_process_out_of_descriptors_still_notifies") {
            let dir = temp_dir("notify-emfile");
            let path = dir.join("notify.sock");
            let sock = UnixDatagram::bind(&path).unwrap();
            crate::testutil::run_child(
                "notify::tests::a_process_out_of_descriptors_still_notifies",
                &[("NOTIFY_SOCKET", path.to_str().unwrap())],
            );
            assert_eq!([recv(&sock), recv(&sock)], ["READY=1", "WATCHDOG=1"]);
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
        assert!(ready().unwrap());
        // A low limit, so that using it up is quick.
        let limit = libc::rlimit {
            rlim_cur: 64,
            rlim_max: 64,
        };
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        let mut held = Vec::new();
        let err = loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => held.push(f),
                Err(e) => break e,
            }
        };
        assert_eq!(err.raw_os_error(), Some(libc::EMFILE));
        assert!(heartbeat().unwrap());
    }

    /// A receiver that does not read (a stalled master; its queue holds
    /// `net.unix.max_dgram_qlen` datagrams): a heartbeat or a status is
    /// dropped at once, a change of state waits up to NOTIFY_WAIT, and both
    /// say so. They waited for as long as it did not read. READY=1 alone
    /// still does.
    #[test]
    fn a_receiver_that_does_not_read_never_holds_the_sender() {
        let dir = temp_dir("notify-full");
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let filler = UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        while filler.send_to(b"STATUS=filler", &path).is_ok() {}
        // On the old code the first send below blocked: end the test then.
        let (done, finished) = std::sync::mpsc::channel();
        let target = path.clone();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            for (state, periodic) in [
                ("WATCHDOG=1", true),
                ("STATUS=busy", true),
                ("STOPPING=1", false),
            ] {
                let began = std::time::Instant::now();
                let e = notify_to(target.as_os_str(), state).unwrap_err();
                got.push((state, periodic, began.elapsed(), e));
            }
            done.send(got).unwrap();
        });
        let got = finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the sends end while the queue is full");
        for (state, periodic, took, e) in got {
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{state}: {e}");
            if periodic {
                assert!(took < Duration::from_millis(500), "{state}: {took:?}");
                assert!(e.to_string().ends_with(&format!("{state} dropped")), "{e}");
            } else {
                assert!(took >= Duration::from_millis(900), "{state}: {took:?}");
                assert!(e.to_string().ends_with(&format!("{state} not sent")), "{e}");
            }
        }
        // READY=1 waits past NOTIFY_WAIT until room comes: it was dropped,
        // and the worker killed at boot_timeout though it served.
        // Timed from before the spawn: the room comes NOTIFY_WAIT * 2 after
        // it, however late a loaded machine starts the thread.
        let target = path.clone();
        let began = std::time::Instant::now();
        let ready = std::thread::spawn(move || {
            notify_to(target.as_os_str(), "READY=1").map(|()| began.elapsed())
        });
        std::thread::sleep(NOTIFY_WAIT * 2);
        recv(&sock);
        let took = ready
            .join()
            .unwrap()
            .expect("READY=1 is sent once there is room");
        assert!(took >= NOTIFY_WAIT * 2, "{took:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn periodic_messages() {
        assert!(is_periodic("WATCHDOG=1"));
        assert!(is_periodic("STATUS=a\nWATCHDOG=1\n"));
        assert!(!is_periodic("WATCHDOG=1\nSTOPPING=1"));
        assert!(!is_periodic("READY=1"));
        assert!(!is_periodic(""));
    }

    #[test]
    fn relative_socket_is_rejected() {
        let err = notify_to(OsStr::new("relative.sock"), "READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn missing_receiver_is_an_error() {
        let dir = temp_dir("notify-gone");
        assert!(notify_to(dir.join("nobody").as_os_str(), "READY=1").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `notify()` and the helpers read `NOTIFY_SOCKET`: in a child process.
    #[test]
    fn helpers_send_to_notify_socket() {
        if !crate::testutil::in_child("helpers_send_to_notify_socket") {
            let dir = temp_dir("notify-env");
            let path = dir.join("notify.sock");
            let sock = UnixDatagram::bind(&path).unwrap();
            crate::testutil::run_child(
                "notify::tests::helpers_send_to_notify_socket",
                &[("NOTIFY_SOCKET", path.to_str().unwrap())],
            );
            let got: Vec<String> = (0..6).map(|_| recv(&sock)).collect();
            assert_eq!(
                got,
                [
                    "READY=1",
                    "WATCHDOG=1",
                    "STATUS=two lines",
                    "STOPPING=1",
                    "EXTEND_TIMEOUT_USEC=1500000",
                    "X=1\nY=2",
                ]
            );
            let mut cmd =
                crate::testutil::child_command("notify::tests::helpers_send_to_notify_socket");
            cmd.env_remove("NOTIFY_SOCKET").env("TEST_EXPECT_NOOP", "1");
            crate::testutil::check(cmd.output().unwrap());
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
        let sent = std::env::var_os("TEST_EXPECT_NOOP").is_none();
        assert_eq!(ready().unwrap(), sent);
        assert_eq!(heartbeat().unwrap(), sent);
        assert_eq!(status("two\nlines").unwrap(), sent);
        assert_eq!(stopping().unwrap(), sent);
        assert_eq!(extend_timeout(Duration::from_millis(1500)).unwrap(), sent);
        assert_eq!(notify("X=1\nY=2").unwrap(), sent);
    }

    #[test]
    fn watchdog_rules() {
        assert_eq!(
            parse_watchdog(Some("2000000"), None, 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_watchdog(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(parse_watchdog(Some("2000000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
    }
}

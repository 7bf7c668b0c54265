//! Socket I/O on raw descriptors: non-blocking sockets, waits bounded with
//! poll(2). Errors that end a connection are `Gone`.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Why a connection cannot go on.
#[derive(Debug)]
pub enum Gone {
    /// Closed by the client (EOF) or an error (reset...).
    Closed(String),
    /// No bytes (or no room to write) in time.
    Timeout(String),
}

impl Gone {
    pub fn text(&self) -> &str {
        match self {
            Gone::Closed(s) | Gone::Timeout(s) => s,
        }
    }
}

/// Waits until `fd` is ready for `events` (POLLIN/POLLOUT), at most `timeout`:
/// Ok(false) on a timeout.
pub fn wait(fd: RawFd, events: i16, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32
            + i32::from(!left.subsec_nanos().is_multiple_of(1_000_000));
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n > 0);
    }
}

/// Reads what is there into the spare room of `buf` (grown when short):
/// Ok(None) when nothing is there, Ok(Some(0)) at EOF.
pub fn recv_nowait(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(buf.len().max(16384));
    }
    let spare = buf.spare_capacity_mut();
    loop {
        let n = unsafe {
            libc::recv(
                fd,
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            unsafe { buf.set_len(buf.len() + n as usize) };
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Reads more bytes into `buf`, waiting at most `io_timeout` for them and
/// never past `until`: the number read (never 0), or why not.
pub fn recv_blocking(
    fd: RawFd,
    buf: &mut Vec<u8>,
    until: Option<Instant>,
    io_timeout: Duration,
) -> Result<usize, Gone> {
    loop {
        match recv_nowait(fd, buf) {
            Ok(Some(0)) => return Err(Gone::Closed("closed by the client".into())),
            Ok(Some(n)) => return Ok(n),
            Ok(None) => {}
            Err(e) => return Err(Gone::Closed(e.to_string())),
        }
        let mut wait_for = io_timeout;
        if let Some(until) = until {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Gone::Timeout("the request did not arrive in time".into()));
            }
            wait_for = wait_for.min(left);
        }
        match wait(fd, libc::POLLIN, wait_for) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Gone::Timeout(format!(
                    "no bytes from the client for {:.1}s",
                    wait_for.as_secs_f64()
                )))
            }
            Err(e) => return Err(Gone::Closed(e.to_string())),
        }
    }
}

/// Sends what the socket takes now: the number of bytes sent (0: none).
pub fn send_nowait(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    loop {
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

/// Writes all of `data`, waiting at most `io_timeout` at a time for room.
pub fn send_all(fd: RawFd, data: &[u8], io_timeout: Duration) -> Result<(), Gone> {
    send_all_counted(fd, data, io_timeout).1
}

/// `send_all`, with how many bytes of `data` went out (all, or those sent
/// before the error).
pub fn send_all_counted(fd: RawFd, data: &[u8], io_timeout: Duration) -> (usize, Result<(), Gone>) {
    let all = data.len();
    let mut data = data;
    let sent = |data: &[u8]| all - data.len();
    while !data.is_empty() {
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => match wait(fd, libc::POLLOUT, io_timeout) {
                    Ok(true) => continue,
                    Ok(false) => {
                        let why = "the client took no bytes for the I/O timeout";
                        return (sent(data), Err(Gone::Timeout(why.into())));
                    }
                    Err(e) => return (sent(data), Err(Gone::Closed(e.to_string()))),
                },
                _ => return (sent(data), Err(Gone::Closed(e.to_string()))),
            }
        }
        data = &data[n as usize..];
    }
    (all, Ok(()))
}

pub fn close(fd: RawFd) {
    unsafe { libc::close(fd) };
}

pub fn shutdown_write(fd: RawFd) -> bool {
    unsafe { libc::shutdown(fd, libc::SHUT_WR) == 0 }
}

/// Set once on a TCP listener: TCP_NODELAY, for every connection accepted
/// from it (Linux copies a listener's options to the sockets it accepts): a
/// response is one write, sent at once (no Nagle delay). The listener is
/// shared with the other workers, which want the same.
///
/// Not TCP_DEFER_ACCEPT, although it saved parking 63 % of wrk's
/// `Connection: close` connections once: a connection whose client has
/// connected but not yet sent its request is then not in the accept queue
/// but half-open in the kernel, and when the listeners close at a graceful
/// stop it is reset instead of taken from the queue and answered.
pub fn tune_listener(fd: RawFd) {
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Whether a socket filter is attached to listener `fd`: drover's stage 1
/// of a shutdown (docs/signals.md), after which no new connection gets in
/// but a handshake already under way may still complete.
pub fn filtered(fd: RawFd) -> bool {
    // With no room given, the kernel says only the filter's length.
    let mut len: libc::socklen_t = 0;
    let got = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_GET_FILTER,
            std::ptr::null_mut(),
            &mut len,
        )
    };
    got == 0 && len > 0
}

/// How many connections wait in listener `fd`'s accept queue, if the kernel
/// says: TCP_INFO on a TCP listener (its `tcpi_unacked` is the queue's
/// length), sock_diag (`UNIX_DIAG_RQLEN`) on a Unix one. None when it cannot
/// be asked (no `unix_diag` in the kernel, say).
pub fn queued(fd: RawFd, unix: bool) -> Option<u32> {
    if unix {
        return unix_queued(fd);
    }
    // struct tcp_info: eight one-byte fields, then u32 rto, ato, snd_mss,
    // rcv_mss, unacked (at 24).
    let mut info = [0u8; 32];
    let mut len = info.len() as libc::socklen_t;
    let got = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (got == 0 && len >= 28).then(|| u32::from_ne_bytes(info[24..28].try_into().unwrap()))
}

/// A Unix listener's queue through sock_diag, the socket named by its inode.
fn unix_queued(fd: RawFd) -> Option<u32> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const TCP_LISTEN: u32 = 10;
    const UDIAG_SHOW_RQLEN: u32 = 0x10;
    const UNIX_DIAG_RQLEN: u16 = 4;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    // struct nlmsghdr, then struct unix_diag_req.
    let mut req = Vec::with_capacity(40);
    req.extend(40u32.to_ne_bytes());
    req.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend((libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend([0u8; 8]); // sequence number, port id
    req.extend([libc::AF_UNIX as u8, 0, 0, 0]);
    req.extend((1u32 << TCP_LISTEN).to_ne_bytes());
    req.extend((st.st_ino as u32).to_ne_bytes());
    req.extend(UDIAG_SHOW_RQLEN.to_ne_bytes());
    req.extend([0xffu8; 8]); // no cookie: the inode names the socket
    let nl = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if nl < 0 {
        return None;
    }
    let mut reply = [0u8; 512];
    let n = unsafe {
        let sent = libc::send(nl, req.as_ptr().cast(), req.len(), 0);
        let n = if sent == req.len() as isize {
            // The kernel answers within the send: never wait here (the
            // caller is the stop).
            libc::recv(
                nl,
                reply.as_mut_ptr().cast(),
                reply.len(),
                libc::MSG_DONTWAIT,
            )
        } else {
            -1
        };
        libc::close(nl);
        n
    };
    if n < 16 + 16 || u16::from_ne_bytes([reply[4], reply[5]]) != SOCK_DIAG_BY_FAMILY {
        return None; // an error (NLMSG_ERROR), or no such listener
    }
    let end = (u32::from_ne_bytes(reply[..4].try_into().unwrap()) as usize).min(n as usize);
    // The attributes after struct unix_diag_msg, each 4-byte aligned.
    let mut at = 16 + 16;
    while at + 4 <= end {
        let len = u16::from_ne_bytes([reply[at], reply[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([reply[at + 2], reply[at + 3]]);
        if len < 4 || at + len > end {
            return None;
        }
        if kind == UNIX_DIAG_RQLEN && len >= 8 {
            return Some(u32::from_ne_bytes(
                reply[at + 4..at + 8].try_into().unwrap(),
            ));
        }
        at += (len + 3) & !3;
    }
    None
}

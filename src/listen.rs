//! Listening sockets: bound once by the master (or handed in by its parent)
//! and shared by every worker.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Mutex;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{Address, Bind, Settings};

/// One listening socket the master holds for its workers.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    /// The configured address it was opened for (`None`: inherited as is).
    pub address: Option<Address>,
    /// What it listens on, for logs (a port 0 bind shows the real port).
    pub shown: String,
    /// A Unix socket file we created and must remove: (path, device, inode).
    unix_file: RefCell<Option<(PathBuf, u64, u64)>>,
    /// A socket drover bound itself (not one a parent keeps a copy of).
    bound_here: Cell<bool>,
    /// Bound by the old master of an upgrade: ours once we have told it we
    /// are ready and it retires ([`Listener::take_over`]), not before (if we
    /// fail, it goes on serving the socket).
    from_old_master: Option<Bound>,
}

/// What the old master of an upgrade owned of a socket it hands over: it
/// bound the socket itself (systemd keeps no copy), and made this socket
/// file (device, inode), if any. Passed in `DROVER_UPGRADE_BOUND`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bound {
    file: Option<(u64, u64)>,
}

/// The environment variable in which an old master tells the new one which
/// of the `LISTEN_FDS` sockets it bound itself, one entry per socket in
/// order, `:`-separated: `-` (not bound here: systemd's, or `fd://N`),
/// `bound`, or `bound/DEV/INO` for a Unix socket whose file it made.
pub const UPGRADE_BOUND: &str = "DROVER_UPGRADE_BOUND";

impl Bound {
    fn parse(entry: &str) -> Option<Bound> {
        let mut parts = entry.split('/');
        if parts.next() != Some("bound") {
            return None;
        }
        let file = match (parts.next(), parts.next()) {
            (Some(dev), Some(ino)) => Some((dev.parse().ok()?, ino.parse().ok()?)),
            _ => None,
        };
        Some(Bound { file })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// `at`: where the bind was set (`drover.toml:2:8: `), when known;
    /// `hint`: what to do about the error, when drover can tell.
    #[error("{at}cannot listen on {addr}: {source}{hint}")]
    Bind {
        at: String,
        addr: String,
        source: io::Error,
        hint: String,
    },
    #[error("cannot listen on {addr}: {why}")]
    Refused { addr: String, why: String },
    #[error("LISTEN_FDS: {0}")]
    Inherited(String),
}

/// BPF (classic) for a TCP listener: the filter sees the TCP header at
/// offset 0; byte 13 holds the flags. A segment with SYN set is dropped
/// (a client never sends SYN with ACK to a listener); anything else passes.
const DROP_SYNS: [socket2::SockFilter; 4] = [
    socket2::SockFilter::new(0x30, 0, 0, 13), // BPF_LD|BPF_B|BPF_ABS: A = flags
    socket2::SockFilter::new(0x45, 0, 1, 0x02), // BPF_JMP|BPF_JSET|BPF_K: SYN?
    socket2::SockFilter::new(0x06, 0, 0, 0),  // BPF_RET|BPF_K: drop
    socket2::SockFilter::new(0x06, 0, 0, u32::MAX), // BPF_RET|BPF_K: accept
];

/// BPF for any other listener: drop everything.
const DROP_ALL: [socket2::SockFilter; 1] = [socket2::SockFilter::new(0x06, 0, 0, 0)];

/// Says at start-up, once, when stage 1 will not be able to attach its
/// filter to a TCP socket: on kernels that require `CAP_NET_ADMIN` for it,
/// in a master that will not have it then (it has none now, or it gives up
/// root with `master_as_user`). See docs/signals.md.
fn warn_if_stage_one_is_unprivileged(s: &Settings) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let switching = s.master_as_user && s.user.is_some();
        if (switching || !has_net_admin()) && filter_needs_net_admin() {
            tracing::warn!(
                "this kernel lets only CAP_NET_ADMIN attach a socket filter to a TCP socket, \
                 and drover will not have it at shutdown: stage 1 will cut the listen backlog \
                 to its minimum instead of refusing new connections, and one at a time can \
                 still get in (docs/signals.md, \"Stage 1 without privileges\")"
            );
        }
    });
}

const CAP_NET_ADMIN: u32 = 12;

/// The capability header and sets of capget(2)/capset(2), version 3.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capabilities() -> Option<[CapData; 2]> {
    let mut head = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a valid header and room for two sets (version 3).
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut head, data.as_mut_ptr()) };
    (r == 0).then_some(data)
}

fn set_capabilities(data: &[CapData; 2]) -> bool {
    let mut head = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    // SAFETY: capset of this thread with a valid header and two sets.
    unsafe { libc::syscall(libc::SYS_capset, &mut head, data.as_ptr()) == 0 }
}

fn has_net_admin() -> bool {
    capabilities().is_some_and(|c| c[0].effective & (1 << CAP_NET_ADMIN) != 0)
}

/// Whether attaching a filter to a TCP socket fails without
/// `CAP_NET_ADMIN`: tried on a throwaway socket, with the capability taken
/// out of the effective set for the moment if we have it.
fn filter_needs_net_admin() -> bool {
    let Some(caps) = capabilities() else {
        return false;
    };
    let mut without = caps;
    without[0].effective &= !(1 << CAP_NET_ADMIN);
    let dropped = caps[0].effective != without[0].effective;
    if dropped && !set_capabilities(&without) {
        return false;
    }
    let refused = Socket::new(Domain::IPV4, Type::STREAM, None).is_ok_and(|sock| {
        sock.attach_filter(&DROP_ALL)
            .is_err_and(|e| e.raw_os_error() == Some(libc::EPERM))
    });
    if dropped {
        set_capabilities(&caps);
    }
    refused
}

impl Listener {
    /// Closes our copy without touching the socket: for a socket another
    /// process (a newer drover) goes on serving.
    pub fn release(mut self) {
        *self.unix_file.get_mut() = None;
    }

    /// What a new master of an upgrade is to own of this socket once this
    /// master retires: its `DROVER_UPGRADE_BOUND` entry.
    pub fn handover_entry(&self) -> String {
        // Not yet taken over (an upgrade of a master still starting): what
        // the master before us owned.
        let file = match (&*self.unix_file.borrow(), self.from_old_master) {
            (Some((_, dev, ino)), _) => Some((*dev, *ino)),
            (None, Some(Bound { file })) => file,
            (None, None) => None,
        };
        match file {
            Some((dev, ino)) => format!("bound/{dev}/{ino}"),
            None if self.bound_here.get() || self.from_old_master.is_some() => "bound".into(),
            None => "-".into(),
        }
    }

    /// The old master of the upgrade that handed us this socket has been
    /// told we are ready, and retires: the socket is now ours as it was its,
    /// so our shutdown refuses new connections and removes its socket file
    /// as the old master's would have.
    pub fn take_over(&self) {
        let Some(bound) = self.from_old_master else {
            return;
        };
        self.bound_here.set(true);
        if let (Some((dev, ino)), Some(path)) = (bound.file, unix_path(self.fd.as_raw_fd())) {
            *self.unix_file.borrow_mut() = Some((path, dev, ino));
        }
    }

    /// Stops accepting for good: new connection attempts are refused, and the
    /// socket file is removed, while the connections already queued stay for
    /// the workers to take. The master's copy is closed; the socket itself
    /// closes when the last worker closes its copy.
    pub fn close(self) {
        if self.bound_here.get() {
            // Refuse new connections while the workers take what is queued,
            // with a BPF filter on the socket. For TCP it drops only SYNs: a
            // client then retransmits its SYN and gets "connection refused"
            // once the socket is closed. A handshake already under way (our
            // SYN-ACK sent) must still complete into the queue: its client
            // believes it is connected and sends its request, so dropping its
            // last ACK would leave it to be reset at the close. For a Unix
            // socket, which has no handshake, the filter drops everything.
            // Only for sockets bound here: a socket that systemd (or a newer
            // drover) keeps must go on accepting.
            let sock = socket2::SockRef::from(&self.fd);
            let tcp = matches!(
                sock.domain(),
                Ok(socket2::Domain::IPV4) | Ok(socket2::Domain::IPV6)
            );
            let filter = if tcp { &DROP_SYNS[..] } else { &DROP_ALL[..] };
            match sock.attach_filter(filter) {
                Ok(()) => {}
                // Some kernels let only CAP_NET_ADMIN attach a filter to a
                // TCP socket (docs/signals.md). The next best thing: a
                // backlog of 0, so that a SYN is dropped whenever a
                // connection waits in the queue, and at most one at a time
                // gets in while the workers close.
                Err(e) if tcp && e.raw_os_error() == Some(libc::EPERM) => {
                    // SAFETY: listen(2) on a socket we hold; on a listening
                    // socket it only changes the backlog.
                    let cut = unsafe { libc::listen(self.fd.as_raw_fd(), 0) } == 0;
                    tracing::warn!(
                        "{}: cannot refuse new connections before closing: {e} \
                         (a socket filter on TCP needs CAP_NET_ADMIN here); {}",
                        self.shown,
                        if cut {
                            "cut the listen backlog to its minimum instead: \
                             at most one new connection at a time can still get in"
                        } else {
                            "new connections can still get in until the workers close"
                        }
                    );
                }
                Err(e) => tracing::warn!(
                    "{}: cannot refuse new connections before closing: {e}",
                    self.shown
                ),
            }
        }
        // Dropping closes our copy and removes the socket file.
    }
}

impl Drop for Listener {
    /// A socket file we created goes with our copy of the socket (also when
    /// start-up fails after binding), unless another server replaced it.
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &*self.unix_file.get_mut() {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if m.dev() == *dev && m.ino() == *ino {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// A generation's listeners, shared with the other generation during a
/// reload, each with the name its workers see in `LISTEN_FDNAMES`.
pub type Set = Vec<(Rc<Listener>, String)>;

/// `TCP_LISTEN` of the kernel's TCP states (include/net/tcp_states.h).
const TCP_LISTEN: u8 = 10;

/// How many connections wait in the accept queues of the TCP sockets of
/// `set` (for a listening socket the kernel reports its queue length as
/// `tcpi_unacked`); Unix sockets do not say, and count 0.
pub fn queued(set: &Set) -> u32 {
    set.iter()
        .filter_map(|(l, _)| {
            // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes.
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            // SAFETY: a valid descriptor, and a buffer of `len` bytes.
            let r = unsafe {
                libc::getsockopt(
                    l.fd.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    (&mut info as *mut libc::tcp_info).cast(),
                    &mut len,
                )
            };
            (r == 0 && info.tcpi_state == TCP_LISTEN).then_some(info.tcpi_unacked)
        })
        .sum()
}

/// The sockets' inode numbers, as /proc/PID/fd shows them (`socket:[N]`).
pub fn inodes(set: &Set) -> Vec<u64> {
    set.iter()
        .filter_map(|(l, _)| nix::sys::stat::fstat(l.fd.as_fd()).ok())
        .map(|st| st.st_ino)
        .collect()
}

/// Whether process `pid`, or a process it started (a shell that runs the
/// server, a server's own workers), holds one of the sockets `inodes`
/// (whatever its descriptor number: a dup counts). `None` when /proc does
/// not tell (another user's process, or too many processes to look at).
pub fn held_by(pid: nix::unistd::Pid, inodes: &[u64]) -> Option<bool> {
    let mut todo = vec![pid.as_raw()];
    let mut looked = 0;
    while let Some(p) = todo.pop() {
        looked += 1;
        if looked > 64 {
            return None;
        }
        let fds = match std::fs::read_dir(format!("/proc/{p}/fd")) {
            Ok(fds) => fds,
            Err(_) if p == pid.as_raw() => return None,
            Err(_) => continue, // exited meanwhile
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if inode.is_some_and(|i| inodes.contains(&i)) {
                return Some(true);
            }
        }
        for task in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
    }
    Some(false)
}

/// A socket handed in by our parent, with the name it gave it.
pub struct Inherited {
    fd: OwnedFd,
    name: Option<String>,
    /// Handed in by an older drover during an upgrade (not a service manager).
    from_drover: bool,
    /// Bound by that older drover itself.
    bound: Option<Bound>,
}

impl Inherited {
    /// For logs: "fd 3 (127.0.0.1:8000, name \"web\")".
    fn describe(&self) -> String {
        let fd = self.fd.as_raw_fd();
        let addr = local_name(fd).unwrap_or_else(|| "not a named socket".into());
        match &self.name {
            Some(name) => format!("fd {fd} ({addr}, name {name:?})"),
            None => format!("fd {fd} ({addr})"),
        }
    }

    /// Whether `bind` (named `name` in `LISTEN_FDNAMES`) adopts this socket.
    fn matches(&self, bind: &Bind, name: &str) -> bool {
        let fd = self.fd.as_raw_fd();
        // Port 0 ("any free port") matches the socket of the same name that
        // an old drover bound for the same address.
        let same_name = self.name.as_deref() == Some(name);
        same_address(fd, &bind.address)
            || (same_name && any_port_matches(fd, &bind.address))
            // An old master passes its fd://N socket at another number (3,
            // 4, ...): the entry's name finds it, as for port 0.
            || (same_name && self.from_drover && matches!(bind.address, Address::Fd(_)))
    }
}

/// Takes the first of `inherited` that `bind` adopts.
fn take_match(inherited: &mut [Option<Inherited>], bind: &Bind, name: &str) -> Option<Inherited> {
    inherited
        .iter_mut()
        .find(|inh| inh.as_ref().is_some_and(|inh| inh.matches(bind, name)))
        .and_then(Option::take)
}

/// Why each inherited socket that no `bind` adopts is a problem, as a start
/// with these settings would find it (and `drover check` reports it). With no
/// `bind` configured, every inherited socket is served.
pub fn unmatched(
    settings: &Settings,
    bind_was_set: bool,
    inherited: Vec<Inherited>,
) -> Vec<String> {
    if !bind_was_set {
        return Vec::new();
    }
    let mut inherited: Vec<Option<Inherited>> = inherited.into_iter().map(Some).collect();
    for (i, bind) in settings.bind.iter().enumerate() {
        take_match(&mut inherited, bind, &bind.fd_name(i));
    }
    inherited
        .into_iter()
        .flatten()
        .map(|inh| unmatched_message(&inh))
        .collect()
}

fn unmatched_message(inh: &Inherited) -> String {
    if inh.from_drover {
        format!(
            "the socket {} that the old drover served matches no bind: closed \
             (it stays open until the old drover exits; a socket file it made is \
             removed once this drover is ready)",
            inh.describe()
        )
    } else {
        format!(
            "the activated socket {} matches no bind: drover closes it, and nothing \
             will accept its connections; add its address (or fd://N) to `bind`, \
             or remove it from the socket unit",
            inh.describe()
        )
    }
}

/// Opens the listeners `settings` asks for, reusing what is already open:
/// the `current` generation's sockets for unchanged addresses, and sockets
/// handed in with `LISTEN_FDS` (by systemd, or by a previous drover during an
/// upgrade) for the addresses they match. When no bind was configured
/// explicitly, the inherited sockets are all there is.
pub fn open_all(
    settings: &Settings,
    bind_was_set: bool,
    inherited: Vec<Inherited>,
    current: &Set,
) -> Result<Set, ListenError> {
    let mut inherited: Vec<Option<Inherited>> = inherited.into_iter().map(Some).collect();
    let mut out = Set::new();
    if !bind_was_set {
        if !inherited.is_empty() {
            for (i, inh) in inherited.into_iter().flatten().enumerate() {
                let l = adopt(inh.fd, None, inh.bound)?;
                let name = inh.name.unwrap_or_else(|| format!("inherited{i}"));
                tracing::info!("listening on {} (inherited, fd name {name:?})", l.shown);
                out.push((Rc::new(l), name));
            }
            return Ok(out);
        }
        if current.iter().any(|(l, _)| l.address.is_none()) {
            return Ok(current.clone());
        }
    }
    for (i, bind) in settings.bind.iter().enumerate() {
        let name = bind.fd_name(i);
        // Several port-0 entries share an address but not a socket: reuse
        // each current socket once, the one of the same name first.
        let unused: Vec<&(Rc<Listener>, String)> = current
            .iter()
            .filter(|(l, _)| l.address.as_ref() == Some(&bind.address))
            .filter(|(l, _)| !out.iter().any(|(o, _)| Rc::ptr_eq(o, l)))
            .collect();
        if let Some((l, _)) = unused.iter().find(|(_, n)| *n == name).or(unused.first()) {
            out.push((l.clone(), name));
            continue;
        }
        let (listener, how) = match take_match(&mut inherited, bind, &name) {
            Some(inh) => (
                adopt(inh.fd, Some(bind.address.clone()), inh.bound)?,
                "inherited, ",
            ),
            None => (open(bind, settings)?, ""),
        };
        tracing::info!("listening on {} ({how}fd name {name:?})", listener.shown);
        out.push((Rc::new(listener), name));
    }
    // Dropped (closed) below: a socket systemd activated for an address the
    // config no longer has would otherwise vanish without a word.
    for inh in inherited.into_iter().flatten() {
        if inh.from_drover {
            if let (
                Some(Bound {
                    file: Some((dev, ino)),
                }),
                Some(path),
            ) = (inh.bound, unix_path(inh.fd.as_raw_fd()))
            {
                LEFT_BY_OLD_MASTER
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((path, dev, ino));
            }
            tracing::warn!("{}", unmatched_message(&inh));
        } else {
            tracing::error!("{}", unmatched_message(&inh));
        }
    }
    Ok(out)
}

/// Socket files the old master of an upgrade made for binds our config no
/// longer has: (path, device, inode). It keeps them when it retires (they
/// are its successor's), so they are ours to remove, once we are ready.
static LEFT_BY_OLD_MASTER: Mutex<Vec<(PathBuf, u64, u64)>> = Mutex::new(Vec::new());

/// Removes the socket files of [`LEFT_BY_OLD_MASTER`] that are still the
/// ones it made: called when the old master retires (our `READY=1`).
pub fn remove_files_left_by_old_master() {
    let files = std::mem::take(&mut *LEFT_BY_OLD_MASTER.lock().unwrap_or_else(|e| e.into_inner()));
    for (path, dev, ino) in files {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.dev() == dev && m.ino() == ino) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Closes the sockets of `set` that no other generation holds; returns how
/// many. With `handover`, a newer master serves them: our copies are only
/// released (no filter, socket files kept).
pub fn close_unused(set: Set, handover: bool) -> usize {
    let mut closed = 0;
    for (l, _) in set {
        if let Ok(l) = Rc::try_unwrap(l) {
            if handover {
                l.release();
            } else {
                l.close();
            }
            closed += 1;
        }
    }
    closed
}

fn open(bind: &Bind, s: &Settings) -> Result<Listener, ListenError> {
    let shown = bind.address.to_string();
    let fail = |source: io::Error| ListenError::Bind {
        at: crate::config::located(&s.places.of("bind").cloned()),
        addr: shown.clone(),
        hint: bind_hint(&bind.address, &source),
        source,
    };
    match &bind.address {
        Address::Tcp(addr) => {
            let sock = tcp(*addr, s.ipv6_only, s.backlog.0 as i32).map_err(fail)?;
            warn_if_stage_one_is_unprivileged(s);
            let local = sock.local_addr().ok().and_then(|a| a.as_socket());
            Ok(Listener {
                shown: local.map_or(shown.clone(), |a| a.to_string()),
                fd: sock.into(),
                address: Some(bind.address.clone()),
                unix_file: RefCell::new(None),
                bound_here: Cell::new(true),
                from_old_master: None,
            })
        }
        Address::Unix(path) => {
            remove_stale(path).map_err(|why| ListenError::Refused {
                addr: shown.clone(),
                why,
            })?;
            let sock = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(fail)?;
            sock.bind(&SockAddr::unix(path).map_err(fail)?)
                .map_err(fail)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(s.unix_socket_mode.0))
                .map_err(fail)?;
            sock.listen(s.backlog.0 as i32).map_err(fail)?;
            let meta = std::fs::symlink_metadata(path).map_err(fail)?;
            Ok(Listener {
                fd: sock.into(),
                address: Some(bind.address.clone()),
                shown,
                unix_file: RefCell::new(Some((path.clone(), meta.dev(), meta.ino()))),
                bound_here: Cell::new(true),
                from_old_master: None,
            })
        }
        Address::Fd(n) => {
            let refused = |why: String| ListenError::Refused {
                addr: shown.clone(),
                why,
            };
            // Only a descriptor our parent handed us, and only once: any other
            // number may be one of drover's own descriptors (a socket it bound,
            // its signal pipe), and two owners would close it twice.
            handed_in(*n).map_err(refused)?;
            // Check through a borrow first: if fd N is not a listening socket,
            // it must not be closed.
            // SAFETY: open since start (checked just above); borrowed for the check.
            let borrowed = unsafe { BorrowedFd::borrow_raw(*n) };
            if !matches!(getsockopt(&borrowed, sockopt::AcceptConn), Ok(true)) {
                return Err(refused("not a listening socket".into()));
            }
            claim_handed_in(*n);
            // SAFETY: a listening socket handed to drover by its parent, which
            // nothing else in drover owns (claimed just above).
            adopt(
                unsafe { OwnedFd::from_raw_fd(*n) },
                Some(bind.address.clone()),
                None,
            )
        }
    }
}

/// The descriptors open when drover started (before it opened any), less
/// those taken as `LISTEN_FDS`; `fd://N` takes N out of it. `None` until
/// [`note_open_descriptors`] ran.
static HANDED_IN: Mutex<Option<HandedIn>> = Mutex::new(None);

#[derive(Debug)]
struct HandedIn {
    /// Open at start, not yet adopted.
    open: BTreeSet<RawFd>,
    /// Adopted by an `fd://N` (kept for a clearer error).
    claimed: BTreeSet<RawFd>,
}

/// Records the descriptors open right now as the ones drover's parent handed
/// in. Call it first thing, before drover opens anything (later calls keep
/// the first record).
pub fn note_open_descriptors() {
    let mut handed = HANDED_IN.lock().unwrap_or_else(|e| e.into_inner());
    if handed.is_none() {
        *handed = Some(HandedIn {
            open: open_descriptors(),
            claimed: BTreeSet::new(),
        });
    }
}

/// Whether `fd://n` may be adopted now, or why not.
fn handed_in(n: RawFd) -> Result<(), String> {
    let handed = HANDED_IN.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed
        .as_ref()
        .ok_or("drover did not record its inherited descriptors")?;
    if handed.claimed.contains(&n) {
        return Err(format!(
            "descriptor {n} was already taken by an earlier fd://{n} (a handed-in socket \
             can be adopted once; once closed, only a restart gets it back)"
        ));
    }
    if !handed.open.contains(&n) {
        return Err(format!(
            "descriptor {n} was not handed to drover when it started (fd://N names a \
             listening socket that drover's parent left open, not a LISTEN_FDS one)"
        ));
    }
    Ok(())
}

fn claim_handed_in(n: RawFd) {
    if let Some(h) = HANDED_IN.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        h.open.remove(&n);
        h.claimed.insert(n);
    }
}

/// The descriptors open in this process, from /proc/self/fd (or, without
/// /proc, by asking each number up to the limit).
fn open_descriptors() -> BTreeSet<RawFd> {
    let is_open = |fd: RawFd| {
        // SAFETY: F_GETFD only inspects the number.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        flags != -1
    };
    let listed: Option<Vec<RawFd>> = std::fs::read_dir("/proc/self/fd").ok().map(|dir| {
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    });
    match listed {
        // The listing's own descriptor is closed by now: is_open drops it.
        Some(fds) => fds.into_iter().filter(|fd| is_open(*fd)).collect(),
        None => {
            let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(1024, |(soft, _)| soft.min(65536) as RawFd);
            (0..limit).filter(|fd| is_open(*fd)).collect()
        }
    }
}

/// What an operator can do about a failed bind, after ": ".
fn bind_hint(address: &Address, e: &io::Error) -> String {
    let hint = match (address, e.raw_os_error()) {
        (Address::Tcp(a), Some(libc::EADDRINUSE)) => format!(
            "another socket listens on port {} (`ss -ltnp 'sport = :{}'` names its process)",
            a.port(),
            a.port()
        ),
        (Address::Tcp(a), Some(libc::EADDRNOTAVAIL)) => {
            format!("no interface of this machine has the address {}", a.ip())
        }
        (Address::Tcp(a), Some(libc::EACCES)) if a.port() < 1024 => format!(
            "port {} is below 1024: drover needs root or CAP_NET_BIND_SERVICE (systemd: \
             AmbientCapabilities=CAP_NET_BIND_SERVICE), or a port from 1024 up behind a proxy",
            a.port()
        ),
        (_, Some(libc::EMFILE)) => {
            return crate::spawn::limit_hint(nix::errno::Errno::EMFILE);
        }
        (Address::Unix(path), _) => match crate::hint::for_path(path, e) {
            hint if hint.is_empty() => return hint,
            hint => hint,
        },
        _ => return String::new(),
    };
    format!(": {hint}")
}

fn tcp(addr: SocketAddr, v6only: bool, backlog: i32) -> io::Result<Socket> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // Lets a restarted drover bind while old connections sit in TIME_WAIT.
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(v6only)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    Ok(sock)
}

/// A socket file left by a dead server is replaced; a live one is not. Only
/// "connection refused" proves nobody listens: any other failure to connect
/// (no permission on a socket of another user, a full backlog) may hide a
/// live server, so the file is left alone and drover refuses to start.
///
/// The connect does not wait: this runs on the master's loop too (a failed
/// upgrade binds the control socket again, a reload a new Unix listener),
/// and a blocking connect to a live server whose backlog is full waits until
/// that server accepts, which may be never.
pub(crate) fn remove_stale(path: &Path) -> Result<(), String> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(format!("{} exists and is not a socket", path.display()));
    }
    let in_use = || Err(format!("{} is in use by a running server", path.display()));
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None)
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(|e| format!("cannot check whether {} is in use: {e}", path.display()))?;
    let addr = SockAddr::unix(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match probe.connect(&addr) {
        Ok(()) => in_use(),
        // Its backlog is full: a server, alive, not keeping up.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => in_use(),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale {}: {e}", path.display())),
        // Removed meanwhile: nothing left to replace.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!(
            "{} exists and drover cannot tell whether a server uses it (connecting failed: \
             {e}); remove it if it is stale, or fix its permissions",
            path.display()
        )),
    }
}

/// Takes ownership of an already-open socket after checking it listens.
fn adopt(
    fd: OwnedFd,
    address: Option<Address>,
    from_old_master: Option<Bound>,
) -> Result<Listener, ListenError> {
    let raw = fd.as_raw_fd();
    let shown = local_name(raw).unwrap_or_else(|| format!("fd://{raw}"));
    let refused = |why: String| ListenError::Refused {
        addr: format!("fd://{raw}"),
        why,
    };
    match getsockopt(&fd, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err(refused("the socket is not listening".into())),
        Err(e) => return Err(refused(format!("not a socket ({e})"))),
    }
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| refused(format!("cannot set close-on-exec: {e}")))?;
    Ok(Listener {
        fd,
        address,
        shown,
        unix_file: RefCell::new(None),
        bound_here: Cell::new(false),
        from_old_master,
    })
}

fn local_name(fd: RawFd) -> Option<String> {
    // SAFETY: the descriptor is open for the duration of this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let addr = socket2::SockRef::from(&fd).local_addr().ok()?;
    if let Some(inet) = addr.as_socket() {
        return Some(inet.to_string());
    }
    Some(format!("unix:{}", addr.as_pathname()?.display()))
}

/// The path a Unix socket is bound to.
fn unix_path(fd: RawFd) -> Option<PathBuf> {
    // SAFETY: the descriptor is open for the duration of this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let addr = socket2::SockRef::from(&fd).local_addr().ok()?;
    addr.as_pathname().map(Path::to_path_buf)
}

fn any_port_matches(fd: RawFd, address: &Address) -> bool {
    let Address::Tcp(want) = address else {
        return false;
    };
    let local = local_name(fd).and_then(|n| n.parse::<SocketAddr>().ok());
    want.port() == 0 && local.is_some_and(|l| l.ip() == want.ip())
}

fn same_address(fd: RawFd, address: &Address) -> bool {
    match address {
        Address::Fd(n) => *n == fd,
        other => local_name(fd).is_some_and(|n| n == other.to_string()),
    }
}

/// The environment variable in which an old master passes its admin
/// endpoint's socket to the new one (the descriptor after the `LISTEN_FDS`).
pub const UPGRADE_ADMIN_FD: &str = "DROVER_UPGRADE_ADMIN_FD";

/// The admin endpoint's socket the old master of an upgrade passed on, owned
/// from here (close-on-exec: no worker inherits it). Call it after
/// [`take_inherited`].
pub fn take_upgrade_admin() -> Option<OwnedFd> {
    note_open_descriptors();
    let n = std::env::var(UPGRADE_ADMIN_FD).ok();
    std::env::remove_var(UPGRADE_ADMIN_FD);
    let n: RawFd = n?.parse().ok().filter(|n| *n >= 3)?;
    // Only a descriptor that was open at start and is no LISTEN_FDS socket.
    let mut handed = HANDED_IN.lock().unwrap_or_else(|e| e.into_inner());
    if !handed.as_mut()?.open.remove(&n) {
        return None;
    }
    // SAFETY: F_SETFD on a descriptor open since start (checked above).
    if unsafe { libc::fcntl(n, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: handed to us by the old master, owned by nothing else here.
    Some(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Sockets our parent handed us with the systemd convention, if they are
/// meant for this process (`LISTEN_PID` is our pid). The variables are
/// removed so workers never see our copies.
pub fn take_inherited() -> Result<Vec<Inherited>, ListenError> {
    // Usually done already, first thing in main: before the config was read.
    note_open_descriptors();
    let fds = std::env::var("LISTEN_FDS").ok();
    let pid = std::env::var("LISTEN_PID").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let bound = std::env::var(UPGRADE_BOUND).ok();
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", UPGRADE_BOUND] {
        std::env::remove_var(var);
    }
    let Some(fds) = fds else {
        return Ok(Vec::new());
    };
    let from_drover = std::env::var_os("DROVER_UPGRADE_FROM").is_some();
    if pid.as_deref() != Some(&std::process::id().to_string()) {
        // Meant for another process (we were exec'd by a program that did not
        // clean up): not ours to use.
        return Ok(Vec::new());
    }
    let n: RawFd = fds
        .parse()
        .map_err(|_| ListenError::Inherited(format!("{fds:?} is not a number")))?;
    let mut names = names
        .as_deref()
        .unwrap_or("")
        .split(':')
        .map(|n| (!n.is_empty()).then(|| n.to_string()));
    // Only an old drover's word counts (a service manager never says this).
    let mut bound = bound
        .as_deref()
        .filter(|_| from_drover)
        .unwrap_or("")
        .split(':')
        .map(Bound::parse);
    // Owned as inherited sockets from here: fd://N must not adopt them again
    // (fd://N of one of them is matched to it in `open_all` instead).
    if let Some(h) = HANDED_IN.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        h.open.retain(|fd| !(3..3 + n).contains(fd));
    }
    (3..3 + n)
        .map(|fd| {
            let name = names.next().flatten();
            let bound = bound.next().flatten();
            // Check before owning: closing a descriptor that is not open would
            // be a bug of ours, not the parent's.
            // SAFETY: F_GETFD/F_SETFD on a raw number only inspect/flag it.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(ListenError::Inherited(format!(
                    "fd {fd} of the {n} announced is unusable: {e}"
                )));
            }
            // SAFETY: systemd's convention hands these open descriptors to us.
            Ok(Inherited {
                fd: unsafe { OwnedFd::from_raw_fd(fd) },
                name,
                from_drover,
                bound,
            })
        })
        .collect()
}

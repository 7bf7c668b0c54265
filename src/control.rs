//! The control socket: the signals' operations with a synchronous,
//! machine-readable answer. A Unix socket (mode 0600) speaking JSON lines: one
//! request per connection, one answer, then the master closes it. A reload's
//! answer waits for its verdict.
//!
//! Request: `{"command": "status" | "reload" | "upgrade" | "ready"}`,
//! `{"command": "scale", "workers": N}`, `{"command": "stop", "quick": false}`.
//! Answer: `{"ok": bool, "message": "...", "status": {...}}` (status only for
//! `status`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use nix::poll::{PollFd, PollFlags};
use serde::{Deserialize, Serialize};

/// An operation asked for on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase", deny_unknown_fields)]
pub enum Command {
    Status,
    Reload,
    Scale {
        workers: u32,
    },
    Stop {
        #[serde(default)]
        quick: bool,
    },
    Upgrade,
    /// Whether drover should receive traffic (what `/readyz` answers).
    Ready,
    /// Stay connected and receive the event stream (see `crate::events`).
    Events,
}

/// The master's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

pub fn success(message: &str) -> Answer {
    Answer {
        ok: true,
        message: message.to_string(),
        status: None,
    }
}

pub fn failure(message: &str) -> Answer {
    Answer {
        ok: false,
        message: message.to_string(),
        status: None,
    }
}

impl Command {
    /// The fields each command takes besides `command`.
    fn fields(name: &str) -> Option<&'static [&'static str]> {
        Some(match name {
            "status" | "reload" | "upgrade" | "ready" | "events" => &[],
            "scale" => &["workers"],
            "stop" => &["quick"],
            _ => return None,
        })
    }

    /// Parses one request line strictly: a field the command does not take
    /// is an error for every command (`{"command":"reload","dry_run":true}`
    /// must not reload), as is an unknown command or a missing field.
    pub fn parse(line: &[u8]) -> Result<Command, String> {
        let Members(members) = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        let mut object = serde_json::Map::new();
        for (name, value) in members {
            if object.contains_key(&name) {
                return Err(format!("field `{name}` given twice"));
            }
            object.insert(name, value);
        }
        let name = match object.get("command") {
            Some(serde_json::Value::String(name)) => name.as_str(),
            Some(_) => return Err("`command` must be a string".into()),
            None => return Err("missing field `command`".into()),
        };
        let Some(fields) = Command::fields(name) else {
            return Err(format!(
                "unknown command {name:?}: expected status, reload, scale, stop, upgrade, \
                 ready or events"
            ));
        };
        if let Some(extra) = object
            .keys()
            .find(|k| *k != "command" && !fields.contains(&k.as_str()))
        {
            let expected = match fields {
                [] => "it takes no other field".to_string(),
                f => format!(
                    "it takes {}",
                    f.iter()
                        .map(|f| format!("`{f}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            return Err(format!(
                "unknown field `{extra}` for command \"{name}\": {expected}"
            ));
        }
        serde_json::from_value(serde_json::Value::Object(object)).map_err(|e| e.to_string())
    }
}

/// A request's members in the order sent. (serde_json's own map keeps the
/// last of two members of the same name, so `{"command":"status",
/// "command":"stop"}` stopped drover: `parse` refuses a repeated name.)
struct Members(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Members, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object like {\"command\": \"status\"}")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Identifies a connected client until it is answered.
pub type ClientId = u64;

/// The longest request line: a request is a few dozen bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// The most clients connected at once; one more is told so and closed.
pub const MAX_CLIENTS: usize = 64;
/// How long a client may take to send its request, and to take each part
/// of its answer, before it is dropped. A client waiting for a verdict (a
/// reload, an upgrade) has no limit: the master answers it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

enum Phase {
    /// Reading the request line.
    Asking,
    /// A complete request was read: waiting for the master's answer.
    Waiting,
    /// Sending the answer: `sent` bytes of `out` are gone.
    Answering { out: Vec<u8>, sent: usize },
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    phase: Phase,
    /// When it is dropped unless it makes progress (not while `Waiting`).
    deadline: Instant,
}

/// The master's end.
///
/// Nothing here blocks: requests are read and answers written as the
/// sockets allow, each client with its own buffer and deadline. A timer
/// descriptor among `poll_fds` wakes the loop for the nearest deadline.
pub struct ControlSocket {
    /// `None` while a new master (upgrade) holds the path.
    listener: Option<UnixListener>,
    path: PathBuf,
    clients: HashMap<ClientId, Client>,
    next_id: ClientId,
    /// A descriptor kept open to be given up when `accept` fails for want
    /// of descriptors: the pending client is then taken, told why and
    /// closed, instead of waking the loop again and again.
    spare: Option<File>,
    timer: OwnedFd,
    /// What the timer is set to.
    armed: Option<Instant>,
    /// Clients refused or dropped, for the log (one line per power of two).
    refused: u64,
}

impl ControlSocket {
    /// Binds `path` (a stale socket file is replaced, a live one refused),
    /// readable and writable by drover's user only.
    pub fn bind(path: &Path) -> io::Result<ControlSocket> {
        crate::listen::remove_stale(path).map_err(io::Error::other)?;
        // Created with no permission for others from the first instant.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener = bound.map_err(|e| crate::hint::at_path(path, e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(ControlSocket {
            listener: Some(listener),
            path: path.to_path_buf(),
            clients: HashMap::new(),
            next_id: 0,
            spare: File::open("/dev/null").ok(),
            timer: timerfd()?,
            armed: None,
            refused: 0,
        })
    }

    /// Stops listening and frees the path (for a new master), keeping the
    /// clients that wait for an answer.
    pub fn close_listener(&mut self) {
        if self.listener.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Listens again, on a freshly bound socket.
    pub fn take_listener(&mut self, mut fresh: ControlSocket) {
        self.listener = fresh.listener.take();
    }

    /// What to wait on: the listener, the clients still sending (readable) or being answered (writable),
    /// and the timer of the nearest client deadline.
    pub fn poll_fds(&self) -> Vec<PollFd<'_>> {
        // Past the cap too: a client over it is told so at once.
        let listener = self
            .listener
            .iter()
            .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN));
        let clients = self.clients.values().filter_map(|c| match c.phase {
            Phase::Asking => Some(PollFd::new(c.stream.as_fd(), PollFlags::POLLIN)),
            Phase::Answering { .. } => Some(PollFd::new(c.stream.as_fd(), PollFlags::POLLOUT)),
            Phase::Waiting => None,
        });
        let timer = self
            .armed
            .map(|_| PollFd::new(self.timer.as_fd(), PollFlags::POLLIN));
        listener.chain(clients).chain(timer).collect()
    }

    /// Accepts new clients, sends what answers the sockets take, drops the
    /// clients past their deadline, and returns every complete request. A
    /// malformed request is answered at once.
    pub fn read_requests(&mut self) -> Vec<(ClientId, Command)> {
        let now = Instant::now();
        if self.armed.is_some_and(|t| t <= now) {
            // The timer went off: set it afresh below.
            self.armed = None;
        }
        self.accept(now);
        let mut requests = Vec::new();
        let mut bad = Vec::new();
        let mut gone = Vec::new();
        for (&id, c) in self.clients.iter_mut() {
            match &c.phase {
                Phase::Asking => match read_line(c) {
                    Ok(None) if c.deadline <= now => {
                        debug!("control client {id}: no request in {IDLE_TIMEOUT:?}: dropped");
                        gone.push(id);
                    }
                    Ok(None) => {}
                    Ok(Some(Ok(cmd))) => {
                        c.phase = Phase::Waiting;
                        requests.push((id, cmd));
                    }
                    Ok(Some(Err(why))) => {
                        c.phase = Phase::Waiting;
                        bad.push((id, format!("bad request: {why}")));
                    }
                    Err(_) => gone.push(id),
                },
                Phase::Answering { .. } => match send(c, now) {
                    Ok(true) => gone.push(id),
                    Ok(false) if c.deadline <= now => {
                        if let Phase::Answering { out, sent } = &c.phase {
                            warn!(
                                "control client {id} did not read its answer for {IDLE_TIMEOUT:?}: \
                                 closed after {sent} of {} bytes",
                                out.len()
                            );
                        }
                        gone.push(id);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        debug!("control client {id} left before its whole answer: {e}");
                        gone.push(id);
                    }
                },
                Phase::Waiting => {}
            }
        }
        for id in gone {
            self.clients.remove(&id);
        }
        for (id, why) in bad {
            self.reply(id, &failure(&why));
        }
        self.arm();
        requests
    }

    /// Hands a client's connection over (an events subscriber): the control
    /// socket forgets it.
    pub fn take_client(&mut self, id: ClientId) -> Option<UnixStream> {
        self.clients.remove(&id).map(|c| c.stream)
    }

    /// Queues the answer and sends what the socket takes now; the rest goes
    /// out from the loop as the client reads. The connection is closed once
    /// the answer is sent.
    pub fn reply(&mut self, id: ClientId, answer: &Answer) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let mut out = serde_json::to_vec(answer).unwrap_or_default();
        out.push(b'\n');
        let now = Instant::now();
        c.phase = Phase::Answering { out, sent: 0 };
        c.deadline = now + IDLE_TIMEOUT;
        if !matches!(send(c, now), Ok(false)) {
            self.clients.remove(&id);
        }
        self.arm();
    }

    /// Takes every pending connection. Past the client cap, or out of
    /// descriptors, a client is told why and closed at once.
    fn accept(&mut self, now: Instant) {
        while let Some(listener) = &self.listener {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Give up the spare descriptor for this client, then take it back.
                    let Some(spare) = self.spare.take() else {
                        return;
                    };
                    drop(spare);
                    // (accept fails with EMFILE before it looks for a
                    // client: there may be none.)
                    let taken = listener.accept();
                    let refused = match taken {
                        Ok((stream, _)) => {
                            // Closed before the spare is taken back.
                            self.refuse(stream, "drover is out of file descriptors");
                            true
                        }
                        Err(_) => false,
                    };
                    self.spare = File::open("/dev/null").ok();
                    if refused && self.spare.is_some() {
                        continue;
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.clients.len() >= MAX_CLIENTS {
                self.refuse(
                    stream,
                    &format!("too many control clients ({MAX_CLIENTS}): try again"),
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.clients.insert(
                self.next_id,
                Client {
                    stream,
                    buf: Vec::new(),
                    phase: Phase::Asking,
                    deadline: now + IDLE_TIMEOUT,
                },
            );
            self.next_id += 1;
        }
    }

    /// Tells a client it cannot be served (as far as its socket takes it
    /// without waiting) and closes it.
    fn refuse(&mut self, stream: UnixStream, why: &str) {
        self.refused += 1;
        if self.refused.is_power_of_two() {
            warn!(
                "control socket: {why}: client refused ({} so far)",
                self.refused
            );
        }
        let _ = stream.set_nonblocking(true);
        let mut line = serde_json::to_vec(&failure(why)).unwrap_or_default();
        line.push(b'\n');
        let _ = (&stream).write(&line);
        discard_input(&stream);
    }

    /// Sets the timer to the nearest deadline of a client not waiting for
    /// the master.
    fn arm(&mut self) {
        let next = self
            .clients
            .values()
            .filter(|c| !matches!(c.phase, Phase::Waiting))
            .map(|c| c.deadline)
            .min();
        if next == self.armed {
            return;
        }
        self.armed = next;
        // Round up to the millisecond, and never 0 (which would disarm it).
        let after = next.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: a timer descriptor we own, and a valid itimerspec.
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        // Whatever expiry was pending is stale now.
        let mut ticks = [0u8; 8];
        let _ = nix::unistd::read(&self.timer, &mut ticks);
    }
}

/// Reads what the client sent, up to the request cap: `Some` once a line is
/// complete (ended by a newline or by the client's half-close) or the cap is
/// passed, `None` while more is to come.
fn read_line(c: &mut Client) -> io::Result<Option<Result<Command, String>>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = c.buf.iter().position(|b| *b == b'\n') {
            return Ok(Some(Command::parse(&c.buf[..end])));
        }
        if c.buf.len() > MAX_REQUEST {
            return Ok(Some(Err(format!(
                "no newline in the first {MAX_REQUEST} bytes"
            ))));
        }
        // Never more than one byte past the cap is kept.
        let room = (MAX_REQUEST + 1 - c.buf.len()).min(chunk.len());
        match c.stream.read(&mut chunk[..room]) {
            // A client that half-closes after its request (`printf ... |
            // nc -U -N`) has ended its line too; one that sent nothing left.
            Ok(0) if c.buf.iter().all(u8::is_ascii_whitespace) => {
                return Err(io::ErrorKind::UnexpectedEof.into())
            }
            Ok(0) => return Ok(Some(Command::parse(&c.buf))),
            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Reads and drops what the client already sent (up to the request cap):
/// closing a Unix socket with unread input resets it, and its client would
/// get an error instead of the end of the answer.
fn discard_input(mut stream: &UnixStream) {
    let mut chunk = [0u8; 4096];
    let mut left = MAX_REQUEST;
    while left > 0 {
        match stream.read(&mut chunk) {
            Ok(n) if n > 0 => left = left.saturating_sub(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

/// Sends what the socket takes of the answer: true once all of it is sent.
/// Progress moves the client's deadline.
fn send(c: &mut Client, now: Instant) -> io::Result<bool> {
    let Phase::Answering { out, sent } = &mut c.phase else {
        return Ok(false);
    };
    while *sent < out.len() {
        match (&c.stream).write(&out[*sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                *sent += n;
                c.deadline = now + IDLE_TIMEOUT;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn timerfd() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the descriptor is ours on success.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Drop for ControlSocket {
    /// Answers already given are sent out if the clients take them within
    /// a short bound (at shutdown, the answer to `stop` itself); the rest
    /// is said in the log, not lost silently.
    fn drop(&mut self) {
        self.close_listener();
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            let now = Instant::now();
            self.clients.retain(|_, c| {
                matches!(c.phase, Phase::Answering { .. }) && matches!(send(c, now), Ok(false))
            });
            if self.clients.is_empty() || now >= deadline {
                break;
            }
            let mut fds: Vec<PollFd> = self
                .clients
                .values()
                .map(|c| PollFd::new(c.stream.as_fd(), PollFlags::POLLOUT))
                .collect();
            let left = deadline.saturating_duration_since(now).as_millis() as u16;
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(left.max(1)));
        }
        if !self.clients.is_empty() {
            warn!(
                "control socket closed with {} answer(s) not fully read by their clients",
                self.clients.len()
            );
        }
    }
}

/// `drover ctl`: sends one command and prints the answer. Returns the exit
/// status: 0 when the operation succeeded, 1 when it failed (or the master
/// could not be reached).
pub fn ctl(path: &Path, command: &Command, json: bool, wait: Duration) -> u8 {
    match ask(path, command, wait) {
        Ok(answer) => {
            if json {
                println!("{}", serde_json::to_string(&answer).unwrap_or_default());
            } else {
                println!("{}", readable(&answer));
            }
            if answer.ok {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("drover ctl: {}: {e}", path.display());
            1
        }
    }
}

fn ask(path: &Path, command: &Command, wait: Duration) -> io::Result<Answer> {
    let mut stream = UnixStream::connect(path).map_err(unreachable)?;
    stream.set_read_timeout(Some(wait))?;
    let mut line = serde_json::to_vec(command)?;
    line.push(b'\n');
    // A master that refuses us (too many clients, out of descriptors) may
    // answer and close before it reads the request: its answer says why,
    // so read it even when the write or the end of the read fails.
    let sent = stream.write_all(&line);
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    if answer.is_empty() {
        sent?;
        read.map_err(|e| match e.kind() {
            // The read timeout: drover has not decided yet, and goes on.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no answer within {} (--timeout): drover goes on with the command; \
                     `drover ctl status` shows where it is",
                    humantime::format_duration(wait)
                ),
            ),
            _ => e,
        })?;
    }
    let answer = String::from_utf8_lossy(&answer);
    serde_json::from_str(answer.trim())
        .map_err(|e| io::Error::other(format!("unreadable answer {answer:?}: {e}")))
}

/// A failed connect, with what it most likely means for the person at the
/// terminal.
fn unreachable(e: io::Error) -> io::Error {
    let hint = match e.kind() {
        io::ErrorKind::NotFound => {
            "no socket there: is drover running, with control_socket set to this path? \
             (a drover that is shutting down removes it when its drain begins)"
        }
        io::ErrorKind::ConnectionRefused => {
            "nobody listens on it: drover is not running (the file is left from one that was \
             killed)"
        }
        io::ErrorKind::PermissionDenied => {
            "run ctl as the user drover runs as (the socket is mode 0600)"
        }
        _ => return e,
    };
    io::Error::new(e.kind(), format!("{e}: {hint}"))
}

/// The answer for a person: the message, and for `status` a table.
fn readable(a: &Answer) -> String {
    let mut out = format!("{}: {}", if a.ok { "ok" } else { "failed" }, a.message);
    let Some(status) = &a.status else { return out };
    let m = &status["master"];
    out.push_str(&format!(
        "\nmaster pid {} up {}s, generation {}, {} worker(s) wanted{}{}",
        m["pid"],
        m["uptime_s"],
        m["generation"],
        m["workers"],
        if m["paused"] == true { ", paused" } else { "" },
        match (m["reloading"] == true, m["prestop_left_ms"].as_u64()) {
            (_, Some(left)) => format!(", pre-stop: shutting down in {left} ms"),
            (true, None) => ", reloading".to_string(),
            (false, None) => String::new(),
        },
    ));
    out.push_str(&format!(
        "\n{:>4} {:>8} {:>4} {:>9} {:>9} {:>8} {:>8} {:>9}  status",
        "slot", "pid", "gen", "state", "uptime", "restarts", "recycles", "rss"
    ));
    // Width formatting applies to numbers and strings, not to JSON values.
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    for w in status["workers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n{:>4} {:>8} {:>4} {:>9} {:>8}s {:>8} {:>8} {:>6} MiB  {}",
            n(&w["slot"]),
            n(&w["pid"]),
            n(&w["generation"]),
            w["state"].as_str().unwrap_or("?"),
            n(&w["uptime_s"]),
            n(&w["restarts"]),
            n(&w["recycles"]),
            n(&w["rss_bytes"]) >> 20,
            w["status"].as_str().unwrap_or("")
        ));
    }
    // Preload templates: not workers (no slot, no request), one line each.
    for t in status["templates"].as_array().into_iter().flatten() {
        let state = t["state"].as_str().unwrap_or("?");
        let restarts = n(&t["restarts"]);
        out.push_str(&match t["pid"].as_u64() {
            Some(pid) => format!(
                "\ntemplate of generation {} (pid {pid}): {state}, up {}s, {restarts} restart(s), {} MiB",
                n(&t["generation"]),
                n(&t["uptime_s"]),
                n(&t["rss_bytes"]) >> 20,
            ),
            None => format!(
                "\ntemplate of generation {}: {state}, next start in {} ms, {restarts} restart(s)",
                n(&t["generation"]),
                n(&t["start_in_ms"]),
            ),
        });
    }
    for s in status["slots"].as_array().into_iter().flatten() {
        if s["degraded"] == true {
            let next = match s["respawn_in_ms"].as_u64() {
                Some(ms) => format!("next try in {ms} ms"),
                None => "its next worker is on trial".to_string(),
            };
            out.push_str(&format!(
                "\nslot {} is degraded: {} failures in a row, {next}",
                n(&s["slot"]),
                n(&s["failures_in_a_row"]),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let c = Command::parse(br#"{"command":"scale","workers":3}"#).unwrap();
        assert_eq!(c, Command::Scale { workers: 3 });
        let c = Command::parse(br#"{"command":"stop"}"#).unwrap();
        assert_eq!(c, Command::Stop { quick: false });
        assert_eq!(
            Command::parse(br#"{"command":"status"}"#),
            Ok(Command::Status)
        );
        for (line, why) in [
            (r#"{"command":"explode"}"#, "unknown command \"explode\""),
            (r#"{"command":"scale"}"#, "missing field `workers`"),
            // Ignored before: this one reloaded for real.
            (
                r#"{"command":"reload","dry_run":true}"#,
                "unknown field `dry_run` for command \"reload\": it takes no other field",
            ),
            (
                r#"{"command":"status","verbose":1}"#,
                "unknown field `verbose`",
            ),
            (r#"{"command":"upgrade","x":null}"#, "unknown field `x`"),
            (
                r#"{"command":"stop","quick":true,"now":true}"#,
                "unknown field `now` for command \"stop\": it takes `quick`",
            ),
            (
                r#"{"command":"scale","workers":2,"quick":true}"#,
                "unknown field `quick`",
            ),
            (r#"["status"]"#, "expected a JSON object"),
            (r#"{"command":7}"#, "`command` must be a string"),
            (r#"{"workers":7}"#, "missing field `command`"),
            (r#"{"command":"scale","workers":-1}"#, "invalid value"),
            // Stopped drover before: the last `command` won.
            (
                r#"{"command":"status","command":"stop"}"#,
                "field `command` given twice",
            ),
            (
                r#"{"command":"scale","workers":2,"workers":9}"#,
                "field `workers` given twice",
            ),
        ] {
            let e = Command::parse(line.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{line}: {e}");
        }
    }
}

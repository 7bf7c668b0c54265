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
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Identifies a connected client until it is answered.
pub type ClientId = u64;

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    /// A complete request was read: waiting for the master's answer.
    asked: bool,
}

/// The master's end.
pub struct ControlSocket {
    /// `None` while a new master (upgrade) holds the path.
    listener: Option<UnixListener>,
    path: PathBuf,
    clients: HashMap<ClientId, Client>,
    next_id: ClientId,
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
        let listener = bound?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(ControlSocket {
            listener: Some(listener),
            path: path.to_path_buf(),
            clients: HashMap::new(),
            next_id: 0,
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

    /// What to wait on: the listener and the clients still sending.
    pub fn poll_fds(&self) -> Vec<PollFd<'_>> {
        let clients = self
            .clients
            .values()
            .filter(|c| !c.asked)
            .map(|c| c.stream.as_fd());
        self.listener
            .iter()
            .map(|l| l.as_fd())
            .chain(clients)
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect()
    }

    /// Accepts new clients and returns every complete request. A malformed
    /// request is answered at once.
    pub fn read_requests(&mut self) -> Vec<(ClientId, Command)> {
        while let Some(Ok((stream, _))) = self.listener.as_ref().map(|l| l.accept()) {
            if stream.set_nonblocking(true).is_ok() {
                self.clients.insert(
                    self.next_id,
                    Client {
                        stream,
                        buf: Vec::new(),
                        asked: false,
                    },
                );
                self.next_id += 1;
            }
        }
        let mut requests = Vec::new();
        let mut bad = Vec::new();
        let mut gone = Vec::new();
        for (&id, c) in self.clients.iter_mut().filter(|(_, c)| !c.asked) {
            let mut chunk = [0u8; 1024];
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => {
                        gone.push(id);
                        break;
                    }
                    Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        gone.push(id);
                        break;
                    }
                }
            }
            if let Some(end) = c.buf.iter().position(|b| *b == b'\n') {
                c.asked = true;
                match serde_json::from_slice::<Command>(&c.buf[..end]) {
                    Ok(cmd) => requests.push((id, cmd)),
                    Err(e) => bad.push((id, format!("bad request: {e}"))),
                }
            } else if c.buf.len() > 64 * 1024 {
                c.asked = true;
                bad.push((id, "bad request: no newline in 64 KiB".into()));
            }
        }
        for id in gone {
            if self.clients.get(&id).is_some_and(|c| !c.asked) {
                self.clients.remove(&id);
            }
        }
        for (id, why) in bad {
            self.reply(id, &failure(&why));
        }
        requests
    }

    /// Hands a client's connection over (an events subscriber): the control
    /// socket forgets it.
    pub fn take_client(&mut self, id: ClientId) -> Option<UnixStream> {
        self.clients.remove(&id).map(|c| c.stream)
    }

    /// Sends the answer and closes the connection.
    pub fn reply(&mut self, id: ClientId, answer: &Answer) {
        let Some(c) = self.clients.remove(&id) else {
            return;
        };
        let mut line = serde_json::to_vec(answer).unwrap_or_default();
        line.push(b'\n');
        // Answers are small; a client that does not read them loses them
        // rather than blocking the master for long.
        let _ = c.stream.set_nonblocking(false);
        let _ = c.stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = (&c.stream).write_all(&line);
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.close_listener();
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
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(wait))?;
    let mut line = serde_json::to_vec(command)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    serde_json::from_str(answer.trim())
        .map_err(|e| io::Error::other(format!("unreadable answer {answer:?}: {e}")))
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
        "\n{:>4} {:>8} {:>4} {:>9} {:>9} {:>8} {:>9}  status",
        "slot", "pid", "gen", "state", "uptime", "restarts", "rss"
    ));
    // Width formatting applies to numbers and strings, not to JSON values.
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    for w in status["workers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n{:>4} {:>8} {:>4} {:>9} {:>8}s {:>8} {:>6} MiB  {}",
            n(&w["slot"]),
            n(&w["pid"]),
            n(&w["generation"]),
            w["state"].as_str().unwrap_or("?"),
            n(&w["uptime_s"]),
            n(&w["restarts"]),
            n(&w["rss_bytes"]) >> 20,
            w["status"].as_str().unwrap_or("")
        ));
    }
    for s in status["slots"].as_array().into_iter().flatten() {
        if s["degraded"] == true {
            out.push_str(&format!(
                "\nslot {} is degraded: {} failures in a row, next try in {} ms",
                n(&s["slot"]),
                n(&s["failures_in_a_row"]),
                n(&s["respawn_in_ms"])
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
        let c: Command = serde_json::from_str(r#"{"command":"scale","workers":3}"#).unwrap();
        assert_eq!(c, Command::Scale { workers: 3 });
        let c: Command = serde_json::from_str(r#"{"command":"stop"}"#).unwrap();
        assert_eq!(c, Command::Stop { quick: false });
        assert!(serde_json::from_str::<Command>(r#"{"command":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Command>(r#"{"command":"scale"}"#).is_err());
    }
}

//! A load of clients on kept-alive connections, as HTTP clients keep them:
//! each sends its next request on the connection its last response came on,
//! and opens a new one when the server closed it (sending again a request
//! that a closing connection left unanswered).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{wait_for, LIMIT};

/// What the clients of a [`KeepAliveLoad`] saw.
#[derive(Debug, Default)]
pub struct KeptOutcomes {
    /// 200 responses, complete.
    pub ok: u64,
    /// Of those, how many said `Connection: close` (the client then opens a
    /// new connection for its next request).
    pub announced_close: u64,
    /// Requests sent on a kept-alive connection that the server closed
    /// before answering a byte: an HTTP client sends such an idempotent
    /// request again on a new connection (RFC 9112, 9.3.1), and so do these.
    pub resent: u64,
    /// Connections refused.
    pub refused: u64,
    /// Anything else: a truncated or reset response, a timeout, a non-200.
    pub failed: Vec<String>,
}

/// `clients` threads, each sending `GET path` on one kept-alive connection
/// again and again (a new connection when the server closed it).
pub struct KeepAliveLoad {
    stop: Arc<AtomicBool>,
    /// Complete responses so far, across clients.
    pub answered: Arc<AtomicU64>,
    threads: Vec<JoinHandle<KeptOutcomes>>,
}

impl KeepAliveLoad {
    pub fn start(addr: SocketAddr, clients: usize, path: &str) -> KeepAliveLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, answered, path) = (stop.clone(), answered.clone(), path.to_string());
                std::thread::spawn(move || keep_alive_client(addr, &path, &stop, &answered))
            })
            .collect();
        KeepAliveLoad {
            stop,
            answered,
            threads,
        }
    }

    /// Waits until `n` responses in all have been answered.
    pub fn wait_answered(&self, n: u64) {
        wait_for(&format!("{n} answered requests"), LIMIT, || {
            (self.answered.load(Relaxed) >= n).then_some(())
        });
    }

    /// `more` responses more (after a reload: on the new generation
    /// alone), then the outcomes, printed.
    pub fn finish_after(self, more: u64) -> KeptOutcomes {
        self.wait_answered(self.answered.load(Relaxed) + more);
        let o = self.finish();
        eprintln!("outcomes: {o:?}");
        o
    }

    pub fn finish(self) -> KeptOutcomes {
        self.stop.store(true, Relaxed);
        let mut total = KeptOutcomes::default();
        for t in self.threads {
            let o = t.join().unwrap();
            total.ok += o.ok;
            total.announced_close += o.announced_close;
            total.resent += o.resent;
            total.refused += o.refused;
            total.failed.extend(o.failed);
        }
        total
    }
}

/// How one request on a kept-alive connection ended, short of a 200.
enum Miss {
    /// Closed or reset before a byte of the response.
    Unanswered(std::io::Error),
    Failed(String),
}

fn keep_alive_client(
    addr: SocketAddr,
    path: &str,
    stop: &AtomicBool,
    answered: &AtomicU64,
) -> KeptOutcomes {
    let mut o = KeptOutcomes::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut reused = false;
    while !stop.load(Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    reused = false;
                    conn.insert(BufReader::new(s))
                }
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    o.refused += 1;
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => {
                    o.failed.push(format!("connect: {e}"));
                    continue;
                }
            },
        };
        match exchange(c, path) {
            Ok(keep) => {
                o.ok += 1;
                answered.fetch_add(1, Relaxed);
                reused = keep;
                if !keep {
                    o.announced_close += 1;
                    conn = None;
                }
            }
            Err(Miss::Unanswered(_)) if reused => {
                o.resent += 1;
                conn = None;
            }
            Err(Miss::Unanswered(e)) => {
                o.failed
                    .push(format!("a new connection closed unanswered: {e}"));
                conn = None;
            }
            Err(Miss::Failed(why)) => {
                o.failed.push(why);
                conn = None;
            }
        }
    }
    o
}

/// One GET on `c`; Ok(whether the connection stays open) on a 200.
fn exchange(c: &mut BufReader<TcpStream>, path: &str) -> Result<bool, Miss> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: load\r\n\r\n");
    if let Err(e) = c.get_mut().write_all(request.as_bytes()) {
        return Err(Miss::Unanswered(e));
    }
    let mut status = String::new();
    match c.read_line(&mut status) {
        Ok(0) => return Err(Miss::Unanswered(ErrorKind::UnexpectedEof.into())),
        Err(e) if status.is_empty() && e.kind() != ErrorKind::WouldBlock => {
            return Err(Miss::Unanswered(e))
        }
        Err(e) => return Err(Miss::Failed(format!("status line: {e}"))),
        Ok(_) => {}
    }
    if !status.starts_with("HTTP/1.1 200 ") {
        return Err(Miss::Failed(format!("status line {status:?}")));
    }
    let (mut len, mut close) = (None, false);
    loop {
        let mut line = String::new();
        match c.read_line(&mut line) {
            Ok(0) => return Err(Miss::Failed("truncated head".into())),
            Err(e) => return Err(Miss::Failed(format!("head: {e}"))),
            Ok(_) => {}
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.trim().eq_ignore_ascii_case("close");
            }
        }
    }
    let len = len.ok_or_else(|| Miss::Failed("no Content-Length".into()))?;
    let mut body = vec![0u8; len];
    c.read_exact(&mut body)
        .map_err(|e| Miss::Failed(format!("body: {e}")))?;
    Ok(!close)
}

//! `loadgen`: a closed-loop HTTP/1.1 load generator for the reload scenario.
//!
//! wrk reports totals only; this one keeps every request (start time, latency,
//! outcome), so the harness can draw latency over time and classify failures.
//! Each of `--conns` threads opens a connection, sends one `GET` with
//! `Connection: close`, reads the whole response, and starts again, until
//! `--duration` has passed. Output: one JSON object on stdout.
//!
//! usage: loadgen --addr 127.0.0.1:8000 [--conns 50] [--duration 10]
//!                [--path /] [--bucket-ms 100]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok = 0,
    Refused = 1,
    Reset = 2,
    Truncated = 3,
    Status = 4,
    Timeout = 5,
    Other = 6,
}
const NAMES: [&str; 7] = ["ok", "refused", "reset", "truncated", "bad_status", "timeout", "other"];

/// One request: start offset from the run's start, latency, outcome.
#[derive(Clone, Copy)]
struct Rec {
    start_us: u64,
    lat_us: u64,
    outcome: Outcome,
}

fn one(addr: &SocketAddr, req: &[u8], buf: &mut Vec<u8>) -> Outcome {
    use std::io::ErrorKind::*;
    let mut s = match TcpStream::connect_timeout(addr, Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) => {
            return match e.kind() {
                ConnectionRefused => Outcome::Refused,
                TimedOut | WouldBlock => Outcome::Timeout,
                ConnectionReset => Outcome::Reset,
                _ => Outcome::Other,
            }
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_nodelay(true);
    buf.clear();
    let r = s.write_all(req).and_then(|_| s.read_to_end(buf));
    match r {
        Err(e) => match e.kind() {
            ConnectionReset | BrokenPipe | ConnectionAborted => Outcome::Reset,
            TimedOut | WouldBlock => Outcome::Timeout,
            _ => Outcome::Other,
        },
        Ok(_) => classify(buf),
    }
}

fn classify(raw: &[u8]) -> Outcome {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Outcome::Truncated;
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok());
    let body = raw.len() - end - 4;
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    if len.is_some_and(|n| n != body) {
        return Outcome::Truncated;
    }
    match status {
        Some(200) => Outcome::Ok,
        Some(_) => Outcome::Status,
        None => Outcome::Truncated,
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let mut addr = None;
    let (mut conns, mut duration, mut path, mut bucket_ms) = (50usize, 10.0f64, "/".to_string(), 100u64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--addr" => addr = Some(v().parse::<SocketAddr>().expect("--addr HOST:PORT")),
            "--conns" => conns = v().parse().expect("--conns N"),
            "--duration" => duration = v().parse().expect("--duration SECONDS"),
            "--path" => path = v(),
            "--bucket-ms" => bucket_ms = v().parse().expect("--bucket-ms N"),
            _ => panic!("unknown argument {a}"),
        }
    }
    let addr = addr.expect("--addr is required");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").into_bytes();
    let epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(duration);
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let req = req.clone();
            std::thread::spawn(move || {
                let mut recs = Vec::with_capacity(1 << 14);
                let mut buf = Vec::with_capacity(1024);
                loop {
                    let start = Instant::now();
                    if start >= end {
                        break;
                    }
                    let outcome = one(&addr, &req, &mut buf);
                    let done = Instant::now();
                    recs.push(Rec {
                        start_us: (start - t0).as_micros() as u64,
                        lat_us: (done - start).as_micros() as u64,
                        outcome,
                    });
                    if outcome == Outcome::Refused {
                        // Nothing listens: do not spin on refusals.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                recs
            })
        })
        .collect();
    let mut all: Vec<Rec> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let elapsed = t0.elapsed().as_secs_f64();
    all.sort_by_key(|r| r.start_us);

    let mut counts = [0u64; 7];
    for r in &all {
        counts[r.outcome as usize] += 1;
    }
    let mut ok_lat: Vec<u64> = all.iter().filter(|r| r.outcome == Outcome::Ok).map(|r| r.lat_us).collect();
    ok_lat.sort_unstable();
    let nb = ((duration * 1000.0) as u64).div_ceil(bucket_ms) as usize + 1;
    let mut buckets: Vec<(Vec<u64>, u64)> = vec![(Vec::new(), 0); nb];
    for r in &all {
        let b = ((r.start_us / 1000) / bucket_ms) as usize;
        let b = b.min(nb - 1);
        if r.outcome == Outcome::Ok {
            buckets[b].0.push(r.lat_us);
        } else {
            buckets[b].1 += 1;
        }
    }
    let mut out = String::new();
    out.push_str(&format!("{{\"epoch\": {epoch:.6}, \"elapsed_s\": {elapsed:.6}, \"conns\": {conns}, \"requests\": {}, ", all.len()));
    out.push_str("\"outcomes\": {");
    let parts: Vec<String> = NAMES.iter().zip(counts).map(|(n, c)| format!("\"{n}\": {c}")).collect();
    out.push_str(&parts.join(", "));
    out.push_str("}, ");
    out.push_str(&format!(
        "\"rps\": {:.1}, \"lat_us\": {{\"p50\": {}, \"p90\": {}, \"p99\": {}, \"max\": {}}}, ",
        counts[0] as f64 / elapsed,
        pct(&ok_lat, 0.50),
        pct(&ok_lat, 0.90),
        pct(&ok_lat, 0.99),
        ok_lat.last().copied().unwrap_or(0)
    ));
    out.push_str(&format!("\"bucket_ms\": {bucket_ms}, \"series\": ["));
    let series: Vec<String> = buckets
        .iter_mut()
        .enumerate()
        .map(|(i, (lat, errs))| {
            lat.sort_unstable();
            format!(
                "[{}, {}, {}, {}, {}, {}]",
                i as u64 * bucket_ms,
                lat.len(),
                errs,
                pct(lat, 0.5),
                pct(lat, 0.99),
                lat.last().copied().unwrap_or(0)
            )
        })
        .collect();
    out.push_str(&series.join(", "));
    out.push_str("]}\n");
    std::io::stdout().write_all(out.as_bytes()).unwrap();
}

//! Small pure helpers: the log line, the Date header, the answers the server
//! gives itself, and the request target as PEP 3333 wants it.

use std::borrow::Cow;
use std::cell::RefCell;
use std::io::Write;

/// One line on standard error, as drover_wsgi's Python `log()` writes it
/// (one write call, so that lines of several threads never interleave).
pub fn log(message: &str) {
    let line = format!("drover_wsgi[{}]: {}\n", std::process::id(), message);
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

thread_local! {
    static DATE: RefCell<(i64, String)> = const { RefCell::new((-1, String::new())) };
}

/// The Date header's value (RFC 9110 IMF-fixdate), formatted once a second per thread.
pub fn with_http_date<R>(f: impl FnOnce(&str) -> R) -> R {
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != now {
            cached.1 = format_date(now);
            cached.0 = now;
        }
        f(&cached.1)
    })
}

fn format_date(t: i64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::gmtime_r(&t, &mut tm) };
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[tm.tm_wday.rem_euclid(7) as usize],
        tm.tm_mday,
        MONTHS[tm.tm_mon.rem_euclid(12) as usize],
        tm.tm_year + 1900,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The reason phrase of the statuses the server answers itself (as http.py's REASONS).
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// A whole response for an error the server answers itself (then it closes):
/// the same bytes as http.py's `error_response`.
pub fn error_response(status: u16, detail: &str) -> Vec<u8> {
    let body = format!("{} {}: {}\n", status, reason(status), detail);
    let body = latin1(&body);
    let mut out = with_http_date(|date| {
        format!(
            "HTTP/1.1 {} {}\r\nDate: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            status,
            reason(status),
            date,
            body.len()
        )
        .into_bytes()
    });
    out.extend_from_slice(&body);
    out
}

/// The body bytes of an `error_response` (the access log's `b`).
pub fn error_body_size(response: &[u8]) -> usize {
    let head = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |i| i + 4);
    response.len() - head
}

/// `text` encoded as latin-1, with "?" for what latin-1 cannot hold (as
/// Python's encode("latin-1", "replace")).
pub fn latin1(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| if (c as u32) < 256 { c as u8 } else { b'?' })
        .collect()
}

/// PATH_INFO (percent-decoded, as bytes to be read as latin-1) and
/// QUERY_STRING of a request target, as http.py's `split_target`; the error
/// is the 400's detail.
pub fn split_target(target: &[u8]) -> Result<(Cow<'_, [u8]>, &[u8]), &'static str> {
    let mut target = target;
    if target.first() != Some(&b'/') {
        if target == b"*" {
            return Ok((Cow::Borrowed(b"*"), b""));
        }
        let scheme_end = find(target, b"://")
            .filter(|&i| i > 0)
            .ok_or("unsupported request target form")?;
        target = match target[scheme_end + 3..].iter().position(|&b| b == b'/') {
            Some(slash) => &target[scheme_end + 3 + slash..],
            None => b"/",
        };
    }
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (&target[..q], &target[q + 1..]),
        None => (target, &b""[..]),
    };
    let path = match path.iter().position(|&b| b == b'#') {
        Some(h) => &path[..h],
        None => path,
    };
    Ok((unquote(path), query))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// urllib.parse.unquote_to_bytes: %XX with two hex digits is the byte, any
/// other % stays as it is.
fn unquote(path: &[u8]) -> Cow<'_, [u8]> {
    if !path.contains(&b'%') {
        return Cow::Borrowed(path);
    }
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%' && i + 2 < path.len() {
            if let (Some(h), Some(l)) = (hex(path[i + 1]), hex(path[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(path[i]);
        i += 1;
    }
    Cow::Owned(out)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

//! The small part of HTTP/1.1 that the reference worker needs: parse a request
//! head, pick a route, build a response. Pure functions on byte slices, so that
//! they can be unit-tested without sockets.

use std::io::Write;

/// Largest request head (request line + headers) accepted; more is a 431.
pub const MAX_HEAD: usize = 16 * 1024;

/// Longest `/sleep` or `/cpu` accepted, so that a typo cannot pin a thread for days.
pub const MAX_MS: u64 = 3_600_000;

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Root,
    Sleep(u64),
    Cpu(u64),
    Crash,
    Hang,
    NotFound,
    BadQuery(String),
}

/// A parsed request head. The target is reduced to its route at once, so the
/// request borrows nothing from the connection's buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Bytes of the head, including the blank line that ends it.
    pub head_len: usize,
    /// Body length to consume before the next request.
    pub content_length: u64,
    /// HTTP/1.0 (default close) rather than HTTP/1.1 (default keep-alive).
    pub http10: bool,
    /// Whether the client allows another request on this connection.
    pub keep_alive: bool,
    /// HEAD: answer with the headers only.
    pub head_only: bool,
    pub route: Route,
}

/// Outcome of parsing the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// The head is not complete yet: read more (unless the buffer is full: 431).
    Incomplete,
    Complete(Request),
    /// Malformed: answer with this status and close.
    Error(u16),
}

/// Parses a request head at the start of `buf`. Empty lines before the request
/// line are skipped (RFC 9112 §2.2); lines may end in CRLF or bare LF.
pub fn parse(buf: &[u8]) -> Parse {
    let mut lines = Lines { buf, pos: 0 };
    let request_line = loop {
        match lines.next() {
            None => return Parse::Incomplete,
            Some(b"") => continue,
            Some(line) => break line,
        }
    };
    let mut header_lines = Vec::new();
    loop {
        match lines.next() {
            None => return Parse::Incomplete,
            Some(b"") => break,
            Some(line) => header_lines.push(line),
        }
    }
    let head_len = lines.pos;

    let Some((method, target, version)) = split_request_line(request_line) else {
        return Parse::Error(400);
    };
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        v if v.starts_with(b"HTTP/") => return Parse::Error(505),
        _ => return Parse::Error(400),
    };

    let mut content_length: Option<u64> = None;
    let mut close = false;
    let mut keep_alive_token = false;
    for line in header_lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Parse::Error(400);
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.is_empty() || !name.iter().all(|&b| is_token(b)) {
            return Parse::Error(400); // also rejects obsolete line folding
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let Some(n) = parse_u64(value) else {
                return Parse::Error(400);
            };
            if content_length.is_some_and(|old| old != n) {
                return Parse::Error(400);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Chunked bodies are not supported; guessing their framing would
            // desynchronise the connection, so refuse and close.
            return Parse::Error(501);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let keep_alive = !close && (!http10 || keep_alive_token);
    let Ok(target) = std::str::from_utf8(target) else {
        return Parse::Error(400);
    };
    Parse::Complete(Request {
        head_len,
        content_length: content_length.unwrap_or(0),
        http10,
        keep_alive,
        head_only: method == b"HEAD",
        route: route(target),
    })
}

/// Lines of `buf` without their CRLF / LF; stops at an unterminated line.
struct Lines<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = &self.buf[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n')?;
        self.pos += end + 1;
        let line = &rest[..end];
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }
}

fn split_request_line(line: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut parts = line.split(|&b| b == b' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.iter().all(|&b| is_token(b))
        || target.is_empty()
        || !target.iter().all(|&b| b.is_ascii_graphic())
    {
        return None;
    }
    Some((method, target, version))
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Maps a request target to its route.
pub fn route(target: &str) -> Route {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/" => Route::Root,
        "/sleep" => ms(query).map_or_else(Route::BadQuery, Route::Sleep),
        "/cpu" => ms(query).map_or_else(Route::BadQuery, Route::Cpu),
        "/crash" => Route::Crash,
        "/hang" => Route::Hang,
        _ => Route::NotFound,
    }
}

/// The `ms` parameter of a query string.
fn ms(query: &str) -> Result<u64, String> {
    let value = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .ok_or_else(|| "missing ms=<milliseconds>".to_owned())?;
    match value.parse::<u64>() {
        Ok(ms) if ms <= MAX_MS => Ok(ms),
        Ok(_) => Err(format!("ms must be at most {MAX_MS}")),
        Err(_) => Err(format!("ms={value} is not a number of milliseconds")),
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// How the response ends the exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    /// Keep the connection open for another request.
    pub keep_alive: bool,
    /// The request was HTTP/1.0 (keep-alive must then be announced).
    pub http10: bool,
    /// HEAD: headers only.
    pub head_only: bool,
}

/// Appends a complete response to `out`, so that it can go out in one write.
pub fn response(out: &mut Vec<u8>, status: u16, body: &[u8], pid: &str, framing: Framing) {
    let connection = match (framing.keep_alive, framing.http10) {
        (false, _) => "Connection: close\r\n",
        (true, true) => "Connection: keep-alive\r\n",
        (true, false) => "",
    };
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         X-Worker-Pid: {pid}\r\n{connection}\r\n",
        reason(status),
        body.len(),
    );
    if !framing.head_only {
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> Request {
        match parse(buf) {
            Parse::Complete(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn simple_get() {
        let raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /next";
        let r = complete(raw);
        assert_eq!(r.head_len, raw.len() - "GET /next".len());
        assert_eq!(r.route, Route::Root);
        assert!(r.keep_alive && !r.http10 && !r.head_only);
        assert_eq!(r.content_length, 0);
    }

    #[test]
    fn incomplete_until_blank_line() {
        assert_eq!(parse(b""), Parse::Incomplete);
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Parse::Incomplete);
        assert_eq!(parse(b"\r\n\r\nGET / HTTP/1.1\r\n"), Parse::Incomplete);
        let r = complete(b"\r\nGET /x HTTP/1.1\n\n");
        assert_eq!(r.route, Route::NotFound);
    }

    #[test]
    fn connection_rules() {
        assert!(!complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!complete(b"GET / HTTP/1.1\r\nconnection: Keep-Alive, CLOSE\r\n\r\n").keep_alive);
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        let r = complete(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(r.keep_alive && r.http10);
    }

    #[test]
    fn content_length() {
        let r = complete(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(r.content_length, 5);
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Parse::Error(400)
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Parse::Error(400)
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Parse::Error(501)
        );
    }

    #[test]
    fn malformed() {
        assert_eq!(parse(b"GET /\r\n\r\n"), Parse::Error(400));
        assert_eq!(parse(b"GET  / HTTP/1.1\r\n\r\n"), Parse::Error(400));
        assert_eq!(parse(b"GET / HTTP/2.0\r\n\r\n"), Parse::Error(505));
        assert_eq!(parse(b"GET / FTP\r\n\r\n"), Parse::Error(400));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"),
            Parse::Error(400)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n"),
            Parse::Error(400)
        );
    }

    #[test]
    fn routes() {
        assert_eq!(route("/"), Route::Root);
        assert_eq!(route("/?a=b"), Route::Root);
        assert_eq!(route("/sleep?ms=250"), Route::Sleep(250));
        assert_eq!(route("/cpu?x=1&ms=7"), Route::Cpu(7));
        assert!(matches!(route("/sleep"), Route::BadQuery(_)));
        assert!(matches!(route("/sleep?ms=abc"), Route::BadQuery(_)));
        assert!(matches!(route("/cpu?ms=99999999999"), Route::BadQuery(_)));
        assert_eq!(route("/crash"), Route::Crash);
        assert_eq!(route("/hang"), Route::Hang);
        assert_eq!(route("/nope"), Route::NotFound);
        assert!(complete(b"HEAD / HTTP/1.1\r\n\r\n").head_only);
    }

    #[test]
    fn response_framing() {
        let mut out = Vec::new();
        let f = Framing {
            keep_alive: true,
            http10: false,
            head_only: false,
        };
        response(&mut out, 200, b"hi\n", "42", f);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\
             X-Worker-Pid: 42\r\n\r\nhi\n"
        );
        let mut out = Vec::new();
        let f = Framing {
            keep_alive: false,
            http10: true,
            head_only: true,
        };
        response(&mut out, 404, b"not found\n", "42", f);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Content-Length: 10\r\n"), "{text}");
        assert!(text.ends_with("Connection: close\r\n\r\n"), "{text}");
    }
}

//! The request head: request line and header fields, up to the empty line.
//!
//! The head is read line by line, each line checked in the order: its limits
//! (length, count, the head's size so far), its line end (CRLF, never a bare
//! LF), then its syntax. The first line that fails decides the answer, so a
//! prefix of a request is refused only with the answer the whole would get
//! (a client that sends a bad head is answered as soon as the bad line is in,
//! and feeding a head in pieces cannot change the answer).

use memchr::memchr;

use crate::chars::{is_ows, is_token, trim_ows, TARGET, TOKEN, VALUE};
use crate::{Effective, Error, Framing, Head, Limits, Version};

/// The answer's detail for a TLS handshake sent to this plain HTTP port.
pub const TLS_ON_PLAIN_HTTP: &str =
    "TLS handshake on a plain HTTP port: terminate TLS in front of drover, e.g. nginx";

/// Parses the request head at the start of `buf`.
///
/// `Ok(None)`: the head is not complete and nothing so far is wrong (or over
/// a limit); call again with more bytes. `Ok(Some((head, n)))`: a complete
/// head of `n` bytes (with any empty lines before the request line, and the
/// final CRLF CRLF); the body, if any, starts at `buf[n]`. `Err`: answer
/// `status` and close the connection.
///
/// Each call reads `buf` from its start: call again only once more bytes came.
pub fn parse_head<'a>(buf: &'a [u8], limits: &Limits) -> Result<Option<(Head<'a>, usize)>, Error> {
    let limits = limits.effective();
    // RFC 9112 section 2.2: empty lines before the request line are skipped
    // (any CR and LF, as the Python parser strips them), up to the size of
    // a head: a client cannot make us buffer them without end either.
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    if start > limits.max_head {
        return Err(Error::new(
            431,
            format!(
                "more than {} bytes of empty lines before the request line",
                limits.max_head
            ),
        ));
    }
    if start == buf.len() {
        return Ok(None);
    }
    // A TLS record of a handshake (type 22, version 3.x): a client that
    // speaks HTTPS to this port. Its ClientHello is binary, refused for
    // whatever byte came first (a bare LF, a malformed request line), or
    // not at all until the header timeout, none of which names the cause.
    match buf[start..] {
        [0x16, 0x03, 0x00..=0x04, ..] => return Err(Error::bad(TLS_ON_PLAIN_HTTP)),
        // Its first bytes: the third decides, whatever a limit says of the
        // two (a head's prefix gets no other answer than the whole head).
        [0x16] | [0x16, 0x03] => return Ok(None),
        _ => {}
    }
    let mut pos = start;
    let mut line_no = 0;
    let mut request: Option<RequestLine<'a>> = None;
    let mut fields = Fields::default();
    loop {
        let rest = &buf[pos..];
        if request.is_some() {
            // The common case first: a valid field line, read in one pass.
            if let Some((len, name, value)) = scan_field(rest) {
                let end = pos + len + 2;
                check_limits(&rest[..len], line_no, end - start, &limits)?;
                fields.push(name, value)?;
                pos = end;
                line_no += 1;
                continue;
            }
        }
        let Some(lf) = memchr(b'\n', rest) else {
            // The line so far, without a CR that may be the start of its CRLF.
            let partial = rest.strip_suffix(b"\r").unwrap_or(rest);
            check_limits(partial, line_no, buf.len() - start, &limits)?;
            return Ok(None);
        };
        let end = pos + lf + 1;
        let (line, crlf) = match rest[..lf].strip_suffix(b"\r") {
            Some(line) => (line, true),
            None => (&rest[..lf], false),
        };
        check_limits(line, line_no, end - start, &limits)?;
        if !crlf {
            return Err(Error::bad("a line ends in a bare LF, not CRLF"));
        }
        match &request {
            None => request = Some(RequestLine::parse(line)?),
            Some(req) if line.is_empty() => return Ok(Some((fields.finish(req)?, end))),
            Some(_) => fields.add(line)?,
        }
        pos = end;
        line_no += 1;
    }
}

/// Refuses line `line_no` (0 is the request line), complete or not, when it
/// is over a limit, or when the head is by then (`head_len` bytes from the
/// request line on).
fn check_limits(
    line: &[u8],
    line_no: usize,
    head_len: usize,
    limits: &Effective,
) -> Result<(), Error> {
    if line_no == 0 {
        if line.len() > limits.request_line {
            return Err(Error::bad(format!(
                "request line longer than {} bytes (limit_request_line)",
                limits.request_line
            )));
        }
    } else if !line.is_empty() {
        if line_no > limits.fields {
            return Err(Error::new(
                431,
                format!(
                    "more than {} header fields (limit_request_fields)",
                    limits.fields
                ),
            ));
        }
        if line.len() + 2 > limits.field_size {
            return Err(Error::new(
                431,
                format!(
                    "a header field longer than {} bytes (limit_request_field_size)",
                    limits.field_size
                ),
            ));
        }
    }
    if head_len > limits.max_head {
        return Err(Error::new(
            431,
            format!("request head larger than {} bytes", limits.max_head),
        ));
    }
    Ok(())
}

struct RequestLine<'a> {
    method: &'a str,
    target: &'a str,
    version: Version,
}

impl<'a> RequestLine<'a> {
    /// `method SP target SP version`, single spaces (RFC 9112 section 3).
    fn parse(line: &'a [u8]) -> Result<Self, Error> {
        let malformed = || Error::bad("malformed request line");
        let mut parts = line.split(|&b| b == b' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let version = match version {
            b"HTTP/1.1" => Version::Http11,
            b"HTTP/1.0" => Version::Http10,
            [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
                if major.is_ascii_digit() && minor.is_ascii_digit() =>
            {
                return Err(Error::new(505, "HTTP version not supported"));
            }
            _ => return Err(malformed()),
        };
        if !is_token(method) {
            return Err(Error::bad("malformed method"));
        }
        let target = match target {
            t if t.is_empty() || !t.iter().all(|&b| TARGET[b as usize]) => None,
            t if t.is_ascii() => Some(ascii(t)),
            t => std::str::from_utf8(t).ok(),
        }
        .ok_or_else(|| Error::bad("malformed request target"))?;
        Ok(RequestLine {
            method: ascii(method),
            target,
            version,
        })
    }
}

/// A valid field line at the start of `rest`, with its CRLF: (its length
/// without CRLF, name, value without OWS). None for anything else, which the
/// line-by-line path then reads (and refuses in order).
fn scan_field(rest: &[u8]) -> Option<(usize, &str, &[u8])> {
    let name_len = rest.iter().position(|&b| !TOKEN[b as usize])?;
    if name_len == 0 || rest[name_len] != b':' {
        return None;
    }
    let value_start = name_len + 1 + rest[name_len + 1..].iter().position(|&b| !is_ows(b))?;
    let end = value_start + value_run(&rest[value_start..]);
    if rest.get(end..end + 2) != Some(b"\r\n") {
        return None;
    }
    Some((
        end,
        ascii(&rest[..name_len]),
        trim_ows(&rest[value_start..end]),
    ))
}

/// How many bytes at the start of `s` a field value may hold: eight at a
/// time while none is a CTL or DEL, then one at a time.
fn value_run(s: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    let mut i = 0;
    while let Some(word) = s.get(i..i + 8) {
        let x = u64::from_ne_bytes(word.try_into().unwrap_or_default());
        // A byte below 0x20, or a byte equal to 0x7f (exact tests, Bit
        // Twiddling Hacks' hasless and haszero).
        let ctl = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        let del = x ^ (ONES * 0x7f);
        if ctl | (del.wrapping_sub(ONES) & !del & HIGH) != 0 {
            break;
        }
        i += 8;
    }
    i + s[i..]
        .iter()
        .position(|&b| !VALUE[b as usize])
        .unwrap_or(s.len() - i)
}

/// A token (or a target checked to be ASCII) as a str.
fn ascii(token: &[u8]) -> &str {
    debug_assert!(token.is_ascii());
    // SAFETY: ASCII is UTF-8. Every caller passes bytes it checked against
    // TOKEN or TARGET and is_ascii: from_utf8's check again cost a fifth of
    // a parse (measured with callgrind on a browser's head).
    unsafe { std::str::from_utf8_unchecked(token) }
}

/// The header fields read so far, and what they say about the request.
#[derive(Default)]
struct Fields<'a> {
    headers: Vec<(&'a str, &'a [u8])>,
    content_length: Option<u64>,
    host: bool,
    /// The Transfer-Encoding fields' codings, as if joined with ", ".
    te: Option<Codings>,
    /// Connection tokens seen: close, keep-alive.
    connection: Option<(bool, bool)>,
    /// The last Expect field's value.
    expect: Option<&'a [u8]>,
}

#[derive(Default)]
struct Codings {
    last_is_chunked: bool,
    chunked: usize,
    others: usize,
}

impl<'a> Fields<'a> {
    /// One field line: `name ":" OWS value OWS`, the name right before the
    /// colon (no whitespace there, no obs-fold: RFC 9112 section 5).
    fn add(&mut self, line: &'a [u8]) -> Result<(), Error> {
        let malformed = || Error::bad("malformed header line");
        let colon = memchr(b':', line).ok_or_else(malformed)?;
        let name = &line[..colon];
        if !is_token(name) {
            return Err(malformed());
        }
        let value = trim_ows(&line[colon + 1..]);
        if !value.iter().all(|&b| VALUE[b as usize]) {
            return Err(Error::bad("invalid character in a header value"));
        }
        self.push(ascii(name), value)
    }

    /// A field, its name a token and its value valid.
    fn push(&mut self, name: &'a str, value: &'a [u8]) -> Result<(), Error> {
        self.note(name, value)?;
        if self.headers.capacity() == 0 {
            self.headers.reserve(16);
        }
        self.headers.push((name, value));
        Ok(())
    }

    /// What the fields that frame the request say.
    fn note(&mut self, name: &str, value: &'a [u8]) -> Result<(), Error> {
        if name.eq_ignore_ascii_case("content-length") {
            let n = content_length(value)?;
            if self.content_length.is_some_and(|old| old != n) {
                return Err(Error::bad("conflicting Content-Length headers"));
            }
            self.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let te = self.te.get_or_insert_with(Codings::default);
            for coding in value.split(|&b| b == b',') {
                let chunked = trim_ows(coding).eq_ignore_ascii_case(b"chunked");
                te.last_is_chunked = chunked;
                if chunked {
                    te.chunked += 1;
                } else {
                    te.others += 1;
                }
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let (close, keep_alive) = self.connection.get_or_insert((false, false));
            for token in value.split(|&b| b == b',') {
                let token = trim_ows(token);
                *close |= token.eq_ignore_ascii_case(b"close");
                *keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            self.expect = Some(value);
        } else if name.eq_ignore_ascii_case("host") {
            if self.host {
                return Err(Error::bad("more than one Host header"));
            }
            self.host = true;
        }
        Ok(())
    }

    /// The head, once the empty line came.
    fn finish(self, req: &RequestLine<'a>) -> Result<Head<'a>, Error> {
        let http10 = req.version == Version::Http10;
        if !http10 && !self.host {
            return Err(Error::bad("HTTP/1.1 request without a Host header"));
        }
        let framing = match (&self.te, self.content_length) {
            // A request with both is how requests are smuggled past a proxy
            // that reads the other one (RFC 9112 section 6.1).
            (Some(_), Some(_)) => {
                return Err(Error::bad("both Transfer-Encoding and Content-Length"))
            }
            (Some(_), None) if http10 => {
                return Err(Error::bad("Transfer-Encoding in an HTTP/1.0 request"))
            }
            (Some(te), None) => {
                if !te.last_is_chunked {
                    return Err(Error::bad("Transfer-Encoding does not end in chunked"));
                }
                if te.chunked > 1 {
                    return Err(Error::bad("chunked more than once in Transfer-Encoding"));
                }
                if te.others > 0 {
                    return Err(Error::new(501, "unsupported Transfer-Encoding"));
                }
                Framing::Chunked
            }
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::None,
        };
        let keep_alive = match self.connection {
            Some((close, keep_alive)) => !close && (!http10 || keep_alive),
            None => !http10,
        };
        let expect_continue = match self.expect {
            Some(v) if v.eq_ignore_ascii_case(b"100-continue") => !http10,
            Some(_) => return Err(Error::new(417, "unsupported Expect")),
            None => false,
        };
        Ok(Head {
            method: req.method,
            target: req.target,
            version: req.version,
            headers: self.headers,
            framing,
            keep_alive,
            expect_continue,
        })
    }
}

/// `1*DIGIT` that fits in a u64 (RFC 9110 section 8.6: no sign, no list).
fn content_length(value: &[u8]) -> Result<u64, Error> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(Error::bad("invalid Content-Length"));
    }
    value
        .iter()
        .try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or_else(|| Error::bad("Content-Length too large"))
}

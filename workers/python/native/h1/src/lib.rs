//! The HTTP/1.1 request parser of drover_wsgi's native core: the request head
//! ([`parse_head`]) and the chunked request body ([`ChunkedDecoder`]).
//!
//! It gives the answers of the pure-Python parser (`drover_wsgi/http.py`),
//! input for input (it may refuse an incomplete head sooner: tests/
//! differential.rs runs both), and refuses what could smuggle a request past
//! a proxy (RFC 9112 section 11.2) the way llhttp's strict mode does. The
//! policy, case by case, is in docs/http-parser.md.
//!
//! Zero copy: a [`Head`] borrows the method, target, header names and values
//! from the buffer; the one allocation per request is the headers' `Vec`.

mod chars;
mod chunked;
mod head;

pub use chars::is_token;
pub use chunked::{ChunkedDecoder, MAX_CHUNK_LINE, MAX_TRAILERS};
pub use head::parse_head;

use std::fmt;

/// Gunicorn's cap on `limit_request_line` (and what 0 means).
pub const MAX_REQUEST_LINE: usize = 8190;
/// Gunicorn's cap on `limit_request_fields` (and what 0 means).
pub const MAX_FIELDS: usize = 32768;
/// The largest request head accepted whatever the limits say (and what a
/// `field_size` of 0 means).
pub const MAX_HEAD: usize = 1024 * 1024;

/// The request-head limits: Gunicorn's settings, with its defaults and its
/// meaning of 0 (see [`Limits::effective`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `limit_request_line`: bytes of the request line without its CRLF; a
    /// longer one is a 400. 0 means [`MAX_REQUEST_LINE`], as does more.
    pub request_line: usize,
    /// `limit_request_fields`: header fields; more is a 431. 0 (or more than
    /// [`MAX_FIELDS`]) means [`MAX_FIELDS`].
    pub fields: usize,
    /// `limit_request_field_size`: bytes of one field line with its CRLF;
    /// more is a 431. 0 means [`MAX_HEAD`].
    pub field_size: usize,
}

impl Default for Limits {
    /// Gunicorn's defaults: 4094, 100, 8190.
    fn default() -> Self {
        Limits {
            request_line: 4094,
            fields: 100,
            field_size: 8190,
        }
    }
}

/// [`Limits`] with 0 and out-of-range values resolved, as Gunicorn resolves
/// them, and the head size they imply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Effective {
    /// The longest request line (without CRLF).
    pub request_line: usize,
    /// The most header fields.
    pub fields: usize,
    /// The longest field line, with its CRLF.
    pub field_size: usize,
    /// The longest head (from the request line to the final CRLF): past this
    /// a head cannot be within the other limits, or is over [`MAX_HEAD`].
    pub max_head: usize,
}

impl Limits {
    /// The limits as they are applied.
    pub fn effective(&self) -> Effective {
        let request_line = match self.request_line {
            0 => MAX_REQUEST_LINE,
            n => n.min(MAX_REQUEST_LINE),
        };
        let fields = match self.fields {
            n @ 1..=MAX_FIELDS => n,
            _ => MAX_FIELDS,
        };
        let field_size = match self.field_size {
            0 => MAX_HEAD,
            n => n,
        };
        let within = (request_line + 2)
            .saturating_add(fields.saturating_mul(field_size.saturating_add(2)))
            .saturating_add(2);
        Effective {
            request_line,
            fields,
            field_size,
            max_head: within.min(MAX_HEAD),
        }
    }
}

/// The HTTP version of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0
    Http10,
    /// HTTP/1.1
    Http11,
}

/// How the request body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (neither Content-Length nor Transfer-Encoding).
    None,
    /// `Content-Length: n` (also when n is 0).
    Length(u64),
    /// `Transfer-Encoding: chunked`: decode with [`ChunkedDecoder`].
    Chunked,
}

/// A parsed request head, borrowing from the buffer it was parsed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head<'a> {
    /// The method, a token, case as sent.
    pub method: &'a str,
    /// The request-target as sent (visible ASCII, or UTF-8).
    pub target: &'a str,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The header fields in order: names as sent (tokens), values without
    /// leading and trailing SP/HTAB. Repeated fields are not joined.
    pub headers: Vec<(&'a str, &'a [u8])>,
    /// How the body is framed.
    pub framing: Framing,
    /// Whether the connection may carry another request after this one, from
    /// the version and the Connection header(s).
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request (ignored in HTTP/1.0,
    /// RFC 9110 section 10.1.1).
    pub expect_continue: bool,
}

/// A request that cannot be served. Whatever the status, the server answers
/// it with `Connection: close` and closes: the bytes after a malformed head
/// or body cannot be trusted to start a request (that is how requests are
/// smuggled), so they are never parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// 400, 417, 431, 501 or 505.
    pub status: u16,
    /// The status's reason phrase ("Bad Request").
    pub reason: &'static str,
    /// What was wrong, for the log and the response body.
    pub detail: String,
}

impl Error {
    pub(crate) fn new(status: u16, detail: impl Into<String>) -> Self {
        let reason = match status {
            400 => "Bad Request",
            417 => "Expectation Failed",
            431 => "Request Header Fields Too Large",
            501 => "Not Implemented",
            505 => "HTTP Version Not Supported",
            _ => "Error",
        };
        Error {
            status,
            reason,
            detail: detail.into(),
        }
    }

    pub(crate) fn bad(detail: impl Into<String>) -> Self {
        Error::new(400, detail)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.reason, self.detail)
    }
}

impl std::error::Error for Error {}

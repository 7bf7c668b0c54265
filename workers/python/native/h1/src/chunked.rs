//! The chunked request body (RFC 9112 section 7.1), decoded incrementally:
//! a state machine over bytes, so that input may be cut anywhere and nothing
//! but the decoded data is kept.
//!
//! ```text
//! chunked-body = *chunk last-chunk trailer-section CRLF
//! chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
//! chunk-size   = 1*HEXDIG                  (at most 16 digits here)
//! chunk-ext    = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )
//! ext-val      = token / quoted-string
//! ```

use crate::chars::{TOKEN, VALUE};
use crate::{Error, Limits};

/// The longest chunk-size line or trailer line, without its CRLF (the Python
/// server's `MAX_CHUNK_LINE`).
pub const MAX_CHUNK_LINE: usize = 4096;
/// The most trailer fields after the last chunk (the Python server's
/// `MAX_TRAILERS`).
pub const MAX_TRAILERS: usize = 100;

/// The most hex digits of a chunk size (a u64; leading zeros count).
const MAX_SIZE_DIGITS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The first digit of a chunk size.
    SizeStart,
    /// More digits of the size, or what may follow them.
    Size,
    /// BWS after the size or an extension: only ";" may follow.
    BeforeSemicolon,
    /// After ";": BWS, then an extension name.
    ExtNameStart,
    ExtName,
    /// After ext-name BWS: "=", ";" or the line end.
    AfterExtName,
    /// After "=": BWS, then a token or a quoted string.
    ExtValueStart,
    ExtToken,
    Quoted,
    /// After the closing quote of a quoted ext-val.
    AfterQuoted,
    /// After a backslash in a quoted string.
    QuotedPair,
    /// The LF of a chunk-size line.
    SizeLf,
    /// `left` bytes of chunk data to come.
    Data,
    /// The CRLF after chunk data.
    DataCr,
    DataLf,
    /// The start of a trailer line, or of the final CRLF.
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    /// The LF of the final CRLF.
    EndLf,
    Done,
    Failed,
}

/// Decodes a chunked request body as it comes. Any error is final: the
/// server answers it (400) and closes the connection.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: State,
    /// Chunk bytes left to copy (in `Data`), or the size being read.
    left: u64,
    /// Bytes of the current size or trailer line (without CRLF) so far.
    line: usize,
    digits: usize,
    trailers: usize,
    error: Option<Error>,
}

impl ChunkedDecoder {
    /// A decoder at the start of a body. The limits of chunk and trailer
    /// lines are fixed ([`MAX_CHUNK_LINE`], [`MAX_TRAILERS`]), as in the
    /// Python server; `limits` is taken for what may come to depend on them.
    pub fn new(_limits: &Limits) -> Self {
        ChunkedDecoder {
            state: State::SizeStart,
            left: 0,
            line: 0,
            digits: 0,
            trailers: 0,
            error: None,
        }
    }

    /// Whether the last chunk and the trailer section were read: the body is
    /// over, and what follows it is the next request.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes as much of `input` as it can: appends body bytes to `out` and
    /// returns the bytes of `input` consumed. It consumes all of `input`
    /// unless the body ends within it (then the rest is the next request).
    /// After an error, every call returns that error again.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, Error> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        match self.run(input, out) {
            Ok(n) => Ok(n),
            Err(e) => {
                self.state = State::Failed;
                self.error = Some(e.clone());
                Err(e)
            }
        }
    }

    fn run(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, Error> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let take = (input.len() - i).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                out.extend_from_slice(&input[i..i + take]);
                i += take;
                self.left -= take as u64;
                if self.left == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            if self.state == State::Done {
                break;
            }
            self.step(input[i])?;
            i += 1;
        }
        Ok(i)
    }

    /// One byte outside chunk data.
    fn step(&mut self, b: u8) -> Result<(), Error> {
        use State::*;
        let in_line = matches!(
            self.state,
            Size | BeforeSemicolon
                | ExtNameStart
                | ExtName
                | AfterExtName
                | ExtValueStart
                | ExtToken
                | Quoted
                | AfterQuoted
                | QuotedPair
                | TrailerName
                | TrailerValue
        );
        if in_line && b != b'\r' {
            self.line += 1;
            if self.line > MAX_CHUNK_LINE {
                return Err(Error::bad(format!(
                    "chunk line longer than {MAX_CHUNK_LINE} bytes"
                )));
            }
        }
        let token = TOKEN[b as usize];
        self.state = match (self.state, b) {
            (SizeStart, _) => {
                self.left = u64::from(hex(b).ok_or_else(|| bad_size(b))?);
                self.digits = 1;
                self.line = 1;
                Size
            }
            (Size, _) if hex(b).is_some() => {
                self.digits += 1;
                if self.digits > MAX_SIZE_DIGITS {
                    return Err(Error::bad("chunk size too large"));
                }
                self.left = self.left << 4 | u64::from(hex(b).unwrap_or(0));
                Size
            }
            (Size | ExtName | ExtToken | AfterQuoted, b'\r') => SizeLf,
            (Size | BeforeSemicolon | ExtName | AfterExtName | ExtToken | AfterQuoted, b';') => {
                ExtNameStart
            }
            // BWS is allowed before ";" and around "=" only: "2 \r\n" is
            // refused, as llhttp does.
            (Size | BeforeSemicolon | ExtToken | AfterQuoted, b' ' | b'\t') => BeforeSemicolon,
            (ExtName | AfterExtName, b' ' | b'\t') => AfterExtName,
            (ExtName | AfterExtName, b'=') => ExtValueStart,
            (ExtNameStart | ExtValueStart, b' ' | b'\t') => self.state,
            // "2;" (no name after the semicolon) is refused, as llhttp does.
            (ExtNameStart | ExtName, _) if token => ExtName,
            (ExtValueStart, b'"') => Quoted,
            (ExtValueStart | ExtToken, _) if token => ExtToken,
            (Quoted, b'"') => AfterQuoted,
            (Quoted, b'\\') => QuotedPair,
            (Quoted, _) if VALUE[b as usize] => Quoted,
            (QuotedPair, _) if VALUE[b as usize] => Quoted,
            (SizeLf, b'\n') => {
                self.line = 0;
                if self.left == 0 {
                    TrailerStart
                } else {
                    Data
                }
            }
            (DataCr, b'\r') => DataLf,
            (DataCr, _) => return Err(Error::bad("chunk data longer than its size")),
            (DataLf, b'\n') => SizeStart,
            (TrailerStart, b'\r') => EndLf,
            (TrailerStart, _) if token => {
                self.trailers += 1;
                if self.trailers > MAX_TRAILERS {
                    return Err(Error::bad(format!(
                        "more than {MAX_TRAILERS} trailer fields"
                    )));
                }
                self.line = 1;
                TrailerName
            }
            (TrailerName, _) if token => TrailerName,
            (TrailerName, b':') => TrailerValue,
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, _) if VALUE[b as usize] => TrailerValue,
            (TrailerLf, b'\n') => {
                self.line = 0;
                TrailerStart
            }
            (EndLf, b'\n') => Done,
            (SizeLf | DataLf | TrailerLf | EndLf, _) => {
                return Err(Error::bad("a chunk line does not end in CRLF"))
            }
            (Size | BeforeSemicolon, _) => return Err(bad_size(b)),
            (TrailerStart | TrailerName | TrailerValue, _) => {
                return Err(Error::bad("malformed trailer field"))
            }
            _ => return Err(Error::bad("malformed chunk extension")),
        };
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn bad_size(b: u8) -> Error {
    Error::bad(format!("invalid chunk size line (byte 0x{b:02x})"))
}

//! Strategies shared by the property and differential tests.

#![allow(dead_code)] // each test binary uses some

use drover_h1::Limits;
use proptest::prelude::*;

pub const TOKEN: &str = "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,10}";

/// A field value as sent: visible ASCII, obs-text, inner SP/HTAB.
pub fn value() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        8 => 0x21u8..0x7f,
        1 => Just(b' '),
        1 => Just(b'\t'),
        1 => 0x80u8..=0xff,
    ];
    proptest::collection::vec(byte, 0..20)
}

/// Bytes shaped like a request head: valid and broken lines, stray CR, LF,
/// SP, colons, framing fields, and anything.
pub fn head_like() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"GET / HTTP/1.1\r\n".to_vec()),
        Just(b"POST /x HTTP/1.0\r\n".to_vec()),
        Just(b"GET / HTTP/2.0\r\n".to_vec()),
        Just(b"Host: x\r\n".to_vec()),
        Just(b"Content-Length: 5\r\n".to_vec()),
        Just(b"Content-Length: 6\r\n".to_vec()),
        Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
        Just(b"Transfer-Encoding: gzip, chunked\r\n".to_vec()),
        Just(b"Connection: close\r\n".to_vec()),
        Just(b"Expect: 100-continue\r\n".to_vec()),
        Just(b"Expect: other\r\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\n".to_vec()),
        Just(b" ".to_vec()),
        Just(b":".to_vec()),
        Just(b"\t".to_vec()),
        Just(b"\0".to_vec()),
        TOKEN.prop_map(String::into_bytes),
        value(),
        proptest::collection::vec(any::<u8>(), 0..4),
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

/// The default limits, or small ones that the inputs above reach.
pub fn limits() -> impl Strategy<Value = Limits> {
    prop_oneof![
        Just(Limits::default()),
        (0usize..40, 0usize..6, 0usize..40).prop_map(|(request_line, fields, field_size)| Limits {
            request_line,
            fields,
            field_size
        }),
    ]
}

/// Bytes shaped like a chunk-size line (without its CRLF).
pub fn chunk_line_like() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        "[0-9a-fA-F]{1,18}".prop_map(String::into_bytes),
        Just(b";".to_vec()),
        Just(b"=".to_vec()),
        Just(b" ".to_vec()),
        Just(b"\t".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\\".to_vec()),
        TOKEN.prop_map(String::into_bytes),
        any::<u8>()
            .prop_filter("a line end", |b| *b != b'\r' && *b != b'\n')
            .prop_map(|b| vec![b]),
    ];
    proptest::collection::vec(piece, 0..10).prop_map(|v| v.concat())
}

/// Realistic heads with a few bytes inserted, deleted or replaced: mostly
/// near-misses of a valid request, where parsers disagree if they do.
pub fn mutated_head() -> impl Strategy<Value = Vec<u8>> {
    let templates: [&[u8]; 6] = [
        b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        b"POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\n",
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
        b"\r\nPUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    ];
    let interesting = prop_oneof![
        Just(b'\r'),
        Just(b'\n'),
        Just(b' '),
        Just(b'\t'),
        Just(b':'),
        Just(b','),
        Just(b';'),
        Just(b'0'),
        Just(b'9'),
        Just(b'a'),
        Just(0u8),
        Just(0x7f),
        Just(0xa0),
        any::<u8>(),
    ];
    // (where, what): 0 deletes, 1 inserts, 2 replaces.
    let edit = (any::<prop::sample::Index>(), 0u8..3, interesting);
    (0..templates.len(), proptest::collection::vec(edit, 0..3)).prop_map(move |(t, edits)| {
        let mut raw = templates[t].to_vec();
        for (at, op, byte) in edits {
            let at = at.index(raw.len());
            match op {
                0 => {
                    raw.remove(at);
                }
                1 => raw.insert(at, byte),
                _ => raw[at] = byte,
            }
        }
        raw
    })
}

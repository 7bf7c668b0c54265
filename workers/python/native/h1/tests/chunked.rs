//! The chunked body decoder: llhttp's request fixtures (as in
//! workers/python/tests/test_conformance.py) and the cases of the Python
//! server's tests (test_production.py), whole and byte by byte.

use drover_h1::{ChunkedDecoder, Error, Limits};

/// Decodes `input` fed in pieces of `step` bytes: (body, bytes consumed).
fn decode_by(input: &[u8], step: usize) -> Result<(Vec<u8>, usize, bool), Error> {
    let mut d = ChunkedDecoder::new(&Limits::default());
    let mut out = Vec::new();
    let mut used = 0;
    for piece in input.chunks(step) {
        let n = d.decode(piece, &mut out)?;
        used += n;
        if n < piece.len() {
            assert!(d.is_done(), "stopped early without being done");
            break;
        }
    }
    Ok((out, used, d.is_done()))
}

/// Decodes whole and byte by byte; both must agree.
fn decode(input: &[u8]) -> Result<(Vec<u8>, usize, bool), Error> {
    let whole = decode_by(input, input.len().max(1));
    let bytewise = decode_by(input, 1);
    assert_eq!(whole, bytewise, "{:?}", String::from_utf8_lossy(input));
    whole
}

fn body(input: &[u8]) -> Vec<u8> {
    match decode(input) {
        Ok((out, n, true)) if n == input.len() => out,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
    }
}

fn refused(input: &[u8]) {
    match decode(input) {
        Err(e) => assert_eq!(e.status, 400, "{e}"),
        ok => panic!(
            "{:?} was not refused: {ok:?}",
            String::from_utf8_lossy(input)
        ),
    }
}

#[test]
fn bodies_as_llhttp_reads_them() {
    assert_eq!(body(b"a\r\n0123456789\r\n0\r\n\r\n"), b"0123456789");
    assert_eq!(body(b"A\r\n0123456789\r\n0\r\n\r\n"), b"0123456789");
    assert_eq!(
        body(b"5\r\nhello\r\n6\r\n world\r\n000\r\n\r\n"),
        b"hello world"
    );
    assert_eq!(
        body(b"5\r\nhello\r\n6\r\n world\r\n0\r\nVary: *\r\nContent-Type: text/plain\r\n\r\n"),
        b"hello world"
    );
    assert_eq!(
        body(
            b"5;ilovew3=\"I \\\"love\\\"; \\\\extensions\\\\\";somuchlove=\"x\";blah;foo=bar\r\nhello\r\n\
              6;blahblah;blah\r\n world\r\n0\r\n\r\n"
        ),
        b"hello world"
    );
}

#[test]
fn bodies_of_the_python_servers_tests() {
    assert_eq!(
        body(b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n"),
        b"hello world!"
    );
    assert_eq!(
        body(b"3\r\na\nb\r\n4\r\n\ncd\n\r\n0\r\n\r\n"),
        b"a\nb\ncd\n"
    );
}

#[test]
fn extensions_with_bws() {
    assert_eq!(body(b"2 ;a\r\nab\r\n0\r\n\r\n"), b"ab");
    assert_eq!(body(b"2;a = b ;c\r\nab\r\n0 ; last\r\n\r\n"), b"ab");
    assert_eq!(body(b"2;a=\"\"\r\nab\r\n0\r\n\r\n"), b"ab");
    assert_eq!(body(b"2;a=\"x\" ;b\r\nab\r\n0\r\n\r\n"), b"ab");
}

#[test]
fn the_body_ends_where_the_next_request_starts() {
    let input = b"2\r\nab\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
    let (out, n, done) = decode(input).unwrap();
    assert_eq!((&out[..], n, done), (&b"ab"[..], 12, true));
    let mut d = ChunkedDecoder::new(&Limits::default());
    let mut out = Vec::new();
    assert_eq!(d.decode(b"2\r\nab\r\n0\r\n\r\n", &mut out), Ok(12));
    assert_eq!(
        d.decode(b"more", &mut out),
        Ok(0),
        "done: nothing more is taken"
    );
}

#[test]
fn large_sizes() {
    let mut d = ChunkedDecoder::new(&Limits::default());
    let mut out = Vec::new();
    assert_eq!(d.decode(b"ffffffffffffffff\r\nabc", &mut out), Ok(21));
    assert_eq!(out, b"abc");
    assert!(!d.is_done());
    refused(b"10000000000000000\r\n"); // 17 digits
    refused(b"00000000000000001\r\na\r\n0\r\n\r\n");
}

#[test]
fn malformed_chunks_are_refused() {
    for input in [
        &b"2 erfrferferf\r\naa\r\n0 rrrr\r\n\r\n"[..], // no semicolon before an extension
        b"g\r\nhello\r\n0\r\n\r\n",                    // not hexadecimal
        b"zz\r\nab\r\n0\r\n\r\n",
        b"5\r\nhello world\r\n0\r\n\r\n", // more data than the size
        b"2\r\nabc\r\n0\r\n\r\n",
        b"ffffffffffffffffff\r\n", // an absurd size
        b"\r\nab\r\n0\r\n\r\n",    // no size
        b"-2\r\nab\r\n0\r\n\r\n",
        b"+2\r\nab\r\n0\r\n\r\n",
        b"0x2\r\nab\r\n0\r\n\r\n",
        b" 2\r\nab\r\n0\r\n\r\n", // leading whitespace
        b"2 \r\nab\r\n0\r\n\r\n", // trailing whitespace (llhttp refuses it)
        b"2\t\r\nab\r\n0\r\n\r\n",
        b"2;\r\nab\r\n0\r\n\r\n", // an empty extension (llhttp refuses it)
        b"2; \r\nab\r\n0\r\n\r\n",
        b"2;;a\r\nab\r\n0\r\n\r\n",
        b"2;a=\r\nab\r\n0\r\n\r\n",
        b"2;a \r\nab\r\n0\r\n\r\n",
        b"2;a= b c\r\nab\r\n0\r\n\r\n",
        b"2;a=\"b\r\nab\r\n0\r\n\r\n", // an unterminated quoted string
        b"2;a=\"b\"c\r\nab\r\n0\r\n\r\n",
        b"2;a=\"\x01\"\r\nab\r\n0\r\n\r\n",
        b"2;=b\r\nab\r\n0\r\n\r\n",
        b"2;a@\r\nab\r\n0\r\n\r\n",
        b"2\nab\r\n0\r\n\r\n", // bare LF after the size
        b"2\r\nab\n0\r\n\r\n", // bare LF after the data
        b"2\r\nab\r\n0\n\r\n",
        b"2\r\nab\r\n0\r\n\n",         // bare LF as the final line end
        b"2\r\nab\r\n0\r\nX: y\n\r\n", // bare LF after a trailer
        b"2\rab\r\n0\r\n\r\n",
        b"2\r\nab\r\r\n0\r\n\r\n",
        b"0\r\nX : y\r\n\r\n", // trailers are header fields
        b"0\r\n folded\r\n\r\n",
        b"0\r\nNo colon\r\n\r\n",
        b"0\r\nX: a\x00b\r\n\r\n",
        b"0\r\nX: a\rb\r\n\r\n",
    ] {
        refused(input);
    }
}

#[test]
fn line_and_trailer_limits() {
    let ext = vec![b'a'; 4096 - 2];
    assert_eq!(
        body(&[&b"2;"[..], &ext, b"\r\nab\r\n0\r\n\r\n"].concat()),
        b"ab"
    );
    refused(&[&b"2;a"[..], &ext, b"\r\nab\r\n0\r\n\r\n"].concat());
    let trailer = [&b"X: "[..], &vec![b'v'; 4096 - 3], b"\r\n"].concat();
    assert_eq!(body(&[&b"0\r\n"[..], &trailer, b"\r\n"].concat()), b"");
    refused(&[&b"0\r\nX"[..], &trailer, b"\r\n"].concat());
    let trailers = b"X: y\r\n".repeat(100);
    assert_eq!(body(&[&b"0\r\n"[..], &trailers, b"\r\n"].concat()), b"");
    refused(&[&b"0\r\nX: y\r\n"[..], &trailers, b"\r\n"].concat());
}

#[test]
fn an_error_is_final() {
    let mut d = ChunkedDecoder::new(&Limits::default());
    let mut out = Vec::new();
    let e = d.decode(b"2;\r\n", &mut out).unwrap_err();
    assert_eq!((e.status, e.reason), (400, "Bad Request"));
    assert_eq!(d.decode(b"ab\r\n0\r\n\r\n", &mut out), Err(e));
    assert!(!d.is_done());
}

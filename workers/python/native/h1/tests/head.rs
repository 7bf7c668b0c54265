//! The request head: the cases of the Python parser's tests
//! (workers/python/tests/test_http_parse.py, test_conformance.py), with the
//! same answers, and the smuggling cases refused as llhttp's strict mode does.

use drover_h1::{parse_head, Framing, Head, Limits, Version};

fn parse(raw: &[u8]) -> (Head<'_>, usize) {
    match parse_head(raw, &Limits::default()) {
        Ok(Some(done)) => done,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(raw)),
    }
}

fn status_with(raw: &[u8], limits: &Limits) -> u16 {
    match parse_head(raw, limits) {
        Err(e) => e.status,
        other => panic!(
            "{:?} was not refused: {other:?}",
            String::from_utf8_lossy(raw)
        ),
    }
}

fn status(raw: &[u8]) -> u16 {
    status_with(raw, &Limits::default())
}

#[test]
fn a_simple_request() {
    let raw = b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Thing:  v  \r\n\r\nrest";
    let (head, n) = parse(raw);
    assert_eq!(n, raw.len() - 4);
    assert_eq!(head.method, "GET");
    assert_eq!(head.target, "/a?b=c");
    assert_eq!(head.version, Version::Http11);
    assert_eq!(head.headers, vec![("Host", &b"x"[..]), ("X-Thing", b"v")]);
    assert_eq!(head.framing, Framing::None);
    assert!(head.keep_alive);
    assert!(!head.expect_continue);
}

#[test]
fn incomplete_heads() {
    for raw in [
        &b""[..],
        b"\r\n",
        b"GET",
        b"GET / HTTP/1.1\r",
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r",
    ] {
        assert_eq!(parse_head(raw, &Limits::default()), Ok(None), "{raw:?}");
    }
}

#[test]
fn leading_empty_lines_are_skipped() {
    let raw = b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let (head, n) = parse(raw);
    assert_eq!((head.target, n), ("/", raw.len()));
}

#[test]
fn bare_lf_is_refused_wherever_it_is() {
    assert_eq!(status(b"GET / HTTP/1.1\nHost: x\n\n"), 400);
    assert_eq!(status(b"GET / HTTP/1.1\r\nHost: x\n\r\n"), 400);
    assert_eq!(status(b"GET / HTTP/1.1\r\nHost: x\r\n\n"), 400);
    assert_eq!(status(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\nb\r\n\r\n"), 400);
    // Refused as soon as it is in, without waiting for the head's end.
    assert_eq!(status(b"GET / HTTP/1.1\nHost"), 400);
}

#[test]
fn content_type_and_length() {
    let (head, _) = parse(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\n",
    );
    assert_eq!(head.framing, Framing::Length(12));
    let (head, _) = parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(head.framing, Framing::Length(0));
    let (head, _) =
        parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551615\r\n\r\n");
    assert_eq!(head.framing, Framing::Length(u64::MAX));
}

#[test]
fn repeated_headers_are_kept_in_order() {
    let (head, _) = parse(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: a\r\nAccept: b\r\n\r\n");
    assert_eq!(head.headers[1..], [("Accept", &b"a"[..]), ("Accept", b"b")]);
}

#[test]
fn values_keep_obs_text_and_inner_whitespace() {
    let (head, _) = parse(b"GET / HTTP/1.1\r\nHost: x\r\nX: \t a \xe9\t b \t\r\nY:\r\n\r\n");
    assert_eq!(head.headers[1..], [("X", &b"a \xe9\t b"[..]), ("Y", b"")]);
}

#[test]
fn keep_alive_rules() {
    let ka = |raw: &[u8]| {
        parse_head(raw, &Limits::default())
            .unwrap()
            .unwrap()
            .0
            .keep_alive
    };
    assert!(ka(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert!(!ka(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ));
    assert!(!ka(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, Close\r\n\r\n"
    ));
    assert!(!ka(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nConnection: close\r\n\r\n"
    ));
    assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
    assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    assert!(!ka(
        b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"
    ));
    // A coding-like token is compared whole.
    assert!(ka(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: closed\r\n\r\n"
    ));
}

#[test]
fn malformed_request_lines() {
    for raw in [
        &b"GET /\r\n\r\n"[..], // HTTP/0.9
        b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n",
        b"GET\t/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
        b" GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /caf\xe9 HTTP/1.1\r\nHost: x\r\n\r\n", // not UTF-8
        b"GET / FTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / http/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\r\nHost: x\r\n\r\n",
    ] {
        assert_eq!(status(raw), 400, "{:?}", String::from_utf8_lossy(raw));
    }
    assert_eq!(status(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n"), 505);
    assert_eq!(status(b"GET / HTTP/0.9\r\nHost: x\r\n\r\n"), 505);
    // The version is checked before the method and the target, as in http.py.
    assert_eq!(status(b"G(T / HTTP/2.0\r\nHost: x\r\n\r\n"), 505);
}

#[test]
fn a_utf8_target_is_taken_as_sent() {
    let (head, _) = parse("GET /café?q=ü HTTP/1.1\r\nHost: x\r\n\r\n".as_bytes());
    assert_eq!(head.target, "/café?q=ü");
}

#[test]
fn malformed_header_lines() {
    for raw in [
        &b"GET / HTTP/1.1\r\n\r\n"[..], // no Host
        b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nhost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", // whitespace before the colon
        b"GET / HTTP/1.1\r\nHost\t: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", // obs-fold
        b"GET / HTTP/1.1\r\nHost: x\r\n\tfolded\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nNo colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n: no name\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX(: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", // NUL
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",   // CR
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x7fb\r\n\r\n", // DEL
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x1bb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\r\n\r\n",
    ] {
        assert_eq!(status(raw), 400, "{:?}", String::from_utf8_lossy(raw));
    }
}

#[test]
fn content_length_smuggling_is_refused() {
    for cl in [
        &b"-1"[..],
        b"+5",
        b"5 5",
        b"0x5",
        b"5,5",
        b"1,1",
        b"",
        b"abc",
        b"\xd9\xa5", // a non-ASCII digit
        b"18446744073709551616",
        b"99999999999999999999999",
    ] {
        let mut raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: ".to_vec();
        raw.extend_from_slice(cl);
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(&raw), 400, "{:?}", String::from_utf8_lossy(cl));
    }
    assert_eq!(
        status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
        400
    );
    let (head, _) =
        parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 005\r\n\r\n");
    assert_eq!(head.framing, Framing::Length(5));
    // Leading zeros are taken, however many (http.py's int() refused more
    // than 4300 digits with a ValueError).
    let of = |digits: &[u8]| {
        let raw = [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: "[..],
            digits,
            b"\r\n\r\n",
        ]
        .concat();
        parse_head(&raw, &Limits::default())
            .map(|h| h.unwrap().0.framing)
            .map_err(|e| e.status)
    };
    assert_eq!(
        of(&[&[b'0'; 5000][..], b"5"].concat()),
        Ok(Framing::Length(5))
    );
    assert_eq!(of(b"000"), Ok(Framing::Length(0)));
    assert_eq!(of(&[b'9'; 5000]), Err(400));
}

#[test]
fn content_length_with_transfer_encoding_is_refused() {
    for te in [&b"chunked"[..], b"identity", b"", b"gzip, chunked"] {
        for cl_first in [true, false] {
            let (cl, te) = (
                &b"Content-Length: 5\r\n"[..],
                [&b"Transfer-Encoding: "[..], te, b"\r\n"].concat(),
            );
            let fields = if cl_first {
                [cl, &te].concat()
            } else {
                [&te, cl].concat()
            };
            let raw = [&b"POST / HTTP/1.1\r\nHost: x\r\n"[..], &fields, b"\r\n"].concat();
            assert_eq!(status(&raw), 400, "{:?}", String::from_utf8_lossy(&raw));
        }
    }
}

#[test]
fn transfer_encodings() {
    let (head, _) = parse(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n");
    assert_eq!(head.framing, Framing::Chunked);
    let te = |value: &[u8]| {
        let raw = [&b"POST / HTTP/1.1\r\nHost: x\r\n"[..], value, b"\r\n"].concat();
        parse_head(&raw, &Limits::default())
            .map(|h| h.unwrap().0.framing)
            .map_err(|e| e.status)
    };
    assert_eq!(
        te(b"Transfer-Encoding: \t chunked \t\r\n"),
        Ok(Framing::Chunked)
    );
    assert_eq!(te(b"Transfer-Encoding: chunked, chunked\r\n"), Err(400));
    assert_eq!(
        te(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
        Err(400)
    );
    assert_eq!(
        te(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"),
        Err(400)
    );
    assert_eq!(te(b"Transfer-Encoding: chunked, gzip\r\n"), Err(400));
    assert_eq!(te(b"Transfer-Encoding: chunked,\r\n"), Err(400));
    assert_eq!(te(b"Transfer-Encoding: gzip\r\n"), Err(400));
    assert_eq!(te(b"Transfer-Encoding: pigeons\r\n"), Err(400));
    assert_eq!(te(b"Transfer-Encoding: \r\n"), Err(400));
    assert_eq!(te(b"Transfer-Encoding: \xa0chunked\r\n"), Err(400));
    assert_eq!(te(b"Transfer-Encoding: chunkedx\r\n"), Err(400));
    // A coding before chunked is understood but not supported.
    assert_eq!(te(b"Transfer-Encoding: gzip, chunked\r\n"), Err(501));
    assert_eq!(
        te(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"),
        Err(501)
    );
    assert_eq!(te(b"Transfer-Encoding: , chunked\r\n"), Err(501));
    assert_eq!(
        status(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        400
    );
}

#[test]
fn expect() {
    let (head, _) =
        parse(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-Continue\r\n\r\n");
    assert!(head.expect_continue);
    let (head, _) = parse(b"POST / HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n");
    assert!(!head.expect_continue, "ignored in HTTP/1.0");
    assert_eq!(
        status(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: something\r\n\r\n"),
        417
    );
}

#[test]
fn gunicorns_limits_and_answers() {
    // limit_request_line (4094): the request line without its CRLF; a 400.
    let line = [
        &b"GET /"[..],
        &vec![b'a'; 4094 - b"GET / HTTP/1.1".len()],
        b" HTTP/1.1",
    ]
    .concat();
    assert_eq!(line.len(), 4094);
    parse(&[&line[..], b"\r\nHost: x\r\n\r\n"].concat());
    // A request line of exactly the limit whose CR came alone is not refused.
    assert_eq!(
        parse_head(&[&line[..], b"\r"].concat(), &Limits::default()),
        Ok(None)
    );
    let long = [&b"GET /a"[..], &line[5..], b"\r\nHost: x\r\n\r\n"].concat();
    assert_eq!(status(&long), 400);
    assert_eq!(
        status(&[&b"GET /"[..], &[b'a'; 5000]].concat()),
        400,
        "refused before its end"
    );
    // limit_request_fields (100): a 431.
    let fields: Vec<u8> = (0..99)
        .flat_map(|i| format!("X-{i}: v\r\n").into_bytes())
        .collect();
    parse(&[&b"GET / HTTP/1.1\r\nHost: x\r\n"[..], &fields, b"\r\n"].concat());
    assert_eq!(
        status(
            &[
                &b"GET / HTTP/1.1\r\nHost: x\r\nX-a: b\r\n"[..],
                &fields,
                b"\r\n"
            ]
            .concat()
        ),
        431
    );
    // limit_request_field_size (8190, with the CRLF): a 431.
    let value = vec![b'v'; 8190 - b"X: \r\n".len()];
    parse(
        &[
            &b"GET / HTTP/1.1\r\nHost: x\r\nX: "[..],
            &value,
            b"\r\n\r\n",
        ]
        .concat(),
    );
    assert_eq!(
        status(
            &[
                &b"GET / HTTP/1.1\r\nHost: x\r\nX: v"[..],
                &value,
                b"\r\n\r\n"
            ]
            .concat()
        ),
        431
    );
    assert_eq!(
        status(&[&b"GET / HTTP/1.1\r\nHost: x\r\nX: v"[..], &value].concat()),
        431,
        "before its end"
    );
    // A head that cannot end within the limits is refused before its end.
    let many = b"X: y\r\n".repeat(200_000);
    assert_eq!(
        status(&[&b"GET / HTTP/1.1\r\nHost: x\r\n"[..], &many].concat()),
        431
    );
    // So are empty lines before the request line, past the size of a head.
    assert_eq!(
        parse_head(&b"\r\n".repeat(400_000), &Limits::default()),
        Ok(None)
    );
    assert_eq!(status(&b"\r\n".repeat(500_000)), 431);
}

#[test]
fn limits_are_settable_and_zero_means_gunicorns_maximum() {
    let small = Limits {
        request_line: 20,
        fields: 2,
        field_size: 20,
    };
    assert_eq!(
        status_with(
            b"GET /aaaaaaaaaaaaaaaaa HTTP/1.1\r\nHost: x\r\n\r\n",
            &small
        ),
        400
    );
    assert_eq!(
        status_with(b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\nC: d\r\n\r\n", &small),
        431
    );
    assert_eq!(
        status_with(
            b"GET / HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxx\r\n\r\n",
            &small
        ),
        431
    );
    let unlimited = Limits {
        request_line: 0,
        fields: 0,
        field_size: 0,
    };
    let e = unlimited.effective();
    assert_eq!(
        (e.request_line, e.fields, e.max_head),
        (8190, 32768, 1 << 20)
    );
    let big = [
        &b"GET / HTTP/1.1\r\nHost: x\r\nX: "[..],
        &vec![b'v'; 100_000],
        b"\r\n\r\n",
    ]
    .concat();
    assert!(parse_head(&big, &unlimited).unwrap().is_some());
    // Past 1 MiB, whatever the limits: a 431.
    let huge = [
        &b"GET / HTTP/1.1\r\nHost: x\r\nX: "[..],
        &vec![b'v'; 1 << 20],
        b"\r\n\r\n",
    ]
    .concat();
    assert_eq!(status_with(&huge, &unlimited), 431);
}

#[test]
fn a_tls_handshake_is_named() {
    // As test_http_parse.py's test_a_tls_handshake_is_named: a ClientHello's
    // record header names the cause as soon as its three bytes are in.
    let tls = "TLS handshake on a plain HTTP port: terminate TLS in front of drover, e.g. nginx";
    for raw in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n"[..],
        b"\x16\x03\x03",
        b"\x16\x03\x00\x00\x05",
        b"\r\n\x16\x03\x04",
    ] {
        let e = parse_head(raw, &Limits::default()).unwrap_err();
        assert_eq!((e.status, &*e.detail), (400, tls), "{raw:?}");
    }
    assert!(matches!(
        parse_head(b"\x16\x03", &Limits::default()),
        Ok(None)
    ));
    // Its first two bytes wait for the third even past a tiny
    // limit_request_line, which the whole would not meet: a prefix gets no
    // other answer than the whole (the fuzz target's rule).
    let tiny = Limits {
        request_line: 1,
        ..Limits::default()
    };
    assert!(matches!(parse_head(b"\x16\x03", &tiny), Ok(None)));
    let e = parse_head(b"\x16\x03\x00\x5c", &tiny).unwrap_err();
    assert_eq!(&*e.detail, tls);
    for raw in [
        b"\x16\x03\x05 / HTTP/1.1\r\n\r\n",
        b"\x17\x03\x01 / HTTP/1.1\r\n\r\n",
    ] {
        let e = parse_head(raw, &Limits::default()).unwrap_err();
        assert_ne!(&*e.detail, tls, "{raw:?}");
    }
}

#[test]
fn errors_name_status_and_reason() {
    let e = parse_head(b"GET / HTTP/2.0\r\n", &Limits::default()).unwrap_err();
    assert_eq!((e.status, e.reason), (505, "HTTP Version Not Supported"));
    assert_eq!(
        e.to_string(),
        "505 HTTP Version Not Supported: HTTP version not supported"
    );
    let e = parse_head(
        b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n",
        &Limits::default(),
    )
    .unwrap_err();
    assert_eq!(
        (e.status, e.reason, &*e.detail),
        (400, "Bad Request", "more than one Host header")
    );
}

#[test]
fn the_first_line_at_fault_decides() {
    // Each line is checked in order: its limits, its line end, its syntax
    // (as test_http_parse.py's test of the same name checks http.py).
    let of = |parts: &[&[u8]]| status(&parts.concat());
    let fields: Vec<u8> = (0..200)
        .flat_map(|i| format!("X-{i}: v\r\n").into_bytes())
        .collect();
    let v9000 = &[b'v'; 9000][..];
    let get = &b"GET / HTTP/1.1\r\n"[..];
    assert_eq!(
        of(&[get, b"Host: x\r\nBad line\r\n", &fields, b"\r\n"]),
        400
    );
    assert_eq!(
        of(&[get, b"Host: x\r\n", &fields, b"Bad line\r\n\r\n"]),
        431
    );
    assert_eq!(of(&[b"G(T / HTTP/2.0\r\nHost: x\r\n\r\n"]), 505);
    assert_eq!(of(&[b"G(T / HTTP/1.1\r\nX: ", v9000, b"\r\n\r\n"]), 400);
    assert_eq!(of(&[get, b"X: ", v9000, b"\r\nBad line\r\n\r\n"]), 431);
    assert_eq!(of(&[get, b"Bad line\r\nX: ", v9000]), 400);
    assert_eq!(of(&[b"GET / HTTP/2.0\r\nHost: x\n"]), 505);
    assert_eq!(of(&[get, b"X: ", v9000, b"\n"]), 431);
    // The native parser refuses a complete bad line at once (http.py waits
    // for the head's end or a limit: the answer is the same, later).
    assert_eq!(of(&[get, b"Bad line\r\nX: v"]), 400);
}

#[test]
fn every_byte_at_every_place_of_a_long_value() {
    // Values are checked eight bytes at a time: each byte, at each place.
    for byte in 0..=255u8 {
        for at in 0..24 {
            let mut value = b"abcdefghijklmnopqrstuvwx".to_vec();
            value[at] = byte;
            let raw = [
                &b"GET / HTTP/1.1\r\nHost: x\r\nX: "[..],
                &value,
                b"\r\n\r\n",
            ]
            .concat();
            let valid = byte == b'\t' || (byte >= b' ' && byte != 0x7f);
            match parse_head(&raw, &Limits::default()) {
                Ok(Some((head, _))) if valid => {
                    let trimmed = value.trim_ascii_start().trim_ascii_end();
                    let trimmed = if byte == b'\t' || byte == b' ' {
                        trimmed
                    } else {
                        &value[..]
                    };
                    assert_eq!(head.headers[1].1, trimmed, "{byte:#x} at {at}");
                }
                Err(e) if !valid => assert_eq!(e.status, 400, "{byte:#x} at {at}"),
                other => panic!("{byte:#x} at {at}: {other:?}"),
            }
        }
    }
}

//! Properties of the parser and the decoder: a request built from valid
//! parts parses back to them; smuggling-shaped edits of it are refused; input
//! fed in pieces gets the answer the whole gets; no input panics; a chunked
//! encoding decodes to what was encoded. Bounded: 256 cases each (about a
//! second in all); set PROPTEST_CASES for a longer run.

use drover_h1::{parse_head, ChunkedDecoder, Error, Framing, Head, Limits, Version};
use proptest::prelude::*;

mod common;
use common::{head_like, limits, mutated_head, value, TOKEN};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A request from parts, and the head its parse must give.
#[derive(Debug, Clone)]
struct Parts {
    lead: usize,
    method: String,
    target: String,
    version: Version,
    /// Fields other than those that frame the request.
    fields: Vec<(String, Vec<u8>)>,
    /// 0: no body, 1: Content-Length, 2: chunked.
    body: (u8, u64),
    connection: Option<&'static str>,
    expect: bool,
    /// Padding around values (OWS).
    pad: (&'static str, &'static str),
}

impl Parts {
    fn fields(&self) -> Vec<(String, Vec<u8>)> {
        let mut all = Vec::new();
        if self.version == Version::Http11 {
            all.push(("Host".to_string(), b"example.org".to_vec()));
        }
        all.extend(self.fields.iter().cloned());
        match self.body {
            (1, n) => all.push(("content-LENGTH".into(), n.to_string().into_bytes())),
            (2, _) if self.version == Version::Http11 => {
                all.push(("Transfer-Encoding".into(), b"chunked".to_vec()))
            }
            _ => {}
        }
        if let Some(c) = self.connection {
            all.push(("Connection".into(), c.as_bytes().to_vec()));
        }
        if self.expect {
            all.push(("Expect".into(), b"100-continue".to_vec()));
        }
        all
    }

    fn raw(&self) -> Vec<u8> {
        let version = match self.version {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        };
        let mut raw = b"\r\n".repeat(self.lead);
        raw.extend(format!("{} {} {version}\r\n", self.method, self.target).bytes());
        for (name, value) in self.fields() {
            raw.extend(format!("{name}:{}", self.pad.0).bytes());
            raw.extend(&value);
            raw.extend(format!("{}\r\n", self.pad.1).bytes());
        }
        raw.extend(b"\r\n");
        raw
    }

    fn check(&self, head: &Head<'_>) -> Result<(), TestCaseError> {
        let http10 = self.version == Version::Http10;
        prop_assert_eq!(head.method, &self.method);
        prop_assert_eq!(head.target, &self.target);
        prop_assert_eq!(head.version, self.version);
        let fields = self.fields();
        let expected: Vec<(&str, &[u8])> = fields.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        prop_assert_eq!(&head.headers, &expected);
        let framing = match self.body {
            (1, n) => Framing::Length(n),
            (2, _) if !http10 => Framing::Chunked,
            _ => Framing::None,
        };
        prop_assert_eq!(head.framing, framing);
        let keep_alive = match self.connection {
            Some("close") => false,
            Some("keep-alive") => true,
            _ => !http10,
        };
        prop_assert_eq!(head.keep_alive, keep_alive);
        prop_assert_eq!(head.expect_continue, self.expect && !http10);
        Ok(())
    }
}

fn parts() -> impl Strategy<Value = Parts> {
    let field = (TOKEN, value()).prop_filter_map("a framing field", |(name, v)| {
        let framing = [
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
            "expect",
        ];
        let v = v.trim_ascii().to_vec();
        (!framing.contains(&name.to_ascii_lowercase().as_str())).then_some((name, v))
    });
    (
        0usize..3,
        TOKEN,
        prop_oneof!["/[!-~]{0,30}", "/[a-zé€/]{0,8}", Just("*".to_string())],
        prop_oneof![Just(Version::Http10), Just(Version::Http11)],
        proptest::collection::vec(field, 0..8),
        (0u8..3, any::<u64>()),
        prop_oneof![Just(None), Just(Some("close")), Just(Some("keep-alive"))],
        any::<bool>(),
        (
            prop_oneof![Just(""), Just(" "), Just("\t "), Just("  ")],
            prop_oneof![Just(""), Just(" "), Just(" \t")],
        ),
    )
        .prop_map(
            |(lead, method, target, version, fields, body, connection, expect, pad)| Parts {
                lead,
                method,
                target,
                version,
                fields,
                body,
                connection,
                expect,
                pad,
            },
        )
}

type Parsed<'a> = Result<Option<(Head<'a>, usize)>, Error>;

/// What a prefix's answer must be, given the whole's: the same error, or
/// (until the head is complete) None, or the same head.
fn prefix_agrees(
    prefix_len: usize,
    prefix: &Parsed<'_>,
    whole: &Parsed<'_>,
) -> Result<(), TestCaseError> {
    match (prefix, whole) {
        (Ok(None), Ok(Some((_, n)))) => prop_assert!(prefix_len < *n),
        (Ok(None), _) => {}
        (Ok(Some(p)), Ok(Some(w))) => prop_assert_eq!(p, w),
        (Err(p), Err(w)) => prop_assert_eq!(p, w),
        (p, w) => prop_assert!(
            false,
            "prefix of {} bytes: {:?}, whole: {:?}",
            prefix_len,
            p,
            w
        ),
    }
    Ok(())
}

/// Decodes `input` fed in the pieces `cuts` makes of it.
fn decode_in_pieces(input: &[u8], cuts: &[usize]) -> (Vec<u8>, usize, bool, Option<Error>) {
    let mut d = ChunkedDecoder::new(&Limits::default());
    let mut out = Vec::new();
    let mut used = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    bounds.push(input.len());
    bounds.sort_unstable();
    let mut at = 0;
    for end in bounds {
        match d.decode(&input[at..end], &mut out) {
            Ok(n) => {
                used += n;
                if n < end - at {
                    break;
                }
            }
            // What the pieces before took is not compared: the error is final.
            Err(e) => return (out, 0, d.is_done(), Some(e)),
        }
        at = end;
    }
    (out, used, d.is_done(), None)
}

/// A chunked encoding of `body` cut at `cuts`, with extensions and trailers.
fn encode(body: &[u8], cuts: &[usize], exts: &[String], trailers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    bounds.push(body.len());
    bounds.sort_unstable();
    bounds.dedup();
    let mut out = Vec::new();
    let mut at = 0;
    for (i, end) in bounds.into_iter().enumerate() {
        if end == at {
            continue;
        }
        let ext = exts.get(i % exts.len().max(1)).map_or("", |s| s.as_str());
        out.extend(format!("{:x}{ext}\r\n", end - at).bytes());
        out.extend(&body[at..end]);
        out.extend(b"\r\n");
        at = end;
    }
    out.extend(b"0\r\n");
    for (name, value) in trailers {
        out.extend(name.bytes());
        out.extend(b": ");
        out.extend(value);
        out.extend(b"\r\n");
    }
    out.extend(b"\r\n");
    out
}

fn chunk_ext() -> impl Strategy<Value = String> {
    let one = (
        prop_oneof![Just(""), Just(" "), Just("\t ")],
        TOKEN,
        prop_oneof![
            Just(String::new()),
            TOKEN.prop_map(|v| format!("={v}")),
            "[ -!#-\\[\\]-~]{0,8}".prop_map(|v| format!(" = \"{v}\"")),
            "[a-z]{0,3}".prop_map(|v| format!("=\"\\\"{v}\\\\\"")),
        ],
    )
        .prop_map(|(bws, name, value)| format!("{bws};{bws}{name}{value}"));
    proptest::collection::vec(one, 0..3).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_request_from_valid_parts_parses_back_to_them(parts in parts(), body in proptest::collection::vec(any::<u8>(), 0..8)) {
        let raw = parts.raw();
        let mut buf = raw.clone();
        buf.extend(&body);
        match parse_head(&buf, &Limits::default()) {
            Ok(Some((head, n))) => {
                prop_assert_eq!(n, raw.len());
                parts.check(&head)?;
            }
            other => prop_assert!(false, "{:?}: {:?}", String::from_utf8_lossy(&raw), other),
        }
    }

    /// Every prefix of a request gets None (before its end), or the whole's answer.
    #[test]
    fn a_head_fed_in_pieces_gets_the_answer_the_whole_gets(
        raw in prop_oneof![head_like(), mutated_head()],
        limits in limits(),
    ) {
        let whole = parse_head(&raw, &limits);
        for k in 0..raw.len() {
            prefix_agrees(k, &parse_head(&raw[..k], &limits), &whole)?;
        }
    }

    #[test]
    fn a_valid_request_fed_in_pieces_is_none_until_its_end(parts in parts()) {
        let raw = parts.raw();
        let whole = parse_head(&raw, &Limits::default());
        prop_assert!(matches!(whole, Ok(Some(_))));
        for k in 0..raw.len() {
            prop_assert_eq!(parse_head(&raw[..k], &Limits::default()), Ok(None), "{}", k);
        }
    }

    /// Any one CRLF of a valid head made a bare LF (or a bare CR): a 400.
    #[test]
    fn a_bare_lf_or_cr_anywhere_in_a_head_is_refused(parts in parts(), which in any::<prop::sample::Index>(), cr in any::<bool>()) {
        let raw = parts.raw();
        let lead = 2 * parts.lead;
        let crlfs: Vec<usize> = raw.windows(2).enumerate()
            .filter(|(i, w)| *i >= lead && w == b"\r\n").map(|(i, _)| i).collect();
        let at = crlfs[which.index(crlfs.len())];
        let mut bad = raw.clone();
        bad.remove(if cr { at + 1 } else { at });
        let got = parse_head(&bad, &Limits::default());
        if cr && at + 2 == raw.len() {
            // The final CRLF cut to a CR: a head that is not over yet.
            prop_assert_eq!(got, Ok(None));
        } else {
            prop_assert_eq!(got.map_err(|e| e.status), Err(400), "{:?}", String::from_utf8_lossy(&bad));
        }
    }

    /// Smuggling-shaped edits of a valid head: refused with a 400.
    #[test]
    fn smuggling_shaped_edits_are_refused(parts in parts(), edit in 0usize..6, which in any::<prop::sample::Index>()) {
        let raw = parts.raw();
        let head_start = 2 * parts.lead;
        let line_starts: Vec<usize> = raw.windows(2).enumerate()
            .filter(|(i, w)| *i >= head_start && w == b"\r\n" && i + 2 < raw.len())
            .map(|(i, _)| i + 2).collect();
        let mut bad = raw.clone();
        let extra: &[u8] = match edit {
            0 => b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
            1 => b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
            2 => b"Content-Length: 1\r\nContent-Length: 2\r\n",
            3 => b"Content-Length: 1 \r\nContent-Length:  12\r\n",
            4 => b"Content-Length : 3\r\n",
            _ => b" folded\r\n",
        };
        let at = line_starts[which.index(line_starts.len())];
        bad.splice(at..at, extra.iter().copied());
        let got = parse_head(&bad, &Limits::default()).map_err(|e| e.status);
        prop_assert_eq!(got, Err(400), "{:?}", String::from_utf8_lossy(&bad));
    }

    #[test]
    fn any_bytes_are_parsed_or_refused_without_a_panic(raw in proptest::collection::vec(any::<u8>(), 0..600), limits in limits()) {
        if let Err(e) = parse_head(&raw, &limits) {
            prop_assert!([400, 417, 431, 501, 505].contains(&e.status), "{}", e);
        }
        let _ = decode_in_pieces(&raw, &[]);
    }

    #[test]
    fn a_chunked_encoding_decodes_to_its_body(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
        exts in proptest::collection::vec(chunk_ext(), 0..3),
        trailers in proptest::collection::vec((TOKEN, value()), 0..3),
        feed in proptest::collection::vec(any::<usize>(), 0..8),
        next in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let trailers: Vec<_> = trailers.into_iter().map(|(n, v)| (n, v.trim_ascii().to_vec())).collect();
        let encoded = encode(&body, &cuts, &exts, &trailers);
        let mut input = encoded.clone();
        input.extend(&next);
        let (out, used, done, err) = decode_in_pieces(&input, &feed);
        prop_assert_eq!(err, None, "{:?}", String::from_utf8_lossy(&encoded));
        prop_assert!(done);
        prop_assert_eq!(used, encoded.len());
        prop_assert_eq!(out, body);
    }

    /// Any input, cut anywhere: the same body, bytes used, end and error as whole.
    #[test]
    fn a_chunked_body_fed_in_pieces_decodes_as_the_whole(
        pieces in proptest::collection::vec(prop_oneof![
            Just(b"5\r\nhello\r\n".to_vec()),
            Just(b"0\r\n\r\n".to_vec()),
            Just(b"0\r\nX: y\r\n\r\n".to_vec()),
            Just(b"a;b=\"c\"\r\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b";".to_vec()),
            Just(b" ".to_vec()),
            Just(b"\"".to_vec()),
            Just(b"\\".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..6),
        ], 0..12),
        feed in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let input = pieces.concat();
        let whole = decode_in_pieces(&input, &[]);
        let cut = decode_in_pieces(&input, &feed);
        prop_assert_eq!(whole, cut);
    }
}

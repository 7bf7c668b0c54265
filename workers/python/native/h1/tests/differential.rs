//! Differential test: the same corpus through drover-h1 and the pure-Python
//! parser (workers/python/src/drover_wsgi/http.py, run by `python3`), which
//! must give the same answers: the same status for a refused head, the same
//! head (length, method, target, framing, keep-alive, 100-continue) for an
//! accepted one, the same verdict on a chunk-size line. The one difference
//! allowed: on an incomplete head, drover-h1 refuses a complete bad line at
//! once where http.py waits (None) for the head's end or a limit.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use drover_h1::{parse_head, ChunkedDecoder, Framing, Limits, Version};
use proptest::prop_oneof;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;

mod common;

const SCRIPT: &str = r#"
import sys
from drover_wsgi.http import HTTPError, Limits, parse_chunk_size, parse_request
for line in sys.stdin:
    kind, rl, fields, fs, raw = line.split()
    raw = bytes.fromhex(raw)
    try:
        if kind == "chunk":
            parse_chunk_size(raw)
            print("ok")
            continue
        got = parse_request(raw, Limits(int(rl), int(fields), int(fs)))
    except HTTPError as e:
        print("error", e.status)
        continue
    if got is None:
        print("none")
        continue
    req, used = got
    framing = "chunked" if req.chunked else ("length %d" % req.content_length
                                            if "CONTENT_LENGTH" in req.headers else "none")
    print("head", used, req.method, req.target.hex(), "1.0" if req.http10 else "1.1", framing,
          int(req.keep_alive), int(req.expect_continue))
"#;

/// drover-h1's answer, in the script's words.
fn native(kind: &str, raw: &[u8], limits: &Limits) -> String {
    if kind == "chunk" {
        let line = [raw, b"\r\n"].concat();
        let mut d = ChunkedDecoder::new(limits);
        return match d.decode(&line, &mut Vec::new()) {
            Ok(_) => "ok".into(),
            Err(e) => format!("error {}", e.status),
        };
    }
    match parse_head(raw, limits) {
        Err(e) => format!("error {}", e.status),
        Ok(None) => "none".into(),
        Ok(Some((h, n))) => {
            let target: String = h.target.bytes().fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            });
            let framing = match h.framing {
                Framing::Chunked => "chunked".to_string(),
                Framing::Length(n) => format!("length {n}"),
                Framing::None => "none".into(),
            };
            let version = if h.version == Version::Http10 {
                "1.0"
            } else {
                "1.1"
            };
            format!(
                "head {n} {} {target} {version} {framing} {} {}",
                h.method, h.keep_alive as u8, h.expect_continue as u8
            )
        }
    }
}

fn hex(raw: &[u8]) -> String {
    let mut s = String::with_capacity(raw.len() * 2 + 2);
    for b in raw {
        let _ = write!(s, "{b:02x}");
    }
    if s.is_empty() {
        s.push_str("00"); // never sent: an empty head is not in the corpus
    }
    s
}

#[test]
fn drover_h1_and_http_py_give_the_same_answers() {
    let cases: usize = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
        * 8;
    let mut runner = TestRunner::deterministic();
    let heads = (
        prop_oneof![common::head_like(), common::mutated_head()],
        common::limits(),
    );
    let mut corpus: Vec<(&str, Vec<u8>, Limits)> = Vec::new();
    while corpus.len() < cases {
        let (raw, limits) = heads.new_tree(&mut runner).unwrap().current();
        if !raw.is_empty() {
            corpus.push(("head", raw, limits));
        }
        let line = common::chunk_line_like()
            .new_tree(&mut runner)
            .unwrap()
            .current();
        if !line.is_empty() {
            corpus.push(("chunk", line, Limits::default()));
        }
    }
    let input: String = corpus
        .iter()
        .map(|(kind, raw, l)| {
            format!(
                "{kind} {} {} {} {}\n",
                l.request_line,
                l.fields,
                l.field_size,
                hex(raw)
            )
        })
        .collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../src");
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .env("PYTHONPATH", &src)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs (the differential test needs it)");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "python3 failed");
    let answers: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(answers.len(), corpus.len());
    let (mut refused, mut accepted, mut early) = (0, 0, 0);
    for ((kind, raw, limits), python) in corpus.iter().zip(answers) {
        let rust = native(kind, raw, limits);
        if python == "none" && rust.starts_with("error") {
            early += 1;
            continue;
        }
        assert_eq!(
            rust,
            python,
            "{kind} {:?} with {limits:?}",
            String::from_utf8_lossy(raw)
        );
        refused += rust.starts_with("error") as usize;
        accepted += (rust.starts_with("head") || rust == "ok") as usize;
    }
    eprintln!(
        "{} inputs: {accepted} accepted, {refused} refused alike, {early} refused early by drover-h1",
        corpus.len()
    );
}

//! What a parse costs: `parse_head` on wrk's head and a browser's, N times
//! each (N from the first argument, default 1,000,000), in ns per parse.
//! For a figure a loaded machine does not skew, count instructions:
//!   cargo build --release --example cost -p drover-h1
//!   valgrind --tool=callgrind target/release/examples/cost 10000 wrk
//! and subtract a run with N = 0.

use std::hint::black_box;
use std::time::Instant;

use drover_h1::{parse_head, Limits};

const WRK: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n";
const BROWSER: &[u8] = b"GET /static/app.js?v=123 HTTP/1.1\r\nHost: example.org\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n\
Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\n\
Cookie: session=abcdef0123456789; theme=dark; lang=en\r\nUpgrade-Insecure-Requests: 1\r\n\
Sec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Site: none\r\nSec-Fetch-User: ?1\r\n\
If-None-Match: \"abc123\"\r\nCache-Control: max-age=0\r\n\r\n";

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let only = args.next();
    let limits = Limits::default();
    for (name, head) in [("wrk", WRK), ("browser", BROWSER)] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let began = Instant::now();
        for _ in 0..n {
            black_box(parse_head(black_box(head), &limits).ok());
        }
        let ns = began.elapsed().as_nanos() as f64 / f64::from(n.max(1));
        println!("{name} ({} bytes): {ns:.0} ns per parse", head.len());
    }
}

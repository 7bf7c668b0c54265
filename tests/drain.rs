//! Drain without resets: under a steady stream of new connections, a graceful
//! shutdown leaves every attempt either fully answered or refused at connect
//! time — for the Rust reference worker and for the Python WSGI worker.

mod common;

use common::*;

/// Three shutdowns per worker kind: the race this guards against (a handshake
/// completing between a worker's last accept and its close) is narrow.
const ROUNDS: usize = 3;

#[test]
fn rust_worker_graceful_shutdown_under_load_resets_nothing() {
    let command = format!("[\"{}\"]", hello_bin());
    for _ in 0..ROUNDS {
        shutdown_under_load(&command, "/sleep?ms=5", 1000);
    }
}

#[test]
fn python_worker_graceful_shutdown_under_load_resets_nothing() {
    let command = format!(
        "[{:?}, \"--threads\", \"8\", \"example_app:app\"]",
        python::script("drover-wsgi")
    );
    for _ in 0..ROUNDS {
        shutdown_under_load(&command, "/", 300);
    }
}

fn shutdown_under_load(command: &str, path: &str, before: u64) {
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = {command}\nworkers = 2\nready = \"notify\"\nchdir = \"{}\"\n",
        python::examples_dir()
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    let addr = d.tcp_addr();
    let load = Load::start(addr, 50, path);
    // A steady state first.
    wait_answered(&load, before);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0));
    // Every client makes at least one attempt after the exit.
    wait_for("refusals after exit", LIMIT, || {
        get(addr, "/").is_err().then_some(())
    });
    let o = load.finish();
    eprintln!("outcomes: {o:?}");
    assert!(
        o.refused > 0,
        "connections were refused after the shutdown: {o:?}"
    );
    assert_eq!((o.reset, o.truncated, o.other), (0, 0, 0), "{o:?}");
}

/// A kept-alive connection that is idle when its worker is told to stop,
/// and whose client sends its next request a moment later (as a client in a
/// loop does, the instant it has the last response): hello answers that
/// request, with `Connection: close`, instead of closing the connection
/// under it. The old hello closed it at once, and the client saw the end of
/// the stream (or a reset) where it expected an answer.
#[test]
fn hello_answers_a_kept_alive_request_sent_just_after_the_stop() {
    use std::io::{Read, Write};
    let config = format!(
        "bind = [\"127.0.0.1:0\"]\ncommand = [\"{}\"]\nworkers = 1\nready = \"notify\"\n\
         graceful_timeout = \"10s\"\n",
        hello_bin()
    );
    let mut d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    let mut s = std::net::TcpStream::connect(d.tcp_addr()).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    s.write_all(request).unwrap();
    let first = read_response(&mut s);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(!first.to_ascii_lowercase().contains("connection: close"));
    d.signal(Signal::SIGTERM);
    d.wait_log("stopping (graceful)");
    // A worker that closes idle connections at the stop has done so by now:
    // watch for the end of the stream for 200 ms (hello now gives the client
    // 1 s to send its request).
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&s),
        nix::poll::PollFlags::POLLIN,
    )];
    let closed = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16)).unwrap() > 0;
    // Sent either way: a client does not know.
    let sent = s.write_all(request);
    let second = read_response(&mut s);
    assert!(
        !closed && sent.is_ok() && second.starts_with("HTTP/1.1 200"),
        "closed under the client: end of stream seen {closed}, write {sent:?}, read {second:?}"
    );
    assert!(
        second.to_ascii_lowercase().contains("connection: close"),
        "{second}"
    );
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "closed after it");
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}

/// One response (head and `Content-Length` body) read from `s`, as text;
/// what was read before an error or the end of the stream otherwise.
fn read_response(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => raw.push(byte[0]),
            Ok(_) => return format!("{}<end of stream>", String::from_utf8_lossy(&raw)),
            Err(e) => return format!("{}<{e}>", String::from_utf8_lossy(&raw)),
        }
    }
    let head = String::from_utf8_lossy(&raw).to_string();
    let length: usize = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    match s.read_exact(&mut body) {
        Ok(()) => head + &String::from_utf8_lossy(&body),
        Err(e) => format!("{head}<{e}>"),
    }
}

//! One request with the GIL held: the WSGI environ, the app call,
//! `start_response`, the iteration of the result and the response framing
//! (ported from drover_wsgi/server.py's Response). The response is collected
//! and written by the caller with the GIL released; only a streamed body
//! (chunked, or delimited by the close) is written as it comes.

use std::borrow::Cow;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyAssertionError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use pyo3::{ffi, intern};

use crate::input::Input;
use crate::pool::{Peer, Shared};
use crate::sock;
use crate::util::{error_body_size, error_response, log, split_target, with_http_date};
use crate::ClientGone;

/// What the connection does after the response is written.
pub enum After {
    /// Serve the next request (pipelined, or wait for it: park).
    Continue,
    /// Close now: the client asked for it and nothing more will come.
    Close,
    /// Close without a reset.
    Linger,
}

pub struct Outcome {
    /// Bytes to write, with the GIL released.
    pub out: Vec<u8>,
    pub after: After,
    /// The access log line, to write once `out` went out or could not.
    pub line: Option<Line>,
}

/// The access log line of the app's response, written when the response
/// ended: its last bytes sent, or the client gone (as Gunicorn writes it,
/// in a `finally`), so that `b` counts the body bytes that went out.
pub struct Line {
    environ: Py<PyDict>,
    code: u16,
    headers: Py<PyAny>,
    took: f64,
    /// Body bytes sent already (a streamed body's), and whether any byte
    /// of the response was.
    body_sent: u64,
    wrote: bool,
    /// Where the outcome's `out` holds body bytes, and how many.
    body_at: usize,
    body_len: usize,
}

impl Line {
    /// Writes the line, `n` bytes of the outcome's `out` having gone out.
    pub fn write(self, py: Python<'_>, sh: &Shared, n: usize) {
        let Some(access) = &sh.hooks.access else {
            return;
        };
        let body = self.body_sent + n.saturating_sub(self.body_at).min(self.body_len) as u64;
        let sent = (self.wrote || n > 0).then_some(body);
        let status = match self.code {
            0 => "-".to_string(),
            code => code.to_string(),
        };
        let line = (
            self.environ.bind(py),
            status,
            sent,
            self.headers.bind(py),
            self.took,
        );
        if let Err(e) = access.call1(py, line) {
            e.print(py);
        }
    }

    /// Whether the line is whole before `out` is sent: no body byte is
    /// left to send, and a byte of the response went out already.
    fn whole_before(&self, out: &[u8]) -> bool {
        out.is_empty() || (self.wrote && self.body_len == 0)
    }
}

pub enum BodyPlan {
    Empty,
    InMemory(Vec<u8>),
    /// Read by wsgi.input from the socket as the app reads.
    Stream,
    /// The small body did not arrive in time (408).
    TimedOut,
}

pub struct ConnView<'a> {
    pub fd: RawFd,
    pub listener: usize,
    pub peer: &'a Peer,
    pub trusted: bool,
    /// The connection's last request (--keepalive-requests): its response closes it.
    pub last: bool,
}

/// A coalesced write is flushed past this size.
const FLUSH_AT: usize = 64 * 1024;

/// The worker's pid, and the fork handler that marks a child (an app's
/// `os.fork()` in a request): set at the first request.
static SERVER_PID: OnceLock<u32> = OnceLock::new();
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn mark_forked() {
    FORKED.store(true, Ordering::Relaxed);
    crate::pool::unblock_signals_in_child();
}

/// The child of an app's `os.fork()` came back into the server: without
/// this it served on (the forking thread went back to polling the
/// listeners, outside drover's watch). It exits, as in the pure-Python core.
fn exit_forked_child(py: Python<'_>) -> ! {
    let parent = SERVER_PID.get().copied().unwrap_or(0);
    let exit = py
        .import("drover_wsgi.server")
        .and_then(|m| m.getattr("exit_forked_child"))
        .and_then(|f| f.call1((parent,)));
    if let Err(e) = exit {
        e.print(py);
    }
    unsafe { libc::_exit(0) }
}

pub fn handle(
    py: Python<'_>,
    sh: &Arc<Shared>,
    view: &ConnView<'_>,
    head: &drover_h1::Head<'_>,
    rest: &mut Vec<u8>,
    plan: BodyPlan,
) -> Outcome {
    sh.count_request();
    let environ = match sh.listeners[view.listener].base.bind(py).copy() {
        Ok(e) => e,
        Err(e) => return internal_error(py, sh, view.fd, &PyDict::new(py), head, e),
    };
    match environ_of(py, sh, view, head, &environ) {
        Ok(None) => {}
        Ok(Some((status, why))) => return refused(py, sh, view.fd, &environ, head, status, &why),
        Err(e) => return internal_error(py, sh, view.fd, &environ, head, e),
    }
    let http10 = head.version == drover_h1::Version::Http10;
    let streaming = matches!(plan, BodyPlan::Stream);
    let timed_out = matches!(plan, BodyPlan::TimedOut);
    let input = match plan {
        BodyPlan::Empty | BodyPlan::TimedOut => Input::empty(),
        BodyPlan::InMemory(body) => Input::in_memory(body),
        BodyPlan::Stream => Input::streaming(
            view.fd,
            std::mem::take(rest),
            match head.framing {
                drover_h1::Framing::Length(n) => Some(n),
                _ => None,
            },
            &sh.set.limits,
            head.expect_continue,
            sh.set.body_timeout,
            sh.set.body_min_rate,
            sh.set.io_timeout,
        ),
    };
    let input = Py::new(py, input).expect("an Input object");
    let resp = Response {
        sh: sh.clone(),
        fd: view.fd,
        io_timeout: sh.set.io_timeout,
        is_head: head.method == "HEAD",
        http10,
        keep_alive: head.keep_alive && !view.last,
        server_keeps: false,
        code: 0,
        app_length: None,
        app_close: false,
        headers: None,
        sent: false,
        mode: Mode::None,
        left: 0,
        keep: false,
        body_ok: true,
        body_sent: 0,
        wrote: false,
        body_at: 0,
        body_len: 0,
        over: 0,
        out: Vec::new(),
        flushed: false,
        input: Some(input.clone_ref(py)),
    };
    let resp = Py::new(py, StartResponse { r: resp }).expect("a start_response object");
    let _ = environ.set_item(intern!(py, "wsgi.input"), input.bind(py));
    SERVER_PID.get_or_init(|| {
        unsafe { libc::pthread_atfork(None, None, Some(mark_forked)) };
        std::process::id()
    });
    let started = Instant::now();
    let result = if timed_out {
        Err(crate::BodyTimeout::new_err(
            "the request body did not arrive in time",
        ))
    } else {
        call_app(py, sh, &environ, &resp)
    };
    let took = started.elapsed().as_secs_f64();
    let mut inp = input.bind(py).borrow_mut();
    let mut sr = resp.bind(py).borrow_mut();
    let r = &mut sr.r;
    r.input = None;
    let result = match inp.take_failure() {
        // The app caught the body's failure and answered it as its own
        // (Flask, Django: a 500): the client is answered for what happened,
        // 408 or 400, as when the app lets it through.
        Some(e) if result.is_ok() && !r.flushed => {
            r.sent = false; // the app's answer, all still here, is replaced
            r.out.clear();
            r.body_len = 0;
            Err(e)
        }
        _ => result,
    };
    let outcome = match result {
        Ok(()) => {
            sh.note_service_time(took);
            let keep = r.keep && inp.discard(py);
            let after = if keep {
                After::Continue
            } else if !head.keep_alive
                && inp.finished()
                && r.body_ok
                && (!streaming || inp.finished())
            {
                After::Close
            } else {
                After::Linger
            };
            Outcome {
                out: std::mem::take(&mut r.out),
                after,
                line: r.line(py, sh, &environ, took),
            }
        }
        // With what was sent: the client left.
        Err(e) if e.is_instance_of::<ClientGone>(py) => Outcome {
            out: Vec::new(),
            after: After::Close,
            line: r.line(py, sh, &environ, took),
        },
        Err(e) => failed(py, sh, &environ, head, r, e, took),
    };
    if r.over > 0 {
        said_over(
            py,
            environ.get_item(intern!(py, "RAW_URI")).ok().flatten(),
            head,
            r,
        );
    }
    r.fd = -1;
    let leftover = inp.detach();
    if streaming {
        *rest = leftover;
    }
    let mut outcome = outcome;
    // Close after the whole body only when nothing else arrived (the next
    // request would be lost).
    if matches!(outcome.after, After::Close) && !rest.is_empty() {
        outcome.after = After::Linger;
    }
    // A line that sending `out` cannot change is written now, without
    // taking the GIL again after the send.
    if outcome
        .line
        .as_ref()
        .is_some_and(|l| l.whole_before(&outcome.out))
    {
        outcome.line.take().unwrap().write(py, sh, 0);
    }
    outcome
}

/// The line for a body longer than its Content-Length (the pure-Python core's).
fn said_over(
    py: Python<'_>,
    uri: Option<Bound<'_, PyAny>>,
    head: &drover_h1::Head<'_>,
    r: &Response,
) {
    let line = py
        .import("drover_wsgi.server")
        .and_then(|m| m.getattr("over_line"))
        .and_then(|f| f.call1((head.method, uri, r.app_length.unwrap_or(0), r.over)))
        .and_then(|line| line.extract::<String>());
    match line {
        Ok(line) => log(&line),
        Err(e) => e.print(py),
    }
}

/// The server's own failure on a request (building its environ; a proxy
/// hook that raised): logged with its traceback (the pure-Python core's
/// line), answered 500 and written to the access log.
fn internal_error(
    py: Python<'_>,
    sh: &Shared,
    fd: RawFd,
    environ: &Bound<'_, PyDict>,
    head: &drover_h1::Head<'_>,
    error: PyErr,
) -> Outcome {
    let uri = latin1(py, head.target.as_bytes());
    let logged = py
        .import("drover_wsgi.server")
        .and_then(|m| m.getattr("log_internal_error"))
        .and_then(|f| f.call1((head.method, uri, error.into_value(py))));
    if let Err(e) = logged {
        e.print(py);
    }
    let (sent, outcome) = answer(py, sh, fd, 500, "internal error");
    if let Some(access) = &sh.hooks.access {
        let line = access.call1(py, (environ, "500", sent, PyList::empty(py), 0.0));
        if let Err(e) = line {
            e.print(py);
        }
    }
    outcome
}

/// A request refused once its head was read (the secure scheme headers
/// disagree, a SCRIPT_NAME header outside the path, a target it cannot
/// split): the line that says why (the pure-Python core's), the answer,
/// and its access log line, as for a bad request body.
fn refused(
    py: Python<'_>,
    sh: &Shared,
    fd: RawFd,
    environ: &Bound<'_, PyDict>,
    head: &drover_h1::Head<'_>,
    status: u16,
    why: &str,
) -> Outcome {
    let raw_uri = environ.get_item(intern!(py, "RAW_URI")).ok().flatten();
    let logged = py
        .import("drover_wsgi.server")
        .and_then(|m| m.getattr("log_refusal"))
        .and_then(|f| f.call1((head.method, raw_uri, status, why)));
    if let Err(e) = logged {
        e.print(py);
    }
    let (sent, outcome) = answer(py, sh, fd, status, why);
    if let Some(access) = &sh.hooks.access {
        let line = access.call1(
            py,
            (environ, status.to_string(), sent, PyList::empty(py), 0.0),
        );
        if let Err(e) = line {
            e.print(py);
        }
    }
    outcome
}

/// Sends the server's own answer (an error) with the GIL released. Returns
/// its body's bytes once sent, None if it could not be (the access log's
/// `b`, logged after the answer, as nginx logs its error page's size), and
/// what the connection does next: it lingers, or closes if the client left.
fn answer(
    py: Python<'_>,
    sh: &Shared,
    fd: RawFd,
    status: u16,
    why: &str,
) -> (Option<usize>, Outcome) {
    let response = error_response(status, why);
    let timeout = sh.set.io_timeout;
    match py.detach(|| sock::send_all(fd, &response, timeout)) {
        Ok(()) => (
            Some(error_body_size(&response)),
            Outcome {
                out: Vec::new(),
                after: After::Linger,
                line: None,
            },
        ),
        Err(_) => (
            None,
            Outcome {
                out: Vec::new(),
                after: After::Close,
                line: None,
            },
        ),
    }
}

/// A request head refused before there is a request: drover_wsgi's
/// HeadRefusals hook, with the client's address as REMOTE_ADDR and its port.
pub fn head_refused(
    py: Python<'_>,
    sh: &Shared,
    peer: &Peer,
    status: u16,
    why: &str,
    seconds: f64,
    sent: Option<usize>,
) {
    let (addr, port) = match peer {
        Peer::Inet(ip, port) => (PyString::new(py, &ip.to_string()), Some(*port)),
        Peer::Unix(path) => (latin1(py, path), None),
    };
    if let Err(e) = sh
        .hooks
        .head_refused
        .call1(py, (addr, port, status, why, seconds, sent))
    {
        e.print(py);
    }
}

/// The app raised (or its read of the body failed): 400 for a bad chunked
/// body, 408 for a body that stopped coming, else 500 (logged with the
/// traceback, by the Python hook); after a head was sent, the connection
/// just ends.
fn failed(
    py: Python<'_>,
    sh: &Shared,
    environ: &Bound<'_, PyDict>,
    head: &drover_h1::Head<'_>,
    r: &mut Response,
    error: PyErr,
    took: f64,
) -> Outcome {
    let raw_uri = environ.get_item(intern!(py, "RAW_URI")).ok().flatten();
    let (status, why): (u16, String) = match sh
        .hooks
        .failed
        .call1(py, (error.into_value(py), head.method, raw_uri))
        .and_then(|v| v.extract(py))
    {
        Ok(v) => v,
        Err(e) => {
            e.print(py);
            (500, "the application failed; see the worker's log".into())
        }
    };
    if r.sent {
        // Mid-body: what was made goes out, then the connection ends early;
        // its line has what was sent, as Gunicorn logs it.
        return Outcome {
            out: std::mem::take(&mut r.out),
            after: After::Close,
            line: r.line(py, sh, environ, took),
        };
    }
    let (sent, outcome) = answer(py, sh, r.fd, status, &why);
    if let Some(access) = &sh.hooks.access {
        if let Err(e) = access.call1(
            py,
            (environ, status.to_string(), sent, PyList::empty(py), took),
        ) {
            e.print(py);
        }
    }
    outcome
}

fn call_app(
    py: Python<'_>,
    sh: &Shared,
    environ: &Bound<'_, PyDict>,
    resp: &Py<StartResponse>,
) -> PyResult<()> {
    let result = sh.hooks.app.bind(py).call1((environ, resp.bind(py)));
    if FORKED.load(Ordering::Relaxed) {
        exit_forked_child(py);
    }
    let result = result?;
    let sent = send_result(py, resp, &result);
    if result.is_exact_instance_of::<PyList>() || result.is_exact_instance_of::<PyTuple>() {
        return sent; // no close() (and no AttributeError to make and drop per request)
    }
    let closed = match result.getattr_opt(intern!(py, "close")) {
        Ok(Some(close)) => close.call0().map(|_| ()),
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    sent.and(closed)
}

fn send_result(
    py: Python<'_>,
    resp: &Py<StartResponse>,
    result: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let mut sr = resp.bind(py).borrow_mut();
    if sr.r.sent {
        // The app used write(): the body is streamed.
        drop(sr);
        for chunk in result.try_iter()? {
            let chunk = chunk?;
            resp.bind(py).borrow_mut().r.write(py, &chunk)?;
        }
        return resp.bind(py).borrow_mut().r.finish(py);
    }
    if let Ok(list) = result.cast_exact::<PyList>() {
        return sr.r.send_whole_seq(py, list.iter());
    }
    if let Ok(tuple) = result.cast_exact::<PyTuple>() {
        return sr.r.send_whole_seq(py, tuple.iter());
    }
    // An iterator (a generator, werkzeug's ClosingIterator) has no len():
    // not asked, which would make and drop a TypeError per request.
    let is_iterator = unsafe { ffi::PyIter_Check(result.as_ptr()) } != 0;
    let one = !is_iterator && result.len().ok() == Some(1) && sr.r.code != 0;
    drop(sr);
    let mut iter = result.try_iter()?;
    if one {
        if let Some(chunk) = iter.next() {
            let chunk = chunk?;
            // A len() of 1 may lie: then the body is streamed, not cut.
            let Some(rest) = iter.next() else {
                let bytes = to_bytes(py, &chunk)?;
                return resp
                    .bind(py)
                    .borrow_mut()
                    .r
                    .send_whole(py, bytes.as_bytes());
            };
            let rest = rest?;
            resp.bind(py).borrow_mut().r.write(py, &chunk)?;
            resp.bind(py).borrow_mut().r.write(py, &rest)?;
        } else {
            iter = result.try_iter()?;
        }
    }
    for chunk in iter {
        let chunk = chunk?;
        resp.bind(py).borrow_mut().r.write(py, &chunk)?;
    }
    resp.bind(py).borrow_mut().r.finish(py)
}

fn to_bytes<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    if let Ok(b) = data.cast_exact::<PyBytes>() {
        return Ok(b.clone());
    }
    let name = data.get_type().name()?.to_string();
    if name == "bytearray" || name == "memoryview" {
        return Ok(py
            .get_type::<PyBytes>()
            .call1((data,))?
            .cast_into::<PyBytes>()?);
    }
    Err(PyTypeError::new_err(format!(
        "response body chunks must be bytes, not {name}"
    )))
}

// -- the environ -------------------------------------------------------------------

/// Why a request is refused: its status and reason.
type Refusal = (u16, String);

/// A str from bytes read as latin-1 (PEP 3333's "native strings").
fn latin1<'py>(py: Python<'py>, b: &[u8]) -> Bound<'py, PyString> {
    if b.is_ascii() {
        return PyString::new(py, unsafe { std::str::from_utf8_unchecked(b) });
    }
    unsafe {
        let p = ffi::PyUnicode_DecodeLatin1(
            b.as_ptr().cast(),
            b.len() as ffi::Py_ssize_t,
            std::ptr::null(),
        );
        Bound::from_owned_ptr(py, p).cast_into_unchecked()
    }
}

fn method<'py>(py: Python<'py>, m: &str) -> Bound<'py, PyString> {
    match m {
        "GET" => intern!(py, "GET").clone(),
        "POST" => intern!(py, "POST").clone(),
        "HEAD" => intern!(py, "HEAD").clone(),
        _ => PyString::new(py, m),
    }
}

/// The environ key of a header name ("X-Foo" -> "HTTP_X_FOO"), interned and
/// cached by the name in lower case.
fn header_key<'py>(py: Python<'py>, sh: &Shared, lower: &[u8]) -> Bound<'py, PyString> {
    // The commonest, without the cache's lock and hash.
    let common = match lower {
        b"host" => intern!(py, "HTTP_HOST"),
        b"user-agent" => intern!(py, "HTTP_USER_AGENT"),
        b"accept" => intern!(py, "HTTP_ACCEPT"),
        b"accept-encoding" => intern!(py, "HTTP_ACCEPT_ENCODING"),
        b"accept-language" => intern!(py, "HTTP_ACCEPT_LANGUAGE"),
        b"connection" => intern!(py, "HTTP_CONNECTION"),
        b"cookie" => intern!(py, "HTTP_COOKIE"),
        b"referer" => intern!(py, "HTTP_REFERER"),
        b"authorization" => intern!(py, "HTTP_AUTHORIZATION"),
        b"cache-control" => intern!(py, "HTTP_CACHE_CONTROL"),
        b"origin" => intern!(py, "HTTP_ORIGIN"),
        b"x-forwarded-for" => intern!(py, "HTTP_X_FORWARDED_FOR"),
        b"x-forwarded-proto" => intern!(py, "HTTP_X_FORWARDED_PROTO"),
        b"x-request-id" => intern!(py, "HTTP_X_REQUEST_ID"),
        _ => {
            return cached_header_key(py, sh, lower);
        }
    };
    common.clone()
}

fn cached_header_key<'py>(py: Python<'py>, sh: &Shared, lower: &[u8]) -> Bound<'py, PyString> {
    let mut keys = sh.keys.lock().unwrap();
    if let Some(k) = keys.get(lower) {
        return k.bind(py).clone();
    }
    let mut key = String::with_capacity(lower.len() + 5);
    key.push_str("HTTP_");
    for &c in lower {
        key.push(if c == b'-' {
            '_'
        } else {
            c.to_ascii_uppercase() as char
        });
    }
    let k = PyString::intern(py, &key);
    if keys.len() < 512 {
        keys.insert(lower.to_vec(), k.clone().unbind());
    }
    k
}

/// Fills `env`, a copy of the listener's base environ, for the request:
/// the HTTPError that refuses it, if any.
fn environ_of<'py>(
    py: Python<'py>,
    sh: &Shared,
    view: &ConnView<'_>,
    head: &drover_h1::Head<'_>,
    env: &Bound<'py, PyDict>,
) -> PyResult<Option<Refusal>> {
    let target = head.target.as_bytes();
    let mut refusal = None;
    let (path, query) = split_target(target).unwrap_or_else(|why| {
        refusal = Some((400, why.to_string()));
        (Cow::Borrowed(&b""[..]), &b""[..])
    });
    env.set_item(intern!(py, "REQUEST_METHOD"), method(py, head.method))?;
    let path = latin1(py, &path);
    env.set_item(intern!(py, "PATH_INFO"), &path)?;
    env.set_item(intern!(py, "QUERY_STRING"), latin1(py, query))?;
    let raw = latin1(py, target);
    env.set_item(intern!(py, "RAW_URI"), &raw)?;
    env.set_item(intern!(py, "REQUEST_URI"), &raw)?;
    let protocol = match head.version {
        drover_h1::Version::Http10 => intern!(py, "HTTP/1.0"),
        drover_h1::Version::Http11 => intern!(py, "HTTP/1.1"),
    };
    env.set_item(intern!(py, "SERVER_PROTOCOL"), protocol)?;
    match view.peer {
        Peer::Inet(ip, port) => {
            let mut text = Ascii::default();
            match ip {
                std::net::IpAddr::V4(v4) => {
                    // What Display writes, without the formatting machinery
                    // (a tenth of the server's own work per request).
                    for (i, octet) in v4.octets().into_iter().enumerate() {
                        if i > 0 {
                            text.push(b".");
                        }
                        text.push(decimal(u64::from(octet)).as_ref());
                    }
                }
                std::net::IpAddr::V6(v6) => {
                    use std::io::Write;
                    let _ = write!(text, "{v6}");
                }
            }
            env.set_item(intern!(py, "REMOTE_ADDR"), text.to_py(py))?;
            let port = decimal(u64::from(*port));
            env.set_item(intern!(py, "REMOTE_PORT"), latin1(py, port.as_ref()))?;
        }
        Peer::Unix(path) => env.set_item(intern!(py, "REMOTE_ADDR"), latin1(py, path))?,
    }
    let mut underscored: Option<Bound<'py, PyDict>> = None;
    let mut lower = Ascii::default();
    for (name, value) in &head.headers {
        let lower = lower.lowercase(name);
        let key = match lower {
            b"content-length" => {
                if let drover_h1::Framing::Length(n) = head.framing {
                    let n = decimal(n);
                    env.set_item(intern!(py, "CONTENT_LENGTH"), latin1(py, n.as_ref()))?;
                }
                continue;
            }
            b"content-type" => intern!(py, "CONTENT_TYPE").clone(),
            _ if lower.contains(&b'_') => {
                // "X_Foo" would land on the same key as "X-Foo": kept aside,
                // as gunicorn's header_map = "drop" does.
                let fields = underscored.get_or_insert_with(|| PyDict::new(py));
                fields.set_item(name.to_ascii_uppercase(), latin1(py, value))?;
                continue;
            }
            _ => header_key(py, sh, lower),
        };
        let value = latin1(py, value);
        match env.get_item(&key)? {
            None => env.set_item(&key, value)?,
            Some(old) => {
                let sep = if lower == b"cookie" { "; " } else { ", " };
                let old = old.cast_into::<PyString>().map_err(PyErr::from)?;
                let joined = format!("{}{}{}", old.to_str()?, sep, value.to_str()?);
                env.set_item(&key, joined)?;
            }
        }
    }
    if view.trusted && refusal.is_none() {
        let mut secure = false;
        for key in &sh.hooks.secure_keys {
            if env.contains(key.bind(py))? {
                secure = true;
                break;
            }
        }
        if secure {
            match sh.hooks.scheme.call1(py, (env,)) {
                Ok(scheme) if !scheme.is_none(py) => {
                    env.set_item(intern!(py, "wsgi.url_scheme"), scheme)?
                }
                Ok(_) => {}
                Err(e) => return Ok(Some(http_error(py, e)?)),
            }
        }
        if let Some(fields) = underscored {
            if let Err(e) = sh.hooks.forwarded.call1(py, (env, fields, path)) {
                return Ok(Some(http_error(py, e)?));
            }
        }
    }
    Ok(refusal)
}

/// `n` in decimal, on the stack.
fn decimal(n: u64) -> Decimal {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Decimal(digits, i)
}

struct Decimal([u8; 20], usize);

impl AsRef<[u8]> for Decimal {
    fn as_ref(&self) -> &[u8] {
        &self.0[self.1..]
    }
}

fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(decimal(n).as_ref());
}

/// Short ASCII text made on the stack (an address, a header name in lower
/// case), where a String would be an allocation per request. 64 bytes
/// hold the longest address (45); a longer header name goes to `long`.
struct Ascii {
    buf: [u8; 64],
    len: usize,
    /// A longer header name, in lower case.
    long: Vec<u8>,
}

impl Default for Ascii {
    fn default() -> Ascii {
        Ascii {
            buf: [0; 64],
            len: 0,
            long: Vec::new(),
        }
    }
}

impl Ascii {
    fn push(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }

    /// `name` in lower case (its bytes are a token's: ASCII).
    fn lowercase(&mut self, name: &str) -> &[u8] {
        if name.len() > self.buf.len() {
            self.long = name.to_ascii_lowercase().into_bytes();
            return &self.long;
        }
        let out = &mut self.buf[..name.len()];
        for (o, c) in out.iter_mut().zip(name.bytes()) {
            *o = c.to_ascii_lowercase();
        }
        out
    }

    fn to_py<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        latin1(py, &self.buf[..self.len])
    }
}

impl std::io::Write for Ascii {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.push(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The status and reason of an HTTPError a Python hook raised; any other
/// exception as it is.
fn http_error(py: Python<'_>, e: PyErr) -> PyResult<Refusal> {
    let v = e.value(py);
    match (
        v.getattr("status").and_then(|s| s.extract::<u16>()),
        v.getattr("reason").and_then(|s| s.extract::<String>()),
    ) {
        (Ok(status), Ok(reason)) => Ok((status, reason)),
        _ => Err(e),
    }
}

// -- the response -------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Length,
    Chunked,
    Close,
}

/// One response: what start_response was given, the framing, the bytes not
/// yet written.
pub struct Response {
    sh: Arc<Shared>,
    fd: RawFd,
    io_timeout: Duration,
    is_head: bool,
    http10: bool,
    keep_alive: bool,
    server_keeps: bool,
    /// The status's code once start_response was called, else 0.
    code: u16,
    app_length: Option<u64>,
    app_close: bool,
    headers: Option<Py<PyAny>>,
    sent: bool,
    mode: Mode,
    left: u64,
    keep: bool,
    body_ok: bool,
    /// The body's bytes sent (the access log's `b`), and whether any byte
    /// of the response was.
    body_sent: u64,
    wrote: bool,
    /// Where `out` holds body bytes (one run of them), and how many.
    body_at: usize,
    body_len: usize,
    /// The app's body bytes past its Content-Length (cut, not sent).
    over: u64,
    /// The bytes to write: from start_response on, the head's start (the
    /// status line, Date and the app's headers); the rest of the head and
    /// the body are appended (only a streamed body is written before the end).
    out: Vec<u8>,
    /// Bytes of the response are on their way to the client (a streamed
    /// body): it can no longer be replaced by an error response.
    flushed: bool,
    input: Option<Py<Input>>,
}

fn no_body_code(code: u16) -> bool {
    code == 204 || code == 304
}

impl Response {
    fn start(
        &mut self,
        py: Python<'_>,
        status: &Bound<'_, PyAny>,
        headers: &Bound<'_, PyAny>,
        exc_info: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        if let Some(exc) = exc_info.filter(|e| !e.is_none()) {
            if self.sent {
                let value = exc.get_item(1)?;
                let tb = exc.get_item(2)?;
                let err = value.call_method1(intern!(py, "with_traceback"), (tb,))?;
                return Err(PyErr::from_value(err));
            }
        } else if self.code != 0 {
            return Err(PyAssertionError::new_err(
                "start_response() called a second time without exc_info",
            ));
        }
        let Ok(status) = status.cast::<PyString>() else {
            return Err(PyTypeError::new_err(format!(
                "status must be a str, not {}",
                status.get_type().name()?
            )));
        };
        let text = status.to_str()?;
        let b = text.as_bytes();
        if b.len() < 4
            || !b[..3].iter().all(u8::is_ascii_digit)
            || b[3] != b' '
            || text.contains(['\n', '\r'])
        {
            return Err(PyValueError::new_err(format!(
                "malformed status {}",
                status.repr()?
            )));
        }
        // A 1xx would leave the client waiting for the final status.
        let code: u16 = text[..3].parse().unwrap_or(0);
        if !(200..=599).contains(&code) {
            return Err(PyValueError::new_err(format!(
                "status {}: a response's status is 200 to 599",
                status.repr()?
            )));
        }
        if text.chars().any(|c| c as u32 > 255) {
            return Err(PyValueError::new_err(format!(
                "malformed status {}: not latin-1",
                status.repr()?
            )));
        }
        self.out.clear();
        let written = self.start_head(text, headers);
        if written.is_err() {
            self.out.clear();
        }
        let (length, close) = written?;
        self.code = code;
        self.headers = Some(headers.clone().unbind());
        self.app_length = length;
        self.app_close = close;
        Ok(())
    }

    /// Writes the head's start to `out`: the status line, Date and the
    /// app's headers but those of the connection and the framing (the
    /// server's); returns the app's Content-Length and whether it asked to
    /// close.
    fn start_head(
        &mut self,
        status: &str,
        headers: &Bound<'_, PyAny>,
    ) -> PyResult<(Option<u64>, bool)> {
        let out = &mut self.out;
        out.reserve(256);
        out.extend_from_slice(b"HTTP/1.1 ");
        push_latin1(out, status)?;
        out.extend_from_slice(b"\r\nDate: ");
        with_http_date(|d| out.extend_from_slice(d.as_bytes()));
        out.extend_from_slice(b"\r\n");
        let mut length = None;
        let mut close = false;
        for item in headers.try_iter()? {
            let item = item?;
            let (name, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) = match item.extract() {
                Ok(pair) => pair,
                // Any pair, as the pure-Python core (and gunicorn) take it: ["Name", "value"].
                Err(_) => match item.extract::<Vec<Bound<'_, PyAny>>>() {
                    Ok(v) if v.len() == 2 => (v[0].clone(), v[1].clone()),
                    // Worded as the pure-Python core's (a dict's key, a pair given alone).
                    _ => {
                        return Err(PyTypeError::new_err(format!(
                        "response headers are a list of (name, value) pairs, not a {} holding {}",
                        headers.get_type().name()?,
                        item.repr()?
                    )))
                    }
                },
            };
            let (Ok(name), Ok(value)) = (name.cast::<PyString>(), value.cast::<PyString>()) else {
                return Err(PyTypeError::new_err(format!(
                    "header names and values must be str: {}",
                    item.repr()?
                )));
            };
            let (n, v) = (name.to_str()?, value.to_str()?);
            // A token for the name, no control character but HTAB in the
            // value (RFC 9110 5.1, 5.5), as the pure-Python core checks.
            if !drover_h1::is_token(n.as_bytes())
                || v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
            {
                return Err(PyValueError::new_err(format!(
                    "invalid header {}",
                    item.repr()?
                )));
            }
            match server_field(n) {
                Some(ServerField::Connection) => {
                    close |= v.to_ascii_lowercase().contains("close");
                    continue;
                }
                // The server frames the response and manages the connection.
                Some(ServerField::Other) => continue,
                Some(ServerField::ContentLength) => {
                    length = Some(v.trim().parse::<u64>().map_err(|_| {
                        PyValueError::new_err(format!("invalid Content-Length {v:?}"))
                    })?);
                    continue;
                }
                None => {}
            }
            push_latin1(out, n)?;
            out.extend_from_slice(b": ");
            if push_latin1(out, v).is_err() {
                return Err(PyValueError::new_err(format!(
                    "invalid header {}: not latin-1",
                    item.repr()?
                )));
            }
            out.extend_from_slice(b"\r\n");
        }
        Ok((length, close))
    }

    /// Ends the head in `out`; `body` is the whole body when known, else
    /// None (streaming). Decides the framing and whether to keep the
    /// connection.
    fn head(&mut self, py: Python<'_>, body: Option<&[u8]>, server_keeps: bool) -> PyResult<()> {
        if self.code == 0 {
            return Err(PyAssertionError::new_err(
                "the application did not call start_response()",
            ));
        }
        let code = self.code;
        let no_body = self.is_head || no_body_code(code) || code < 200;
        let mut length = self.app_length;
        if no_body {
            self.mode = Mode::None;
            if let (None, Some(body)) = (length, body) {
                if !body.is_empty() && self.is_head && !no_body_code(code) && code >= 200 {
                    length = Some(body.len() as u64);
                }
            }
        } else if let Some(body) = body {
            self.mode = Mode::Length;
            let n = *length.get_or_insert(body.len() as u64);
            self.left = n;
        } else if let Some(n) = length {
            self.mode = Mode::Length;
            self.left = n;
        } else if !self.http10 {
            self.mode = Mode::Chunked;
        } else {
            self.mode = Mode::Close;
        }
        let discardable = self
            .input
            .as_ref()
            .is_none_or(|i| i.bind(py).borrow().discardable());
        self.keep = self.keep_alive
            && !self.app_close
            && self.mode != Mode::Close
            && server_keeps
            && discardable;
        let h = &mut self.out;
        h.reserve(64 + body.map_or(0, <[u8]>::len));
        if let (Some(n), false) = (length, no_body_code(code) || code < 200) {
            h.extend_from_slice(b"Content-Length: ");
            push_decimal(h, n);
            h.extend_from_slice(b"\r\n");
        }
        if self.mode == Mode::Chunked {
            h.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        if !self.keep {
            h.extend_from_slice(b"Connection: close\r\n");
        } else if self.http10 {
            h.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        h.extend_from_slice(b"\r\n");
        self.sent = true;
        Ok(())
    }

    /// The whole body of a list or tuple result.
    fn send_whole_seq<'py>(
        &mut self,
        py: Python<'py>,
        items: impl ExactSizeIterator<Item = Bound<'py, PyAny>>,
    ) -> PyResult<()> {
        let mut items = items;
        if items.len() == 1 {
            let body = to_bytes(py, &items.next().unwrap())?;
            return self.send_whole(py, body.as_bytes());
        }
        let mut body = Vec::new();
        for item in items {
            let Ok(b) = item.cast::<PyBytes>() else {
                let b = to_bytes(py, &item)?;
                body.extend_from_slice(b.as_bytes());
                continue;
            };
            body.extend_from_slice(b.as_bytes());
        }
        self.send_whole(py, &body)
    }

    /// The head and the whole `body`, to be written after the GIL is released.
    fn send_whole(&mut self, py: Python<'_>, body: &[u8]) -> PyResult<()> {
        self.server_keeps = self.server_keeps_now(py);
        self.head(py, Some(body), self.server_keeps)?;
        if self.mode == Mode::None {
            return Ok(());
        }
        let mut body = body;
        if body.len() as u64 > self.left {
            // Cut: what follows would be read as the next response.
            self.over += body.len() as u64 - self.left;
            body = &body[..self.left as usize];
        } else if (body.len() as u64) < self.left {
            self.keep = false;
            self.body_ok = false;
        }
        self.left -= body.len() as u64;
        self.push_body(body);
        Ok(())
    }

    /// Appends body bytes to `out` (after those already there).
    fn push_body(&mut self, body: &[u8]) {
        if self.body_len == 0 {
            self.body_at = self.out.len();
        }
        self.body_len += body.len();
        self.out.extend_from_slice(body);
    }

    /// The access log line of this response, to write once `out` is sent.
    fn line(
        &self,
        py: Python<'_>,
        sh: &Shared,
        environ: &Bound<'_, PyDict>,
        took: f64,
    ) -> Option<Line> {
        sh.hooks.access.as_ref()?;
        Some(Line {
            environ: environ.clone().unbind(),
            code: self.code,
            headers: self.headers.as_ref().map_or_else(
                || PyTuple::empty(py).into_any().unbind(),
                |h| h.clone_ref(py),
            ),
            took,
            body_sent: self.body_sent,
            wrote: self.wrote,
            body_at: self.body_at,
            body_len: self.body_len,
        })
    }

    fn server_keeps_now(&self, _py: Python<'_>) -> bool {
        self.sh.keeps_connections()
    }

    /// A chunk of the body (the WSGI write callable, also used for iterated
    /// bodies). The head goes with the first chunk. A chunked or
    /// close-delimited body is written at once; a Content-Length one is
    /// coalesced (up to FLUSH_AT) and written after the app.
    fn write(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = to_bytes(py, data)?;
        let mut data = data.as_bytes();
        if data.is_empty() {
            return Ok(());
        }
        if !self.sent {
            self.server_keeps = self.server_keeps_now(py);
            self.head(py, None, self.server_keeps)?;
        }
        match self.mode {
            Mode::Chunked => {
                self.out
                    .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                self.push_body(data);
                self.out.extend_from_slice(b"\r\n");
                self.flush(py)
            }
            Mode::Length => {
                if data.len() as u64 > self.left {
                    // Cut: what follows would be read as the next response.
                    self.over += data.len() as u64 - self.left;
                    data = &data[..self.left as usize];
                }
                self.left -= data.len() as u64;
                self.push_body(data);
                if self.out.len() >= FLUSH_AT {
                    self.flush(py)?;
                }
                Ok(())
            }
            Mode::Close => {
                self.push_body(data);
                self.flush(py)
            }
            Mode::None => Ok(()),
        }
    }

    /// After the last chunk of a streamed body.
    fn finish(&mut self, py: Python<'_>) -> PyResult<()> {
        if !self.sent {
            return self.send_whole(py, b"");
        }
        if self.mode == Mode::Chunked {
            self.out.extend_from_slice(b"0\r\n\r\n");
        } else if self.mode == Mode::Length && self.left > 0 {
            self.keep = false; // short: the client sees the connection close early
            self.body_ok = false;
        }
        Ok(())
    }

    /// Writes what is collected, with the GIL released.
    fn flush(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.fd < 0 {
            return Err(ClientGone::new_err(
                "the request is over: nothing more can be sent",
            ));
        }
        let (fd, timeout, out) = (self.fd, self.io_timeout, &self.out);
        self.flushed = true;
        let (n, sent) = py.detach(|| sock::send_all_counted(fd, out, timeout));
        self.wrote |= n > 0;
        self.body_sent += n.saturating_sub(self.body_at).min(self.body_len) as u64;
        self.out.clear();
        self.body_len = 0;
        sent.map_err(|e| ClientGone::new_err(e.text().to_string()))
    }
}

fn push_latin1(out: &mut Vec<u8>, s: &str) -> PyResult<()> {
    if s.is_ascii() {
        out.extend_from_slice(s.as_bytes());
        return Ok(());
    }
    for c in s.chars() {
        let c = c as u32;
        if c > 255 {
            return Err(PyValueError::new_err(format!(
                "{s:?} cannot be encoded as latin-1"
            )));
        }
        out.push(c as u8);
    }
    Ok(())
}

/// `start_response` (and, returned by it, `write`) of one request.
#[pyclass(module = "drover_wsgi_native")]
pub struct StartResponse {
    r: Response,
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info=None))]
    fn __call__<'py>(
        slf: Bound<'py, Self>,
        status: &Bound<'py, PyAny>,
        headers: &Bound<'py, PyAny>,
        exc_info: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.borrow_mut().r.start(py, status, headers, exc_info)?;
        slf.getattr(intern!(py, "write"))
    }

    fn write(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        self.r.write(py, data)
    }
}

/// The response fields the server writes itself (RFC 9110 7.6.1's
/// hop-by-hop fields and the framing), by name in any case.
enum ServerField {
    Connection,
    ContentLength,
    Other,
}

fn server_field(name: &str) -> Option<ServerField> {
    // By length first: most names are none of these, and are told so by it.
    let candidates: &[&str] = match name.len() {
        2 => &["te"],
        7 => &["trailer", "upgrade"],
        10 => &["connection", "keep-alive"],
        14 => &["content-length"],
        16 => &["proxy-connection"],
        17 => &["transfer-encoding"],
        _ => return None,
    };
    let known = candidates.iter().find(|c| name.eq_ignore_ascii_case(c))?;
    Some(match *known {
        "connection" => ServerField::Connection,
        "content-length" => ServerField::ContentLength,
        _ => ServerField::Other,
    })
}

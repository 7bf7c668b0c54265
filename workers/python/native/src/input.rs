//! `wsgi.input`: the request body. A small Content-Length body is already in
//! memory; otherwise the body is read from the socket as the app reads, with
//! the GIL released while it waits (and `100 Continue` sent before the first
//! read when the client asked for it). The body must keep coming:
//! `body_timeout` from the end of the head, plus one second per
//! `body_min_rate` bytes received.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyConnectionError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::sock::{self, Gone};
use crate::{BodyError, BodyTimeout};

/// A request body the app did not read is read and discarded before the next
/// request on the connection, up to this size; beyond it the connection closes.
pub const DISCARD_LIMIT: u64 = 64 * 1024;

#[pyclass(module = "drover_wsgi_native")]
pub struct Input {
    /// The socket, while the request runs and the body is not all here; -1 else.
    fd: RawFd,
    /// Received, not yet consumed (from `pos`): body bytes, then maybe the next request.
    buf: Vec<u8>,
    pos: usize,
    /// Content-Length bytes the app has not read yet.
    left: u64,
    chunked: Option<drover_h1::ChunkedDecoder>,
    /// Decoded chunked data the app has not read yet (from `dpos`).
    data: Vec<u8>,
    dpos: usize,
    done: bool,
    /// 100 Continue is owed before the first read.
    cont: bool,
    until: Option<Instant>,
    min_rate: u64,
    io_timeout: Duration,
    /// The BodyTimeout or BodyError a read raised: the client is answered
    /// 408 or 400 even when the app caught it and answered itself.
    failure: Option<PyErr>,
}

impl Input {
    pub fn empty() -> Input {
        Input::in_memory(Vec::new())
    }

    pub fn in_memory(body: Vec<u8>) -> Input {
        let left = body.len() as u64;
        Input {
            fd: -1,
            buf: body,
            pos: 0,
            left,
            chunked: None,
            data: Vec::new(),
            dpos: 0,
            done: true,
            cont: false,
            until: None,
            min_rate: 0,
            io_timeout: Duration::ZERO,
            failure: None,
        }
    }

    /// A body read from `fd` as the app reads: `length` bytes, or chunked
    /// (None); `buf` holds what already arrived after the head.
    #[allow(clippy::too_many_arguments)]
    pub fn streaming(
        fd: RawFd,
        buf: Vec<u8>,
        length: Option<u64>,
        limits: &drover_h1::Limits,
        expect_continue: bool,
        body_timeout: Option<Duration>,
        min_rate: u64,
        io_timeout: Duration,
    ) -> Input {
        Input {
            fd,
            buf,
            pos: 0,
            left: length.unwrap_or(0),
            chunked: if length.is_none() {
                Some(drover_h1::ChunkedDecoder::new(limits))
            } else {
                None
            },
            data: Vec::new(),
            dpos: 0,
            done: length.is_some(),
            cont: expect_continue && length != Some(0),
            until: body_timeout.map(|t| Instant::now() + t),
            min_rate,
            io_timeout,
            failure: None,
        }
    }

    /// After the request: what was received past the body (the next request),
    /// and the input no longer touches the socket.
    pub fn detach(&mut self) -> Vec<u8> {
        self.fd = -1;
        let rest = if self.pos == 0 {
            std::mem::take(&mut self.buf)
        } else {
            self.buf.split_off(self.pos)
        };
        self.buf = Vec::new();
        self.pos = 0;
        self.left = 0;
        self.done = true;
        rest
    }

    /// Whether `discard` would succeed without closing.
    pub fn discardable(&self) -> bool {
        if self.chunked.is_some() {
            return self.done || !self.cont;
        }
        self.left == 0 || (!self.cont && self.left <= DISCARD_LIMIT)
    }

    /// The whole body was read: the next request can follow.
    /// `error`, noted as the body's failure.
    fn failed(&mut self, py: Python<'_>, error: PyErr) -> PyErr {
        self.failure = Some(error.clone_ref(py));
        error
    }

    /// The failure a read of the body raised, if any.
    pub fn take_failure(&mut self) -> Option<PyErr> {
        self.failure.take()
    }

    pub fn finished(&self) -> bool {
        if self.chunked.is_some() {
            return self.done && self.dpos >= self.data.len();
        }
        self.left == 0
    }

    /// Consumes what the app did not read, if small. True when the body is
    /// fully consumed (the connection can carry another request).
    pub fn discard(&mut self, py: Python<'_>) -> bool {
        if self.chunked.is_some() {
            if self.done {
                return true;
            }
            if self.cont {
                return false;
            }
            let mut total = (self.data.len() - self.dpos) as u64;
            while !self.done {
                self.data.clear();
                self.dpos = 0;
                if self.fill(py).is_err() {
                    return false;
                }
                total += self.data.len() as u64;
                if total > DISCARD_LIMIT {
                    return false;
                }
            }
            self.data.clear();
            self.dpos = 0;
            return true;
        }
        if self.left == 0 {
            return true;
        }
        if self.cont || self.left > DISCARD_LIMIT {
            return false;
        }
        while self.left > 0 {
            if self.avail() == 0 && self.more(py).is_err() {
                return false;
            }
            let n = (self.avail() as u64).min(self.left) as usize;
            self.pos += n;
            self.left -= n as u64;
        }
        true
    }

    fn avail(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// More bytes from the socket (GIL released while waiting).
    fn more(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.fd < 0 {
            return Err(PyConnectionError::new_err(
                "the request is over: its body cannot be read any more",
            ));
        }
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let fd = self.fd;
        let cont = std::mem::take(&mut self.cont);
        let (until, io_timeout) = (self.until, self.io_timeout);
        let buf = &mut self.buf;
        let got = py.detach(|| {
            if cont {
                sock::send_all(fd, b"HTTP/1.1 100 Continue\r\n\r\n", io_timeout)?;
            }
            sock::recv_blocking(fd, buf, until, io_timeout)
        });
        match got {
            Ok(n) => {
                if let (Some(u), true) = (self.until.as_mut(), self.min_rate > 0) {
                    *u += Duration::from_secs_f64(n as f64 / self.min_rate as f64);
                }
                Ok(())
            }
            Err(Gone::Timeout(why)) => Err(self.failed(
                py,
                BodyTimeout::new_err(format!("the request body did not arrive in time ({why})")),
            )),
            Err(Gone::Closed(why)) => Err(PyConnectionError::new_err(format!(
                "client disconnected before the end of the request body ({why})"
            ))),
        }
    }

    /// Decodes the next piece of a chunked body into `data` (or ends it).
    fn fill(&mut self, py: Python<'_>) -> PyResult<()> {
        loop {
            let decoder = self.chunked.as_mut().expect("chunked");
            let before = self.data.len();
            match decoder.decode(&self.buf[self.pos..], &mut self.data) {
                Ok(used) => self.pos += used,
                Err(e) => {
                    return Err(self.failed(py, BodyError::new_err((e.status, e.detail))));
                }
            }
            if decoder.is_done() {
                self.done = true;
                return Ok(());
            }
            if self.data.len() > before {
                return Ok(());
            }
            self.more(py)?;
        }
    }

    fn read_bytes<'py>(
        &mut self,
        py: Python<'py>,
        size: Option<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        if self.chunked.is_some() {
            while !self.done && size.is_none_or(|s| self.data.len() - self.dpos < s) {
                self.fill(py)?;
            }
            let have = self.data.len() - self.dpos;
            let n = size.map_or(have, |s| s.min(have));
            return Ok(self.take_data(py, n));
        }
        let n = size.map_or(self.left, |s| (s as u64).min(self.left)) as usize;
        while self.avail() < n {
            self.more(py)?;
        }
        let out = PyBytes::new(py, &self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.left -= n as u64;
        Ok(out)
    }

    fn take_data<'py>(&mut self, py: Python<'py>, n: usize) -> Bound<'py, PyBytes> {
        let out = PyBytes::new(py, &self.data[self.dpos..self.dpos + n]);
        self.dpos += n;
        if self.dpos == self.data.len() {
            self.data.clear();
            self.dpos = 0;
        }
        out
    }

    fn readline_bytes<'py>(
        &mut self,
        py: Python<'py>,
        size: Option<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        if self.chunked.is_some() {
            loop {
                let have = &self.data[self.dpos..];
                let nl = have.iter().position(|&b| b == b'\n');
                if let Some(nl) = nl {
                    let n = size.map_or(nl + 1, |s| s.min(nl + 1));
                    return Ok(self.take_data(py, n));
                }
                if self.done || size.is_some_and(|s| have.len() >= s) {
                    let n = size.map_or(have.len(), |s| s.min(have.len()));
                    return Ok(self.take_data(py, n));
                }
                self.fill(py)?;
            }
        }
        let limit = size.map_or(self.left, |s| (s as u64).min(self.left)) as usize;
        loop {
            let have = &self.buf[self.pos..];
            let window = &have[..have.len().min(limit)];
            let n = match window.iter().position(|&b| b == b'\n') {
                Some(nl) => nl + 1,
                None if have.len() >= limit => limit,
                None => {
                    self.more(py)?;
                    continue;
                }
            };
            let out = PyBytes::new(py, &self.buf[self.pos..self.pos + n]);
            self.pos += n;
            self.left -= n as u64;
            return Ok(out);
        }
    }
}

fn size_arg(size: Option<i64>) -> Option<usize> {
    size.filter(|&s| s >= 0).map(|s| s as usize)
}

#[pymethods]
impl Input {
    #[pyo3(signature = (size=None))]
    fn read<'py>(&mut self, py: Python<'py>, size: Option<i64>) -> PyResult<Bound<'py, PyBytes>> {
        self.read_bytes(py, size_arg(size))
    }

    #[pyo3(signature = (size=None))]
    fn readline<'py>(
        &mut self,
        py: Python<'py>,
        size: Option<i64>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.readline_bytes(py, size_arg(size))
    }

    #[pyo3(signature = (hint=None))]
    fn readlines<'py>(
        &mut self,
        py: Python<'py>,
        hint: Option<i64>,
    ) -> PyResult<Bound<'py, PyList>> {
        let lines = PyList::empty(py);
        let mut total = 0usize;
        loop {
            let line = self.readline_bytes(py, None)?;
            let n = line.as_bytes().len();
            if n == 0 {
                return Ok(lines);
            }
            lines.append(line)?;
            total += n;
            if hint.is_some_and(|h| h > 0 && total >= h as usize) {
                return Ok(lines);
            }
        }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let line = self.readline_bytes(py, None)?;
        Ok(if line.as_bytes().is_empty() {
            None
        } else {
            Some(line)
        })
    }
}

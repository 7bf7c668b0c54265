//! drover_wsgi_native: the native core of drover_wsgi. HTTP/1.1 connections,
//! request parsing (the drover-h1 crate), response framing and the thread
//! pool in Rust; the WSGI app, and the environ and start_response work that
//! must be Python, with the GIL. drover_wsgi/native.py drives it with the
//! interface of drover_wsgi.server.Server. See docs/drover-wsgi-native.md.

mod exchange;
mod input;
mod poller;
mod pool;
mod sock;
mod turn;
mod util;

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyConnectionError, PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use pool::{Hooks, Listener, Settings, Shared, StopKind, Trust};

pyo3::create_exception!(
    drover_wsgi_native,
    ClientGone,
    PyException,
    "The client closed, reset or timed out: nothing to answer."
);
pyo3::create_exception!(
    drover_wsgi_native,
    BodyError,
    PyValueError,
    "A malformed chunked body: args are (status, reason)."
);
pyo3::create_exception!(
    drover_wsgi_native,
    BodyTimeout,
    PyConnectionError,
    "The request body stopped coming (body_timeout): answered 408."
);

/// What drover_wsgi/native.py must match (it falls back to the pure-Python
/// core when it does not).
const API: u32 = 5;

fn seconds(s: Option<f64>) -> Option<Duration> {
    s.filter(|s| *s > 0.0).map(Duration::from_secs_f64)
}

/// The pool serving an app on the listeners: see pool.rs.
#[pyclass(module = "drover_wsgi_native")]
struct Core {
    sh: Arc<Shared>,
    started: bool,
}

#[pymethods]
impl Core {
    /// `listeners`: (fd, name, is_unix, base environ) each; the fds are
    /// duplicated (the core owns its copies). `hooks`: an object with app,
    /// failed, scheme, forwarded, access (or None), head_refused and secure_keys.
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (hooks, listeners, threads, keepalive, io_timeout, header_timeout, body_timeout,
                        body_min_rate, max_requests, keepalive_requests, limits, trust_everyone, trust_nets, ctrl_fd))]
    fn new(
        py: Python<'_>,
        hooks: &Bound<'_, PyAny>,
        listeners: Vec<(i32, String, bool, Bound<'_, PyDict>)>,
        threads: usize,
        keepalive: f64,
        io_timeout: f64,
        header_timeout: Option<f64>,
        body_timeout: Option<f64>,
        body_min_rate: u64,
        max_requests: u64,
        keepalive_requests: u64,
        limits: (usize, usize, usize),
        trust_everyone: bool,
        trust_nets: Vec<(Vec<u8>, u8)>,
        ctrl_fd: i32,
    ) -> PyResult<Core> {
        let access = hooks.getattr("access")?;
        let secure_keys: Vec<Bound<'_, PyString>> = hooks.getattr("secure_keys")?.extract()?;
        let hooks = Hooks {
            app: hooks.getattr("app")?.unbind(),
            failed: hooks.getattr("failed")?.unbind(),
            scheme: hooks.getattr("scheme")?.unbind(),
            forwarded: hooks.getattr("forwarded")?.unbind(),
            head_refused: hooks.getattr("head_refused")?.unbind(),
            access: if access.is_none() {
                None
            } else {
                Some(access.unbind())
            },
            secure_keys: secure_keys
                .into_iter()
                .map(|k| PyString::intern(py, k.to_str().unwrap_or("")).unbind())
                .collect(),
        };
        let mut owned = Vec::new();
        for (fd, name, unix, base) in listeners {
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if dup < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            owned.push(Listener {
                fd: dup,
                name,
                unix,
                base: base.unbind(),
            });
        }
        let set = Settings {
            threads: threads.max(1),
            keepalive: Duration::from_secs_f64(keepalive.max(0.0)),
            io_timeout: Duration::from_secs_f64(io_timeout.max(0.001)),
            header_timeout: seconds(header_timeout),
            body_timeout: seconds(body_timeout),
            body_min_rate,
            max_requests,
            keepalive_requests,
            limits: drover_h1::Limits {
                request_line: limits.0,
                fields: limits.1,
                field_size: limits.2,
            },
        };
        let trust = Trust {
            everyone: trust_everyone,
            nets: trust_nets,
        };
        let sh = Shared::new(set, hooks, owned, trust, ctrl_fd)?;
        Ok(Core {
            sh: Arc::new(sh),
            started: false,
        })
    }

    /// Starts the threads.
    fn start(&mut self) {
        if !self.started {
            self.started = true;
            self.sh.start();
        }
    }

    /// The stop: kind is "graceful", "quick" or "recycle"; the first-byte
    /// grace and the time left before the drain deadline, in seconds.
    /// Returns the number of parked connections found, and the listeners
    /// (name, is_unix) whose queue's length could not be read at a graceful stop.
    fn stop(
        &self,
        py: Python<'_>,
        kind: &str,
        first_byte_grace: f64,
        drain_left: f64,
    ) -> PyResult<(usize, Vec<(String, bool)>)> {
        let kind = match kind {
            "graceful" => StopKind::Graceful,
            "quick" => StopKind::Quick,
            "recycle" => StopKind::Recycle,
            _ => return Err(PyValueError::new_err(format!("unknown stop kind {kind:?}"))),
        };
        let sh = self.sh.clone();
        Ok(py.detach(move || {
            sh.stop(
                kind,
                Duration::from_secs_f64(first_byte_grace.max(0.0)),
                Duration::from_secs_f64(drain_left.max(0.0)),
            )
        }))
    }

    /// The stop became quick; the time left before the new drain deadline.
    fn escalate(&self, drain_left: f64) {
        self.sh
            .escalate(Duration::from_secs_f64(drain_left.max(0.0)));
    }

    /// Waits at most `timeout` seconds for the threads to end; how many still run.
    fn join(&self, py: Python<'_>, timeout: f64) -> usize {
        let sh = self.sh.clone();
        py.detach(move || sh.join(Duration::from_secs_f64(timeout.max(0.0))))
    }

    /// (every thread busy, requests and events handled so far): the
    /// heartbeat's measure of progress.
    fn progress(&self) -> (bool, u64) {
        let all_busy = self
            .sh
            .busy
            .iter()
            .all(|b| b.load(std::sync::atomic::Ordering::Relaxed));
        let done = self
            .sh
            .done
            .iter()
            .map(|d| d.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        (all_busy, done)
    }

    /// Finishes the lingering closes within `budget` seconds (after the pool stopped).
    fn linger_leftovers(&self, py: Python<'_>, budget: f64) {
        let sh = self.sh.clone();
        py.detach(move || sh.linger_leftovers(Duration::from_secs_f64(budget.max(0.0))));
    }

    #[getter]
    fn recycling(&self) -> bool {
        self.sh.recycling.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[getter]
    fn winding_down(&self) -> bool {
        self.sh
            .winding_down
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    #[setter]
    fn set_winding_down(&self, value: bool) {
        self.sh
            .winding_down
            .store(value, std::sync::atomic::Ordering::Relaxed);
    }
}

#[pymodule]
fn drover_wsgi_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Core>()?;
    m.add_class::<input::Input>()?;
    m.add_class::<exchange::StartResponse>()?;
    m.add("ClientGone", py.get_type::<ClientGone>())?;
    m.add("BodyError", py.get_type::<BodyError>())?;
    m.add("BodyTimeout", py.get_type::<BodyTimeout>())?;
    m.add("API", API)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

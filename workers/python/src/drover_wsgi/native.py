"""The native core: drover_wsgi's server with its connections, parsing,
framing and thread pool in Rust (the ``drover_wsgi_native`` extension module,
distribution ``drover-wsgi-native``, ``pip install ./workers/python/native``).

:class:`NativeServer` has the interface of :class:`drover_wsgi.server.Server`
that ``drover_wsgi.main`` drives (start, wait_for_stop, stop,
linger_leftovers, heartbeats, winding_down) and the same behaviour; what
stays Python is here: the app, the proxy settings and the access log (called
only when needed), the classification and logging of an app's failure, and
the stop's timing (drover_worker's deadlines). See docs/drover-wsgi-native.md.
"""

import os
import time
import traceback
from typing import Any, Optional, Tuple

import drover_worker as dw

from .http import DEFAULT_LIMITS
from .proxy import Proxy
from .server import (
    FIRST_BYTE_GRACE,
    LINGER,
    QUICK_DRAIN,
    HeadRefusals,
    ListenerInfo,
    _cause,
    base_environ,
    beat_while_progressing,
    forwarded,
    log,
    signal_pipe,
    stop_line,
    wait_for_stop,
)

#: The drover_wsgi_native interface this module drives.
API = 5

_native: Any = None


def load() -> Tuple[Any, Optional[str]]:
    """(the drover_wsgi_native module, None), or (None, why it cannot be used)."""
    global _native
    try:
        import drover_wsgi_native as native  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ModuleNotFoundError as e:
        if e.name == "drover_wsgi_native":
            return None, "drover_wsgi_native is not installed"
        return None, "drover_wsgi_native cannot be imported: %s" % e
    except ImportError as e:
        return None, "drover_wsgi_native cannot be imported: %s" % e
    except Exception as e:  # a broken build or install can raise anything: still fall back
        return None, "drover_wsgi_native cannot be imported: %s: %s" % (type(e).__name__, e)
    if getattr(native, "API", None) != API:
        return None, "drover_wsgi_native %s does not fit this drover_wsgi (interface %s, expected %s)" % (
            getattr(native, "__version__", "?"), getattr(native, "API", "?"), API)
    _native = native
    return native, None


class _Hooks:
    """What the Rust pool calls back into Python for."""

    def __init__(self, app, proxy, access_log):
        self.app = app
        self.proxy = proxy
        self.scheme = proxy.scheme
        self.secure_keys = [key for key, _ in proxy.secure]
        self.access = access_log.log if access_log is not None else None
        # head_refused(addr, port, status, reason, seconds, sent): see HeadRefusals.
        self.head_refused = HeadRefusals(access_log)

    def forwarded(self, environ, fields, path):
        forwarded(self.proxy, environ, fields, path)

    def failed(self, error, method, uri):
        """The status and reason for an app that raised (or whose read of the
        body failed), logged as the pure-Python server logs it."""
        bad = _cause(error, _native.BodyError)
        if bad is not None:
            status, why = bad.args[0], bad.args[1]
            log("bad request body on %s %s: %s" % (method, uri, why))
        elif _cause(error, _native.BodyTimeout) is not None:
            status, why = 408, "the request body did not arrive in time"
            log("%s on %s %s" % (why, method, uri))
        else:
            status, why = 500, "the application failed; see the worker's log"
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()
            log("error in the application on %s %s:\n%s" % (method, uri, text))
        return status, why


class NativeServer:
    """The pool serving ``app`` on ``socks`` (as server.Server, whose
    arguments it takes)."""

    def __init__(self, app, socks, threads=4, keepalive=5.0, io_timeout=30.0, max_requests=0,
                 limits=DEFAULT_LIMITS, proxy=None, access_log=None, header_timeout=20.0,
                 body_timeout=20.0, body_min_rate=500, keepalive_requests=1000):
        native, why = (_native, None) if _native is not None else load()
        if native is None:
            raise RuntimeError(why)
        self.nthreads = max(1, threads)
        self.proxy = proxy if proxy is not None else Proxy()
        base = base_environ(self.nthreads)
        listeners = []
        for s in socks:
            info = ListenerInfo(s, getattr(s, "name", "unknown"), base)
            listeners.append((s.fileno(), info.name, info.unix, info.base))
        self.ctrl_r, self.ctrl_w = os.pipe()
        for fd in (self.ctrl_r, self.ctrl_w):
            os.set_blocking(fd, False)
        self.signal_pipe = signal_pipe()
        nets = [(net.network_address.packed, net.prefixlen) for net in self.proxy.networks]
        self.core = native.Core(
            _Hooks(app, self.proxy, access_log), listeners, self.nthreads, keepalive, io_timeout,
            header_timeout, body_timeout, body_min_rate, max_requests, keepalive_requests,
            (limits.request_line, limits.request_fields, limits.request_field_size),
            self.proxy.everyone, nets, self.ctrl_w)
        self.stop_kind = None

    @property
    def winding_down(self):
        """drover's pre-stop delay began (SIGWINCH): serve on, end keep-alive."""
        return self.core.winding_down

    @winding_down.setter
    def winding_down(self, value):
        self.core.winding_down = value

    def start(self):
        self.core.start()

    def wait_for_stop(self):
        """Blocks the main thread until a stop signal or a recycle; returns
        the kind (server.wait_for_stop: woken whichever thread takes the
        signal, and bounded)."""
        return wait_for_stop(self.ctrl_r, lambda: self.core.recycling, self.signal_pipe)

    def stop(self, kind):
        """Stops accepting new work (on a graceful stop the threads drain the
        listen queue by server.py's rule), then drains. Returns True when
        every thread finished."""
        self.stop_kind = kind
        grace = min(FIRST_BYTE_GRACE, dw.remaining_budget())
        parked, unmeasured = self.core.stop(kind, grace, dw.drain_deadline() - time.monotonic())
        log(stop_line(kind, parked, unmeasured))
        return self._join_threads()

    def _join_threads(self):
        """As server.Server's: waits until the drain deadline (QUICK_DRAIN
        once the stop is quick); False when busy threads are abandoned."""
        quick_deadline = None
        while True:
            alive = self.core.join(0)
            if not alive:
                return True
            if quick_deadline is None and (self.stop_kind == "quick" or dw.stop_kind() == "quick"):
                if self.stop_kind != "quick":  # a graceful stop (or a recycle) escalated
                    self.core.escalate(max(0.0, dw.drain_deadline() - time.monotonic()))
                self.stop_kind = "quick"
                quick_deadline = time.monotonic() + QUICK_DRAIN
            deadline = dw.drain_deadline()  # a recycle's: from its STOPPING=1
            if quick_deadline is not None:
                deadline = min(deadline, quick_deadline)
            left = deadline - time.monotonic()
            if left <= 0:
                why = "quick stop" if self.stop_kind == "quick" else "drain deadline"
                log("abandoning %d busy thread(s) (%s)" % (alive, why))
                return False
            self.core.join(min(left, 0.05))

    def linger_leftovers(self):
        """Finishes the lingering closes (main thread, after the pool stopped)."""
        self.core.linger_leftovers(min(LINGER, max(0.0, dw.remaining_budget() - 0.5)))

    def heartbeats(self, interval):
        """As server.Server's: WATCHDOG=1 while the pool makes progress."""
        beat_while_progressing(self.core.progress, self.nthreads, interval)

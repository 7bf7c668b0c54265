"""drover_wsgi: a WSGI worker for drover (standard library only, Python 3.8+).

    drover-wsgi [options] module:app
    python -m drover_wsgi [options] module:app

It serves the WSGI application ``module:app`` (``module`` alone means
``module:application``; ``module:make_app()`` calls a factory) on the listening
sockets drover passes (``LISTEN_FDS``), with a pool of threads, HTTP/1.1
keep-alive and the worker contract: ``READY=1`` once the app is imported and
the pool accepts, exit status 3 when the app cannot be imported, a graceful
stop on SIGTERM/SIGINT and a quick one on SIGQUIT, recycling after
``--max-requests``, and the cleanup registry of ``drover_worker`` run on every
stop. The current directory is put first on ``sys.path`` (as gunicorn does).

How it serves: ``--threads`` threads take turns as the one that waits (a
"leader/followers" pool): the waiting thread polls the listeners and the idle
keep-alive connections with ``selectors``, takes one event and serves it
itself while another thread takes over the waiting. A busy pool therefore
accepts nothing (connections stay queued for the other workers), and no
request is handed between threads. Listening sockets are non-blocking: they
are shared with the other workers, so a poll may be followed by an empty
accept.

Graceful stop (SIGTERM/SIGINT): STOPPING=1, take every connection already
queued on the listeners, close our copies of the listeners, finish in-flight
requests (answered with ``Connection: close``), serve a request that already
arrived on an idle keep-alive connection and close the others, run the cleanup
registry, exit 0. In-flight requests get until ``drover_worker.drain_deadline()``
(4/5 of the grace budget) and are abandoned then, so that the registry still
runs before drover's SIGKILL. Quick stop (SIGQUIT): stop accepting, give
in-flight requests at most 1 s, run the cleanup registry, exit 0. ``--max-requests``:
after N (+ up to ``--max-requests-jitter``) requests, STOPPING=1, stop
accepting (queued connections are left to the other workers), finish, clean
up, exit 0: drover starts a replacement at once.
"""

import argparse
import collections
import faulthandler
import importlib
import itertools
import os
import random
import re
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from email.utils import formatdate
from urllib.parse import unquote_to_bytes

import drover_worker as dw
from drover_worker.scoreboard import Scoreboard

#: Largest request head (request line and headers); more is answered 431.
MAX_HEAD = 32 * 1024
#: A request body the app did not read is read and discarded before the next
#: request on the connection, up to this size; beyond it the connection closes.
DISCARD_LIMIT = 64 * 1024
#: After a final response on a connection we close, read and discard what the
#: client still sends for at most this long, so that closing does not reset it.
LINGER = 1.0
#: On a quick stop, the longest wait for in-flight requests.
QUICK_DRAIN = 1.0
#: On a graceful stop, how long a connection taken from the queue (or accepted
#: just before) may take to send its request.
FIRST_BYTE_GRACE = 1.0
#: Connections taken from the queue on a graceful stop, at most, per listener.
MAX_DRAIN_ACCEPTS = 65536

_RUNNING, _STOPPING, _DRAINED = "running", "stopping", "drained"
_STOP = object()  # selector data: the stop pipe or the recycle pipe
_WAKE = object()  # selector data: the wake-up pipe (non-epoll selectors only)


def log(message):
    text = "drover_wsgi[%d]: %s\n" % (os.getpid(), message)
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:
        pass


# ---------------------------------------------------------------------------
# HTTP parsing (pure functions, unit-tested without sockets)
# ---------------------------------------------------------------------------


class HTTPError(Exception):
    """A request that cannot be served: answer ``status`` and close."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[^\x00-\x20\x7f]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_LF_END = re.compile(rb"\n\r?\n")
_KEYS = {b"content-type": "CONTENT_TYPE", b"content-length": "CONTENT_LENGTH"}
_KEYS_MAX = 512


class Request:
    """A parsed request head."""

    __slots__ = (
        "method", "target", "http10", "headers", "content_length", "chunked",
        "keep_alive", "expect_continue",
    )

    def __init__(self, method, target, http10, headers, content_length, chunked, keep_alive, expect_continue):
        self.method = method  # str
        self.target = target  # bytes, as sent
        self.http10 = http10
        self.headers = headers  # environ entries: HTTP_*, CONTENT_TYPE, CONTENT_LENGTH
        self.content_length = content_length  # int (0 when absent)
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue


def parse_request(buf):
    """Parses the request head at the start of ``buf`` (bytes).

    Returns None when the head is not complete yet, else ``(request, used)``
    where ``used`` is the number of bytes of the head. Raises HTTPError for a
    malformed, unsupported or too large head. Empty lines before the request
    line are skipped; lines may end in CRLF or a bare LF.
    """
    start = 0
    if buf[:1] in (b"\r", b"\n"):
        start = len(buf) - len(buf.lstrip(b"\r\n"))
    end = buf.find(b"\r\n\r\n", start)
    if end >= 0:
        head = buf[start:end]
        used = end + 4
        lines = head.split(b"\r\n")
    else:
        m = _LF_END.search(buf, start)
        if m is None:
            if len(buf) - start > MAX_HEAD:
                raise HTTPError(431, "request head larger than %d bytes" % MAX_HEAD)
            return None
        used = m.end()
        lines = [l[:-1] if l[-1:] == b"\r" else l for l in buf[start:m.start()].split(b"\n")]
    if used - start > MAX_HEAD:
        raise HTTPError(431, "request head larger than %d bytes" % MAX_HEAD)

    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        http10 = False
    elif version == b"HTTP/1.0":
        http10 = True
    elif _VERSION.fullmatch(version):
        raise HTTPError(505, "HTTP version not supported")
    else:
        raise HTTPError(400, "malformed request line")
    if _TOKEN.fullmatch(method) is None:
        raise HTTPError(400, "malformed method")
    if _TARGET.fullmatch(target) is None:
        raise HTTPError(400, "malformed request target")

    headers = {}
    content_length = None
    te = None
    connection = None
    expect = None
    has_host = False
    for line in itertools.islice(lines, 1, None):
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:
            raise HTTPError(400, "malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value) is not None:
            raise HTTPError(400, "invalid character in a header value")
        lname = name.lower()
        key = _KEYS.get(lname)
        if key is None:
            if b"_" in name:
                # "X_Foo" would land on the same key as "X-Foo": dropped, as
                # nginx and gunicorn do, so that one cannot spoof the other.
                continue
            key = "HTTP_" + name.decode("ascii").upper().replace("-", "_")
            if len(_KEYS) < _KEYS_MAX:
                _KEYS[lname] = key
        text = value.decode("latin-1")
        if key == "CONTENT_LENGTH":
            if not value.isdigit():
                raise HTTPError(400, "invalid Content-Length")
            if content_length is not None and int(value) != content_length:
                raise HTTPError(400, "conflicting Content-Length headers")
            content_length = int(value)
            headers[key] = str(content_length)
            continue
        if key == "HTTP_TRANSFER_ENCODING":
            te = text if te is None else te + ", " + text
        elif key == "HTTP_CONNECTION":
            connection = text if connection is None else connection + ", " + text
        elif key == "HTTP_EXPECT":
            expect = text
        elif key == "HTTP_HOST":
            if has_host:
                raise HTTPError(400, "more than one Host header")
            has_host = True
        old = headers.get(key)
        if old is None:
            headers[key] = text
        elif key == "HTTP_COOKIE":
            headers[key] = old + "; " + text
        else:
            headers[key] = old + ", " + text

    if not http10 and not has_host:
        raise HTTPError(400, "HTTP/1.1 request without a Host header")
    chunked = False
    if te is not None:
        if content_length is not None:
            raise HTTPError(400, "both Transfer-Encoding and Content-Length")
        if http10:
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in te.split(",")]
        if codings[-1] != "chunked":
            raise HTTPError(400, "Transfer-Encoding does not end in chunked")
        if codings != ["chunked"]:
            raise HTTPError(501, "unsupported Transfer-Encoding")
        # Request bodies must have a Content-Length (RFC 9110 allows 411).
        raise HTTPError(411, "chunked request bodies are not supported; send a Content-Length")
    if connection is not None:
        tokens = [t.strip().lower() for t in connection.split(",")]
        keep_alive = "close" not in tokens and (not http10 or "keep-alive" in tokens)
    else:
        keep_alive = not http10
    expect_continue = False
    if expect is not None:
        if expect.lower() != "100-continue":
            raise HTTPError(417, "unsupported Expect")
        expect_continue = not http10
    req = Request(
        method.decode("ascii"), target, http10, headers, content_length or 0, chunked,
        keep_alive, expect_continue,
    )
    return req, used


def split_target(target):
    """(PATH_INFO, QUERY_STRING) of a request target (bytes), per PEP 3333:
    the path percent-decoded, both as latin-1 str."""
    if target[:1] != b"/":
        if target == b"*":
            return "*", ""
        scheme_end = target.find(b"://")
        if scheme_end <= 0:
            raise HTTPError(400, "unsupported request target form")
        slash = target.find(b"/", scheme_end + 3)
        target = target[slash:] if slash >= 0 else b"/"
    path, _, query = target.partition(b"?")
    path = path.partition(b"#")[0]
    if b"%" in path:
        path = unquote_to_bytes(path)
    return path.decode("latin-1"), query.decode("latin-1")


_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 408: "Request Timeout", 411: "Length Required",
    413: "Content Too Large", 417: "Expectation Failed", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_date = [0, ""]


def http_date():
    now = int(time.time())
    if _date[0] != now:
        _date[1] = formatdate(now, usegmt=True)
        _date[0] = now
    return _date[1]


def error_response(status, reason):
    body = ("%d %s: %s\n" % (status, _REASONS.get(status, "Error"), reason)).encode("latin-1", "replace")
    head = "HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        status, _REASONS.get(status, "Error"), http_date(), len(body))
    return head.encode("latin-1") + body


# ---------------------------------------------------------------------------
# Connections, request bodies, responses
# ---------------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed, reset or timed out: nothing to answer."""


def _timeval(seconds):
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1_000_000))


class Conn:
    """One client connection and the bytes received but not yet consumed."""

    __slots__ = ("sock", "fd", "listener", "peer", "buf", "requests", "deadline", "timer", "lingering")

    def __init__(self, sock, peer, listener):
        self.sock = sock
        self.fd = sock.fileno()
        self.listener = listener
        self.peer = peer
        self.buf = b""
        self.requests = 0
        self.deadline = 0.0
        self.timer = None  # which of the server's timer dicts holds it
        self.lingering = False

    def recv_blocking(self):
        """More bytes (blocking, bounded by the I/O timeout); raises ClientGone
        at EOF, on an error or on the timeout."""
        try:
            data = self.sock.recv(65536)
        except OSError as e:  # BlockingIOError: SO_RCVTIMEO expired
            raise ClientGone(str(e)) from None
        if not data:
            raise ClientGone("closed by the client")
        return data

    def recv_nowait(self):
        """Bytes already received, b"" at EOF (or error), None when there are none."""
        try:
            return self.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def sendall(self, data):
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ClientGone(str(e)) from None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Input:
    """``wsgi.input``: the request body (Content-Length bytes), read from the
    connection's buffer first, then from the socket. Sends ``100 Continue``
    before the first read when the client asked for it."""

    __slots__ = ("_conn", "_left", "_continue")

    def __init__(self, conn, length, expect_continue):
        self._conn = conn
        self._left = length
        self._continue = expect_continue and length > 0

    def _more(self):
        if self._continue:
            self._continue = False
            self._conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            return self._conn.recv_blocking()
        except ClientGone as e:
            raise ConnectionError("client disconnected before the end of the request body (%s)" % e) from None

    def read(self, size=-1):
        left = self._left
        if left <= 0:
            return b""
        if size is None or size < 0 or size > left:
            size = left
        conn = self._conn
        buf = conn.buf
        while len(buf) < size:
            buf += self._more()
        if len(buf) == size:
            data, conn.buf = buf, b""
        else:
            data, conn.buf = buf[:size], buf[size:]
        self._left = left - size
        return data

    def readline(self, size=-1):
        left = self._left
        if left <= 0:
            return b""
        if size is None or size < 0 or size > left:
            size = left
        conn = self._conn
        buf = conn.buf
        while True:
            nl = buf.find(b"\n", 0, size)
            if nl >= 0:
                n = nl + 1
                break
            if len(buf) >= size:
                n = size
                break
            buf += self._more()
        data, conn.buf = buf[:n], buf[n:]
        self._left = left - n
        return data

    def readlines(self, hint=-1):
        lines, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                return lines

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def discardable(self):
        """Whether :meth:`discard` would succeed without closing."""
        return self._left <= 0 or (not self._continue and self._left <= DISCARD_LIMIT)

    def discard(self):
        """Consumes what the app did not read, if small. True when the body is
        fully consumed (the connection can carry another request)."""
        if self._left <= 0:
            return True
        if self._continue or self._left > DISCARD_LIMIT:
            return False
        try:
            while self._left > 0:
                self.read(min(self._left, 65536))
        except OSError:
            return False
        return True


class FileWrapper:
    """``wsgi.file_wrapper``: iterates a file-like object in blocks."""

    def __init__(self, filelike, blksize=8192):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        return self

    def __next__(self):
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


_NO_BODY = frozenset([204, 304])
_HOP = frozenset(["connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"])


class Response:
    """One response: ``start_response``, ``write`` and the framing."""

    __slots__ = (
        "conn", "req", "server", "status", "code", "header_text", "app_length", "app_close",
        "sent", "mode", "left", "keep", "body_ok", "inp",
    )

    def __init__(self, conn, req, server, inp):
        self.conn = conn
        self.inp = inp
        self.req = req
        self.server = server
        self.status = None
        self.code = 0
        self.header_text = ""
        self.app_length = None
        self.app_close = False
        self.sent = False
        self.mode = None  # after the head: "length", "chunked", "close" or "none"
        self.left = 0
        self.keep = False
        self.body_ok = True  # the body was sent whole

    def start_response(self, status, headers, exc_info=None):
        if exc_info:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called a second time without exc_info")
        if type(status) is not str:
            raise TypeError("status must be a str, not %s" % type(status).__name__)
        if len(status) < 4 or not status[:3].isdigit() or status[3] != " " or "\n" in status or "\r" in status:
            raise ValueError("malformed status %r" % status)
        lines = []
        length = None
        close = False
        for name, value in headers:
            if type(name) is not str or type(value) is not str:
                raise TypeError("header names and values must be str: %r" % ((name, value),))
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
                raise ValueError("invalid header %r" % ((name, value),))
            lname = name.lower()
            if lname in _HOP:
                if lname == "connection" and "close" in value.lower():
                    close = True
                continue  # the server frames the response and manages the connection
            if lname == "content-length":
                try:
                    length = int(value)
                    if length < 0:
                        raise ValueError
                except ValueError:
                    raise ValueError("invalid Content-Length %r" % value) from None
                continue
            lines.append("%s: %s\r\n" % (name, value))
        self.status = status
        self.code = int(status[:3])
        self.header_text = "".join(lines)
        self.app_length = length
        self.app_close = close
        return self.write

    def _head(self, body):
        """The response head; ``body`` is the whole body when known, else None
        (streaming). Decides the framing and whether to keep the connection."""
        if self.status is None:
            raise AssertionError("the application did not call start_response()")
        req, code = self.req, self.code
        no_body = req.method == "HEAD" or code in _NO_BODY or code < 200
        length = self.app_length
        if no_body:
            self.mode = "none"
            if length is None and body and req.method == "HEAD" and code not in _NO_BODY and code >= 200:
                length = len(body)
        elif body is not None:
            self.mode = "length"
            if length is None:
                length = len(body)
            self.left = length
        elif length is not None:
            self.mode = "length"
            self.left = length
        elif not req.http10:
            self.mode = "chunked"
        else:
            self.mode = "close"
        keep = (
            req.keep_alive and not self.app_close and self.mode != "close"
            and self.server.state is _RUNNING and self.server.keep_going()
        )
        self.keep = keep and self.inp.discardable()
        parts = ["HTTP/1.1 ", self.status, "\r\nDate: ", http_date(), "\r\n", self.header_text]
        if length is not None and code not in _NO_BODY and code >= 200:
            parts.append("Content-Length: %d\r\n" % length)
        if self.mode == "chunked":
            parts.append("Transfer-Encoding: chunked\r\n")
        if not self.keep:
            parts.append("Connection: close\r\n")
        elif req.http10:
            parts.append("Connection: keep-alive\r\n")
        parts.append("\r\n")
        self.sent = True
        return "".join(parts).encode("latin-1")

    def send_whole(self, body):
        """Sends the head and the whole ``body`` (one write when small)."""
        head = self._head(body)
        if self.mode == "none":
            self.conn.sendall(head)
            return
        if len(body) > self.left:
            log("the application sent %d bytes for Content-Length %d; truncated" % (len(body), self.left))
            body = body[: self.left]
            self.keep = False
        elif len(body) < self.left:
            self.keep = False
            self.body_ok = False
        self.left -= len(body)
        if len(body) < 262144:
            self.conn.sendall(head + body)
        else:
            self.conn.sendall(head)
            self.conn.sendall(body)

    def write(self, data):
        """Sends a chunk of the body (the WSGI ``write`` callable, also used for
        iterated bodies). The head goes with the first chunk."""
        if type(data) is not bytes:
            if isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            else:
                raise TypeError("response body chunks must be bytes, not %s" % type(data).__name__)
        if not data:
            return
        head = b""
        if not self.sent:
            head = self._head(None)
        mode = self.mode
        if mode == "chunked":
            self.conn.sendall(head + b"%x\r\n" % len(data) + data + b"\r\n")
        elif mode == "length":
            if len(data) > self.left:
                log("the application sent more than its Content-Length; truncated")
                data = data[: self.left]
                self.keep = False
            self.left -= len(data)
            self.conn.sendall(head + data)
        elif mode == "close":
            self.conn.sendall(head + data)
        elif head:
            self.conn.sendall(head)

    def finish(self):
        """After the last chunk of a streamed body."""
        if not self.sent:
            self.send_whole(b"")
        elif self.mode == "chunked":
            self.conn.sendall(b"0\r\n\r\n")
        elif self.mode == "length" and self.left > 0:
            self.keep = False  # short: the client sees the connection close early
            self.body_ok = False


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


class ListenerInfo:
    """A listener and the environ entries that come from it."""

    __slots__ = ("sock", "name", "unix", "base")

    def __init__(self, sock, name, base_environ):
        self.sock = sock
        self.name = name
        self.unix = sock.family == socket.AF_UNIX
        self.base = dict(base_environ)
        if self.unix:
            self.base["SERVER_NAME"] = "localhost"
            self.base["SERVER_PORT"] = "80"
        else:
            addr = sock.getsockname()
            self.base["SERVER_NAME"] = addr[0]
            self.base["SERVER_PORT"] = str(addr[1])


class Server:
    def __init__(self, app, socks, threads=4, keepalive=5.0, io_timeout=30.0, max_requests=0):
        self.app = app
        self.nthreads = max(1, threads)
        self.keepalive = keepalive
        self.io_timeout = io_timeout
        self.max_requests = max_requests
        self.counter = itertools.count(1)
        self.recycling = False
        base = {
            "SCRIPT_NAME": "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": self.nthreads > 1,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
        }
        self.listeners = [ListenerInfo(s, getattr(s, "name", "unknown"), base) for s in socks]
        self.sel = selectors.DefaultSelector()
        self.epoll = type(self.sel).__name__ == "EpollSelector"
        self.leader = threading.Condition(threading.Lock())  # held by the polling thread
        self.mu = threading.Lock()  # guards the selector's connections, the timers, state
        self.pending = collections.deque()
        self.state = _RUNNING
        self.stop_seen = False
        self.stop_kind = None
        self.first_byte_deadline = 0.0
        self.timers = {  # OrderedDicts fd -> Conn, in deadline order (one timeout each)
            "fresh": collections.OrderedDict(),
            "idle": collections.OrderedDict(),
            "linger": collections.OrderedDict(),
        }
        self.stop_lingering = []  # lingering closes started during a stop
        self.poll_until = float("inf")  # when the polling thread wakes up at the latest
        self.threads = []
        # Per thread (each writes its own slot): in a request now; items done.
        self.busy = [False] * self.nthreads
        self.done = [0] * self.nthreads
        self.ctrl_r, self.ctrl_w = os.pipe()
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.ctrl_r, self.ctrl_w, self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self._rcvtimeo = _timeval(io_timeout)
        self.pid = os.getpid()
        # drover's scoreboard record, if it gave one: requests are counted there.
        self.scoreboard = Scoreboard.from_env()

    # -- life cycle --------------------------------------------------------

    def start(self):
        for info in self.listeners:
            info.sock.setblocking(False)
            self.sel.register(info.sock, selectors.EVENT_READ, info)
        self.sel.register(dw.stop_fd(), selectors.EVENT_READ, _STOP)
        self.sel.register(self.ctrl_r, selectors.EVENT_READ, _STOP)
        self.sel.register(self.wake_r, selectors.EVENT_READ, _WAKE)
        for i in range(self.nthreads):
            t = threading.Thread(target=self._thread_main, args=(i,), name="drover-wsgi-%d" % (i + 1), daemon=True)
            t.start()
            self.threads.append(t)

    def keep_going(self):
        """False once the request that reached --max-requests has started."""
        return not self.recycling

    def wait_for_stop(self):
        """Blocks the main thread until a stop signal or a recycle; returns the kind."""
        fds = [dw.stop_fd(), self.ctrl_r]
        while True:
            kind = dw.stop_kind()
            if kind is not None:
                return kind
            if self.recycling:
                return "recycle"
            select.select(fds, [], [])

    def stop(self, kind):
        """The stop procedure (main thread): stop accepting, then drain.
        Returns True when every thread finished."""
        self.stop_kind = kind
        now = time.monotonic()
        self.first_byte_deadline = now + min(FIRST_BYTE_GRACE, dw.remaining_budget())
        # The polling thread sees the stop (or recycle) pipe and waits: we get
        # the leader lock, and nothing else polls or accepts while we hold it.
        with self.leader:
            self.stop_seen = True
            with self.mu:
                self.state = _STOPPING
                parked = []
                for name in ("fresh", "idle"):
                    parked.extend(self.timers[name].values())
                    self.timers[name].clear()
                for conn in parked:
                    conn.timer = None
                    self._unregister(conn)
            taken = 0
            for info in self.listeners:
                if kind == "graceful":
                    taken += self._drain_queue(info)
                try:
                    self.sel.unregister(info.sock)
                except (KeyError, ValueError, OSError):
                    pass
                info.sock.close()
            readable = _readable([c.sock for c in parked])
            for conn in parked:
                if kind == "quick":
                    self._start_linger(conn)
                elif conn.fd in readable or conn.buf:
                    self.pending.append(conn)  # a request is here: serve it, then close
                elif conn.requests == 0:
                    self.pending.append(conn)  # never sent a request: it may be on its way
                else:
                    self._start_linger(conn)  # idle keep-alive: close
            with self.mu:
                self.state = _DRAINED
            self.leader.notify_all()
        log(
            "stopping (%s): listeners closed, %d queued connection(s) taken, %d parked connection(s)"
            % (kind, taken, len(parked))
        )
        return self._join_threads()

    def _drain_queue(self, info):
        taken = 0
        for _ in range(MAX_DRAIN_ACCEPTS):
            try:
                sock, peer = info.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue
            except OSError as e:
                log("accept on %s: %s" % (info.name, e))
                break
            self.pending.append(self._new_conn(sock, peer, info))
            taken += 1
        return taken

    def _join_threads(self):
        """Waits for the busy threads until the SDK's drain deadline (4/5 of
        the stop budget: the rest is the cleanup's, which drover's SIGKILL
        would otherwise cut short) or, once the stop is quick, QUICK_DRAIN.
        A recycle without a stop signal has no deadline. Returns True when
        every thread finished; False when busy ones are abandoned."""
        quick_deadline = None
        while True:
            alive = [t for t in self.threads if t.is_alive()]
            if not alive:
                return True
            if quick_deadline is None and (self.stop_kind == "quick" or dw.stop_kind() == "quick"):
                self.stop_kind = "quick"  # also when a graceful stop escalated
                quick_deadline = time.monotonic() + QUICK_DRAIN
            # Asked each time: a stop signal during a recycle, or an
            # escalation to quick, brings it forward.
            deadline = dw.drain_deadline() if dw.stop_kind() is not None else float("inf")
            if quick_deadline is not None:
                deadline = min(deadline, quick_deadline)
            left = deadline - time.monotonic()
            if left <= 0:
                why = "quick stop" if self.stop_kind == "quick" else "drain deadline"
                log("abandoning %d busy thread(s) (%s)" % (len(alive), why))
                return False
            alive[0].join(min(left, 0.05))

    def linger_leftovers(self):
        """Finishes the lingering closes (main thread, after the pool stopped)."""
        with self.mu:
            conns = list(self.timers["linger"].values()) + self.stop_lingering
            self.timers["linger"].clear()
            self.stop_lingering = []
        for conn in conns:
            self._unregister(conn)
        deadline = time.monotonic() + min(LINGER, max(0.0, dw.remaining_budget() - 0.5))
        socks = {c.sock: c for c in conns}
        while socks:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                r, _, _ = select.select(list(socks), [], [], left)
            except (OSError, ValueError):
                break
            for s in r:
                try:
                    data = s.recv(65536, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    socks.pop(s).close()
        for conn in socks.values():
            conn.close()

    # -- the pool ----------------------------------------------------------

    def _thread_main(self, index):
        busy, done = self.busy, self.done
        while True:
            item = self._next_item()
            if item is None:
                return
            busy[index] = True
            try:
                if type(item) is ListenerInfo:
                    self._accept_one(item)
                else:
                    self._serve(item)
            except BaseException:
                log("internal error (the thread goes on):\n" + traceback.format_exc())
            finally:
                busy[index] = False
                done[index] += 1

    def heartbeats(self, interval):
        """Sends WATCHDOG=1 every interval/2 while the pool makes progress: a
        thread is free, or some request finished since the last beat. A pool
        whose every thread is stuck in a request stops beating, and drover's
        heartbeat timeout (SIGABRT: the stacks are dumped) catches it."""
        period = max(0.01, interval / 2)
        last = None
        quiet = False
        while True:
            done = list(self.done)
            if not all(self.busy) or done != last:
                try:
                    dw.heartbeat()
                except OSError as e:
                    log("cannot send WATCHDOG=1: %s" % e)
                quiet = False
            elif not quiet:
                log("all %d threads busy and no request finished for %.1fs: holding WATCHDOG=1"
                    % (self.nthreads, period))
                quiet = True
            last = done
            time.sleep(period)

    def _next_item(self):
        """The next thing to do: a listener to accept from, or a connection to
        serve; None when the pool is done (stopped and nothing left)."""
        with self.leader:
            while True:
                if self.pending:
                    return self.pending.popleft()
                if self.state is _DRAINED:
                    return None
                if self.stop_seen:
                    self.leader.wait()
                    continue
                self._poll()

    def _poll(self):
        """One poll (with the leader lock held): events go to self.pending."""
        timeout = None
        with self.mu:
            for timer in self.timers.values():
                if timer:
                    first = next(iter(timer.values())).deadline
                    if timeout is None or first < timeout:
                        timeout = first
            self.poll_until = float("inf") if timeout is None else timeout
        if timeout is not None:
            timeout = max(0.0, timeout - time.monotonic())
        try:
            events = self.sel.select(timeout)
        except (OSError, ValueError):
            events = []
        self.poll_until = 0.0  # not polling: nobody to wake
        for key, _ in events:
            data = key.data
            if data is _STOP:
                self.stop_seen = True
            elif type(data) is ListenerInfo:
                if not self.stop_seen and not self.recycling:
                    self.pending.append(data)
            elif data is _WAKE:
                try:
                    os.read(self.wake_r, 4096)
                except OSError:
                    pass
            else:
                conn = data
                with self.mu:
                    if conn.timer is None:
                        continue  # taken away meanwhile
                    del self.timers[conn.timer][conn.fd]
                    conn.timer = None
                    self._unregister(conn)
                if conn.lingering:
                    self._linger_read(conn)
                else:
                    self.pending.append(conn)
        self._expire(time.monotonic())

    def _expire(self, now):
        with self.mu:
            expired = []
            for name, timer in self.timers.items():
                while timer:
                    conn = next(iter(timer.values()))
                    if conn.deadline > now:
                        break
                    timer.popitem(last=False)
                    conn.timer = None
                    self._unregister(conn)
                    expired.append(conn)
        for conn in expired:
            if conn.lingering:
                conn.close()
            else:
                self._start_linger(conn)

    def _unregister(self, conn):
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _park(self, conn, timer):
        """Puts a connection in the selector until it is readable; False when
        the server is stopping (the caller handles the connection)."""
        with self.mu:
            if self.state is not _RUNNING:
                return False
            conn.deadline = time.monotonic() + (self.keepalive if timer == "idle" else self.io_timeout)
            conn.timer = timer
            self.timers[timer][conn.fd] = conn
            try:
                self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            except (KeyError, ValueError, OSError):
                del self.timers[timer][conn.fd]
                conn.timer = None
                conn.close()
                return True
        self._wake_for(conn)
        return True

    def _wake_for(self, conn):
        """Wakes the polling thread when it would sleep past ``conn``'s deadline
        (or cannot see a new registration: non-epoll selectors)."""
        if conn.deadline < self.poll_until or not self.epoll:
            try:
                os.write(self.wake_w, b"x")
            except OSError:
                pass

    def _start_linger(self, conn):
        """Closes without resetting: half-close now, read and drop what the
        client still sends for a short while, then close."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        conn.lingering = True
        with self.mu:
            if self.state is not _RUNNING:
                self.stop_lingering.append(conn)
                return
            conn.deadline = time.monotonic() + LINGER
            conn.timer = "linger"
            self.timers["linger"][conn.fd] = conn
            try:
                self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            except (KeyError, ValueError, OSError):
                del self.timers["linger"][conn.fd]
                conn.timer = None
                conn.close()
                return
        self._wake_for(conn)

    def _linger_read(self, conn):
        for _ in range(4):
            data = conn.recv_nowait()
            if data is None:
                break
            if not data:
                conn.close()
                return
        with self.mu:
            if self.state is not _RUNNING:
                self.stop_lingering.append(conn)
                return
            conn.timer = "linger"
            self.timers["linger"][conn.fd] = conn  # keeps its deadline
            try:
                self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            except (KeyError, ValueError, OSError):
                del self.timers["linger"][conn.fd]
                conn.timer = None
                conn.close()

    def _new_conn(self, sock, peer, info):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._rcvtimeo)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._rcvtimeo)
            if not info.unix:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return Conn(sock, peer, info)

    def _accept_one(self, info):
        if self.recycling or self.stop_seen:
            return  # recycling: queued connections are for the other workers
        try:
            sock, peer = info.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker (or thread) took it
        except OSError as e:
            if self.state is not _RUNNING:
                return
            # EMFILE and friends: back off instead of spinning on a readable listener.
            log("accept on %s: %s" % (info.name, e))
            time.sleep(0.1)
            return
        self._serve(self._new_conn(sock, peer, info))

    # -- one connection ------------------------------------------------------

    def _serve(self, conn):
        """Serves requests on ``conn`` until it is parked, closed or handed to
        the lingering close."""
        try:
            while True:
                if not conn.buf:
                    data = conn.recv_nowait()
                    if data is None:
                        if self._park(conn, "idle" if conn.requests else "fresh"):
                            return
                        data = self._wait_while_stopping(conn)
                        if data is None:
                            self._start_linger(conn)
                            return
                    elif self.state is not _RUNNING and self.stop_kind == "quick" and conn.requests:
                        self._start_linger(conn)  # quick stop: no new request on an old connection
                        return
                    if not data:
                        conn.close()
                        return
                    conn.buf = data
                parsed = None
                try:
                    while True:
                        parsed = parse_request(conn.buf)
                        if parsed is not None:
                            break
                        conn.buf += conn.recv_blocking()
                except HTTPError as e:
                    conn.sendall(error_response(e.status, e.reason))
                    self._start_linger(conn)
                    return
                req, used = parsed
                conn.buf = conn.buf[used:]
                conn.requests += 1
                if not self._handle(conn, req):
                    return
        except ClientGone:
            conn.close()

    def _wait_while_stopping(self, conn):
        """During a stop, a connection with nothing to read yet: one that never
        sent a request gets until the first-byte deadline (it was accepted, so
        it is owed an answer); an idle keep-alive one is closed (None)."""
        if conn.requests or self.stop_kind == "quick":
            return None
        left = self.first_byte_deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            r, _, _ = select.select([conn.sock], [], [], left)
        except (OSError, ValueError):
            return b""
        if not r:
            return None
        data = conn.recv_nowait()
        return b"" if data is None else data

    def _handle(self, conn, req):
        """Runs the app for one request; True when the connection stays open
        (parked or pipelined), False when it was closed or handed off. The
        request is counted in drover's scoreboard, if any, until its response
        is sent."""
        board = self.scoreboard
        if board is None:
            return self._handle_request(conn, req)
        started = board.begin()
        try:
            return self._handle_request(conn, req)
        finally:
            board.end(started)

    def _handle_request(self, conn, req):
        n = next(self.counter)
        if self.max_requests and n >= self.max_requests and not self.recycling:
            self.recycling = True
            try:
                os.write(self.ctrl_w, b"r")
            except OSError:
                pass
        info = conn.listener
        environ = info.base.copy()
        environ.update(req.headers)
        try:
            path, query = split_target(req.target)
        except HTTPError as e:
            conn.sendall(error_response(e.status, e.reason))
            self._start_linger(conn)
            return False
        environ["REQUEST_METHOD"] = req.method
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = query
        environ["RAW_URI"] = environ["REQUEST_URI"] = req.target.decode("latin-1")
        environ["SERVER_PROTOCOL"] = "HTTP/1.0" if req.http10 else "HTTP/1.1"
        peer = conn.peer
        if info.unix:
            environ["REMOTE_ADDR"] = ""
        else:
            environ["REMOTE_ADDR"] = peer[0]
            environ["REMOTE_PORT"] = str(peer[1])
        inp = Input(conn, req.content_length, req.expect_continue)
        environ["wsgi.input"] = inp
        resp = Response(conn, req, self, inp)
        try:
            result = self.app(environ, resp.start_response)
            try:
                self._send_result(resp, result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except ClientGone:
            conn.close()
            return False
        except Exception:
            log("error in the application on %s %s:\n%s" % (req.method, environ["RAW_URI"], traceback.format_exc().rstrip()))
            if not resp.sent:
                try:
                    conn.sendall(error_response(500, "the application failed; see the worker's log"))
                except ClientGone:
                    conn.close()
                    return False
                self._start_linger(conn)
            else:
                conn.close()  # mid-body: the client sees the connection end early
            return False
        if resp.keep and inp.discard():
            if conn.buf:
                return True  # pipelined: the next request is already here
            if self._park(conn, "idle"):
                return False
            return True  # stopping: _serve decides (serve what arrived, or close)
        if not req.keep_alive and not conn.buf and inp._left <= 0 and resp.body_ok:
            conn.close()  # the client asked for the close: nothing more will come
        else:
            self._start_linger(conn)
        return False

    def _send_result(self, resp, result):
        if resp.sent:  # the app used write(): the body is streamed
            for chunk in result:
                resp.write(chunk)
            resp.finish()
            return
        if type(result) is list or type(result) is tuple:
            if len(result) == 1:
                body = result[0]
                if type(body) is not bytes:
                    body = _to_bytes(body)
            else:
                body = b"".join(result)
            resp.send_whole(body)
            return
        try:
            n = len(result)
        except TypeError:
            n = -1
        if n == 1 and resp.status is not None:
            for chunk in result:
                resp.send_whole(_to_bytes(chunk))
                return
        write = resp.write
        for chunk in result:
            write(chunk)
        resp.finish()


def _to_bytes(data):
    if type(data) is bytes:
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError("response body chunks must be bytes, not %s" % type(data).__name__)


def _readable(socks):
    if not socks:
        return set()
    p = select.poll()
    for s in socks:
        p.register(s, select.POLLIN)
    return {fd for fd, ev in p.poll(0) if ev}


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def load_app(spec):
    module_name, _, attr = spec.partition(":")
    attr = attr or "application"
    call = attr.endswith("()")
    if call:
        attr = attr[:-2]
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if call:
        obj = obj()
    if not callable(obj):
        raise TypeError("%s is not callable" % spec)
    return obj


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="drover-wsgi",
        description="Serve a WSGI application on the sockets drover passes (LISTEN_FDS).",
    )
    p.add_argument("app", help="module:app (module alone: module:application; module:factory() calls it)")
    p.add_argument("--threads", type=int, default=4, help="threads serving requests (default 4)")
    p.add_argument("--max-requests", type=int, default=0, help="exit 0 after this many requests (default 0: never)")
    p.add_argument("--max-requests-jitter", type=int, default=0, help="add up to this many, at random, to --max-requests")
    p.add_argument("--keepalive", type=float, default=5.0, help="seconds an idle keep-alive connection is kept (default 5)")
    p.add_argument("--io-timeout", type=float, default=30.0, help="seconds to wait for a client's bytes within a request (default 30)")
    p.add_argument("--chdir", help="change to this directory (and import from it) before loading the app")
    p.add_argument("--bind", help="development only: bind this address when not started by drover (host:port or unix:/path)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.max_requests < 0 or args.max_requests_jitter < 0:
        p.error("--max-requests and --max-requests-jitter must not be negative")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.chdir:
        os.chdir(args.chdir)
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    faulthandler.enable()  # SIGABRT (drover's liveness timeout) dumps every thread's stack
    # Early, so that a stop during the import is not lost; again after the
    # import, so that handlers the app installed are chained, not lost.
    dw.install(exit_on_stop=False)  # we drain, then run the registry ourselves
    try:
        socks = dw.listeners_or_bind(args.bind) if args.bind else dw.listeners()
        if not socks:
            raise dw.ListenError("no listening sockets (LISTEN_FDS=0)")
        for s in socks:
            if s.type != socket.SOCK_STREAM or not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise dw.ListenError("inherited fd %d (%s) is not a listening stream socket" % (s.fileno(), s.name))
    except (dw.ListenError, OSError) as e:
        log("cannot boot: %s" % e)
        return 3
    try:
        app = load_app(args.app)
    except BaseException:
        sys.stderr.write(traceback.format_exc())
        log("cannot boot: cannot load the application %r (traceback above)" % args.app)
        return 3
    dw.install(exit_on_stop=False)
    if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        # drover forwards SIGUSR1 ("reopen log files"); its default would kill us.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    max_requests = args.max_requests
    if max_requests and args.max_requests_jitter:
        max_requests += random.randint(0, args.max_requests_jitter)
    server = Server(app, socks, threads=args.threads, keepalive=args.keepalive,
                    io_timeout=args.io_timeout, max_requests=max_requests)
    server.start()
    interval = dw.watchdog_interval()
    if interval:
        threading.Thread(target=server.heartbeats, args=(interval,), name="drover-heartbeat", daemon=True).start()
    if dw.stop_kind() is None:
        try:
            dw.ready()
        except OSError as e:
            log("cannot send READY=1: %s" % e)
        log("ready: %s, %d thread(s), serving %s" % (
            args.app, server.nthreads, ", ".join("%s (%s)" % (dw._describe(s), s.name) for s in socks)))

    kind = server.wait_for_stop()
    try:
        dw.stopping()
    except OSError:
        pass
    if kind == "recycle":
        log("served %d requests (--max-requests): recycling" % max_requests)
    finished = server.stop(kind)
    server.linger_leftovers()
    dw.run_cleanup()
    log("stopped")
    if not finished:
        # Threads still run a request: do not let interpreter shutdown wait
        # for (or trip over) them. atexit handlers still run.
        _exit_now(0)
    return 0


def _exit_now(code):
    try:
        import atexit

        atexit._run_exitfuncs()
    except Exception:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def console_main():
    """The ``drover-wsgi`` console script."""
    sys.exit(main())

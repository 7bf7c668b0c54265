"""The drover_wsgi server: connections, request bodies, responses and the
thread pool.

How it serves: ``threads`` threads take turns as the one that waits (a
"leader/followers" pool): the waiting thread polls the listeners and the idle
keep-alive connections with ``selectors``, takes one event and serves it
itself while another thread takes over the waiting. A busy pool therefore
accepts nothing (connections stay queued for the other workers), and no
request is handed between threads. Listening sockets are non-blocking: they
are shared with the other workers, so a poll may be followed by an empty
accept.

Graceful stop (SIGTERM/SIGINT): STOPPING=1; idle keep-alive connections are
closed, a request that already arrived on one is served; in-flight requests
finish (answered with ``Connection: close``); and a free thread goes on taking
connections from the listen queue, one at a time, as long as a request of the
usual duration (a moving average) would end before the drain deadline, and
only as many as the queue held when the stop came (in a reload the queue
fills on, for the new workers: an old worker that took from it until its
deadline abandoned the requests it was in then); at a shutdown, once drover
filtered the listeners, until the queue is empty (what is still to come is
a handshake that was under way). When the queue is empty,
what was queued at the stop is taken, or no more fits, this worker closes its
copies of the listeners: what is still queued is left to the other workers,
which drain it by the same rule, instead of being taken and abandoned at the
deadline.
In-flight requests get until ``drover_worker.drain_deadline()`` (4/5 of the
grace budget) and are abandoned then, so that the registry still runs before
drover's SIGKILL. Quick stop (SIGQUIT): stop accepting, give in-flight
requests at most 1 s. ``max_requests``: after N requests, STOPPING=1, stop
accepting (queued connections are left to the other workers), finish.
"""

import collections
import itertools
import os
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
from typing import Any, Deque, Dict, List, Optional

import drover_worker as dw
from drover_worker.scoreboard import Scoreboard

from .http import (
    DEFAULT_LIMITS,
    HTTPError,
    error_body_size,
    error_response,
    http_date,
    parse_chunk_size,
    parse_field_line,
    parse_request,
    split_target,
)
from .proxy import Proxy

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
#: When accept fails (EMFILE: out of file descriptors), the listeners leave the
#: selector for this long; the threads serve the connections they have.
ACCEPT_PAUSE = 0.1
#: The accept failures are logged at most once in this many seconds.
ACCEPT_LOG_EVERY = 10.0
#: The line that says why a request head was refused is written at most once
#: in this many seconds (each refusal still gets its access log line).
REFUSAL_LOG_EVERY = 10.0

_RUNNING, _STOPPING, _DRAINED = "running", "stopping", "drained"
_STOP = object()  # selector data: the stop pipe or the recycle pipe
_WAKE = object()  # selector data: the wake-up pipe (non-epoll selectors only)
_NOTHING = object()  # next()'s default: the iteration ended


def log(message):
    text = "drover_wsgi[%d]: %s\n" % (os.getpid(), message)
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:
        pass


def log_refusal(method, uri, status, reason):
    """The line for a request refused once its head was read (both cores)."""
    log("%s %s %s: %s" % ("bad request on" if status < 500 else "cannot serve", method, uri, reason))


def log_internal_error(method, uri, error):
    """The server's own failure on a request (building its environ: a proxy
    hook that raised), answered 500 (both cores): with its traceback."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()
    log("internal error on %s %s (answered 500):\n%s" % (method, uri, text))


def over_line(method, uri, length, over):
    """The line for an app whose body was longer than its Content-Length
    (both cores), once per response."""
    return ("%s %s: the application's body is longer than its Content-Length (%d): the %d byte(s) past it "
            "were not sent (fix the Content-Length header the application sets)" % (method, uri, length, over))


class HeadRefusals:
    """Request heads the server refuses before there is a request (a head it
    cannot parse, 400; over the limits, 431; one that did not arrive within
    the header timeout, 408; any other status the parser answers), on both
    cores: each gets an access log line with what is known (the client's
    address; "-" for the request line, method, path and protocol), and a line
    on standard error says why, at most once per REFUSAL_LOG_EVERY with the
    number refused meanwhile. Not one line each: a scanner, or TLS sent to
    the HTTP port, would flood the log, and drover's capture_output drops a
    worker's lines past 200 a second, its tracebacks with them."""

    def __init__(self, access_log, clock=time.monotonic):
        self.access_log = access_log
        self.clock = clock
        self.mu = threading.Lock()
        self.unlogged = 0  # refused since the last line
        self.logged_at: Optional[float] = None

    def __call__(self, addr, port, status, reason, seconds, sent):
        """``addr``: REMOTE_ADDR; ``port``: the TCP peer's port, or None;
        ``seconds``: since the head's first bytes were read, to the answer;
        ``sent``: the answer's body bytes, None if it could not be sent (the
        access log's ``b``, as nginx logs the size of its error page)."""
        if self.access_log is not None:
            environ = {"REMOTE_ADDR": addr}
            if port is not None:
                environ["REMOTE_PORT"] = str(port)
            self.access_log.log(environ, str(status), sent, [], seconds)
        now = self.clock()
        with self.mu:
            if self.logged_at is not None and now - self.logged_at < REFUSAL_LOG_EVERY:
                self.unlogged += 1
                return
            unlogged, self.unlogged, self.logged_at = self.unlogged, 0, now
        more = "; %d more refused since the last such line" % unlogged if unlogged else ""
        log("bad request head from %s (%d): %s%s" % (addr or "-", status, reason, more))


#: Why sock_diag may not answer for a Unix listener. Both causes give the
#: same ENOENT; the second is the usual one where the module is there: a
#: socket bound in the host's namespace (a systemd socket unit) handed to a
#: service with PrivateNetwork=yes, whose sock_diag looks only in its own.
_UNIX_QUEUE_UNKNOWN = ("sock_diag failed: no unix_diag module in the kernel, or the socket was made in "
                       "another network namespace, as with systemd's PrivateNetwork=")


def stop_line(kind, parked, unmeasured):
    """The stop's log line (both cores). ``unmeasured``: (name, is_unix) of
    the listeners whose queue's length could not be read at a graceful stop:
    what was queued then is not counted, and the queue is taken from by the
    older rule (see the module's docstring)."""
    line = "stopping (%s): %d parked connection(s)" % (kind, parked)
    if unmeasured:
        line += ("; cannot read the length of the listen queue of %s: queued connections are taken "
                 "while a request of the usual duration ends before the drain deadline, not only "
                 "those queued at the stop" % ", ".join(
                     "%s (%s)" % (name, _UNIX_QUEUE_UNKNOWN if unix else "TCP_INFO failed")
                     for name, unix in unmeasured))
    return line


def exit_forked_child(parent):
    """The child of an ``os.fork()`` made in a request came back from the app
    into the server (both cores call this): it must not answer the parent's
    request nor serve (the native core's child took over the listeners,
    outside drover's watch), nor run the parent's cleanup registry."""
    log("the child of os.fork() in a request returned from the application into the server; "
        "it exits now (os._exit(0)), the worker (pid %d) answers the request: "
        "end a forked child with os._exit()" % parent)
    os._exit(0)


# ---------------------------------------------------------------------------
# Connections, request bodies, responses
# ---------------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed, reset or timed out: nothing to answer. ``sent``:
    how many bytes of the send that failed went out first."""

    sent = 0


class ReadTimeout(ClientGone):
    """The request's head or body did not arrive in time (a slow client)."""


class BodyTimeout(ConnectionError):
    """The request body stopped coming (``body_timeout``): answered 408."""


class BodyError(ValueError):
    """A malformed chunked body: the app's read fails, the client gets a 400."""

    def __init__(self, error):
        super().__init__(error.reason)
        self.error = error


def _wait_writable(fd, timeout):
    """Whether ``fd`` can take bytes within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        return bool(poller.poll(timeout * 1000))
    except InterruptedError:
        return True  # the caller's send tries again


def _timeval(seconds):
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1_000_000))


def _remote_addr(peer):
    """REMOTE_ADDR as Gunicorn sets it: the IP address, or for a Unix-socket
    peer its path as accept() gives it ("" when unnamed, and for an abstract
    name, which starts with a NUL byte: as the native core)."""
    if isinstance(peer, tuple):
        return peer[0]
    if isinstance(peer, bytes):
        peer = peer.decode("utf-8", "replace")
    return (peer or "").split("\0", 1)[0]


class Conn:
    """One client connection and the bytes received but not yet consumed."""

    __slots__ = (
        "sock", "fd", "listener", "peer", "buf", "requests", "deadline", "timer", "lingering",
        "trusted", "read_until", "timeout_set", "io_timeout",
    )

    def __init__(self, sock, peer, listener, trusted, io_timeout):
        self.sock = sock
        self.fd = sock.fileno()
        self.listener = listener
        self.peer = peer
        self.buf = b""
        self.requests = 0
        self.deadline = 0.0
        self.timer = None  # which of the server's timer dicts holds it
        self.lingering = False
        self.trusted = trusted  # may set the secure scheme and forwarder headers
        # When the head (or the body read so far) must have arrived: a slow
        # client cannot hold a thread past it (slowloris).
        self.read_until = float("inf")
        self.timeout_set = io_timeout  # SO_RCVTIMEO now
        self.io_timeout = io_timeout

    def recv_blocking(self):
        """More bytes (blocking, bounded by the I/O timeout and by
        ``read_until``); raises ClientGone at EOF or on an error, ReadTimeout
        on a timeout."""
        left = self.read_until - time.monotonic()
        wait = self.io_timeout if left > self.io_timeout else left
        if wait != self.timeout_set:
            if wait <= 0:
                raise ReadTimeout("the request did not arrive in time")
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(wait))
            except OSError as e:
                raise ClientGone(str(e)) from None
            self.timeout_set = wait
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, socket.timeout):  # SO_RCVTIMEO expired
            raise ReadTimeout("no bytes from the client for %.1fs" % wait) from None
        except OSError as e:
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
        """Sends ``data``; ClientGone when the client took no bytes for the
        I/O timeout (as the native core: a blocking sendall() started its
        SO_SNDTIMEO anew at every trickle of progress, and a client that
        stopped reading held the thread for several timeouts)."""
        view = data
        sent = 0
        try:
            while True:
                try:
                    n = self.sock.send(view, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    if not _wait_writable(self.fd, self.io_timeout):
                        gone = ClientGone("the client took no bytes for %.1fs" % self.io_timeout)
                        gone.sent = sent
                        raise gone from None
                    continue
                if n == len(view):
                    return
                sent += n
                view = memoryview(view)[n:]
        except OSError as e:
            gone = ClientGone(str(e))
            gone.sent = sent
            raise gone from None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Input:
    """``wsgi.input``: the request body (Content-Length bytes), read from the
    connection's buffer first, then from the socket. Sends ``100 Continue``
    before the first read when the client asked for it. The body must keep
    coming: ``body_timeout`` seconds from the end of the head, plus one second
    per ``min_rate`` bytes received."""

    __slots__ = ("_conn", "_left", "_continue", "_min_rate", "failure")

    def __init__(self, conn, length, expect_continue, body_timeout=None, min_rate=0):
        self._conn = conn
        self._left = length
        self._continue = expect_continue and length > 0
        self._min_rate = min_rate
        # The BodyTimeout or BodyError a read raised: the client is answered
        # 408 or 400 even when the app caught it and answered itself.
        self.failure = None
        conn.read_until = float("inf") if body_timeout is None else time.monotonic() + body_timeout

    def _more(self):
        conn = self._conn
        if self._continue:
            self._continue = False
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            data = conn.recv_blocking()
        except ReadTimeout as e:
            self.failure = BodyTimeout("the request body did not arrive in time (%s)" % e)
            raise self.failure from None
        except ClientGone as e:
            raise ConnectionError("client disconnected before the end of the request body (%s)" % e) from None
        if self._min_rate:
            conn.read_until += len(data) / self._min_rate
        return data

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
        lines: List[bytes] = []
        total = 0
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

    def finished(self):
        """The whole body was read: the next request can follow."""
        return self._left <= 0

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


#: The longest chunk-size or trailer line.
MAX_CHUNK_LINE = 4096
#: The most trailer fields after the last chunk.
MAX_TRAILERS = 100


class ChunkedInput(Input):
    """``wsgi.input`` for a chunked request body (``Transfer-Encoding:
    chunked``): decoded as the app reads; the app reads until b"" (PEP 3333's
    ``wsgi.input_terminated``). Trailer fields are read and dropped. A
    malformed body makes the read raise :class:`BodyError` (the client gets
    a 400 if nothing was answered yet)."""

    __slots__ = ("_data", "_chunk", "_crlf", "_done")

    def __init__(self, conn, expect_continue, body_timeout=None, min_rate=0):
        super().__init__(conn, 0, False, body_timeout, min_rate)
        self._continue = expect_continue
        self._data = b""  # decoded, not yet read by the app
        self._chunk = 0  # bytes left in the current chunk
        self._crlf = False  # the current chunk's CRLF is still to come
        self._done = False

    def _line(self):
        """The next chunk-size or trailer line, without its CRLF. As
        drover-h1's ChunkedDecoder: a line must end in CRLF (a bare LF or a
        CR alone is refused), and a line longer than MAX_CHUNK_LINE is refused
        whether its end is buffered or not."""
        conn = self._conn
        while True:
            buf = conn.buf
            nl = buf.find(b"\n", 0, MAX_CHUNK_LINE + 2)
            if nl >= 0:
                cr = buf.find(b"\r", 0, nl)
                if cr < 0 or cr != nl - 1:
                    raise self._bad(HTTPError(400, "a chunk line does not end in CRLF"))
                conn.buf = buf[nl + 1:]
                return buf[:cr]
            cr = buf.find(b"\r", 0, MAX_CHUNK_LINE + 1)
            if 0 <= cr < len(buf) - 1:
                raise self._bad(HTTPError(400, "a chunk line does not end in CRLF"))
            if len(buf) > MAX_CHUNK_LINE and cr < 0:
                raise self._bad(HTTPError(400, "chunk line longer than %d bytes" % MAX_CHUNK_LINE))
            conn.buf += self._more()

    def _bad(self, error):
        """The BodyError to raise for ``error``, noted as the body's failure."""
        self.failure = BodyError(error)
        return self.failure

    def _data_end(self):
        """Reads the CRLF after a chunk's data: anything else means more data
        than the chunk's size."""
        conn = self._conn
        while len(conn.buf) < 2 and b"\r\n".startswith(conn.buf):
            conn.buf += self._more()
        if not conn.buf.startswith(b"\r\n"):
            raise self._bad(HTTPError(400, "chunk data longer than its size"))
        conn.buf = conn.buf[2:]

    def _fill(self):
        """Decodes the next piece of the body into ``_data`` (or ends it)."""
        conn = self._conn
        if self._chunk == 0:
            if self._crlf:
                self._data_end()
                self._crlf = False
            try:
                size = parse_chunk_size(self._line())
                if size == 0:
                    for _ in range(MAX_TRAILERS + 1):
                        line = self._line()
                        if not line:
                            self._done = True
                            return
                        parse_field_line(line)  # checked and dropped
                    raise HTTPError(400, "more than %d trailer fields" % MAX_TRAILERS)
            except HTTPError as e:
                raise self._bad(e) from None
            self._chunk = size
            self._crlf = True
        if not conn.buf:
            conn.buf = self._more()
        take = min(self._chunk, len(conn.buf))
        self._data += conn.buf[:take]
        conn.buf = conn.buf[take:]
        self._chunk -= take

    def read(self, size=-1):
        if size is None or size < 0:
            while not self._done:
                self._fill()
            data, self._data = self._data, b""
            return data
        while len(self._data) < size and not self._done:
            self._fill()
        data, self._data = self._data[:size], self._data[size:]
        return data

    def readline(self, size=-1):
        limit = None if size is None or size < 0 else size
        while not self._done:
            end = self._data.find(b"\n")
            if end >= 0 or (limit is not None and len(self._data) >= limit):
                break
            self._fill()
        end = self._data.find(b"\n")
        n = len(self._data) if end < 0 else end + 1
        if limit is not None:
            n = min(n, limit)
        data, self._data = self._data[:n], self._data[n:]
        return data

    def discardable(self):
        return self._done or not self._continue

    def finished(self):
        return self._done and not self._data

    def discard(self):
        if self._done:
            return True
        if self._continue:
            return False
        try:
            total = len(self._data)
            self._data = b""
            while not self._done:
                self._fill()
                total += len(self._data)
                self._data = b""
                if total > DISCARD_LIMIT:
                    return False
        except (OSError, ValueError):
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
#: A response header's name is a token and its value has no control
#: characters but HTAB (RFC 9110 5.1, 5.5): anything else is the app's error
#: (a 500), never sent, as Gunicorn refuses it.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HOP = frozenset(["connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"])


class Response:
    """One response: ``start_response``, ``write`` and the framing."""

    __slots__ = (
        "conn", "req", "server", "status", "code", "header_text", "app_length", "app_close",
        "sent", "mode", "left", "keep", "body_ok", "inp", "headers", "body_bytes", "wrote",
        "over",
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
        self.headers = ()  # the app's, for the access log
        self.body_bytes = 0  # the body's bytes sent (the access log's b)
        self.wrote = False  # a byte of the response was sent
        self.over = 0  # the app's body bytes past its Content-Length (not sent)

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
        if not status.isascii():
            try:
                status.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError("malformed status %r: not latin-1" % status) from None
        code = int(status[:3])
        if code < 200 or code > 599:  # a 1xx would leave the client waiting for the final status
            raise ValueError("status %r: a response's status is 200 to 599" % status)
        lines = []
        length = None
        close = False
        for item in headers:
            if isinstance(item, str):  # a dict's key, or one pair given alone: "XA" is no ("X", "A")
                raise TypeError(_not_pairs(headers, item))
            try:
                name, value = item
            except (TypeError, ValueError):
                raise TypeError(_not_pairs(headers, item)) from None
            if type(name) is not str or type(value) is not str:
                raise TypeError("header names and values must be str: %r" % ((name, value),))
            if _FIELD_NAME.fullmatch(name) is None or _BAD_VALUE.search(value) is not None:
                raise ValueError("invalid header %r" % ((name, value),))
            if not value.isascii():
                try:
                    value.encode("latin-1")
                except UnicodeEncodeError:
                    raise ValueError("invalid header %r: not latin-1" % ((name, value),)) from None
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
        self.code = code
        self.headers = headers
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
            and not self.server.winding_down
            and self.conn.requests != self.server.keepalive_requests  # counted from 1: 0 never matches
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
        head = "".join(parts).encode("latin-1")  # a header that is not latin-1 raises: nothing is sent yet
        self.sent = True
        return head

    def send_whole(self, body):
        """Sends the head and the whole ``body`` (one write when small)."""
        head = self._head(body)
        if self.mode == "none":
            self._send(head, 0, 0)
            return
        if len(body) > self.left:  # cut: what follows would be read as the next response
            self.over += len(body) - self.left
            body = body[: self.left]
        elif len(body) < self.left:
            self.keep = False
            self.body_ok = False
        self.left -= len(body)
        if len(body) < 262144:
            self._send(head + body, len(head), len(body))
        else:
            self._send(head, 0, 0)
            self._send(body, 0, len(body))

    def _send(self, data, at, n):
        """Sends ``data``, whose bytes ``at`` to ``at + n`` are the body's:
        counted in ``body_bytes`` as far as they went out, also when the
        client leaves midway (the access log's ``b``)."""
        try:
            self.conn.sendall(data)
        except ClientGone as e:
            self.wrote = self.wrote or e.sent > 0
            self.body_bytes += min(max(e.sent - at, 0), n)
            raise
        self.wrote = True
        self.body_bytes += n

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
            size = b"%x\r\n" % len(data)
            self._send(head + size + data + b"\r\n", len(head) + len(size), len(data))
        elif mode == "length":
            if len(data) > self.left:  # cut: what follows would be read as the next response
                self.over += len(data) - self.left
                data = data[: self.left]
            self.left -= len(data)
            self._send(head + data, len(head), len(data))
        elif mode == "close":
            self._send(head + data, len(head), len(data))
        elif head:
            self._send(head, 0, 0)

    def finish(self):
        """After the last chunk of a streamed body."""
        if not self.sent:
            self.send_whole(b"")
        elif self.mode == "chunked":
            self._send(b"0\r\n\r\n", 0, 0)
        elif self.mode == "length" and self.left > 0:
            self.keep = False  # short: the client sees the connection close early
            self.body_ok = False


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------


def base_environ(nthreads):
    """The environ entries every request starts with (the listener's come next)."""
    return {
        "SCRIPT_NAME": "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": nthreads > 1,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": FileWrapper,
    }


_TCP_LISTEN = 10
_SOCK_DIAG_BY_FAMILY = 20
_UDIAG_SHOW_RQLEN = 0x10
_UNIX_DIAG_RQLEN = 4
_SO_GET_FILTER = 26


def filtered(sock: socket.socket) -> bool:
    """Whether a socket filter is attached to listener ``sock``: drover's
    stage 1 of a shutdown (docs/signals.md), after which no new connection
    gets in but a handshake already under way may still complete."""
    # With no room given, the kernel says only the filter's length
    # (socket.getsockopt cannot give none, and a filter longer than the room
    # it gives would be copied past it).
    try:
        import ctypes  # only at a stop

        length = ctypes.c_uint32(0)
        libc = ctypes.CDLL(None, use_errno=True)
        got = libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, _SO_GET_FILTER, None, ctypes.byref(length))
    except (ImportError, OSError, AttributeError):  # a Python built without ctypes
        return False
    return got == 0 and length.value > 0


def queued(sock: socket.socket) -> Optional[int]:
    """How many connections wait in listener ``sock``'s accept queue, if the
    kernel says: TCP_INFO on a TCP listener (its ``tcpi_unacked`` is the
    queue's length), sock_diag (``UNIX_DIAG_RQLEN``) on a Unix one. None when
    it cannot be asked (no ``unix_diag`` in the kernel, say)."""
    try:
        if sock.family != socket.AF_UNIX:
            # struct tcp_info: eight one-byte fields, then u32 rto, ato,
            # snd_mss, rcv_mss, unacked (at 24).
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
            return struct.unpack_from("=I", info, 24)[0] if len(info) >= 28 else None
        ino = os.fstat(sock.fileno()).st_ino & 0xFFFFFFFF
        # struct nlmsghdr, then struct unix_diag_req (the inode names the socket).
        req = struct.pack("=IHHII", 40, _SOCK_DIAG_BY_FAMILY, 1, 0, 0)  # NLM_F_REQUEST
        req += struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, ino, _UDIAG_SHOW_RQLEN,
                           0xFFFFFFFF, 0xFFFFFFFF)
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
            nl.settimeout(1.0)
            nl.send(req)
            reply = nl.recv(512)
    except OSError:
        return None
    if len(reply) < 32 or struct.unpack_from("=H", reply, 4)[0] != _SOCK_DIAG_BY_FAMILY:
        return None  # an error (NLMSG_ERROR), or no such listener
    end = min(struct.unpack_from("=I", reply)[0], len(reply))
    at = 32  # the attributes after struct unix_diag_msg, each 4-byte aligned
    while at + 4 <= end:
        length, kind = struct.unpack_from("=HH", reply, at)
        if length < 4 or at + length > end:
            return None
        if kind == _UNIX_DIAG_RQLEN and length >= 8:
            return struct.unpack_from("=I", reply, at + 4)[0]
        at += (length + 3) & ~3
    return None


class ListenerInfo:
    """A listener and the environ entries that come from it."""

    __slots__ = ("sock", "name", "unix", "base", "left")

    def __init__(self, sock, name, base_environ):
        self.sock = sock
        self.name = name
        # At a graceful stop: what its queue held then, less what was taken
        # since (None: the kernel did not say). See the module's docstring.
        self.left: Optional[int] = None
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
    """The pool serving ``app`` on ``socks``. ``keepalive_requests``: the
    most requests on one connection (0: no limit). Timeouts in seconds (None: no
    limit): ``keepalive`` for an idle connection, ``io_timeout`` for any one
    read or write, ``header_timeout`` for a whole request head from its first
    byte, ``body_timeout`` for a body from the end of its head, plus one second
    per ``body_min_rate`` bytes received."""

    def __init__(self, app, socks, threads=4, keepalive=5.0, io_timeout=30.0, max_requests=0,
                 limits=DEFAULT_LIMITS, proxy=None, access_log=None, header_timeout=20.0,
                 body_timeout=20.0, body_min_rate=500, keepalive_requests=1000):
        self.app = app
        self.nthreads = max(1, threads)
        self.keepalive = keepalive
        # The requests a connection carries (0: no limit): the last one's
        # response closes it, and the client's next connection goes to
        # whichever worker accepts first (long-lived connections would keep
        # the load where they landed at their burst).
        self.keepalive_requests = keepalive_requests
        self.io_timeout = io_timeout
        self.max_requests = max_requests
        self.limits = limits
        self.proxy = proxy if proxy is not None else Proxy()
        self.access_log = access_log
        self.head_refusals = HeadRefusals(access_log)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate
        self.service_time = None  # moving average of the app's time per request
        self.draining_queue = False  # graceful stop: free threads take from the queue
        self.taken = 0  # connections taken from the queue during the stop
        self.counter = itertools.count(1)
        self.recycling = False
        # Held while a thread checks `recycling` and accepts, and while the
        # request that reaches --max-requests sets it: a thread that checked
        # before has accepted (or found nothing) before that request's
        # response goes out, so no connection made after it is taken here.
        self.recycle_mu = threading.Lock()
        # drover's pre-stop delay began (SIGWINCH): serve on, end keep-alive.
        self.winding_down = False
        base = base_environ(self.nthreads)
        self.listeners = [ListenerInfo(s, getattr(s, "name", "unknown"), base) for s in socks]
        self.sel = selectors.DefaultSelector()
        self.epoll = type(self.sel).__name__ == "EpollSelector"
        self.leader = threading.Condition(threading.Lock())  # held by the polling thread
        self.mu = threading.Lock()  # guards the selector's connections, the timers, state
        self.pending: Deque[Any] = collections.deque()
        self.state = _RUNNING
        self.stop_seen = False
        self.stop_kind = None
        self.first_byte_deadline = 0.0
        self.timers: Dict[str, collections.OrderedDict[int, Conn]] = {  # fd -> Conn, in deadline order (one timeout each)
            "fresh": collections.OrderedDict(),
            "idle": collections.OrderedDict(),
            "linger": collections.OrderedDict(),
        }
        self.stop_lingering = []  # lingering closes started during a stop
        self.poll_until = float("inf")  # when the polling thread wakes up at the latest
        self.accept_resume = 0.0  # accept failed: the listeners are off the selector until then
        self.accept_failures = 0  # accept failures not logged yet
        self.accept_logged = -ACCEPT_LOG_EVERY  # when the last one was logged
        self.threads = []
        # Per thread (each writes its own slot): in a request now; items done.
        self.busy = [False] * self.nthreads
        self.done = [0] * self.nthreads
        self.ctrl_r, self.ctrl_w = os.pipe()
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.ctrl_r, self.ctrl_w, self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.signal_pipe = signal_pipe()
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

    def head_deadline(self, now):
        """When a request head whose first bytes came at ``now`` must be complete."""
        if self.header_timeout is None:
            return float("inf")
        return now + self.header_timeout

    def keep_going(self):
        """False once the request that reached --max-requests has started."""
        return not self.recycling

    def wait_for_stop(self):
        """Blocks the main thread until a stop signal or a recycle; returns the kind."""
        return wait_for_stop(self.ctrl_r, lambda: self.recycling, self.signal_pipe)

    def stop(self, kind):
        """The stop procedure (main thread): stop accepting new work (on a
        graceful stop, the listen queue is drained by the rule in the module's
        docstring), then drain. Returns True when every thread finished."""
        if kind == "recycle" and dw.stop_kind() is not None:
            # A stop signal came with the recycle: no successor will take
            # what is queued, so this is a stop (the queue is drained).
            kind = dw.stop_kind()
        self.stop_kind = kind
        unmeasured = []
        for info in self.listeners:
            # Behind drover's filter (a shutdown) nothing new can come but a
            # handshake that was under way: that one is served too.
            if filtered(info.sock):
                info.left = None
                continue
            info.left = queued(info.sock)
            if info.left is None and kind == "graceful":
                unmeasured.append((info.name, info.unix))
        now = time.monotonic()
        self.first_byte_deadline = now + min(FIRST_BYTE_GRACE, dw.remaining_budget())
        # The polling thread sees the stop (or recycle) pipe and waits: we get
        # the leader lock, and nothing else polls or accepts while we hold it.
        with self.leader:
            self.stop_seen = True
            with self.mu:
                self.state = _STOPPING
                parked: List[Conn] = []
                for name in ("fresh", "idle"):
                    parked.extend(self.timers[name].values())
                    self.timers[name].clear()
                for conn in parked:
                    conn.timer = None
                    self._unregister(conn)
            for info in self.listeners:
                try:
                    self.sel.unregister(info.sock)
                except (KeyError, ValueError, OSError):
                    pass
            for conn in parked:
                conn.deadline = self.first_byte_deadline
                if kind == "quick":
                    self._start_linger(conn)
                else:
                    # A request is here (serve it, then close), or may be on
                    # its way: a client of a kept-alive connection may send
                    # its next one as the stop comes, and must not see the end
                    # of the stream (wrk counts read errors at every reload).
                    self.pending.append(conn)
            if kind == "graceful":
                self.draining_queue = True  # the threads take from the queue
            else:
                self._close_listeners("%s stop" % kind)
            self.leader.notify_all()
        log(stop_line(kind, len(parked), unmeasured))
        return self._join_threads()

    def _close_listeners(self, why):
        """Closes our copies of the listeners (leader lock held): whatever is
        still queued is the other workers'. The pool ends once idle."""
        self.draining_queue = False
        for info in self.listeners:
            info.sock.close()
        with self.mu:
            self.state = _DRAINED
        if self.stop_kind == "graceful":
            log("listeners closed (%s): %d queued connection(s) taken" % (why, self.taken))

    def _take_queued(self):
        """During a graceful stop (leader lock held): the next connection from
        the listen queues, if a request of the usual duration would end before
        the drain deadline and its queue has not given what it held at the
        stop; None once the listeners are closed (the queues are empty or gave
        that much, nothing more fits, or the stop became quick)."""
        if dw.stop_kind() == "quick":
            self._close_listeners("quick stop")
            return None
        now = time.monotonic()
        usual = self.service_time or 0.0
        left = dw.drain_deadline() - now
        if usual > left:
            self._close_listeners("a request takes %.2fs, %.2fs left before the drain deadline" % (usual, max(0.0, left)))
            return None
        spent = False
        for info in self.listeners:
            if info.left == 0:
                spent = True
                continue
            while True:
                try:
                    sock, peer = info.sock.accept()
                except ConnectionAbortedError:
                    continue
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    log("accept on %s: %s" % (info.name, e))
                    break
                self.taken += 1
                if info.left is not None:
                    info.left -= 1
                conn = self._new_conn(sock, peer, info)
                conn.deadline = now + FIRST_BYTE_GRACE
                return conn
        # Only a queue found empty is said to be: one whose budget was spent
        # (also a budget of 0, nothing queued at the stop) may hold more.
        self._close_listeners("what was queued at the stop is taken" if spent else "the queue is empty")
        return None

    def _join_threads(self):
        """Waits for the busy threads until the SDK's drain deadline (4/5 of
        the stop budget: the rest is the cleanup's, which drover's SIGKILL
        would otherwise cut short) or, once the stop is quick, QUICK_DRAIN.
        A recycle counts its budget from its STOPPING=1 (drover kills the
        worker graceful_timeout after it). Returns True when every thread
        finished; False when busy ones are abandoned."""
        quick_deadline = None
        while True:
            alive = [t for t in self.threads if t.is_alive()]
            if not alive:
                return True
            if quick_deadline is None and (self.stop_kind == "quick" or dw.stop_kind() == "quick"):
                self.stop_kind = "quick"  # also when a graceful stop escalated
                quick_deadline = time.monotonic() + QUICK_DRAIN
            # Asked each time: an escalation to quick brings it forward.
            deadline = dw.drain_deadline()
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
        """WATCHDOG=1 while the pool makes progress (see beat_while_progressing)."""
        beat_while_progressing(lambda: (all(self.busy), list(self.done)), self.nthreads, interval)

    def _next_item(self):
        """The next thing to do: a listener to accept from, or a connection to
        serve; None when the pool is done (stopped and nothing left)."""
        with self.leader:
            while True:
                if self.pending:
                    return self.pending.popleft()
                if self.state is _DRAINED:
                    return None
                if self.draining_queue:
                    conn = self._take_queued()
                    if conn is not None:
                        return conn
                    continue
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
            if self.accept_resume and (timeout is None or self.accept_resume < timeout):
                timeout = self.accept_resume
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
        now = time.monotonic()
        if self.accept_resume and now >= self.accept_resume:
            self._resume_accepting()
        self._expire(now)

    def _expire(self, now):
        with self.mu:
            expired = []
            for timer in self.timers.values():
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
        return Conn(sock, peer, info, self.proxy.trusts(peer), self.io_timeout)

    def _accept_one(self, info):
        error: Optional[OSError] = None
        with self.recycle_mu:
            if self.recycling or self.stop_seen:
                return  # recycling: queued connections are for the other workers
            try:
                sock, peer = info.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # another worker (or thread) took it
            except OSError as e:
                error = e
        if error is not None:
            if self.state is _RUNNING:
                self._pause_accepting(info, error)
            return
        self._serve(self._new_conn(sock, peer, info))

    def _pause_accepting(self, info, error):
        """EMFILE and friends: the listeners leave the selector for
        ACCEPT_PAUSE, so that a level-triggered listener does not spin and the
        threads serve the connections they have (a thread that slept in place
        held up the requests of connections already accepted, 100 ms each
        time); the failures are logged at most once per ACCEPT_LOG_EVERY."""
        now = time.monotonic()
        with self.mu:
            if self.state is not _RUNNING:
                return
            self.accept_failures += 1
            if not self.accept_resume:
                self.accept_resume = now + ACCEPT_PAUSE
                for each in self.listeners:
                    try:
                        self.sel.unregister(each.sock)
                    except (KeyError, ValueError, OSError):
                        pass
            report = now - self.accept_logged >= ACCEPT_LOG_EVERY
            if report:
                failures, self.accept_failures, self.accept_logged = self.accept_failures, 0, now
        if report:
            log("accept on %s: %s (%d time(s) since the last such line): not accepting for %.1fs each time"
                % (info.name, error, failures, ACCEPT_PAUSE))
        try:
            os.write(self.wake_w, b"x")  # the polling thread's timeout must see accept_resume
        except OSError:
            pass

    def _resume_accepting(self):
        """The listeners back in the selector after an accept pause (leader
        lock held: not after the stop took them out)."""
        with self.mu:
            self.accept_resume = 0.0
            if self.stop_seen or self.state is not _RUNNING:
                return
            for info in self.listeners:
                try:
                    self.sel.register(info.sock, selectors.EVENT_READ, info)
                except (KeyError, ValueError, OSError):
                    pass

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
                began = time.monotonic()
                conn.read_until = self.head_deadline(began)
                try:
                    while True:
                        parsed = parse_request(conn.buf, self.limits)
                        if parsed is not None:
                            break
                        conn.buf += conn.recv_blocking()
                except HTTPError as e:
                    self._head_refused(conn, e.status, e.reason, began)
                    return
                except ReadTimeout:
                    # A slow client (slowloris): it does not keep a thread.
                    self._head_refused(conn, 408, "the request head did not arrive in time", began)
                    return
                req, used = parsed
                conn.buf = conn.buf[used:]
                conn.requests += 1
                if not self._handle(conn, req):
                    return
        except ClientGone:
            conn.close()

    def _head_refused(self, conn, status, reason, began):
        """Answers a request head refused before there is a request, then
        closes without a reset; logged once answered (see HeadRefusals)."""
        sent = self._answer(conn, status, reason)
        peer = conn.peer
        self.head_refusals(_remote_addr(peer), peer[1] if isinstance(peer, tuple) else None,
                           status, reason, time.monotonic() - began, sent)

    def _answer(self, conn, status, reason):
        """Sends the server's own answer (an error), then closes without a
        reset. Returns its body's bytes once sent, None if it could not be
        (the client left): the access log's ``b``, logged after the answer,
        as nginx logs the size of its error page."""
        response = error_response(status, reason)
        try:
            conn.sendall(response)
        except ClientGone:
            conn.close()
            return None
        self._start_linger(conn)
        return error_body_size(response)

    def _wait_while_stopping(self, conn):
        """During a stop, a connection with nothing to read yet gets until the
        first-byte deadline (one just accepted is owed an answer; on a kept-alive
        one the next request may be on its way); on a quick stop it is closed
        (None)."""
        if self.stop_kind == "quick":
            return None
        left = max(conn.deadline, self.first_byte_deadline) - time.monotonic()
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
            with self.recycle_mu:
                self.recycling = True
            try:
                os.write(self.ctrl_w, b"r")
            except OSError:
                pass
        environ = conn.listener.base.copy()
        try:
            refusal = self._environ(conn, req, environ)
        except Exception as e:  # the server's own failure: answered, never left hanging
            log_internal_error(req.method, req.target.decode("latin-1"), e)
            sent = self._answer(conn, 500, "internal error")
            if self.access_log is not None:
                self.access_log.log(environ, "500", sent, [], 0.0)
            return False
        if refusal is not None:
            self._refused(conn, req, environ, refusal)
            return False
        inp: Input
        if req.chunked:
            inp = ChunkedInput(conn, req.expect_continue, self.body_timeout, self.body_min_rate)
        else:
            inp = Input(conn, req.content_length, req.expect_continue, self.body_timeout, self.body_min_rate)
        environ["wsgi.input"] = inp
        resp = Response(conn, req, self, inp)
        started = time.monotonic()
        try:
            result = self.app(environ, resp.start_response)
            if os.getpid() != self.pid:
                exit_forked_child(self.pid)
            if inp.failure is not None and not resp.sent:
                # The app caught the body's failure and answered it as its
                # own (Flask, Django: a 500): the client is answered for what
                # happened, 408 or 400, as when the app lets it through.
                close = getattr(result, "close", None)
                if close is not None:
                    close()
                raise inp.failure
            try:
                self._send_result(resp, result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except ClientGone:
            conn.close()
            self._ended(environ, resp, started)  # with what was sent: the client left
            return False
        except BaseException as e:  # SystemExit too: sys.exit() in a view fails the request, not the worker
            if os.getpid() != self.pid:
                exit_forked_child(self.pid)
            self._failed(conn, req, environ, resp, e, started)
            return False
        self._finished(started)
        self._ended(environ, resp, started)
        if resp.keep and inp.discard():
            if conn.buf:
                return True  # pipelined: the next request is already here
            if self._park(conn, "idle"):
                return False
            return True  # stopping: _serve decides (serve what arrived, or close)
        if not req.keep_alive and not conn.buf and inp.finished() and resp.body_ok:
            conn.close()  # the client asked for the close: nothing more will come
        else:
            self._start_linger(conn)
        return False

    def _environ(self, conn, req, environ):
        """Fills ``environ``, a copy of the listener's base entries, for a
        request (but wsgi.input); returns the HTTPError that refuses it (or
        None): a target it cannot split, or headers of a trusted peer that
        cannot be believed."""
        environ.update(req.headers)
        refusal = None
        try:
            path, query = split_target(req.target)
        except HTTPError as e:
            path, query, refusal = "", "", e
        environ["REQUEST_METHOD"] = req.method
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = query
        environ["RAW_URI"] = environ["REQUEST_URI"] = req.target.decode("latin-1")
        environ["SERVER_PROTOCOL"] = "HTTP/1.0" if req.http10 else "HTTP/1.1"
        peer = conn.peer
        environ["REMOTE_ADDR"] = _remote_addr(peer)
        if isinstance(peer, tuple):
            environ["REMOTE_PORT"] = str(peer[1])
        if conn.trusted and refusal is None:
            try:
                scheme = self.proxy.scheme(req.headers)
                if scheme is not None:
                    environ["wsgi.url_scheme"] = scheme
                if req.underscored:
                    forwarded(self.proxy, environ, req.underscored, path)
            except HTTPError as e:
                refusal = e
        return refusal

    def _refused(self, conn, req, environ, error):
        """A request the server answers itself once its head was read (the
        secure scheme headers disagree, a SCRIPT_NAME header outside the
        path, a target it cannot split): a line that says why, and its access
        log line, as for a bad request body."""
        log_refusal(req.method, environ["RAW_URI"], error.status, error.reason)
        sent = self._answer(conn, error.status, error.reason)
        if self.access_log is not None:
            self.access_log.log(environ, str(error.status), sent, [], 0.0)

    def _finished(self, started):
        """After a whole response: the service time's moving average (what
        the drain admits by)."""
        took = time.monotonic() - started
        avg = self.service_time
        self.service_time = took if avg is None else avg + 0.2 * (took - avg)

    def _ended(self, environ, resp, started):
        """The access log line of the app's response once it ended, sent
        whole, cut short by the app or left by the client (as Gunicorn writes
        it, in a ``finally``): ``b`` counts the body bytes that went out, "-"
        when no byte of the response did. A body longer than its
        Content-Length was cut at it: said once."""
        if resp.over:
            log(over_line(resp.req.method, environ["RAW_URI"], resp.app_length, resp.over))
        if self.access_log is not None:
            self.access_log.log(environ, resp.status[:3] if resp.status else "-",
                                resp.body_bytes if resp.wrote else None, resp.headers,
                                time.monotonic() - started)

    def _failed(self, conn, req, environ, resp, error, started):
        """The app raised (or its read of the body failed): 400 for a bad
        chunked body, 408 for a body that stopped coming, else 500 (logged
        with the traceback); after a head was sent, the connection just ends."""
        bad = _cause(error, BodyError)
        if bad is not None:
            status, why = bad.error.status, bad.error.reason
            log("bad request body on %s %s: %s" % (req.method, environ["RAW_URI"], why))
        elif _cause(error, BodyTimeout) is not None:
            status, why = 408, "the request body did not arrive in time"
            log("%s on %s %s" % (why, req.method, environ["RAW_URI"]))
        else:
            status, why = 500, "the application failed; see the worker's log"
            log("error in the application on %s %s:\n%s" % (req.method, environ["RAW_URI"], traceback.format_exc().rstrip()))
        if resp.sent:
            conn.close()  # mid-body: the client sees the connection end early
            self._ended(environ, resp, started)  # with what was sent, as Gunicorn logs it
            return
        sent = self._answer(conn, status, why)
        if self.access_log is not None:
            self.access_log.log(environ, str(status), sent, [], time.monotonic() - started)

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
        write = resp.write
        it = iter(result)
        if n == 1 and resp.status is not None:
            for chunk in it:
                rest = next(it, _NOTHING)  # a len() of 1 may lie: then the body is streamed, not cut
                if rest is _NOTHING:
                    resp.send_whole(_to_bytes(chunk))
                    return
                write(chunk)
                write(rest)
                break
            else:
                it = iter(result)
        for chunk in it:
            write(chunk)
        resp.finish()


def forwarded(proxy, environ, fields, path):
    """The forwarder_headers a trusted proxy sent (SCRIPT_NAME...), into the
    environ; HTTPError(500) when SCRIPT_NAME is not a prefix of the path."""
    allowed = proxy.forwarders
    for name, value in fields.items():
        if name not in allowed:
            continue
        environ["HTTP_" + name.replace("-", "_")] = value
        if name == "SCRIPT_NAME" and value:
            if not path.startswith(value):
                raise HTTPError(500, "the request path %r does not start with SCRIPT_NAME %r" % (path, value))
            environ["SCRIPT_NAME"] = value
            environ["PATH_INFO"] = path[len(value):]


def signal_pipe():
    """The pipe of wait_for_stop's wake-up fd (non-blocking). Made with the
    server, before its first accept: a pool that accepted until EMFILE left
    no descriptor for it, and a pipe made at the wait failed there and
    killed the worker, closing every connection it had accepted unanswered."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    return wake_r, wake_w


def wait_for_stop(ctrl_r, recycling, wake):
    """The main thread's wait for a stop signal ("graceful" or "quick") or a
    recycle (``ctrl_r`` readable, ``recycling()`` true); returns the kind.
    ``wake``: a signal_pipe(), closed here.

    The kernel may hand a signal sent to the process to any thread that
    does not block it, a pool thread as well; its Python handler (which
    records the stop) runs only in the main thread, once it runs bytecode
    again. The wake-up fd, written by the C-level handler whichever thread
    takes the signal, ends the select for that: without it, the stop waited
    for drover's SIGKILL. The wait is bounded as well: a pending handler also
    runs once this thread takes the GIL back after a wait."""
    wake_r, wake_w = wake
    previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        fds = [dw.stop_fd(), ctrl_r, wake_r]
        while True:
            kind = dw.stop_kind()
            if kind is not None:
                return kind
            if recycling():
                return "recycle"
            readable, _, _ = select.select(fds, [], [], 0.5)
            if wake_r in readable:
                try:
                    os.read(wake_r, 4096)
                except OSError:
                    pass
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)


def beat_while_progressing(progress, nthreads, interval):
    """Sends WATCHDOG=1 every interval/2 while the pool makes progress: a
    thread is free, or some request finished since the last beat
    (``progress()`` returns whether every thread is busy, and the requests
    done so far). A pool whose every thread is stuck in a request stops
    beating, and drover's heartbeat timeout (SIGABRT: the stacks are dumped)
    catches it. Both cores' heartbeat thread runs this."""
    period = max(0.01, interval / 2)
    last = None
    quiet = False
    while True:
        all_busy, done = progress()
        if not all_busy or done != last:
            dw._beat(log)
            quiet = False
        elif not quiet:
            log("all %d threads busy and no request finished for %.1fs: holding WATCHDOG=1" % (nthreads, period))
            quiet = True
        last = done
        time.sleep(period)


def _not_pairs(headers, item):
    return "response headers are a list of (name, value) pairs, not a %s holding %r" % (
        type(headers).__name__, item)


def _cause(error, kind):
    """``error`` or the exception it was raised from (or during) if of
    ``kind``: an app may wrap the read error in one of its own."""
    for _ in range(8):
        if error is None or isinstance(error, kind):
            return error
        error = error.__cause__ or error.__context__
    return None


def _to_bytes(data):
    if type(data) is bytes:
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError("response body chunks must be bytes, not %s" % type(data).__name__)



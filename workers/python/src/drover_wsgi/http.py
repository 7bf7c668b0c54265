"""HTTP/1.1 request parsing for drover_wsgi: pure functions on bytes, tested
without sockets.

Limits follow Gunicorn's settings, with its names, defaults and answers:
``limit_request_line`` (4094 bytes, 0 = no limit up to 8190; a longer request
line is a 400), ``limit_request_fields`` (100 header fields, 0 or more than
32768 = 32768; more is a 431) and ``limit_request_field_size`` (8190 bytes
per field line with its CRLF, 0 = no limit; more is a 431).
"""

import re
import time
from email.utils import formatdate
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote_to_bytes

#: Gunicorn's cap on ``limit_request_line``.
MAX_REQUEST_LINE = 8190
#: Gunicorn's cap on ``limit_request_fields``.
MAX_HEADERS = 32768
#: The largest request head accepted whatever the limits say (a sanity bound).
MAX_HEAD = 1024 * 1024


class HTTPError(Exception):
    """A request that cannot be served: answer ``status`` and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Limits:
    """The request-head limits (Gunicorn's settings and defaults)."""

    __slots__ = ("request_line", "request_fields", "request_field_size", "max_head")

    def __init__(self, request_line: int = 4094, request_fields: int = 100,
                 request_field_size: int = 8190) -> None:
        if request_line < 0 or request_fields < 0 or request_field_size < 0:
            raise ValueError("request limits must not be negative")
        self.request_line = min(request_line, MAX_REQUEST_LINE) if request_line else MAX_REQUEST_LINE
        self.request_fields = request_fields if 0 < request_fields <= MAX_HEADERS else MAX_HEADERS
        self.request_field_size = request_field_size or MAX_HEAD
        # Past this size a head cannot be within the limits (the blank lines
        # before the request line aside): a 431 without waiting for its end.
        self.max_head = min(MAX_HEAD, self.request_line + 2 + self.request_fields * (self.request_field_size + 2) + 2)


DEFAULT_LIMITS = Limits()

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
        "keep_alive", "expect_continue", "underscored",
    )

    def __init__(self, method: str, target: bytes, http10: bool, headers: Dict[str, str],
                 content_length: int, chunked: bool, keep_alive: bool, expect_continue: bool,
                 underscored: Optional[Dict[str, str]] = None) -> None:
        self.method = method
        self.target = target  # as sent
        self.http10 = http10
        self.headers = headers  # environ entries: HTTP_*, CONTENT_TYPE, CONTENT_LENGTH
        self.content_length = content_length  # 0 when absent or chunked
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        # Fields whose name has "_" ({"SCRIPT_NAME": value}): not in headers,
        # since "X_Foo" and "X-Foo" would share a key; the server lets trusted
        # proxies set the ones named in forwarder_headers.
        self.underscored = underscored


def _lines(buf: bytes, limits: Limits) -> Optional[Tuple[List[bytes], int]]:
    """The head's lines (CRLF or bare LF) and its length, or None when
    incomplete. Empty lines before the request line are skipped."""
    start = 0
    if buf[:1] in (b"\r", b"\n"):
        start = len(buf) - len(buf.lstrip(b"\r\n"))
    end = buf.find(b"\r\n\r\n", start)
    if end >= 0:
        used = end + 4
        lines = buf[start:end].split(b"\r\n")
    else:
        m = _LF_END.search(buf, start)
        if m is None:
            _check_incomplete(buf, start, limits)
            return None
        used = m.end()
        lines = [ln[:-1] if ln[-1:] == b"\r" else ln for ln in buf[start:m.start()].split(b"\n")]
    if used - start > limits.max_head:
        raise HTTPError(431, "request head larger than %d bytes" % limits.max_head)
    return lines, used


def _check_incomplete(buf: bytes, start: int, limits: Limits) -> None:
    """Refuses an incomplete head that is already past a limit, so that a
    client cannot make us buffer without end."""
    line_end = buf.find(b"\n", start)
    line_len = (line_end if line_end >= 0 else len(buf)) - start
    if line_end >= 0 and buf[line_end - 1:line_end] == b"\r":
        line_len -= 1
    if line_len > limits.request_line:
        raise HTTPError(400, "request line longer than %d bytes (limit_request_line)" % limits.request_line)
    if len(buf) - start > limits.max_head:
        raise HTTPError(431, "request head larger than %d bytes" % limits.max_head)


def parse_request(buf: bytes, limits: Limits = DEFAULT_LIMITS) -> Optional[Tuple[Request, int]]:
    """Parses the request head at the start of ``buf``.

    Returns None when the head is not complete yet, else ``(request, used)``
    where ``used`` is the number of bytes of the head. Raises HTTPError for a
    malformed, unsupported or too large head.
    """
    found = _lines(buf, limits)
    if found is None:
        return None
    lines, used = found
    if len(lines[0]) > limits.request_line:
        raise HTTPError(400, "request line longer than %d bytes (limit_request_line)" % limits.request_line)
    if len(lines) - 1 > limits.request_fields:
        raise HTTPError(431, "more than %d header fields (limit_request_fields)" % limits.request_fields)
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
    head = _Head()
    field_size = limits.request_field_size
    for i in range(1, len(lines)):
        line = lines[i]
        if len(line) + 2 > field_size:
            raise HTTPError(431, "a header field longer than %d bytes (limit_request_field_size)" % field_size)
        head.add(line)
    return head.request(method.decode("ascii"), target, http10), used


class _Head:
    """The header fields of one request, as they are read."""

    __slots__ = ("headers", "content_length", "te", "connection", "expect", "has_host", "underscored")

    def __init__(self) -> None:
        self.headers: Dict[str, str] = {}
        self.content_length: Optional[int] = None
        self.te: Optional[str] = None
        self.connection: Optional[str] = None
        self.expect: Optional[str] = None
        self.has_host = False
        self.underscored: Optional[Dict[str, str]] = None

    def add(self, line: bytes) -> None:
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:
            raise HTTPError(400, "malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value) is not None:
            raise HTTPError(400, "invalid character in a header value")
        lname = name.lower()
        key = _KEYS.get(lname)
        text = value.decode("latin-1")
        if key is None:
            if b"_" in name:
                # "X_Foo" would land on the same key as "X-Foo": kept aside,
                # as gunicorn's header_map = "drop" does.
                if self.underscored is None:
                    self.underscored = {}
                self.underscored[name.decode("ascii").upper()] = text
                return
            key = "HTTP_" + name.decode("ascii").upper().replace("-", "_")
            if len(_KEYS) < _KEYS_MAX:
                _KEYS[lname] = key
        headers = self.headers
        if key == "CONTENT_LENGTH":
            if not value.isdigit():
                raise HTTPError(400, "invalid Content-Length")
            if self.content_length is not None and int(value) != self.content_length:
                raise HTTPError(400, "conflicting Content-Length headers")
            self.content_length = int(value)
            headers[key] = str(self.content_length)
            return
        if key == "HTTP_TRANSFER_ENCODING":
            self.te = text if self.te is None else self.te + ", " + text
        elif key == "HTTP_CONNECTION":
            self.connection = text if self.connection is None else self.connection + ", " + text
        elif key == "HTTP_EXPECT":
            self.expect = text
        elif key == "HTTP_HOST":
            if self.has_host:
                raise HTTPError(400, "more than one Host header")
            self.has_host = True
        old = headers.get(key)
        if old is None:
            headers[key] = text
        elif key == "HTTP_COOKIE":
            headers[key] = old + "; " + text
        else:
            headers[key] = old + ", " + text

    def request(self, method: str, target: bytes, http10: bool) -> Request:
        if not http10 and not self.has_host:
            raise HTTPError(400, "HTTP/1.1 request without a Host header")
        chunked = False
        if self.te is not None:
            # A request with both is how requests are smuggled past a proxy
            # that reads the other one (RFC 9112 section 6.1).
            if self.content_length is not None:
                raise HTTPError(400, "both Transfer-Encoding and Content-Length")
            if http10:
                raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
            codings = [c.strip().lower() for c in self.te.split(",")]
            if codings[-1] != "chunked":
                raise HTTPError(400, "Transfer-Encoding does not end in chunked")
            if codings.count("chunked") > 1:
                raise HTTPError(400, "chunked more than once in Transfer-Encoding")
            if codings != ["chunked"]:
                raise HTTPError(501, "unsupported Transfer-Encoding")
            chunked = True
        if self.connection is not None:
            tokens = [t.strip().lower() for t in self.connection.split(",")]
            keep_alive = "close" not in tokens and (not http10 or "keep-alive" in tokens)
        else:
            keep_alive = not http10
        expect_continue = False
        if self.expect is not None:
            if self.expect.lower() != "100-continue":
                raise HTTPError(417, "unsupported Expect")
            expect_continue = not http10  # RFC 9110: ignored in HTTP/1.0
        return Request(method, target, http10, self.headers, self.content_length or 0, chunked,
                       keep_alive, expect_continue, self.underscored)


def parse_chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (without its line end); extensions after
    ";" are ignored. Raises HTTPError(400) when malformed."""
    size = line.split(b";", 1)[0].strip(b" \t")
    if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
        raise HTTPError(400, "invalid chunk size line %r" % line[:40])
    return int(size, 16)


def split_target(target: bytes) -> Tuple[str, str]:
    """(PATH_INFO, QUERY_STRING) of a request target, per PEP 3333: the path
    percent-decoded, both as latin-1 str."""
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


REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 408: "Request Timeout", 411: "Length Required",
    413: "Content Too Large", 417: "Expectation Failed", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_date = [0, ""]


def http_date() -> str:
    """The Date header's value, formatted once a second."""
    now = int(time.time())
    if _date[0] != now:
        _date[1] = formatdate(now, usegmt=True)
        _date[0] = now
    return str(_date[1])


def error_response(status: int, reason: str) -> bytes:
    """A whole response for an error we answer ourselves (then we close)."""
    body = ("%d %s: %s\n" % (status, REASONS.get(status, "Error"), reason)).encode("latin-1", "replace")
    head = "HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        status, REASONS.get(status, "Error"), http_date(), len(body))
    return head.encode("latin-1") + body

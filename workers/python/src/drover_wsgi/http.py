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
#: The largest Content-Length (a u64, as llhttp and the native parser take).
MAX_CONTENT_LENGTH = 2**64 - 1


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
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*"
                         % (_TOKEN.pattern, _TOKEN.pattern, _QUOTED))
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


#: The answer's detail for a TLS handshake sent to this plain HTTP port.
TLS_ON_PLAIN_HTTP = "TLS handshake on a plain HTTP port: terminate TLS in front of drover, e.g. nginx"
#: The first bytes of a TLS record of a handshake: type 22, version 3.0 to 3.4.
_TLS_HANDSHAKE = re.compile(rb"\x16\x03[\x00-\x04]")


def parse_request(buf: bytes, limits: Limits = DEFAULT_LIMITS) -> Optional[Tuple[Request, int]]:
    """Parses the request head at the start of ``buf``.

    Returns None when the head is not complete yet, else ``(request, used)``
    where ``used`` is the number of bytes of the head. Raises HTTPError for a
    malformed, unsupported or too large head: the first line at fault decides
    the answer, each line checked for its limits, its CRLF, then its syntax
    (as drover-h1, the native parser, does; docs/http-parser.md).
    """
    start = 0
    if buf[:1] in (b"\r", b"\n"):
        # Empty lines before the request line are skipped (RFC 9112 2.2), up
        # to the size of a head: a client cannot make us buffer them either.
        start = len(buf) - len(buf.lstrip(b"\r\n"))
        if start > limits.max_head:
            raise HTTPError(431, "more than %d bytes of empty lines before the request line" % limits.max_head)
    if _TLS_HANDSHAKE.match(buf, start):
        # A client that speaks HTTPS to this port: its ClientHello is binary,
        # refused for whatever byte came first (a bare LF, a malformed request
        # line), or not at all until the header timeout, none of which names
        # the cause.
        raise HTTPError(400, TLS_ON_PLAIN_HTTP)
    end = buf.find(b"\r\n\r\n", start)
    stop = end + 2 if end >= 0 else len(buf)
    if buf.count(b"\n", start, stop) != buf.count(b"\r\n", start, stop):
        lf = _bare_lf(buf, start, stop)
        _refuse(buf, start, lf, lf + 1, limits, HTTPError(400, "a line ends in a bare LF, not CRLF"))
    if end < 0:
        _check_incomplete(buf, start, limits)
        return None
    used = end + 4
    request = _parse_lines(buf[start:end].split(b"\r\n"), used - start, limits)
    return None if request is None else (request, used)  # never None: not partial


def _bare_lf(buf: bytes, start: int, stop: int) -> int:
    """The position of the first LF without a CR before it."""
    lf = buf.find(b"\n", start, stop)
    while buf[lf - 1] == 13:
        lf = buf.find(b"\n", lf + 1, stop)
    return lf


def _check_incomplete(buf: bytes, start: int, limits: Limits) -> None:
    """Refuses an incomplete head whose last line, or the head itself, is
    already past a limit, so that a client cannot make us buffer without end."""
    lf = buf.rfind(b"\n", start)
    line_start = start if lf < 0 else lf + 1
    line_end = len(buf)
    if line_end > line_start and buf[-1] == 13:
        line_end -= 1  # may be the CR of the line's CRLF
    n = line_end - line_start
    if lf < 0:
        over = n > limits.request_line
    else:
        over = n > 0 and (n + 2 > limits.request_field_size
                          or buf.count(b"\n", start, lf) + 1 > limits.request_fields)
    if over or len(buf) - start > limits.max_head:
        _refuse(buf, start, line_end, len(buf), limits,
                HTTPError(431, "request head larger than %d bytes" % limits.max_head))


def _refuse(buf: bytes, start: int, stop: int, size: int, limits: Limits, error: HTTPError) -> None:
    """Raises the error of the first line at fault in ``buf[start:stop]``,
    whose last line is not complete (``size``: where the head's bytes so far
    end), or ``error`` if none is."""
    _parse_lines(buf[start:stop].split(b"\r\n"), size - start, limits, partial=True)
    raise error


def _parse_lines(lines: List[bytes], size: int, limits: Limits, partial: bool = False) -> Optional[Request]:
    """The request of a head's lines (without CRLF and the final empty line;
    ``size``: the head's bytes). With ``partial``, the last line is not
    complete: it is checked for the limits only, and nothing is returned."""
    first = lines[0]
    if len(first) > limits.request_line:
        raise HTTPError(400, "request line longer than %d bytes (limit_request_line)" % limits.request_line)
    last = len(lines) - 1
    if partial and last == 0:
        return None
    method, target, http10 = _request_line(first)
    head = _Head()
    fields = limits.request_fields
    field_size = limits.request_field_size
    # The head's size so far matters only when MAX_HEAD caps max_head below
    # what the other limits allow.
    offset = len(first) + 2 if size > limits.max_head else -1
    for i in range(1, len(lines)):
        line = lines[i]
        if line:
            if i > fields:
                raise HTTPError(431, "more than %d header fields (limit_request_fields)" % fields)
            if len(line) + 2 > field_size:
                raise HTTPError(431, "a header field longer than %d bytes (limit_request_field_size)" % field_size)
        if offset >= 0:
            offset = size if partial and i == last else offset + len(line) + 2
            if offset > limits.max_head:
                raise HTTPError(431, "request head larger than %d bytes" % limits.max_head)
        if partial and i == last:
            return None
        head.add(line)
    if size > limits.max_head:
        raise HTTPError(431, "request head larger than %d bytes" % limits.max_head)
    return head.request(method.decode("ascii"), target, http10)


def _request_line(line: bytes) -> Tuple[bytes, bytes, bool]:
    """(method, target, http10) of a request line."""
    parts = line.split(b" ")
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
    if _TARGET.fullmatch(target) is None or not (target.isascii() or _is_utf8(target)):
        raise HTTPError(400, "malformed request target")
    return method, target, http10


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


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
        name, value = parse_field_line(line)
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
            # Without its leading zeros: int() refuses more than 4300 digits
            # with a ValueError (CPython's int_max_str_digits).
            digits = value.lstrip(b"0")
            length = int(digits) if 0 < len(digits) <= 20 else (MAX_CONTENT_LENGTH + 1 if digits else 0)
            if length > MAX_CONTENT_LENGTH:
                raise HTTPError(400, "Content-Length too large")
            if self.content_length is not None and length != self.content_length:
                raise HTTPError(400, "conflicting Content-Length headers")
            self.content_length = length
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
            codings = [c.strip(" \t").lower() for c in self.te.split(",")]
            if codings[-1] != "chunked":
                raise HTTPError(400, "Transfer-Encoding does not end in chunked")
            if codings.count("chunked") > 1:
                raise HTTPError(400, "chunked more than once in Transfer-Encoding")
            if codings != ["chunked"]:
                raise HTTPError(501, "unsupported Transfer-Encoding")
            chunked = True
        if self.connection is not None:
            tokens = [t.strip(" \t").lower() for t in self.connection.split(",")]
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


def parse_field_line(line: bytes) -> Tuple[bytes, bytes]:
    """(name, value) of a field line without its CRLF, of a head or a chunked
    body's trailer section (RFC 9112 sections 5 and 7.1.2): the value without
    the SP and HTAB around it. Raises HTTPError(400) for a name that is not a
    token (whitespace before the colon, obs-fold), no colon, or a CTL or DEL
    in the value."""
    name, sep, value = line.partition(b":")
    if not sep or _TOKEN.fullmatch(name) is None:
        raise HTTPError(400, "malformed header line")
    value = value.strip(b" \t")
    if _BAD_VALUE.search(value) is not None:
        raise HTTPError(400, "invalid character in a header value")
    return name, value


def parse_chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (without its CRLF): at most 16 hex
    digits, then extensions (``;name`` or ``;name=value``, BWS around ``;``
    and ``=``; RFC 9112 7.1.1), which are ignored. Raises HTTPError(400)
    otherwise: ``2;`` (no extension name), `` 2`` and ``2 `` (padding) too, as
    llhttp refuses them."""
    m = _CHUNK_SIZE.fullmatch(line)
    if m is None:
        raise HTTPError(400, "invalid chunk size line %r" % line[:40])
    return int(m.group(1), 16)


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


def error_body_size(response: bytes) -> int:
    """The body bytes of an ``error_response`` (the access log's ``b``)."""
    return len(response) - response.index(b"\r\n\r\n") - 4

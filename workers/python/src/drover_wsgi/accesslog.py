"""The access log, in Gunicorn's ``access_log_format`` conventions.

A format is a Python %-format over named atoms, as Gunicorn's::

    %(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"

(``combined``, Gunicorn's default; ``common`` is the same without the last
two). Atoms: ``h`` remote address, ``l`` "-", ``u`` the user of HTTP Basic
auth, ``t`` the time as ``[10/Oct/2000:13:55:36 -0700]``, ``r`` the request
line, ``m`` method, ``U`` path, ``q`` query string, ``H`` protocol, ``s``
status, ``B`` body bytes sent (the app's, or the server's error body), ``b``
the same or "-" when no answer could be sent,
``f`` Referer, ``a`` User-Agent, ``T``/``M``/``D`` the request time in whole
seconds, milliseconds, microseconds, ``L`` in decimal seconds, ``p`` the
process id as ``<pid>``, ``{name}i`` a request header, ``{name}o`` a response
header, ``{name}e`` a WSGI environ entry (names in lower case). An atom
with no value is "-". Only the atoms the format names are computed.
"""

import base64
import os
import re
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

COMBINED = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
COMMON = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s'
FORMATS = {"combined": COMBINED, "common": COMMON}

_ATOM = re.compile(r"%\(([^)]*)\)")

#: What the server knows of one finished request.
Finished = Tuple[Mapping[str, Any], str, int, Optional[int], List[Tuple[str, str]], float]


class _Missing(dict):  # type: ignore[type-arg]
    """Atoms for %-formatting: an unknown key is "-", as in Gunicorn."""

    def __missing__(self, key: str) -> str:
        return "-"


_clf = [-1, ""]


def _clf_time(now: float) -> str:
    second = int(now)
    if _clf[0] != second:
        _clf[1] = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(second))
        _clf[0] = second
    return str(_clf[1])


def _basic_user(environ: Mapping[str, Any]) -> str:
    auth = environ.get("HTTP_AUTHORIZATION")
    if not auth or auth[:6].lower() != "basic ":
        return "-"
    try:
        user = base64.b64decode(auth[6:].strip()).decode("latin-1").split(":", 1)[0]
    except (ValueError, UnicodeDecodeError):
        return "-"
    return user or "-"


def _request_line(e: Mapping[str, Any]) -> str:
    if "REQUEST_METHOD" not in e:
        return "-"  # a request head the server refused: no request line is known
    return "%s %s %s" % (e["REQUEST_METHOD"], e["RAW_URI"], e["SERVER_PROTOCOL"])


# atom -> f(environ, status, sent, seconds)
_SIMPLE: Dict[str, Callable[[Mapping[str, Any], str, Optional[int], float], Any]] = {
    "h": lambda e, s, n, d: e.get("REMOTE_ADDR") or "-",
    "l": lambda e, s, n, d: "-",
    "u": lambda e, s, n, d: _basic_user(e),
    "t": lambda e, s, n, d: _clf_time(time.time()),
    "r": lambda e, s, n, d: _request_line(e),
    "m": lambda e, s, n, d: e.get("REQUEST_METHOD", "-"),
    "U": lambda e, s, n, d: e.get("PATH_INFO", "-"),
    "q": lambda e, s, n, d: e.get("QUERY_STRING", "-"),
    "H": lambda e, s, n, d: e.get("SERVER_PROTOCOL", "-"),
    "s": lambda e, s, n, d: s,
    "B": lambda e, s, n, d: n or 0,  # a number for log parsers, as Apache's %B
    "b": lambda e, s, n, d: "-" if n is None else str(n),
    "f": lambda e, s, n, d: e.get("HTTP_REFERER", "-"),
    "a": lambda e, s, n, d: e.get("HTTP_USER_AGENT", "-"),
    "T": lambda e, s, n, d: int(d),
    "M": lambda e, s, n, d: int(d * 1000),
    "D": lambda e, s, n, d: int(d * 1_000_000),
    "L": lambda e, s, n, d: "%.6f" % d,
    "p": lambda e, s, n, d: "<%d>" % os.getpid(),
}


class AccessLog:
    """Formats a line per request and writes it (one ``write`` call per
    line, so lines from several threads or workers never interleave)."""

    def __init__(self, target: str, fmt: str = COMBINED) -> None:
        fmt = FORMATS.get(fmt, fmt)
        self.fmt = fmt
        self.target = target
        self._keys = sorted(set(_ATOM.findall(fmt)))
        self._check()
        self._lock = threading.Lock()
        self._fd, self._owned = _open(target)

    def _check(self) -> None:
        try:
            self.fmt % _Missing()
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError("invalid access log format %r: %s" % (self.fmt, e)) from None

    def atoms(self, environ: Mapping[str, Any], status: str, sent: Optional[int],
              headers: List[Tuple[str, str]], seconds: float) -> Dict[str, Any]:
        """The values of the atoms the format names."""
        out = _Missing()
        for key in self._keys:
            simple = _SIMPLE.get(key)
            if simple is not None:
                out[key] = simple(environ, status, sent, seconds)
            elif key[:1] == "{" and key[-2:-1] == "}":
                out[key] = _braced(key[1:-2].lower(), key[-1], environ, headers)
        return out

    def line(self, environ: Mapping[str, Any], status: str, sent: Optional[int],
             headers: List[Tuple[str, str]], seconds: float) -> str:
        return self.fmt % self.atoms(environ, status, sent, headers, seconds)

    def log(self, environ: Mapping[str, Any], status: str, sent: Optional[int],
            headers: List[Tuple[str, str]], seconds: float) -> None:
        data = (self.line(environ, status, sent, headers, seconds).replace("\n", " ") + "\n").encode(
            "utf-8", "backslashreplace")
        try:
            os.write(self._fd, data)
        except OSError as e:
            _complain(self.target, e)

    def reopen(self) -> None:
        """Reopens a file target (after a log rotation moved it): SIGUSR1."""
        if not self._owned:
            return
        fd, _ = _open(self.target)
        with self._lock:
            old, self._fd = self._fd, fd
        os.close(old)

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)
            self._owned = False


def _braced(name: str, kind: str, environ: Mapping[str, Any], headers: List[Tuple[str, str]]) -> str:
    if kind == "i":
        key = "HTTP_" + name.upper().replace("-", "_")
        if name == "content-type":
            key = "CONTENT_TYPE"
        elif name == "content-length":
            key = "CONTENT_LENGTH"
        return str(environ.get(key, "-"))
    if kind == "o":
        for n, v in headers:
            if n.lower() == name:
                return v
        return "-"
    if kind == "e":  # the WSGI environ, as in Gunicorn
        value = environ.get(name.upper(), environ.get(name, "-"))
        return str(value)
    return "-"


def _open(target: str) -> Tuple[int, bool]:
    if target in ("-", "stdout", "/dev/stdout"):
        return sys.stdout.fileno(), False
    if target in ("stderr", "/dev/stderr"):
        return sys.stderr.fileno(), False
    return os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644), True


_complained = [False]


def _complain(target: str, error: OSError) -> None:
    if not _complained[0]:
        _complained[0] = True
        try:
            sys.stderr.write("drover_wsgi[%d]: cannot write the access log to %s: %s\n" % (os.getpid(), target, error))
        except Exception:
            pass

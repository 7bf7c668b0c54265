"""Shared helpers for the drover_worker / drover_wsgi tests: subprocesses with
the SDK importable, a fake drover (a listening socket at fd 3 and a notify
socket), and a raw HTTP client. Every wait has a deadline."""

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
#: The WSGI server, from the installed package (as a user runs it).
WSGI = [sys.executable, "-m", "drover_wsgi"]
LIMIT = 15.0


def env_with_sdk(extra=None):
    env = dict(os.environ)
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                "WATCHDOG_PID", "DROVER_GRACEFUL_TIMEOUT"):
        env.pop(var, None)
    # The test apps only: drover_worker and drover_wsgi come from the
    # installed package, never from the checkout.
    env["PYTHONPATH"] = TESTS_DIR
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def run_script(code, env=None, timeout=LIMIT):
    """Runs ``code`` (dedented) in a fresh interpreter; returns CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env_with_sdk(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=timeout, text=True,
    )


def spawn_script(code, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env_with_sdk(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, **kw,
    )


def wait_line(proc, needle, timeout=LIMIT):
    """Reads proc.stdout until a line contains ``needle``; returns the lines read."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError("no line with %r in %r (stderr: %s)" % (needle, lines, _stderr_now(proc)))


def _stderr_now(proc):
    try:
        proc.kill()
        return proc.stderr.read()
    except Exception:
        return "?"


class NotifySocket:
    """A bound datagram socket in a private directory, as drover's."""

    def __init__(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def recv(self, timeout=LIMIT):
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            raise AssertionError("no notify datagram within %ss" % timeout)
        return self.sock.recv(4096)

    def wait_for(self, message, timeout=LIMIT):
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no %r, got %r" % (message, seen))
            data = self.recv(left)
            seen.append(data)
            if message in data.split(b"\n"):
                return seen

    def close(self):
        self.sock.close()
        self.dir.cleanup()


def fill_queue(path):
    """Fills the queue of the datagram socket at ``path`` (a receiver that
    does not read, as a stalled master: net.unix.max_dgram_qlen datagrams)."""
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        while True:
            filler.sendto(b"STATUS=filler", path)
    except BlockingIOError:
        pass
    finally:
        filler.close()


def read_until(sock, done):
    """Reads and drops the datagrams of ``sock`` until ``done`` is set (a
    receiver that reads again)."""
    while not done.is_set():
        if select.select([sock], [], [], 0.05)[0]:
            sock.recv(4096)


class Worker:
    """drover_wsgi (or any command) started as drover would: a listening socket
    at fd 3 with LISTEN_FDS/LISTEN_PID, a NOTIFY_SOCKET, its own process group."""

    def __init__(self, app, args=(), env=None, command=None, family=socket.AF_INET, ready=True):
        if family == socket.AF_UNIX:
            self.tmp = tempfile.TemporaryDirectory()
            self.addr = os.path.join(self.tmp.name, "app.sock")
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.addr)
        else:
            self.tmp = None
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind(("127.0.0.1", 0))
            self.addr = self.listener.getsockname()
        self.family = family
        self.listener.listen(128)
        self.notify = NotifySocket()
        fd = self.listener.fileno()
        cmd = command or WSGI + list(args) + [app]
        extra = {"NOTIFY_SOCKET": self.notify.path, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "main",
                 "DROVER_GRACEFUL_TIMEOUT": "10"}
        extra.update(env or {})
        self.proc = subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$ exec "$@" 3<&%d' % fd, "sh"] + cmd,
            env=env_with_sdk(extra), pass_fds=[fd], cwd=TESTS_DIR,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
            start_new_session=True,
        )
        if ready:
            self.notify.wait_for(b"READY=1")

    def connect(self):
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.settimeout(LIMIT)
        s.connect(self.addr)
        return s

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def wait(self, timeout=LIMIT):
        """Waits for the exit; returns (status, stderr)."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError("worker still running after %ss; stderr:\n%s" % (timeout, err)) from None
        return self.proc.returncode, err

    def close(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.communicate()
        else:
            self.proc.communicate()
        self.listener.close()
        self.notify.close()
        if self.tmp:
            self.tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def filter_everything_in(sock):
    """Attaches a socket filter that lets every packet in to ``sock``: a
    filter is there, as after drover's stage 1 of a shutdown, but new
    connections still get in (SO_ATTACH_FILTER: no privilege needed on a
    Unix socket)."""
    import ctypes

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    accept = (SockFilter * 1)(SockFilter(0x06, 0, 0, 0xFFFFFFFF))  # BPF_RET|BPF_K: the whole packet
    sock.setsockopt(socket.SOL_SOCKET, 26, bytes(SockFprog(1, accept)))  # SO_ATTACH_FILTER


def read_stderr_until(worker, text):
    """The worker's standard error up to and with the first line holding
    ``text`` (read from the pipe: what follows stays for worker.wait())."""
    fd = worker.proc.stderr.fileno()
    deadline = time.monotonic() + LIMIT
    seen = b""
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError("no %r on the worker's stderr within %ss:\n%s" % (text, LIMIT, seen.decode()))
        # One byte at a time: what comes after the line is left in the pipe.
        chunk = os.read(fd, 1)
        if not chunk:
            raise AssertionError("the worker's stderr closed without %r:\n%s" % (text, seen.decode()))
        seen += chunk
    while not seen.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        seen += chunk
    return seen.decode()


def read_response(f, head_only=False):
    """Reads one HTTP response from the binary file ``f``: (status, headers
    dict (lower-case names; repeated ones joined), body bytes). Handles
    Content-Length, chunked and close-delimited bodies."""
    line = f.readline()
    if not line:
        raise ConnectionError("closed before a response")
    status = int(line.split()[1])
    headers = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        key = name.strip().lower()
        headers[key] = headers[key] + ", " + value.strip() if key in headers else value.strip()
    if head_only or status in (204, 304) or status < 200:
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b""):
                    pass
                break
            body += f.read(size)
            f.read(2)
        return status, headers, body
    if "content-length" in headers:
        n = int(headers["content-length"])
        body = f.read(n)
        if len(body) != n:
            raise ConnectionError("truncated body: %d of %d bytes" % (len(body), n))
        return status, headers, body
    return status, headers, f.read()


class Client:
    """One connection: send raw bytes, read responses in order."""

    def __init__(self, worker):
        self.sock = worker.connect()
        self.f = self.sock.makefile("rb")

    def send(self, raw):
        self.sock.sendall(raw)

    def response(self, head_only=False):
        return read_response(self.f, head_only)

    def eof_within(self, timeout):
        """True when the server closes (EOF, not reset) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            return self.f.read(1) == b""
        except socket.timeout:
            return False

    def close(self):
        self.f.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request(worker, raw, head_only=False):
    """Sends ``raw`` on a new connection, returns (status, headers, body)."""
    with Client(worker) as c:
        c.send(raw)
        return c.response(head_only)

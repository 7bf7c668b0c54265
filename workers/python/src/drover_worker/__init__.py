"""drover_worker: the Python SDK for workers run by drover (standard library only).

drover speaks the systemd conventions, so everything here also works under
systemd socket activation and ``Type=notify``:

* :func:`listeners` -- the listening sockets passed at fd 3.. (``LISTEN_FDS``,
  ``LISTEN_PID``, ``LISTEN_FDNAMES``);
* :func:`notify`, :func:`ready`, :func:`heartbeat`, :func:`status`,
  :func:`stopping`, :func:`extend_timeout` -- one datagram each to
  ``$NOTIFY_SOCKET`` (no-ops returning False when it is unset);
* :func:`install` / :func:`install_asyncio` -- SIGTERM and SIGINT ask for a
  graceful stop, SIGQUIT for a quick one: :data:`stop_event` is set and
  :func:`stop_kind` says which. By default :func:`install` then also raises
  ``SystemExit(0)`` in the main thread (once), so that a plain script stops
  and runs the registry; a program with a drain loop of its own passes
  ``exit_on_stop=False`` and watches the stop event. Handlers the application
  installed before are called after ours (chained), not replaced;
* the cleanup registry -- :func:`on_exit` (decorator or function),
  :func:`register`, :func:`run_cleanup`;
* the stop budget -- :func:`remaining_budget`, :func:`drain_deadline`.

Cleanup registry semantics (the same in drover's Rust SDK): each function runs
at most once, last registered first; an exception in one is logged on stderr
with its name and traceback and the others still run; the whole run is bounded
by the remaining budget (:func:`remaining_budget`): the functions run on a
daemon thread and one still running when the budget ends is abandoned with a
log line naming it. (At interpreter exit on Python 3.12+, where no thread can
be started, they run on the main thread and ``SIGALRM`` interrupts the one
running at the end of the budget.) The registry runs when the application
calls :func:`run_cleanup` (after draining, on a stop) or at normal interpreter
exit (``atexit``), whichever comes first -- exactly once in total. The drover
WSGI worker (``drover_wsgi``) drains and calls :func:`run_cleanup` for you.

The budget: drover sends SIGKILL ``DROVER_GRACEFUL_TIMEOUT`` seconds (default
30) after its stop signal, or ``DROVER_QUICK_TIMEOUT`` seconds (default 5)
after a SIGQUIT if that is earlier. Its clock starts when it sends the signal,
a moment before we receive it, and the process must still exit after the
cleanup, so a :func:`reserve` of max(0.25 s, 5 %) of the timeout (at most half
of it) is kept back. A server should abandon in-flight requests at
:func:`drain_deadline`, 4/5 of the way to the end of the budget, so that the
registry keeps at least a fifth of it.

Log lines go to stderr, prefixed ``drover_worker[<pid>]:``.
"""

import argparse
import atexit
import errno
import faulthandler
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional, Set, Tuple, TypeVar, Union

if TYPE_CHECKING:
    import asyncio

F = TypeVar("F", bound=Callable[[], Any])

__all__ = [
    "ListenError",
    "Listener",
    "listeners",
    "listeners_by_name",
    "listeners_or_bind",
    "notify",
    "ready",
    "will_notify",
    "heartbeat",
    "status",
    "stopping",
    "extend_timeout",
    "watchdog_interval",
    "install",
    "install_asyncio",
    "request_stop",
    "stop_event",
    "stop_kind",
    "stop_fd",
    "on_exit",
    "register",
    "run_cleanup",
    "remaining_budget",
    "drain_deadline",
    "reserve",
    "graceful_timeout",
    "quick_timeout",
    "before_fork",
    "after_fork",
]

#: The first inherited listening fd (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: Grace budget when DROVER_GRACEFUL_TIMEOUT is not set (drover's default).
DEFAULT_GRACEFUL_TIMEOUT = 30.0
#: Quick-stop budget when DROVER_QUICK_TIMEOUT is not set (drover's default).
DEFAULT_QUICK_TIMEOUT = 5.0


def _log(message: str) -> None:
    """One line on stderr (newlines inside become spaces), one write call."""
    text = "drover_worker[%d]: %s\n" % (os.getpid(), message.replace("\n", " "))
    _write_stderr(text)


def _write_stderr(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:
        try:
            os.write(2, text.encode("utf-8", "replace"))
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Listening sockets
# ---------------------------------------------------------------------------


class ListenError(Exception):
    """The inherited sockets cannot be used. A worker should exit with status 3
    ("cannot boot") on it, so that drover does not respawn it in a loop."""


class Listener(socket.socket):
    """A ``socket.socket`` with the ``name`` drover (``LISTEN_FDNAMES``) gave it."""

    def __init__(self, fileno: int, name: str) -> None:
        super().__init__(fileno=fileno)
        self.name = name

    def __repr__(self) -> str:
        return "<Listener %r fd=%d %s>" % (self.name, self.fileno(), _describe(self))


def _describe(sock: socket.socket) -> str:
    try:
        addr = sock.getsockname()
    except OSError:
        return "?"
    if sock.family == socket.AF_UNIX:
        if isinstance(addr, bytes):
            addr = "@" + addr[1:].decode("utf-8", "replace")
        return "unix:" + (addr or "?")
    if sock.family == socket.AF_INET6:
        return "[%s]:%d" % (addr[0], addr[1])
    return "%s:%d" % (addr[0], addr[1])


def parse_activation(listen_fds: Optional[str], listen_pid: Optional[str], listen_fdnames: Optional[str],
                     pid: int) -> List[str]:
    """Checks the activation variables' values (None when unset) against our
    ``pid`` and returns one name per fd. Pure: touches no descriptor."""
    missing = [n for n, v in (("LISTEN_FDS", listen_fds), ("LISTEN_PID", listen_pid)) if v is None]
    if missing:
        raise ListenError(
            "no listening sockets were passed to this process (%s not set): it must run "
            "under drover (or systemd socket activation), which binds the sockets and "
            "passes them at fd 3 and up" % " and ".join(missing)
        )
    assert listen_pid is not None and listen_fds is not None
    try:
        expected = int(listen_pid.strip())
    except ValueError:
        raise ListenError("invalid LISTEN_PID=%r: not a process id" % listen_pid) from None
    if expected != pid:
        raise ListenError(
            "LISTEN_PID is %d but this process is %d: the sockets were passed to another "
            "process (inherited environment), refusing to use them" % (expected, pid)
        )
    try:
        count = int(listen_fds.strip())
        if count < 0:
            raise ValueError
    except ValueError:
        raise ListenError("invalid LISTEN_FDS=%r: not a number of file descriptors" % listen_fds) from None
    if listen_fdnames is None:
        return ["unknown"] * count
    if listen_fdnames == "" and count == 0:
        return []
    names = listen_fdnames.split(":")
    if len(names) != count:
        raise ListenError(
            "invalid LISTEN_FDNAMES=%r: %d names for LISTEN_FDS=%d" % (listen_fdnames, len(names), count)
        )
    return names


_listen_lock = threading.Lock()
_taken: Optional[List[Listener]] = None


def listeners() -> List[Listener]:
    """The listening sockets passed by drover (or systemd), as :class:`Listener`
    objects (``socket.socket`` with a ``name``), fd 3 first.

    On success the fds become non-inheritable and ``LISTEN_FDS``, ``LISTEN_PID``
    and ``LISTEN_FDNAMES`` are removed from the environment, so that programs the
    worker starts do not take them too. Later calls return the same list.

    Raises :class:`ListenError` when the variables are missing (not started by
    drover) or belong to another process (``LISTEN_PID`` is not our pid), and
    leaves fd 3.. alone then.
    """
    global _taken
    with _listen_lock:
        if _taken is not None:
            return list(_taken)
        env = os.environ
        names = parse_activation(
            env.get("LISTEN_FDS"), env.get("LISTEN_PID"), env.get("LISTEN_FDNAMES"), os.getpid()
        )
        socks: List[Listener] = []
        for i, name in enumerate(names):
            fd = LISTEN_FDS_START + i
            try:
                sock = Listener(fd, name)
            except OSError as e:
                for s in socks:
                    s.detach()
                raise ListenError("inherited fd %d is not a usable socket: %s" % (fd, e)) from None
            socks.append(sock)
        for sock in socks:
            sock.set_inheritable(False)
        for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(var, None)
        _taken = socks
        return list(socks)


def listeners_by_name() -> Dict[str, List[Listener]]:
    """``{name: [Listener, ...]}`` (names may repeat, as under systemd)."""
    by_name: Dict[str, List[Listener]] = {}
    for sock in listeners():
        by_name.setdefault(sock.name, []).append(sock)
    return by_name


def listeners_or_bind(address: str) -> List[Listener]:
    """:func:`listeners` when started by drover; otherwise, for development,
    binds ``address`` ("host:port", "[v6]:port" or "unix:/path") and returns it
    as the only listener (named "fallback"). A LISTEN_PID mismatch still raises."""
    env = os.environ
    if env.get("LISTEN_FDS") is not None or env.get("LISTEN_PID") is not None or _taken is not None:
        return listeners()
    if address.startswith("unix:"):
        path = address[5:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path):
                os.unlink(path)
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise ListenError("cannot bind fallback address %s: %s" % (address, e)) from None
    else:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
            sock = socket.socket(info[0], socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
        except (OSError, ValueError) as e:
            raise ListenError("cannot bind fallback address %s: %s" % (address, e)) from None
    sock.listen(1024)
    fd = sock.detach()
    return [Listener(fd, "fallback")]


# ---------------------------------------------------------------------------
# Notify (systemd's sd_notify protocol)
# ---------------------------------------------------------------------------


#: How long a change of state (READY=1, STOPPING=1, ...) waits while the
#: receiver's queue is full before notify() gives up with an error.
NOTIFY_WAIT = 1.0


def notify(state: Union[str, bytes]) -> bool:
    """Sends ``state`` ("KEY=VALUE", or several lines) as one datagram to
    ``$NOTIFY_SOCKET`` (an absolute path, or "@name" for Linux's abstract
    namespace). Returns False when ``NOTIFY_SOCKET`` is unset or empty, True
    once sent; raises OSError when sending fails.

    It never blocks for long: the receiver (drover's master, or systemd)
    queues only a few datagrams (``net.unix.max_dgram_qlen``, 10), and a
    send to a full queue waited for as long as the receiver did not read.
    A stalled master held a worker's stop (its STOPPING=1) and, in an
    asyncio launcher, the whole event loop at a heartbeat. A periodic
    message (only ``WATCHDOG=1`` and ``STATUS=`` lines, as drover's master
    treats its own) is dropped at once when the queue is full; any other
    waits up to :data:`NOTIFY_WAIT`. Both raise BlockingIOError then.
    ``READY=1`` alone waits until it is taken, or until a stop is asked: a
    worker whose ``READY=1`` is lost is killed at ``boot_timeout``."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    elif addr[0] != "/":
        raise OSError("NOTIFY_SOCKET=%r is neither an absolute path nor @abstract" % addr)
    data = state.encode("utf-8") if isinstance(state, str) else bytes(state)
    periodic = _periodic(data)
    try:
        while True:
            try:
                _notify_socket().sendto(data, socket.MSG_DONTWAIT if periodic else 0, addr)
                break
            except BlockingIOError:
                # READY=1 waits for as long as the receiver does not read,
                # unless this worker is asked to stop: dropped, it got a
                # worker that serves killed at boot_timeout once the master
                # ran again, and until it is taken the worker does not count
                # as booted anyway.
                if not (_has_ready(data) and stop_kind() is None):
                    raise
    except BlockingIOError:
        what = data.decode("utf-8", "replace").replace("\n", " ")
        raise BlockingIOError(errno.EAGAIN, "%s (its receiver is not reading): %s" % (
            "the notify socket's queue is full" if periodic
            else "the notify socket's queue stayed full for %.1fs" % NOTIFY_WAIT,
            ("%s dropped" if periodic else "%s not sent") % what)) from None
    return True


def _has_ready(data: bytes) -> bool:
    """A READY=1 line: the one message a worker cannot do without."""
    return b"READY=1" in data.split(b"\n")


def _periodic(data: bytes) -> bool:
    """Only WATCHDOG=1 and STATUS= lines: a message the next one replaces."""
    lines = [line for line in data.split(b"\n") if line]
    return bool(lines) and all(line == b"WATCHDOG=1" or line.startswith(b"STATUS=") for line in lines)


# The socket notify() sends from, made at its first call (drover-wsgi and the
# launchers send X_DROVER_WILL_NOTIFY=1 before they accept anything) and kept:
# a socket per message, as sd_notify makes, fails with EMFILE once a flood of
# connections took every descriptor, and a heartbeat that cannot be sent gets
# a worker that still serves killed. A forked child closes its copy of the
# parent's and makes its own. (No lock: two threads that make one at once
# keep one; the other is closed, unused.)
_notify_sock: Optional[Tuple[int, socket.socket]] = None


def _notify_socket() -> socket.socket:
    global _notify_sock
    mine = _notify_sock
    if mine is None or mine[0] != os.getpid():
        if mine is not None:
            mine[1].close()  # the parent's, inherited: this process's copy only
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # A blocking socket whose sends wait at most NOTIFY_WAIT for room in
        # the receiver's queue (the kernel's SO_SNDTIMEO, which a datagram
        # send to a full Unix socket's queue honours).
        sec = int(NOTIFY_WAIT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", sec, int((NOTIFY_WAIT - sec) * 1_000_000)))
        mine = (os.getpid(), sock)
        _notify_sock = mine
    return mine[1]


def _notify_fd() -> int:
    """The descriptor of the socket notify() keeps, -1 if none (for the
    preload template, which names the sockets the application left open)."""
    mine = _notify_sock
    return mine[1].fileno() if mine is not None and mine[0] == os.getpid() else -1


def ready() -> bool:
    """READY=1: the worker accepts; drover counts it as booted."""
    return notify("READY=1")


def will_notify() -> bool:
    """X_DROVER_WILL_NOTIFY=1: sent early (before a slow import), it tells
    drover that this worker will send READY=1 itself when it accepts, so that
    drover, under its default ``ready = "auto"``, waits for it
    (docs/protocol.md); drover versions that do not know it ignore it."""
    return notify("X_DROVER_WILL_NOTIFY=1")


def begin_launch(chdir: Optional[str], log: Callable[[str], None]) -> bool:
    """What every launcher (drover-wsgi, drover-uvicorn, drover-granian,
    drover-hypercorn) does first, before its slow import: turn faulthandler
    on, ignore SIGUSR1, say that READY=1 will follow, change to ``chdir``,
    and import from the working directory (as gunicorn and uvicorn do).

    drover forwards SIGUSR1 ("reopen your log files", logrotate's
    ``postrotate``) to every worker, and its default action kills the
    process: ignored from here on, unless the app installs a handler of its
    own while it is imported. Returns True when it was ignored here (it was
    at its default action), so that a launcher with a use for it (drover-wsgi
    reopens its access log) knows that SIG_IGN is its own."""
    # SIGABRT (drover's boot_timeout, a missed heartbeat) dumps every
    # thread's stack: where the import or the app hangs.
    faulthandler.enable()
    usr1_ignored_here = signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    if usr1_ignored_here:
        _set_signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        will_notify()
    except OSError as e:
        log("cannot tell drover that READY=1 will follow: %s" % e)
    if chdir:
        os.chdir(chdir)
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return usr1_ignored_here


def heartbeat() -> bool:
    """WATCHDOG=1: the worker is alive (send it at half of :func:`watchdog_interval`)."""
    return notify("WATCHDOG=1")


#: A heartbeat that could not be sent is logged at most this often per
#: process, with a count (as drover's master logs its own dropped messages).
HEARTBEAT_LOG_EVERY = 1.0


class _HeartbeatLog:
    """WATCHDOG=1 for drover-wsgi and the launchers, which log a beat that
    could not be sent: at most one line per :data:`HEARTBEAT_LOG_EVERY`,
    with the number not sent since the last line, and one once a beat is
    sent again. A stalled master (its notify queue full) drops every beat,
    and each was a line of its own: two a second per worker with drover's
    ``timeout = "1s"``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.mu = threading.Lock()
        self.unlogged = 0  # not sent since the last line
        self.failing_since: Optional[float] = None
        self.logged_at: Optional[float] = None

    def beat(self, log: Callable[[str], None]) -> None:
        try:
            heartbeat()
            error: Optional[OSError] = None
        except OSError as e:
            error = e
        now = self.clock()
        with self.mu:
            since = self.failing_since
            if error is not None:
                self.unlogged += 1
                if since is None:
                    self.failing_since = since = now
            elif since is None:
                return  # sent, as the last one was
            if self.logged_at is not None and now - self.logged_at < HEARTBEAT_LOG_EVERY:
                return  # counted in the next line
            n, self.unlogged = self.unlogged, 0
            self.logged_at = now
            if error is not None:
                line = "cannot send WATCHDOG=1: %s" % error
                if n > 1:
                    line += "; %d not sent since the last line" % n
            else:
                line = "WATCHDOG=1 sent again after %.1fs" % (now - since)
                if n:
                    line += "; %d more not sent since the last line" % n
                self.failing_since = None
        log(line)


_heartbeat_log: Optional[Tuple[int, _HeartbeatLog]] = None


def _beat(log: Callable[[str], None]) -> None:
    """Sends WATCHDOG=1; logs with ``log`` what could not be sent, at most
    once a second per process (see :class:`_HeartbeatLog`)."""
    global _heartbeat_log
    mine = _heartbeat_log
    if mine is None or mine[0] != os.getpid():  # a forked child counts its own
        mine = _heartbeat_log = (os.getpid(), _HeartbeatLog())
    mine[1].beat(log)


def _send_or_log(send: Callable[[], bool], what: str, log: Callable[[str], None]) -> None:
    """``send()`` (:func:`ready`, :func:`stopping`), for the launchers: a
    message drover cannot be sent is logged with ``log`` (``cannot send
    READY=1: ...``), and the launcher serves or stops on."""
    try:
        send()
    except OSError as e:
        log("cannot send %s: %s" % (what, e))


def status(text: object) -> bool:
    """STATUS=<text>: a free-form line shown in drover's log."""
    return notify("STATUS=" + str(text).replace("\n", " "))


def stopping() -> bool:
    """STOPPING=1: the worker is going away on its own (e.g. after max requests):
    drover replaces it at once instead of treating the exit as a crash.
    drover kills a worker still running ``graceful_timeout`` after its
    STOPPING=1, so the stop budget (:func:`remaining_budget`,
    :func:`drain_deadline`) counts from the first call when no stop was
    requested before it."""
    global _stopping_time
    if _stopping_time is None:
        _stopping_time = time.monotonic()
    return notify("STOPPING=1")


def extend_timeout(seconds: float) -> bool:
    """EXTEND_TIMEOUT_USEC: asks for more time for the current phase."""
    return notify("EXTEND_TIMEOUT_USEC=%d" % int(seconds * 1_000_000))


def watchdog_interval() -> Optional[float]:
    """The heartbeat interval drover expects (``WATCHDOG_USEC``, in seconds), or
    None when no heartbeat is expected (or ``WATCHDOG_PID`` names another process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    wpid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    try:
        if wpid and int(wpid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


# ---------------------------------------------------------------------------
# Stop state and signal handling
# ---------------------------------------------------------------------------

_KIND_RANK = {None: 0, "graceful": 1, "quick": 2}


class _StopEvent(threading.Event):
    """A ``threading.Event`` that can be set from a signal handler.

    ``threading.Event`` uses a non-reentrant lock: a handler calling ``set()``
    while the main thread is inside ``wait()`` or ``set()`` could deadlock. This
    one uses a reentrant lock, and in the main thread (where Python runs signal
    handlers) ``wait()`` blocks in ``select()`` on the stop pipe and on a
    wake-up fd (``signal.set_wakeup_fd``). The stop pipe alone lost wake-ups:
    the Python handler that writes it runs only when the main thread runs
    bytecode again, and a signal whose C-level handler ran just before the
    ``select()`` (a SIGTERM sent right after the program said it was ready,
    on a loaded machine), or that the kernel gave to another thread, left
    the main thread in ``select()`` for good. The C-level handler writes the
    wake-up fd whichever thread takes the signal, whenever. It is never
    cleared.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition(threading.RLock())

    def wait(self, timeout: Optional[float] = None) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return super().wait(timeout)
        import select

        deadline = None if timeout is None else time.monotonic() + timeout
        wake_r, wake_w = os.pipe()
        try:
            os.set_blocking(wake_r, False)
            os.set_blocking(wake_w, False)
            previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
            try:
                while not self.is_set():
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    readable, _, _ = select.select([_pipe_fds()[0], wake_r], [], [], left)
                    if wake_r in readable:
                        _pass_on_wakeup(wake_r, previous)
            finally:
                signal.set_wakeup_fd(previous)
        finally:
            os.close(wake_r)
            os.close(wake_w)
        return self.is_set()

    def set(self) -> None:
        try:
            os.write(_pipe_fds()[1], b"x")
        except OSError:
            pass  # full: it is readable already
        super().set()

    def clear(self) -> None:
        raise RuntimeError("the stop event is never cleared")


def _pass_on_wakeup(wake_r: int, previous: int) -> None:
    """Empties the wake-up pipe of :meth:`_StopEvent.wait`, and passes what
    it read on to the wake-up fd it stood in for (an asyncio loop's, which
    reads the signal numbers from it)."""
    try:
        data = os.read(wake_r, 4096)
        if previous != -1:
            os.write(previous, data)
    except OSError:
        pass  # empty, or theirs is full: it is readable already


#: Set (never cleared) once a stop has been requested, by a signal or by
#: :func:`request_stop`. Safe to wait on from any thread.
stop_event = _StopEvent()
_stop_kind: Optional[str] = None
_stop_time: Optional[float] = None
_quick_time: Optional[float] = None
_stopping_time: Optional[float] = None  # the first stopping() (STOPPING=1)
_pipe: Optional[Tuple[int, int]] = None
_pipe_lock = threading.Lock()


def _pipe_fds() -> Tuple[int, int]:
    global _pipe
    if _pipe is None:
        with _pipe_lock:
            if _pipe is None:
                r, w = os.pipe()
                os.set_blocking(r, False)
                os.set_blocking(w, False)
                _pipe = (r, w)
    return _pipe


def stop_fd() -> int:
    """A file descriptor that becomes readable at the first stop request and
    stays readable (never read it): watch it with select/poll next to sockets."""
    return _pipe_fds()[0]


def stop_kind() -> Optional[str]:
    """None (running), "graceful" (SIGTERM/SIGINT) or "quick" (SIGQUIT).
    A stop is never downgraded: quick wins over graceful."""
    if _stop_kind is None and stop_event.is_set():
        return "graceful"  # stop_event.set() called directly
    return _stop_kind


def stop_requested_at() -> Optional[float]:
    """``time.monotonic()`` of the first stop request, or None."""
    return _stop_time


def request_stop(kind: str = "graceful") -> None:
    """Asks for a stop from the program, as the signals do. Any thread."""
    global _stop_kind, _stop_time, _quick_time
    if kind not in ("graceful", "quick"):
        raise ValueError("kind must be 'graceful' or 'quick'")
    now = time.monotonic()
    if _stop_time is None:
        _stop_time = now
    if kind == "quick" and _quick_time is None:
        _quick_time = now  # drover's quick deadline counts from here
    if _KIND_RANK[kind] > _KIND_RANK[_stop_kind]:
        _stop_kind = kind
    stop_event.set()


def _is_chainable(handler: Any) -> bool:
    return callable(handler) and handler is not signal.default_int_handler


_installed: Dict[int, Any] = {}  # signum -> our handler function currently installed
_replaced: Dict[int, Any] = {}  # signum -> what the process would have without us
# The other handlers the SDK and the launchers set (_set_signal): signum ->
# (ours, what was there before the first of them).
_set_here: Dict[int, Tuple[Any, Any]] = {}
_install_lock = threading.Lock()
_exit_on_stop = False  # as the last install() said
_exit_raised = False
_signalled = False  # a stop signal arrived (not only request_stop())


def _stop_signal(kind: str) -> None:
    """A stop signal arrived (from drover, or a user's kill): a stop request
    that drover bounds with its stop timeout."""
    global _signalled
    _signalled = True
    request_stop(kind)


def _make_handler(kind: str, previous: Optional[Callable[..., Any]]) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        global _exit_raised
        _stop_signal(kind)
        if previous is not None:
            if _exit_on_stop:
                previous(signum, frame)
            else:
                _call_deferring_exit(previous, signum, frame)
        # Once only, and never while the registry runs: drover escalates with
        # SIGQUIT, and a SystemExit then would cut the cleanup short.
        if _exit_on_stop and not _exit_raised and _phase == "open":
            _exit_raised = True
            raise SystemExit(0)

    handler.__drover_worker__ = True  # type: ignore[attr-defined]
    return handler


def _call_deferring_exit(previous: Callable[..., Any], signum: int, frame: Any) -> None:
    """Calls the application's own handler for a program that drains by
    itself (``exit_on_stop=False``). A handler that calls ``sys.exit`` (a
    common way to "exit cleanly on SIGTERM") would raise ``SystemExit`` in the
    main thread wherever it is, cutting the requests in flight and the drain
    short; the stop it asks for is already under way, so its exit is taken as
    that stop's: the program drains, runs the registry and exits."""
    try:
        previous(signum, frame)
    except SystemExit as e:
        _log("the application's %s handler raised SystemExit(%r): the worker exits once it has "
             "drained and run its cleanup" % (_signal_name(signum), e.code))


#: How long an exit may wait for the application's threads before the log
#: says what it waits for.
EXIT_WAIT_NOTICE = 1.0


#: Past the stop budget, faulthandler ends an exit stuck in the interpreter's
#: teardown (less than the smallest reserve, 0.25 s, so before drover's kill).
EXIT_LAST_RESORT = 0.1

#: The end of the stop budget of an exit bounded by _bound_exit (monotonic
#: clock), for the last resort armed at the start of the teardown.
_exit_deadline: Optional[float] = None


def _bound_exit(log: Callable[[str], None]) -> None:
    """For a launcher that has drained and run the registry, and returns to
    let the interpreter exit: the interpreter first waits for every
    non-daemon thread (a queue consumer, a scheduler, a busy
    ``ThreadPoolExecutor``), and one that never ends would hold the worker
    until drover's SIGKILL, with nothing in the log to say why. A daemon
    thread names them after a second, and at the end of the stop budget
    exits the process (status 0, ``atexit`` functions not run) without them.
    Past that, faulthandler ends a teardown that hangs (status 1, with every
    thread's stack on stderr): armed by ``_at_exit``, once the threads are
    joined and the atexit functions ran (see _arm_last_resort)."""
    global _exit_deadline
    deadline = time.monotonic() + remaining_budget()
    _exit_deadline = deadline

    def names() -> str:
        main = threading.main_thread()
        return ", ".join(repr(t.name) for t in threading.enumerate()
                         if t is not main and not t.daemon and t.is_alive())

    def watch() -> None:
        time.sleep(max(0.0, min(EXIT_WAIT_NOTICE, deadline - time.monotonic())))
        waiting = names()
        if waiting and deadline > time.monotonic():
            log("exit waits for the application's non-daemon thread(s) %s, up to %.1fs: make them daemons, "
                "or end them in an on_exit function" % (waiting, deadline - time.monotonic()))
        time.sleep(max(0.0, deadline - time.monotonic()))
        try:
            faulthandler.cancel_dump_traceback_later()  # this exit is the stop's, status 0
        except Exception:
            pass
        waiting = names()
        log("the stop budget ran out while the interpreter's exit waited (%s): exiting without it"
            % ("for thread(s) %s" % waiting if waiting else "in an atexit function"))
        _flush_and_exit(0)

    threading.Thread(target=watch, name="drover-exit-deadline", daemon=True).start()


def _arm_last_resort() -> None:
    """The watch thread of _bound_exit runs Python: once the interpreter's
    teardown has begun (after the atexit functions) no Python thread runs
    again, and a hang there (a finalizer that waits, an extension module
    joining its own thread) held the worker until drover's SIGKILL.
    faulthandler's timer is a C thread: just past the budget, still within
    the reserve, it writes every thread's stack to stderr (where the exit
    hangs) and exits with 1. Armed only now, from the SDK's atexit function:
    armed at _bound_exit, it raced the watch thread while the exit waited for
    an application's thread, and on a loaded machine (or with a thread that
    held the GIL) it fired first, 0.1 s after the budget, and a worker whose
    cleanup had finished exited 1 instead of 0. Until now a Python thread can
    run, and the watch thread ends the exit."""
    if _exit_deadline is None:
        return
    try:
        faulthandler.dump_traceback_later(max(0.0, _exit_deadline - time.monotonic()) + EXIT_LAST_RESORT, exit=True)
    except (RuntimeError, ValueError, OSError):
        pass  # no usable stderr: the SIGKILL remains


def _exit_skipping_teardown(wait_for_threads: bool) -> NoReturn:
    """Exits with status 0 as the interpreter would -- the application's
    non-daemon threads joined (when ``wait_for_threads``; call
    ``_bound_exit`` first to bound that wait), the ``atexit`` functions run,
    the output flushed -- but without the interpreter's teardown. For a
    server whose native threads go on running until the process ends: a
    thread that touches the interpreter while it is being torn down crashes
    the process (Granian's runtime panics and aborts: the worker dies by
    SIGABRT after a clean drain); and for a drain that abandoned requests,
    whose threads the teardown would wait for. Granian's own workers end
    the same way (multiprocessing's ``os._exit``)."""
    if wait_for_threads:
        # As the interpreter's exit does first: the functions registered with
        # threading's own atexit, which end the idle workers of every
        # ThreadPoolExecutor (else the join below waits for them forever).
        for call in reversed(getattr(threading, "_threading_atexits", [])):
            try:
                call()
            except Exception:
                pass
        main = threading.main_thread()
        for t in threading.enumerate():
            if t is not main and not t.daemon:
                t.join()
    try:
        atexit._run_exitfuncs()
    except Exception:
        pass
    _flush_and_exit(0)


def _flush_and_exit(code: int) -> NoReturn:
    """``os._exit(code)``, with what the program wrote to its standard
    streams sent first (``os._exit`` leaves Python's buffers unwritten)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal %d" % signum


def install(sigint: bool = True, quick_signal: int = signal.SIGQUIT, exit_on_stop: bool = True) -> threading.Event:
    """Handles SIGTERM (graceful stop), SIGINT (graceful; left alone with
    ``sigint=False``) and ``quick_signal`` (quick stop; SIGQUIT by default) by
    setting :data:`stop_event`. Returns :data:`stop_event`.

    A Python-level handler the application installed before is called after ours
    (its stop request is not swallowed); SIG_DFL, SIG_IGN and Python's default
    SIGINT handler (KeyboardInterrupt) are replaced, not chained. SIGINT that is
    ignored at install time (a background job) stays ignored. Calling it again
    is harmless: a handler the application installed in between is chained.

    With ``exit_on_stop=True`` (the default) the first stop signal also raises
    ``SystemExit(0)`` in the main thread, so that a program without a drain
    loop of its own stops: the stack unwinds (``finally`` blocks run) and the
    registry runs at interpreter exit. It is raised once only, and not while
    the registry runs (a second signal then only shortens the budget, if it is
    a quick stop). A program that drains by itself passes
    ``exit_on_stop=False`` and waits on the returned event (as ``drover_wsgi``
    does); the last call's choice applies to every handler.

    Must be called from the main thread (a rule of the ``signal`` module).
    """
    global _exit_on_stop
    wanted = [(signal.SIGTERM, "graceful"), (quick_signal, "quick")]
    if sigint:
        wanted.insert(1, (signal.SIGINT, "graceful"))
    _pipe_fds()
    with _install_lock:
        _exit_on_stop = exit_on_stop
        for signum, kind in wanted:
            current = signal.getsignal(signum)
            if current is not None and current is _installed.get(signum):
                continue  # ours, still in place
            if signum == signal.SIGINT and current == signal.SIG_IGN:
                continue  # started in the background: Ctrl+C is not for us
            previous = current if callable(current) and _is_chainable(current) else None
            _replaced[signum] = current if current is not None else signal.SIG_DFL
            handler = _make_handler(kind, previous)
            signal.signal(signum, handler)
            _installed[signum] = handler
    return stop_event


# Signals handled through an asyncio loop: {signum: "graceful" | "quick"}.
_loop_signals: Dict[int, str] = {}


def install_asyncio(loop: Optional["asyncio.AbstractEventLoop"] = None, sigint: bool = True,
                    quick_signal: int = signal.SIGQUIT) -> "asyncio.Event":
    """The asyncio variant of :func:`install`: ``loop.add_signal_handler`` for
    the same signals. Returns an ``asyncio.Event`` set at the first stop (the
    threading :data:`stop_event` and :func:`stop_kind` are updated too).

    Handlers are chained, not replaced: after ours, the loop calls the
    handler the application had for the signal, whether it was installed with
    ``loop.add_signal_handler`` (as aiohttp's ``run_app`` does) or with
    ``signal.signal``; and one the application adds with
    ``loop.add_signal_handler`` after this call is chained behind ours too
    (``loop.remove_signal_handler`` removes it again). On a loop that does not
    expose its handlers (uvloop), handlers installed with
    ``loop.add_signal_handler`` before this call are replaced.

    Call it from a coroutine running on ``loop`` (default: the running loop).
    """
    import asyncio

    if loop is None:
        loop = asyncio.get_running_loop()
    event = asyncio.Event()
    wanted = [(signal.SIGTERM, "graceful"), (quick_signal, "quick")]
    if sigint:
        wanted.insert(1, (signal.SIGINT, "graceful"))
    _pipe_fds()
    chain = _LoopChain.of(loop)

    def on_signal(signum: int, kind: str) -> None:
        _stop_signal(kind)
        event.set()
        chain.call_next(signum)

    on_signal.__drover_worker__ = True  # type: ignore[attr-defined]
    for signum, kind in wanted:
        current = signal.getsignal(signum)
        if signum == signal.SIGINT and current == signal.SIG_IGN:
            continue
        chain.take_previous(signum, current)
        if signum not in _loop_signals:
            _replaced[signum] = current if current is not None else signal.SIG_DFL
        chain.add(signum, on_signal, signum, kind)
        _loop_signals[signum] = kind
    return event


class _LoopChain:
    """The application's handlers for the signals we handle on one loop,
    called after ours: {signum: (callback, args)}. It wraps the loop's
    ``add_signal_handler``/``remove_signal_handler`` so that a handler added
    later joins the chain instead of replacing ours."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.next: Dict[int, Tuple[Callable[..., Any], Tuple[Any, ...]]] = {}
        self.ours: Set[int] = set()
        self._add = loop.add_signal_handler
        self._remove = loop.remove_signal_handler
        try:
            loop.add_signal_handler = self._app_add
            loop.remove_signal_handler = self._app_remove
            loop._drover_worker_chain = self
        except (AttributeError, TypeError):
            pass  # a loop type without instance attributes: no wrapping

    @classmethod
    def of(cls, loop: Any) -> "_LoopChain":
        chain = getattr(loop, "_drover_worker_chain", None)
        return chain if chain is not None else cls(loop)

    def take_previous(self, signum: int, current: Any) -> None:
        """Remembers the handler the application has now, if any."""
        if signum in self.ours:
            return  # installed by an earlier call: the chain is up to date
        handles = getattr(self.loop, "_signal_handlers", None)
        handle = handles.get(signum) if isinstance(handles, dict) else None
        if handle is not None and not getattr(handle._callback, "__drover_worker__", False):
            self.next[signum] = (handle._callback, handle._args)
        elif _is_chainable(current) and getattr(current, "__name__", "") != "_sighandler_noop":
            self.next[signum] = (current, (signum, None))  # a signal.signal handler

    def add(self, signum: int, callback: Callable[..., Any], *args: Any) -> None:
        self.ours.add(signum)
        self._add(signum, callback, *args)

    def call_next(self, signum: int) -> None:
        entry = self.next.get(signum)
        if entry is not None:
            entry[0](*entry[1])

    def _app_add(self, signum: int, callback: Callable[..., Any], *args: Any) -> None:
        if signum in self.ours:
            self.next[signum] = (callback, args)
            return
        self._add(signum, callback, *args)

    def _app_remove(self, signum: int) -> bool:
        # A closed loop removes its handlers (asyncio.run's end): all of them.
        if signum in self.ours and not self.loop.is_closed():
            return self.next.pop(signum, None) is not None
        self.ours.discard(signum)
        return bool(self._remove(signum))


# ---------------------------------------------------------------------------
# The cleanup registry
# ---------------------------------------------------------------------------

_reg_lock = threading.Condition(threading.Lock())
_entries: List[Tuple[str, Callable[[], Any]]] = []
_phase = "open"  # -> "running" -> "done"
_local = threading.local()


def register(name: str, fn: F) -> F:
    """Registers ``fn()`` to run at cleanup under ``name`` (used in log lines).
    Any thread. Registering once cleanup has started is logged and ignored."""
    if not callable(fn):
        raise TypeError("cleanup function must be callable")
    with _reg_lock:
        if _phase == "open":
            _entries.append((str(name), fn))
            return fn
    _log("cleanup %r registered after cleanup started; it will not run" % (name,))
    return fn


def on_exit(fn: Union[F, str, None] = None, name: Optional[str] = None) -> Any:
    """Registers a cleanup function; usable as ``@on_exit``, ``@on_exit("name")``,
    ``@on_exit(name="name")`` or ``on_exit(fn, name="name")``. Returns the
    function unchanged. The default name is the function's qualified name."""
    if isinstance(fn, str):
        fn, name = None, fn
    if fn is None:
        return lambda f: on_exit(f, name=name)
    return register(name if name is not None else _default_name(fn), fn)


def _default_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def graceful_timeout(value: Optional[str] = None) -> float:
    """``DROVER_GRACEFUL_TIMEOUT`` in seconds (a decimal; default 30)."""
    return _seconds("DROVER_GRACEFUL_TIMEOUT", value, DEFAULT_GRACEFUL_TIMEOUT)


def quick_timeout(value: Optional[str] = None) -> float:
    """``DROVER_QUICK_TIMEOUT`` in seconds (a decimal; default 5)."""
    return _seconds("DROVER_QUICK_TIMEOUT", value, DEFAULT_QUICK_TIMEOUT)


def _seconds(var: str, value: Optional[str], default: float) -> float:
    if value is None:
        value = os.environ.get(var)
    if value is None or value.strip() == "":
        return default
    try:
        seconds = float(value)
        if not seconds >= 0 or seconds == float("inf"):
            raise ValueError
        return seconds
    except ValueError:
        _log("%s=%r is not a number of seconds; using %gs" % (var, value, default))
        return default


def reserve(timeout: float) -> float:
    """The part of a stop timeout kept back for the delivery of the signal and
    the exit: max(0.25 s, 5 %), at most half of ``timeout`` (seconds)."""
    return min(max(0.25, timeout * 0.05), timeout / 2)


def _time_left(graceful: float, quick: float, since_stop: Optional[float],
               since_quick: Optional[float]) -> Tuple[float, float]:
    """(drain, cleanup) seconds left, from the timeouts and the seconds since
    the first stop request and the first quick one (None: not yet). Pure."""

    def left(timeout: float, since: float) -> Tuple[float, float]:
        usable = timeout - reserve(timeout)
        return max(0.0, usable * 0.8 - since), max(0.0, usable - since)

    drain, cleanup = left(graceful, since_stop or 0.0)
    if since_quick is not None:
        quick_drain, quick_cleanup = left(quick, since_quick)
        drain, cleanup = min(drain, quick_drain), min(cleanup, quick_cleanup)
    return drain, cleanup


def _left_now() -> Tuple[float, float]:
    now = time.monotonic()

    def since(t: Optional[float]) -> Optional[float]:
        return None if t is None else now - t

    # drover's graceful deadline runs from its stop signal or from our
    # STOPPING=1 (a recycle), whichever came first.
    started = min((t for t in (_stop_time, _stopping_time) if t is not None), default=None)
    return _time_left(graceful_timeout(), quick_timeout(), since(started), since(_quick_time))


def remaining_budget() -> float:
    """The cleanup budget left now, in seconds: the time until drover's stop
    deadline, less the :func:`reserve`. The deadline is
    :func:`graceful_timeout` after the first stop request or :func:`stopping`
    (now, if neither) or, once the stop is quick, :func:`quick_timeout` after the first
    quick request, whichever is earlier (as drover does)."""
    return _left_now()[1]


def drain_deadline() -> float:
    """When (``time.monotonic()``) a server should abandon in-flight requests
    so that the cleanup keeps its share: 4/5 of the way from the stop request
    to the end of :func:`remaining_budget` (for a quick stop, from the quick
    request to the quick deadline, if earlier). Counted from now when no stop
    was requested and :func:`stopping` was not called."""
    return time.monotonic() + _left_now()[0]


def run_cleanup(budget: Optional[float] = None) -> bool:
    """Runs the registry once (last registered first), bounded by ``budget``
    seconds (default :func:`remaining_budget`, which also shrinks if the stop
    escalates to quick meanwhile). Later calls do nothing; a call from another
    thread while it runs waits for it. Returns True if every function finished
    within the budget."""
    global _phase
    if getattr(_local, "in_cleanup", False):
        return True
    with _reg_lock:
        if _phase == "running":
            while _phase == "running":
                _reg_lock.wait()
            return True
        if _phase == "done":
            return True
        _phase = "running"
        entries = list(_entries)
        del _entries[:]
    follow = budget is None
    if budget is None:
        budget = remaining_budget()
    try:
        return _run_entries(entries, budget, follow)
    finally:
        with _reg_lock:
            _phase = "done"
            _reg_lock.notify_all()


class _BudgetExceeded(BaseException):
    """Raised by SIGALRM in the cleanup function running at the end of the
    budget, when the registry runs on the main thread."""


def _call(name: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except _BudgetExceeded:
        raise
    except BaseException:
        text = traceback.format_exc()
        _write_stderr("drover_worker[%d]: cleanup %r failed:\n%s" % (os.getpid(), name, text))


def _ran_out(budget: float, current: Optional[str], skipped: List[str], what: str = "abandoned it") -> None:
    skipped_text = "; not started: %s" % ", ".join(skipped) if skipped else ""
    if current is not None:
        _log("cleanup budget of %.1fs ran out while %r was still running; %s%s"
             % (budget, current, what, skipped_text))
    elif skipped:
        _log("cleanup budget of %.1fs ran out%s" % (budget, skipped_text))


def _run_entries(entries: List[Tuple[str, Callable[[], Any]]], budget: float, follow: bool = False) -> bool:
    if not entries:
        return True
    todo = list(reversed(entries))  # last registered first
    state: Dict[str, Any] = {"current": None, "next": 0}
    lock = threading.Lock()
    finished = threading.Event()

    def helper() -> None:
        _local.in_cleanup = True
        while True:
            with lock:
                i = state["next"]
                if i >= len(todo):
                    state["current"] = None
                    break
                state["next"] = i + 1
                state["current"] = todo[i][0]
            _call(*todo[i])
        finished.set()

    start = time.monotonic()
    try:
        t = threading.Thread(target=helper, name="drover-cleanup", daemon=True)
        t.start()
    except RuntimeError as e:
        # At interpreter shutdown (Python 3.12+) no thread can be started.
        return _run_on_this_thread(todo, start, budget, follow, e)
    deadline = start + budget
    while True:
        now = time.monotonic()
        if follow:  # drover brings its deadline forward on an escalation to quick
            deadline = min(deadline, now + remaining_budget())
        if now >= deadline:
            break
        if finished.wait(min(deadline - now, 0.1) if follow else deadline - now):
            return True
    with lock:
        current = state["current"]
        skipped = [name for name, _ in todo[state["next"]:]]
        state["next"] = len(todo)  # nothing more starts
    _ran_out(deadline - start, current, skipped)
    return False


def _run_on_this_thread(todo: List[Tuple[str, Callable[[], Any]]], start: float, budget: float, follow: bool,
                        why: BaseException) -> bool:
    """The registry on the calling thread. On the main thread the budget is
    still enforced: SIGALRM (every 50 ms from the budget's end, in case a
    function swallows the exception) raises :class:`_BudgetExceeded` in the
    function then running. The previous SIGALRM handler is restored."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        _log("cannot start the cleanup thread (%s); running cleanup without a time limit" % why)
        _local.in_cleanup = True
        try:
            for name, fn in todo:
                _call(name, fn)
        finally:
            _local.in_cleanup = False
        return True
    _log("cannot start the cleanup thread (%s); running cleanup on the main thread, "
         "with SIGALRM at the end of the budget" % why)
    box: Dict[str, Any] = {"deadline": start + budget, "current": None, "next": 0}

    def on_alarm(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if follow:
            box["deadline"] = min(box["deadline"], now + remaining_budget())
        if now >= box["deadline"]:
            raise _BudgetExceeded()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    _local.in_cleanup = True
    try:
        try:
            # First alarm at the budget's end (or sooner, to follow the stop).
            first = max(0.001, budget if not follow else min(budget, 0.1))
            signal.setitimer(signal.ITIMER_REAL, first, 0.05)
            while box["next"] < len(todo) and time.monotonic() < box["deadline"]:
                name, fn = todo[box["next"]]
                box["next"] += 1
                box["current"] = name
                _call(name, fn)
                box["current"] = None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _BudgetExceeded:
        pass  # also when it fired between the last function and the disarm
    finally:
        _local.in_cleanup = False
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
    skipped = [name for name, _ in todo[box["next"]:]]
    if box["current"] is None and not skipped:
        return True
    _ran_out(box["deadline"] - start, box["current"], skipped, "interrupted it")
    return False


def _at_exit() -> None:
    # asyncio.run() closes its loop, and closing puts the default action back
    # for every signal install_asyncio() handled: a second stop signal (drover
    # escalates with SIGQUIT) would then kill us in the middle of the
    # registry. Take them back for its run: a stop request, nothing more.
    for signum, kind in _loop_signals.items():
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signum, _stop_request_handler(kind))
    run_cleanup()
    _exit_at_idle_priority()
    # The interpreter has joined the application's threads and, as this
    # function was registered at the SDK's import, run (nearly) every other
    # atexit function: what is left is the teardown.
    _arm_last_resort()


def _exit_at_idle_priority() -> None:
    """drover's ``boot_priority = "idle"`` also covers a stopped worker's
    exit (``DROVER_EXIT_PRIORITY=idle``): once the registry has run, what is
    left -- the other atexit handlers, the interpreter's teardown, the kernel
    freeing the heap -- is work no request waits for. At SCHED_IDLE it takes
    only the CPU the serving workers leave idle (measured: it halves the
    latency spike of a FastAPI reload on two CPUs). Only after a stop signal,
    whose stop timeout bounds it: drover gives the normal priority back at
    half of it, so a busy machine cannot starve the exit into a SIGKILL."""
    if not _signalled or os.environ.get("DROVER_EXIT_PRIORITY") != "idle":
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # not Linux, or refused: the exit runs at its priority


def _stop_request_handler(kind: str) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        _stop_signal(kind)

    return handler


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}
_fork_mask = threading.local()


def _hold_stop_signals() -> None:
    """Before a fork: the stop signals wait in the forking thread until the
    child has its own handlers back (a ``SIGTERM`` that reached the child
    before, say ``Process.terminate()`` right after ``start()``, was taken by
    the worker's handler there, and lost)."""
    if _installed or _loop_signals:
        _fork_mask.before = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _release_stop_signals_in_parent() -> None:
    before = getattr(_fork_mask, "before", None)
    if before is not None:
        _fork_mask.before = None
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _set_signal(signum: int, handler: Any) -> None:
    """``signal.signal`` for the handlers the SDK and the launchers set
    besides the stop handlers (``SIGUSR1`` ignored, or reopening
    drover-wsgi's access log; ``SIGWINCH``...): a child the application
    forks gets back what was there before the first of them (see
    :func:`_give_back_signals`)."""
    previous = signal.signal(signum, handler)
    before = _set_here[signum][1] if signum in _set_here else previous
    _set_here[signum] = (handler, before if before is not None else signal.SIG_DFL)


def _give_back_signals() -> None:
    """In a child the application forks (``os.fork()``, multiprocessing's
    fork start method): our handlers are the worker's, not the child's.
    Inherited, the stop handlers made the child ignore ``SIGTERM``
    (``Process.terminate()`` waited in vain; drover's ``SIGKILL`` ended it at
    the stop), and an asyncio loop's wakeup fd, shared with the worker,
    passed the child's signals to the worker's loop; the others made it
    ignore ``SIGUSR1`` (whose default ends it) or reopen the worker's access
    log, and mark the worker's copy of the server as winding down at
    ``SIGWINCH``. The child gets back what it would have without the SDK and
    the launchers (where ours is still in place), then the stop signals held
    since the fork. preload's workers are children too: the template sets
    the worker's handlers and mask after the fork."""
    if not (_installed or _loop_signals or _set_here):
        return
    try:
        for signum, handler in _installed.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, _replaced.get(signum, signal.SIG_DFL))
        if _loop_signals:
            signal.set_wakeup_fd(-1)
            for signum in _loop_signals:
                signal.signal(signum, _replaced.get(signum, signal.SIG_DFL))
        for signum, (handler, before) in _set_here.items():
            if signal.getsignal(signum) == handler:
                if before is _installed.get(signum):  # set over a stop handler (SIGQUIT)
                    before = _replaced.get(signum, signal.SIG_DFL)
                signal.signal(signum, before)
    except (ValueError, OSError) as e:  # not the main thread: cannot happen after a fork
        _write_stderr("drover_worker[%d]: the forked child keeps the worker's signal handlers: %s\n"
                      % (os.getpid(), e))
    if _installed or _loop_signals:
        _fork_mask.before = None
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


atexit.register(_at_exit)
os.register_at_fork(before=_hold_stop_signals, after_in_parent=_release_stop_signals_in_parent,
                    after_in_child=_give_back_signals)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for a worker's command line: a usage error exits with status
    3, "cannot boot", so that drover stops at start-up (or rolls a reload
    back) instead of respawning a worker whose command line is wrong."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(3, "%s: error: %s\n" % (self.prog, message))

# Preload hooks, as drover_worker.before_fork / drover_worker.after_fork.
from drover_worker.preload import after_fork, before_fork  # noqa: E402

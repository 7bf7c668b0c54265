"""drover_worker.preload: the template side of drover's preload protocol.

With ``preload = true``, drover starts the worker command once per generation
as a *template* (``DROVER_TEMPLATE_FD`` is set): it loads the application once
and then forks the workers on drover's request, so that they share its memory
copy-on-write and a new worker costs a fork instead of an import. The protocol
is in drover's docs/protocol.md ("Preload: the template").

A worker program hooks in with one call around the code that loads the app::

    from drover_worker import preload
    app = preload.run(lambda: load_my_app())
    # from here on: a worker (forked from the template, or started normally)

:func:`run` returns ``load()``'s result in every forked worker; in the
template it never returns. Without ``DROVER_TEMPLATE_FD`` it just calls
``load()``, so the same program works with and without preload.

What the template does for you:

* the garbage collector is off while the app loads and frozen
  (``gc.freeze()``) before each fork, so the workers do not dirty the shared
  pages by collecting; each worker turns it on again;
* it refuses to fork while it runs more than one thread (a fork copies only
  the calling thread; a lock another thread held stays locked in the child),
  with a message naming the threads, and exits with status 3;
* it warns about sockets, SQLite databases and pipes the application opened
  before the fork (a database connection shared by every worker is corrupted
  by the first two that use it; a process pool's queues send one worker's
  results to another);
* it forks twice, so that the worker is re-parented to drover, which then
  supervises it like any worker; the worker gets its own process group, its
  ``LISTEN_PID``/``WATCHDOG_PID`` and ``DROVER_*`` variables, the signal
  handling the program had before the template took over, an empty signal
  mask, and ``PR_SET_PDEATHSIG`` once drover is its parent;
* it reaps the processes the application started while it loaded once they
  exit (they would stay zombies until the template exits), without taking
  a status the application may still read: see :meth:`Template.reap_children`;
* hooks: functions decorated with :func:`before_fork` run in the template
  before each fork (close what must not be shared); :func:`after_fork` ones
  run in each new worker (reconnect, reseed, start threads). ``random`` is
  reseeded in every worker.

Standard library only.
"""

import gc
import os
import random
import signal
import socket
import stat
import sys
import threading
import time
import traceback
import weakref

import drover_worker as _dw

__all__ = ["TEMPLATE_FD_VAR", "active", "run", "before_fork", "after_fork", "threads_besides_main"]

#: The variable naming the template's end of its channel to drover.
TEMPLATE_FD_VAR = "DROVER_TEMPLATE_FD"
#: The largest message on the channel, either way.
MAX_MESSAGE = 4096
#: How long a worker waits to be re-parented to drover after the fork.
REPARENT_LIMIT = 5.0

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

_before: list = []
_after: list = []


def before_fork(fn):
    """Decorator: ``fn()`` runs in the template before each fork. Close what
    the workers must not share there (database connections, clients with
    sockets). An exception is logged and the fork goes on."""
    _before.append(_check_callable(fn))
    return fn


def after_fork(fn):
    """Decorator: ``fn()`` runs in each forked worker before the program
    continues (reconnect, reseed a random generator, start threads). An
    exception is logged and the worker goes on."""
    _after.append(_check_callable(fn))
    return fn


def _check_callable(fn):
    if not callable(fn):
        raise TypeError("a fork hook must be callable, not %r" % (fn,))
    return fn


def active():
    """True in a template: drover started this process with ``preload = true``."""
    return bool(os.environ.get(TEMPLATE_FD_VAR))


def _log(message):
    _dw._log("preload: " + message)


def run(load):
    """Calls ``load()`` and returns its result in every worker.

    In a template (``DROVER_TEMPLATE_FD`` set), after ``load()`` this process
    serves drover's fork requests and never returns: each forked worker
    returns ``load()``'s result. If ``load()`` raises, the template prints the
    traceback and exits with status 3 ("cannot boot"); so it does when it runs
    more than one thread. Outside a template, ``run(load)`` is ``load()``.

    Must be called from the main thread.
    """
    value = os.environ.get(TEMPLATE_FD_VAR)
    if not value:
        return load()
    try:
        fd = int(value)
        if fd < 3:
            raise ValueError
    except ValueError:
        _log("cannot boot: invalid %s=%r: not a file descriptor above 2" % (TEMPLATE_FD_VAR, value))
        _exit(3)
    return Template(fd).run(load)


class _Stop(BaseException):
    """A stop signal reached the template."""


class Template:
    """One template process: the channel to drover and the fork loop."""

    def __init__(self, fd):
        self.fd = fd
        self.drover = os.getppid()
        self.forked = 0
        self.worker_signals = {}
        # Intermediate children not yet reaped: reaped without waiting, so
        # that the answer to drover does not wait for their exit.
        self.middles = []
        # The application's Popen objects by pid (_live_popens).
        self.popens = {}
        # Waiting for drover's next request, and nothing else: a SIGCHLD may
        # reap then (reap_children), never while the application's code runs.
        self.idle = False
        # Loaded here, once, so that the workers share it (and only templates
        # pay for importing ctypes).
        import ctypes

        self.prctl = ctypes.CDLL(None, use_errno=True).prctl
        self.get_errno = ctypes.get_errno

    def run(self, load):
        # Stop signals end the template at once: it holds nothing to clean up,
        # and the application's cleanup belongs to the workers.
        before = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
        global _template_pid, _replaced, _template
        _template_pid, _replaced = os.getpid(), before
        for sig in _STOP_SIGNALS:
            signal.signal(sig, _on_stop)
        try:
            self.chan = socket.socket(fileno=self.fd)
        except OSError as e:
            _log("cannot boot: %s=%d is not drover's channel: %s" % (TEMPLATE_FD_VAR, self.fd, e))
            _exit(3)
        self.chan.set_inheritable(False)
        # Collecting during the import would only find garbage that a worker
        # may as well never see; not collecting keeps the heap compact.
        gc.disable()
        try:
            result = load()
        except _Stop:
            _exit(0)
        except SystemExit as e:
            _log("cannot boot: the application exited while loading (status %r)" % (e.code,))
            _exit(3)
        except BaseException:
            _write(traceback.format_exc())
            _log("cannot boot: the application could not be loaded in the template (traceback above)")
            _exit(3)
        # A handler the application installed while loading is its own and
        # stays; where ours is still in place the worker gets what was there.
        for sig in _STOP_SIGNALS:
            current = signal.getsignal(sig)
            self.worker_signals[sig] = before[sig] if current is _on_stop else current
        refusal = _thread_refusal()
        if refusal:
            _log("cannot boot: " + refusal)
            _exit(3)
        # Children the application started while loading are reaped from now
        # on, when they exit, unless it set its own SIGCHLD handling: then
        # reaping them is its business. Never before: an import may wait for
        # a child of its own.
        self.worker_signals[signal.SIGCHLD] = signal.getsignal(signal.SIGCHLD)
        if self.worker_signals[signal.SIGCHLD] == signal.SIG_DFL:
            _template = self
            self.popens = _live_popens()
            signal.signal(signal.SIGCHLD, _on_child)
        try:
            self.send("READY=1")
            _log("ready to fork (pid %d)" % os.getpid())
            while True:
                self.reap_children()
                fields = self.receive()
                if fields is None:
                    _exit(0)  # drover closed the channel: the generation is over
                request = fields.get("FORK")
                if request is None:
                    continue
                result_in_worker = self.fork_one(request[0], fields.get("ENV", []))
                if result_in_worker:
                    return result
        except _Stop:
            _exit(0)
        except (BrokenPipeError, ConnectionResetError):
            # drover closed its end before reading what we sent: it retired
            # this generation (a reload while we loaded the application).
            _log("drover retired this generation (it closed the channel): exiting")
            _exit(0)
        except OSError as e:
            _log("the channel to drover failed: %s; exiting" % e)
            _exit(1)

    # -- the channel ------------------------------------------------------

    def send(self, text):
        self.chan.send(text.encode("utf-8", "replace")[:MAX_MESSAGE])

    def receive(self):
        """The next message as ``{key: [values]}``, or None at end of file."""
        while True:
            self.idle = True
            try:
                data = self.chan.recv(MAX_MESSAGE)
            finally:
                self.idle = False
            if not data:
                return None
            fields = parse_message(data)
            if fields:
                return fields

    # -- one fork ---------------------------------------------------------

    def fork_one(self, request, env):
        """Serves one FORK request. Returns True in the new worker."""
        for fn in _before:
            _call_hook("before_fork", fn)
        if self.forked == 0:
            for line in open_sockets(self.fd) + open_databases(self.fd) + open_pipes(self.fd):
                _log("warning: " + line)
        refusal = _thread_refusal()
        if refusal:
            self.send("FAILED=%s\nERROR=%s" % (request, refusal))
            _log("cannot fork: " + refusal)
            _exit(3)
        try:
            pid = self.double_fork(request, env)
        except OSError as e:
            self.send("FAILED=%s\nERROR=cannot fork: %s" % (request, e.strerror or e))
            return False
        if pid is None:
            return True
        self.forked += 1
        self.send("FORKED=%s\nPID=%d" % (request, pid))
        return False

    def double_fork(self, request, env):
        """Forks the worker through an intermediate child that exits at once,
        so the worker is re-parented to drover. Returns the worker's pid in the
        template and None in the worker; raises OSError if a fork failed."""
        r, w = os.pipe()
        # No signal may run a template handler in a child before it has
        # restored the worker's; the worker unblocks them once set up.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        gc.freeze()  # what the template has stays out of the workers' collections
        try:
            middle = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(r)
            os.close(w)
            raise
        if middle == 0:
            try:
                os.close(r)
                me = os.getpid()
                try:
                    pid = os.fork()
                except OSError as e:
                    os.write(w, b"E%d\n" % e.errno)
                    os._exit(1)
                if pid == 0:
                    os.close(w)
                    self.become_worker(request, env, me)
                    return None
                os.write(w, b"%d\n" % pid)
            except BaseException:
                pass
            os._exit(0)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(w)
        try:
            data = _read_line(r)
        finally:
            os.close(r)
        self.middles.append(middle)
        self.reap_middles()
        if data.startswith(b"E"):
            errno = int(data[1:] or 0)
            raise OSError(errno, os.strerror(errno))
        if not data:
            raise OSError(0, "the intermediate child died before forking")
        return int(data)

    def reap_children(self):
        """Reaps the children that have exited: the intermediate ones, and
        those the application started while it loaded, which would otherwise
        stay zombies until the template exits.

        Never ``os.waitpid(-1)``: a child's status goes where the application
        would read it. A ``multiprocessing`` child is reaped by
        ``multiprocessing.active_children()`` (its ``exitcode`` is kept); a
        ``subprocess.Popen`` the application still holds, by its ``poll()``
        (``returncode``, and so ``wait()``, stay right); one it dropped, as
        ``subprocess`` itself does at the next ``Popen``. Only a child nothing
        in Python tracks (``os.fork``, ``os.posix_spawn``) is reaped with its
        status discarded: the application cannot ``os.waitpid`` one in a
        ``before_fork`` hook after it exited. So is a child a ``before_fork``
        hook started with ``subprocess.Popen`` and left running: the Popen
        objects are looked for once, when the application is loaded."""
        self.reap_middles()
        if _template is not self:
            return  # the application handles SIGCHLD: its children are its own
        mp = sys.modules.get("multiprocessing")
        if mp is not None:
            mp.active_children()
        sp = sys.modules.get("subprocess")
        cleanup = getattr(sp, "_cleanup", None)
        if cleanup is not None:
            cleanup()
        seen = set()
        while True:
            try:
                # WNOWAIT: look which child exited, leave it to be reaped.
                exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if exited is None or exited.si_pid == 0:
                return
            pid = exited.si_pid
            held = None if pid in seen or pid in self.middles else self.held_popen(pid)
            seen.add(pid)
            if held is not None:
                held.poll()
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def held_popen(self, pid):
        """The ``subprocess.Popen`` the application still holds that started
        ``pid`` and has not seen its exit, if any."""
        ref = self.popens.get(pid)
        popen = ref() if ref is not None else None
        return popen if popen is not None and popen.returncode is None else None

    def reap_middles(self):
        """Reaps the intermediate children that have exited (they exit at
        once; one still exiting is reaped next time)."""
        left = []
        for pid in self.middles:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done == 0:
                left.append(pid)
        self.middles = left

    def become_worker(self, request, env, middle):
        """In the new worker: everything an exec'd worker would have had."""
        try:
            os.setpgid(0, 0)
            try:
                self.chan.close()
            except OSError:
                pass
            environ = os.environ
            environ.pop(TEMPLATE_FD_VAR, None)
            for item in env:
                name, sep, val = item.partition("=")
                if sep and name:
                    environ[name] = val
            me = str(os.getpid())
            for name in ("LISTEN_PID", "WATCHDOG_PID"):
                if name in environ:
                    environ[name] = me
            for sig, handler in self.worker_signals.items():
                if handler is not None:
                    signal.signal(sig, handler)
            for sig, (handler, _) in _dw._set_here.items():  # the launcher's (SIGUSR1 ignored): the worker's too
                if sig not in self.worker_signals:
                    signal.signal(sig, handler)
            self.await_drover(middle)
            _reset_sdk_after_fork()
            gc.enable()
            random.seed()
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
        except BaseException:
            _write(traceback.format_exc())
            _log("worker setup after the fork failed (traceback above)")
            os._exit(1)
        for fn in _after:
            _call_hook("after_fork", fn)
        try:
            _dw.notify("DROVER_FORKED=%s" % request)
        except OSError as e:
            _log("cannot send DROVER_FORKED to drover: %s" % e)

    def await_drover(self, middle):
        """Waits until the intermediate child has exited and drover is our
        parent, then asks for SIGKILL when drover dies. Exits if it is not."""
        deadline = time.monotonic() + REPARENT_LIMIT
        while True:
            parent = os.getppid()
            if parent != middle:
                break
            if time.monotonic() > deadline:
                _log("worker not re-parented to drover within %.0f s; exiting" % REPARENT_LIMIT)
                os._exit(1)
            time.sleep(0.0002)
        if parent != self.drover:
            _log("worker re-parented to pid %d instead of drover (pid %d): drover must be a child "
                 "subreaper (it is while preload is on) and alive; exiting" % (parent, self.drover))
            os._exit(1)
        # Only now: the parent-death signal fires when the *parent* exits,
        # and until a moment ago that was the intermediate child.
        if self.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            err = self.get_errno()
            _log("prctl(PR_SET_PDEATHSIG) failed: %s; exiting" % os.strerror(err))
            os._exit(1)
        if os.getppid() != self.drover:
            os._exit(1)  # drover died before the signal was armed


#: The template's pid, and the stop handlers it replaced with _on_stop.
_template_pid = None
_replaced: dict = {}
#: The template, once it reaps the application's children (_on_child).
_template = None


def _on_child(signum, frame):
    """SIGCHLD in the template: reap now if it waits for drover, else the
    fork loop does before it waits again (the application's code, a
    before_fork hook, may be running now)."""
    t = _template
    if t is None or not t.idle or os.getpid() != _template_pid:
        return
    try:
        t.reap_children()
    except Exception:
        _write(traceback.format_exc())
        _log("reaping the template's children failed (traceback above); going on")


def _live_popens():
    """``{pid: weakref}`` of the ``subprocess.Popen`` objects whose child
    runs, looked for once, when the application is loaded and before the
    first fork: gc.get_objects() touches every object's reference count,
    which in a template with workers would copy every page of the heap the
    workers share (18 MB of a Flask and Django heap, measured); and only if
    the template has a child at all."""
    sp = sys.modules.get("subprocess")
    if sp is None:
        return {}
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return {}  # no child at all: nothing to look for
    found = {}
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance would ask a proxy for its
        # __class__, which runs its code (a lazy object would load itself).
        if issubclass(type(obj), sp.Popen) and obj.returncode is None:
            found[obj.pid] = weakref.ref(obj)
    return found


def _on_stop(signum, frame):
    if os.getpid() == _template_pid:
        raise _Stop()
    # A process the application forked while it loaded (a
    # multiprocessing.Process) inherited this handler, which is the
    # template's: it gets what it would have had without the template, here
    # the default action (it was dying with a traceback of _Stop).
    handler = _replaced.get(signum)
    if handler is None:
        handler = signal.SIG_DFL
    signal.signal(signum, handler)
    if handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)
    elif callable(handler):
        handler(signum, frame)


def parse_message(data):
    """``KEY=VALUE`` lines → ``{key: [values in order]}``; other lines ignored."""
    fields = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, val = line.partition("=")
        if sep and key:
            fields.setdefault(key, []).append(val)
    return fields


def threads_besides_main():
    """Descriptions of the threads of this process other than the calling
    one: Python threads by name, others by their kernel name (``comm``)."""
    me = threading.get_native_id() if hasattr(threading, "get_native_id") else None
    named = {}
    for t in threading.enumerate():
        tid = getattr(t, "native_id", None)
        if t is not threading.current_thread():
            named[tid] = "%r%s" % (t.name, " (daemon)" if t.daemon else "")
    found = []
    try:
        tids = sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        return list(named.values())
    for tid in tids:
        if tid == me or tid == os.getpid():
            continue
        if tid in named:
            found.append("Python thread %s" % named.pop(tid))
            continue
        try:
            with open("/proc/self/task/%d/comm" % tid) as f:
                comm = f.read().strip()
        except OSError:
            continue  # ended meanwhile
        found.append("native thread %r (tid %d, not started by the threading module)" % (comm, tid))
    return found


def _thread_refusal():
    others = threads_besides_main()
    if not others:
        return None
    return (
        "refusing to fork: the template runs %d thread(s) besides the main thread: %s. "
        "A fork copies only the calling thread, and a lock another thread held stays locked "
        "forever in the worker. Start threads in a @drover_worker.after_fork hook (or when the "
        "first request comes), not while the application is imported; set up there too a library "
        "that starts one when it is imported or set up (a thread or process pool, a metrics or "
        "tracing client), or set preload = false" % (len(others), "; ".join(others))
    )


def open_sockets(channel_fd):
    """Warnings for sockets open in this process other than the listeners
    (fds 3 up to the channel), the channel itself and the SDK's notify
    socket (each worker makes its own)."""
    warnings = []
    notify_fd = _dw._notify_fd()
    for fd in _fds():
        if fd <= 2 or 3 <= fd <= channel_fd or fd == notify_fd:
            continue
        try:
            if not os.readlink("/proc/self/fd/%d" % fd).startswith("socket:"):
                continue
        except OSError:
            continue
        warnings.append(
            "fd %d is a socket the application opened before the fork (%s): every worker "
            "shares it, and two that use it at once corrupt each other's data. Close it in a "
            "@drover_worker.before_fork hook and open it in @drover_worker.after_fork (for "
            "example a database connection)" % (fd, _describe_fd(fd))
        )
    return warnings


#: The first bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def open_databases(channel_fd):
    """Warnings for SQLite database files open in this process: a connection
    the application opened at import (SQLAlchemy's pool keeps it; a query at
    import, a ``create_all()``) is shared by every worker. SQLite's own rule
    is never to carry a connection across a fork: its POSIX locks belong to
    the template, so two workers writing through it can corrupt the
    database. Not a socket, so the check above does not see it."""
    warnings = []
    seen = set()
    for fd in _fds():
        if fd <= 2 or 3 <= fd <= channel_fd:
            continue
        try:
            path = os.readlink("/proc/self/fd/%d" % fd)
            if path in seen or not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            if os.pread(fd, len(SQLITE_HEADER), 0) != SQLITE_HEADER:
                continue
        except OSError:
            continue  # not readable (write-only): not a database connection
        seen.add(path)
        warnings.append(
            "fd %d is the SQLite database %s, opened before the fork: every worker shares that "
            "connection, and SQLite connections must not cross a fork (writes through it can corrupt "
            "the database). Close it in a @drover_worker.before_fork hook (SQLAlchemy: "
            "engine.dispose(); Django: django.db.connections.close_all()), and let each worker "
            "connect again" % (fd, path)
        )
    return warnings


def open_pipes(channel_fd):
    """One warning naming the pipes open in this process, but for the SDK's
    own: a ``multiprocessing.Queue`` made at import, and so a
    ``ProcessPoolExecutor`` or ``multiprocessing.Pool`` (whose queues are
    pipes) made there even if it has not started a process yet. Every worker
    shares them: a task one worker sends is run by the processes another
    started, and its result may reach a third. Not a socket, so the check
    above does not see them."""
    sdk = set(_dw._pipe or ())
    fds = []
    for fd in _fds():
        if fd <= 2 or 3 <= fd <= channel_fd or fd in sdk:
            continue
        try:
            if os.readlink("/proc/self/fd/%d" % fd).startswith("pipe:"):
                fds.append(fd)
        except OSError:
            continue
    if not fds:
        return []
    return [
        "%s opened before the fork: every worker shares %s, so what one worker writes another may "
        "read. A multiprocessing.Queue is one, and so are the queues of a ProcessPoolExecutor or a "
        "multiprocessing Pool made at import, even unused: a worker's task is run by the processes "
        "another started, and its result goes to whichever worker reads first. Make it in a "
        "@drover_worker.after_fork hook (or at first use) instead" % (
            "fd %d is a pipe the application" % fds[0] if len(fds) == 1
            else "fds %s are pipes the application" % ", ".join(str(fd) for fd in fds),
            "it" if len(fds) == 1 else "them")
    ]


def _fds():
    try:
        return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    except OSError:
        return []


def _describe_fd(fd):
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return "?"
    try:
        dgram = s.type == socket.SOCK_DGRAM
        kind = {
            socket.AF_INET: "udp" if dgram else "tcp",
            socket.AF_INET6: "udp6" if dgram else "tcp6",
            socket.AF_UNIX: "unix datagram" if dgram else "unix",
        }.get(s.family, str(s.family))
        try:
            peer = " -> %s" % (_addr(s.getpeername()),)
        except OSError:
            peer = ""
        try:
            local = _addr(s.getsockname())
        except OSError:
            local = "?"
        return "%s %s%s" % (kind, local, peer)
    finally:
        s.close()


def _addr(addr):
    if isinstance(addr, tuple):
        return "%s:%d" % (addr[0], addr[1])
    if isinstance(addr, bytes):
        return "@" + addr[1:].decode("utf-8", "replace") if addr[:1] == b"\0" else addr.decode()
    return addr or "(unnamed)"


def _reset_sdk_after_fork():
    """The SDK's stop pipe, if the template made one, is shared with every
    other worker: each worker gets its own."""
    pipe = _dw._pipe
    if pipe is not None:
        _dw._pipe = None
        for fd in pipe:
            try:
                os.close(fd)
            except OSError:
                pass


def _call_hook(kind, fn):
    try:
        fn()
    except Exception:
        _write(traceback.format_exc())
        _log("%s hook %s failed (traceback above); going on" % (kind, getattr(fn, "__qualname__", fn)))


def _read_line(fd):
    """Up to the first newline (the intermediate child writes its one line in
    one write), or what there is at end of file."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data.strip()


def _write(text):
    _dw._write_stderr(text)


def _exit(code):
    """Leaves the template without running atexit handlers or the cleanup
    registry: those belong to the workers."""
    _dw._flush_and_exit(code)

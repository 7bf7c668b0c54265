"""drover_worker.preload: the template side of the preload protocol, driven
over a socket pair by a fake drover (this test process, a child subreaper),
with no drover binary. Every wait has a deadline; every process is killed."""

import ctypes
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

from tests.helpers import LIMIT, NotifySocket, env_with_sdk, read_response

PR_SET_CHILD_SUBREAPER = 36

# The template under test: loads a fake app (as PROBE_MODE says), then each
# forked worker reports what it got as one notify datagram and waits.
PROBE = """
    import ctypes, gc, json, os, random, signal, socket, sys, threading, time
    import drover_worker as dw
    from drover_worker import preload

    mode = os.environ.get("PROBE_MODE", "")
    hooks = []

    @dw.before_fork
    def before():
        print("before_fork in %d" % os.getpid(), flush=True)
        if mode == "children":  # what the application reads of its children
            print("held popen %r, process %r" % (kept[0].poll(), kept[1].exitcode), flush=True)
        if mode == "hookthread":
            threading.Thread(target=time.sleep, args=(30,), name="started-by-hook", daemon=True).start()

    @dw.after_fork
    def after():
        hooks.append("after_fork")

    @dw.on_exit
    def cleanup():
        print("cleanup ran in %d" % os.getpid(), flush=True)

    kept = []

    if mode == "atfork":  # a library's os.register_at_fork hooks
        def at_fork(kind):
            print("at_fork %s pid=%d worker_id=%s" % (kind, os.getpid(), os.environ.get("DROVER_WORKER_ID")),
                  flush=True)
        os.register_at_fork(before=lambda: at_fork("before"), after_in_child=lambda: at_fork("child"),
                            after_in_parent=lambda: at_fork("parent"))

    def load():
        if mode == "fail":
            import no_such_module_here  # noqa: F401
        if mode == "thread":
            threading.Thread(target=time.sleep, args=(30,), name="poller", daemon=True).start()
        if mode == "socket":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(("127.0.0.1", 53))
            kept.append(s)
        if mode == "sqlite":  # as SQLAlchemy's pool keeps a connection made at import
            import sqlite3
            db = sqlite3.connect(os.environ["PROBE_DB"])
            db.execute("create table if not exists t (x)")
            db.commit()
            kept.append(db)
        if mode == "pool":  # made at import, never used there: no process, no thread yet
            from concurrent.futures import ProcessPoolExecutor
            kept.append(ProcessPoolExecutor(2))
            dw.stop_fd()  # the SDK's own pipe, not the application's
        if mode == "helper":  # a helper process started at import
            import multiprocessing
            def helper_main():  # says so once it runs (a signal before that is lost in the fork)
                dw.notify("X_HELPER=%d" % os.getpid())
                time.sleep(30)
            multiprocessing.get_context("fork").Process(target=helper_main, name="helper").start()
        if mode == "children":  # each exits after the first fork, while the template waits
            import multiprocessing, subprocess
            assert subprocess.run(["sh", "-c", "exit 5"]).returncode == 5  # waited for at import
            kept.append(subprocess.Popen(["sh", "-c", "sleep 1; exit 7"]))  # held, polled later
            process = multiprocessing.get_context("fork").Process(target=lambda: (time.sleep(1), os._exit(3)))
            process.start()
            kept.append(process)
            subprocess.Popen(["sleep", "1"])  # dropped at once
            if os.fork() == 0:  # nothing in Python tracks it
                time.sleep(1)
                os._exit(0)
            kept.append([[i] for i in range(500000)])  # a heap the workers share: 40 MB of lists
        if mode == "slow":
            print("loading", flush=True)
            time.sleep(30)
        return {"gc_during_load": gc.isenabled(), "loaded_in": os.getpid()}

    app = preload.run(load)
    libc = ctypes.CDLL(None, use_errno=True)
    deathsig = ctypes.c_int()
    libc.prctl(2, ctypes.byref(deathsig), 0, 0, 0)  # PR_GET_PDEATHSIG
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    env = os.environ
    report = {
        "pid": os.getpid(), "ppid": int(fields[1]), "pgid": int(fields[2]), "app": app,
        "env": {k: env.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "DROVER_WORKER_ID",
                                        "DROVER_GENERATION", "DROVER_TEMPLATE_FD", "EXTRA")},
        "gc": gc.isenabled(), "frozen": gc.get_freeze_count(),
        "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "sigchld_default": signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL,
        "deathsig": deathsig.value, "hooks": hooks, "random": random.random(),
        "stop_fd": dw.stop_fd(),
    }
    dw.notify("X_REPORT=" + json.dumps(report))
    while True:
        time.sleep(1)
"""


def setUpModule():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def alive(pid):
    """True while ``pid`` (our child) runs; reaps it once it has exited."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == 0


def running(pid):
    """True while ``pid`` (anyone's child) runs: neither gone nor a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid):
    """The children of ``pid``, zombies included."""
    found = []
    for task in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/children" % (pid, task)) as f:
            found += [int(c) for c in f.read().split()]
    return found


def private_dirty(pid):
    """Bytes of memory only ``pid`` maps and has written."""
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Private_Dirty in smaps_rollup")


def wait_gone(pid, timeout=LIMIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.01)
    return False


def _read(f):
    f.seek(0)
    return f.read()


def _redirect(fds):
    """sh redirections putting ``fds`` at 3, 4, ... and closing the sources."""
    moves = ["%d<&%d" % (3 + i, fd) for i, fd in enumerate(fds) if fd != 3 + i]
    closes = ["%d<&-" % fd for fd in fds if fd >= 3 + len(fds)]
    return " ".join(moves + closes)


class FakeDrover:
    """What drover does for a template: a listener at fd 3, the channel at
    fd 4 (DROVER_TEMPLATE_FD), a notify socket with SO_PASSCRED."""

    def __init__(self, command=None, env=None):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.notify = NotifySocket()
        self.notify.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        extra = {"NOTIFY_SOCKET": self.notify.path, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "main",
                 "DROVER_TEMPLATE_FD": "4", "DROVER_WORKER_ID": "0", "DROVER_GENERATION": "1",
                 "DROVER_GRACEFUL_TIMEOUT": "5"}
        extra.update(env or {})
        cmd = command or [sys.executable, "-c", textwrap.dedent(PROBE)]
        self.out = tempfile.TemporaryFile("w+")
        self.err = tempfile.TemporaryFile("w+")
        fds = [self.listener.fileno(), theirs.fileno()]
        self.proc = subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$ exec "$@" %s' % _redirect(fds), "sh"] + cmd,
            env=env_with_sdk(extra), pass_fds=fds, start_new_session=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            # Files, not pipes: the workers keep a pipe open after the template is gone.
            stdout=self.out, stderr=self.err,
        )
        theirs.close()
        self.workers = []
        self.next_id = 1
        self.reports = {}

    def receive(self, timeout=LIMIT):
        """The next channel message as {key: value}, or None at end of file."""
        r, _, _ = select.select([self.chan], [], [], timeout)
        if not r:
            raise AssertionError("no message from the template within %ss" % timeout)
        data = self.chan.recv(4096)
        if not data:
            return None
        return dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)

    def ready(self):
        msg = self.receive()
        if msg != {"READY": "1"}:
            raise AssertionError("expected READY=1, got %r; stderr: %s" % (msg, self.stderr()))

    def fork(self, slot, env=()):
        request = self.next_id
        self.next_id += 1
        lines = ["FORK=%d" % request, "ENV=DROVER_WORKER_ID=%d" % slot] + ["ENV=%s" % e for e in env]
        self.chan.send("\n".join(lines).encode())
        msg = self.receive()
        if msg and "PID" in msg:
            self.workers.append(int(msg["PID"]))
        return request, msg

    def notify_message(self, timeout=LIMIT):
        """(sender pid, {key: value}) of the next notify datagram."""
        r, _, _ = select.select([self.notify.sock], [], [], timeout)
        if not r:
            raise AssertionError("no notify datagram within %ss" % timeout)
        data, anc, _, _ = self.notify.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        return pid, dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)

    def report(self, pid, timeout=LIMIT):
        """Every notify field worker ``pid`` sent, once its X_REPORT is in."""
        deadline = time.monotonic() + timeout
        while "X_REPORT" not in self.reports.get(pid, {}):
            sender, msg = self.notify_message(max(0.01, deadline - time.monotonic()))
            self.reports.setdefault(sender, {}).update(msg)
        return self.reports[pid]

    def wait(self, timeout=LIMIT):
        """The template's exit: (status, stdout, stderr)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("template still running after %ss: %s" % (timeout, self.stderr())) from None
        return self.proc.returncode, _read(self.out), _read(self.err)

    def stderr(self):
        return _read(self.err)

    def close(self):
        for pid in self.workers:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            wait_gone(pid)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(LIMIT)
        self.out.close()
        self.err.close()
        self.chan.close()
        self.listener.close()
        self.notify.close()


class PreloadTest(unittest.TestCase):
    def start(self, **kw):
        d = FakeDrover(**kw)
        self.addCleanup(d.close)
        return d

    def test_workers_are_children_of_drover_with_their_own_state(self):
        d = self.start()
        d.ready()
        reports = []
        for slot in (1, 2):
            request, msg = d.fork(slot, env=["EXTRA=x y=z"])
            self.assertEqual(msg["FORKED"], str(request))
            pid = int(msg["PID"])
            r = d.report(pid)
            self.assertEqual(r["DROVER_FORKED"], str(request), "the worker names its request on NOTIFY_SOCKET")
            rep = json.loads(r["X_REPORT"])
            reports.append(rep)
            self.assertEqual(rep["pid"], pid)
            self.assertEqual(rep["ppid"], os.getpid(), "re-parented to drover (the subreaper)")
            self.assertEqual(rep["pgid"], pid, "its own process group")
            self.assertEqual(rep["env"], {"LISTEN_PID": str(pid), "LISTEN_FDS": "1",
                                          "DROVER_WORKER_ID": str(slot), "DROVER_GENERATION": "1",
                                          "DROVER_TEMPLATE_FD": None, "EXTRA": "x y=z"})
            self.assertEqual(rep["app"], {"gc_during_load": False, "loaded_in": d.proc.pid})
            self.assertTrue(rep["gc"], "gc enabled again in the worker")
            self.assertGreater(rep["frozen"], 0, "the template's objects were frozen")
            self.assertEqual(rep["mask"], [], "empty signal mask")
            self.assertTrue(rep["sigterm_default"], "the template's SIGTERM handler is not the worker's")
            self.assertEqual(rep["deathsig"], signal.SIGKILL)
            self.assertEqual(rep["hooks"], ["after_fork"])
        self.assertNotEqual(reports[0]["random"], reports[1]["random"], "random is reseeded per worker")
        self.assertNotEqual(reports[0]["stop_fd"], -1)
        # The template is alive and single: closing the channel ends it (0),
        # without running the application's cleanup, and the workers stay.
        d.chan.shutdown(socket.SHUT_RDWR)
        status, out, err = d.wait()
        self.assertEqual(status, 0, err)
        self.assertEqual(out.count("before_fork in %d" % d.proc.pid), 2, out)
        self.assertNotIn("cleanup ran", out)
        for pid in d.workers:
            self.assertTrue(alive(pid), "worker %d outlives its template" % pid)

    def test_template_killed_workers_keep_running_and_do_not_hold_the_channel(self):
        d = self.start()
        d.ready()
        _, msg = d.fork(1)
        pid = int(msg["PID"])
        d.report(pid)
        os.kill(d.proc.pid, signal.SIGKILL)
        # End of file on drover's end: no worker kept the template's end open.
        self.assertIsNone(d.receive())
        self.assertEqual(d.wait()[0], -signal.SIGKILL)
        self.assertTrue(alive(pid))

    def test_sigterm_ends_the_template_with_status_0(self):
        d = self.start()
        d.ready()
        d.proc.send_signal(signal.SIGTERM)
        status, out, err = d.wait()
        self.assertEqual(status, 0, err)
        self.assertNotIn("cleanup ran", out)

    def test_sigterm_while_loading_ends_the_template(self):
        d = self.start(env={"PROBE_MODE": "slow"})
        deadline = time.monotonic() + LIMIT
        while "loading" not in _read(d.out) and time.monotonic() < deadline:
            time.sleep(0.01)
        d.proc.send_signal(signal.SIGTERM)
        self.assertEqual(d.wait()[0], 0)

    def test_import_failure_exits_3(self):
        d = self.start(env={"PROBE_MODE": "fail"})
        self.assertIsNone(d.receive(), "no READY=1")
        status, _, err = d.wait()
        self.assertEqual(status, 3, err)
        self.assertIn("No module named 'no_such_module_here'", err)
        self.assertIn("cannot boot: the application could not be loaded in the template", err)

    def test_thread_started_at_import_is_refused_by_name(self):
        d = self.start(env={"PROBE_MODE": "thread"})
        self.assertIsNone(d.receive(), "no READY=1")
        status, _, err = d.wait()
        self.assertEqual(status, 3, err)
        self.assertIn("refusing to fork: the template runs 1 thread(s) besides the main thread", err)
        self.assertIn("Python thread 'poller' (daemon)", err)

    def test_thread_started_by_a_hook_fails_the_request_and_the_template(self):
        d = self.start(env={"PROBE_MODE": "hookthread"})
        d.ready()
        request, msg = d.fork(1)
        self.assertEqual(msg["FAILED"], str(request))
        self.assertIn("'started-by-hook' (daemon)", msg["ERROR"])
        self.assertEqual(d.wait()[0], 3)
        self.assertEqual(d.workers, [])

    def test_socket_opened_at_import_is_warned_about(self):
        d = self.start(env={"PROBE_MODE": "socket"})
        d.ready()
        _, msg = d.fork(1)
        d.report(int(msg["PID"]))
        d.chan.close()
        _, _, err = d.wait()
        self.assertRegex(err, r"warning: fd \d+ is a socket the application opened before the fork "
                              r"\(udp 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:53\)")
        self.assertEqual(err.count("warning: fd"), 1, "the listener and the channel are not warned about")

    def test_sqlite_database_opened_at_import_is_warned_about(self):
        with tempfile.TemporaryDirectory() as tmp:
            db = os.path.join(tmp, "app.db")
            d = self.start(env={"PROBE_MODE": "sqlite", "PROBE_DB": db})
            d.ready()
            _, msg = d.fork(1)
            d.report(int(msg["PID"]))
            d.chan.close()
            _, _, err = d.wait()
        self.assertIn(" is the SQLite database %s, opened before the fork" % db, err)
        self.assertIn("engine.dispose()", err)
        self.assertEqual(err.count("warning: fd"), 1, "one line for the database, none for the listener")

    def test_pipes_opened_at_import_are_warned_about(self):
        d = self.start(env={"PROBE_MODE": "pool"})
        d.ready()
        _, msg = d.fork(1)
        d.report(int(msg["PID"]))
        d.chan.close()
        _, _, err = d.wait()
        # A ProcessPoolExecutor's three queues (call, result, wake-up): six
        # pipe ends, one line; the SDK's stop pipe is not among them.
        self.assertRegex(err, r"warning: fds (\d+, ){5}\d+ are pipes the application opened before the fork")
        self.assertIn("ProcessPoolExecutor", err)
        self.assertEqual(err.count("warning: fd"), 1, err)

    def test_os_register_at_fork_hooks_run_twice_per_worker(self):
        # What docs/workers.md tells a user of os.register_at_fork: the
        # template forks twice, so each hook runs twice per worker, once in
        # the intermediate process; in the worker, after_in_child runs before
        # the worker has its environment (drover_worker.after_fork runs after).
        d = self.start(env={"PROBE_MODE": "atfork"})
        d.ready()
        _, msg = d.fork(3)
        worker = int(msg["PID"])
        self.assertEqual(json.loads(d.report(worker)["X_REPORT"])["env"]["DROVER_WORKER_ID"], "3")
        d.chan.close()
        _, out, _ = d.wait()
        lines = [line.split() for line in out.splitlines() if line.startswith("at_fork ")]
        by_kind = {kind: sorted(p for _, k, p, _ in lines if k == kind) for kind in ("before", "child", "parent")}
        middle = [p for p in by_kind["child"] if p != "pid=%d" % worker]
        self.assertEqual(len(middle), 1, out)
        self.assertEqual(by_kind["before"], sorted(["pid=%d" % d.proc.pid] + middle), out)
        self.assertEqual(by_kind["parent"], by_kind["before"], out)
        self.assertIn(["at_fork", "child", "pid=%d" % worker, "worker_id=0"], lines, out)

    def test_a_process_started_at_import_dies_of_sigterm_quietly(self):
        # It inherited the template's stop handler, whose exception is the
        # template's: before, SIGTERM printed a traceback of _Stop in it.
        d = self.start(env={"PROBE_MODE": "helper"})
        helper = int(d.notify_message()[1]["X_HELPER"])
        d.ready()
        deadline = time.monotonic() + LIMIT
        os.kill(helper, signal.SIGTERM)
        while running(helper) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertFalse(running(helper), "the helper ends at SIGTERM")
        d.chan.close()
        _, _, err = d.wait()
        self.assertNotIn("_Stop", err)
        self.assertNotIn("Traceback", err)

    def test_children_started_at_import_are_reaped_and_their_status_kept(self):
        # The old code left all four zombies until the template exited; one
        # that reaped with os.waitpid(-1) would have taken the statuses the
        # application reads (Popen.poll() then says 0, exitcode None).
        # The children exit after the first fork (which froze the objects
        # that hold them), while the template waits for the next request.
        d = self.start(env={"PROBE_MODE": "children"})
        d.ready()
        d.fork(1)
        deadline = time.monotonic() + LIMIT
        while children(d.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(children(d.proc.pid), [], "reaped while the template waits for drover")
        # Looking for the application's Popen objects then did not touch the
        # heap the worker shares (which copies it: 40 MB more private).
        self.assertLess(private_dirty(d.proc.pid), 20 << 20, "the template copied the shared heap")
        d.fork(2)
        self.assertIn("held popen 7, process 3", _read(d.out).splitlines()[-1], d.stderr())
        # The workers' SIGCHLD is the default again, not the template's.
        rep = json.loads(d.report(d.workers[0])["X_REPORT"])
        self.assertTrue(rep["sigchld_default"])

    def test_drover_wsgi_template_forks_serving_workers(self):
        command = [sys.executable, "-m", "drover_wsgi", "--threads", "2", "apps:app"]
        d = self.start(command=command)
        d.ready()
        _, msg = d.fork(1)
        pid = int(msg["PID"])
        deadline = time.monotonic() + LIMIT
        seen = {}
        while seen.get("READY") != "1" and time.monotonic() < deadline:
            sender, m = d.notify_message(deadline - time.monotonic())
            if sender == pid:
                seen.update(m)
        self.assertEqual(seen.get("READY"), "1", "the forked worker reports ready itself")
        with socket.create_connection(d.listener.getsockname(), timeout=LIMIT) as s:
            s.sendall(b"GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status, _, body = read_response(s.makefile("rb"))
        self.assertEqual(status, 200)
        self.assertEqual(int(body.split()[0]) if body.split() else None, pid, body)
        os.kill(pid, signal.SIGTERM)
        self.assertTrue(wait_gone(pid))


if __name__ == "__main__":
    unittest.main()

"""listeners(): the LISTEN_* checks, names, what is left behind; notify():
the datagrams, as systemd's protocol has them."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import unittest

import drover_worker as dw
from tests.helpers import LIMIT, NotifySocket, env_with_sdk, run_script, spawn_script

PROBE = """
    import json, os, socket, drover_worker as dw
    try:
        socks = dw.listeners()
    except dw.ListenError as e:
        print(json.dumps({"error": str(e)}))
        raise SystemExit(3)
    print(json.dumps({
        "names": [s.name for s in socks],
        "types": [isinstance(s, socket.socket) for s in socks],
        "addrs": [list(s.getsockname()) for s in socks],
        "inheritable": [s.get_inheritable() for s in socks],
        "env": [os.environ.get(v) for v in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")],
        "again": [s.fileno() for s in dw.listeners()],
        "by_name": {k: [s.fileno() for s in v] for k, v in dw.listeners_by_name().items()},
    }))
"""


def run_with_fds(socks, env, pid_expr="$$"):
    """Runs PROBE with ``socks`` at fds 3.. and LISTEN_PID=pid_expr (sh syntax)."""
    redirs = " ".join("%d<&%d" % (3 + i, s.fileno()) for i, s in enumerate(socks))
    cmd = ["sh", "-c", 'LISTEN_PID=%s exec "$@" %s' % (pid_expr, redirs), "sh",
           sys.executable, "-c", textwrap.dedent(PROBE)]
    r = subprocess.run(cmd, env=env_with_sdk(env), pass_fds=[s.fileno() for s in socks],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=LIMIT, text=True)
    import json
    return r.returncode, json.loads(r.stdout or "{}"), r.stderr


class ListenTest(unittest.TestCase):
    def setUp(self):
        self.a = socket.socket()
        self.a.bind(("127.0.0.1", 0))
        self.a.listen()
        self.b = socket.socket()
        self.b.bind(("127.0.0.1", 0))
        self.b.listen()

    def tearDown(self):
        self.a.close()
        self.b.close()

    def test_takes_the_sockets_with_their_names_and_leaves_nothing_behind(self):
        code, out, err = run_with_fds([self.a, self.b], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"})
        self.assertEqual(code, 0, err)
        self.assertEqual(out["names"], ["web", "admin"])
        self.assertEqual(out["types"], [True, True])
        self.assertEqual([a[1] for a in out["addrs"]], [self.a.getsockname()[1], self.b.getsockname()[1]])
        self.assertEqual(out["inheritable"], [False, False])
        self.assertEqual(out["env"], [None, None, None], "the variables are unset")
        self.assertEqual(out["again"], [3, 4], "a second call returns the same sockets")
        self.assertEqual(out["by_name"], {"web": [3], "admin": [4]})

    def test_names_default_to_unknown(self):
        code, out, err = run_with_fds([self.a], {"LISTEN_FDS": "1"})
        self.assertEqual(out["names"], ["unknown"], err)

    def test_a_listen_pid_mismatch_is_refused(self):
        code, out, err = run_with_fds([self.a], {"LISTEN_FDS": "1"}, pid_expr="1")
        self.assertEqual(code, 3)
        self.assertIn("LISTEN_PID is 1 but this process is", out["error"])
        self.assertIn("refusing to use them", out["error"])

    def test_missing_variables_say_to_run_under_drover(self):
        r = run_script(PROBE)
        self.assertEqual(r.returncode, 3)
        self.assertIn("LISTEN_FDS and LISTEN_PID not set", r.stdout)
        self.assertIn("must run under drover (or systemd socket activation)", r.stdout)

    def test_parse_activation_rules(self):
        self.assertEqual(dw.parse_activation("2", "7", "a:b", 7), ["a", "b"])
        self.assertEqual(dw.parse_activation("0", "7", "", 7), [])
        for args, message in [
            (("2", "7", "a", 7), "1 names for LISTEN_FDS=2"),
            (("x", "7", None, 7), "invalid LISTEN_FDS"),
            (("1", "pid", None, 7), "invalid LISTEN_PID"),
            ((None, "7", None, 7), "LISTEN_FDS not set"),
        ]:
            with self.assertRaises(dw.ListenError) as cm:
                dw.parse_activation(*args)
            self.assertIn(message, str(cm.exception))

    def test_a_closed_fd_is_not_a_socket(self):
        code, out, err = run_with_fds([self.a], {"LISTEN_FDS": "2"})
        self.assertEqual(code, 3)
        self.assertIn("inherited fd 4 is not a usable socket", out["error"])


class NotifyTest(unittest.TestCase):
    def test_messages_are_single_datagrams(self):
        n = NotifySocket()
        try:
            r = run_script("""
                import drover_worker as dw
                print(dw.ready(), dw.status("serving\\n3 clients"), dw.heartbeat(), dw.stopping(),
                      dw.extend_timeout(2.5), dw.notify("READY=1\\nSTATUS=two lines"))
            """, env={"NOTIFY_SOCKET": n.path})
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(r.stdout.split(), ["True"] * 6)
            got = [n.recv(1) for _ in range(6)]
            self.assertEqual(got, [
                b"READY=1", b"STATUS=serving 3 clients", b"WATCHDOG=1", b"STOPPING=1",
                b"EXTEND_TIMEOUT_USEC=2500000", b"READY=1\nSTATUS=two lines",
            ])
        finally:
            n.close()

    def test_a_worker_out_of_descriptors_still_notifies(self):
        # A flood of connections can take every descriptor; the heartbeat
        # (WATCHDOG=1) must still go out, or drover kills a worker that still
        # serves. A socket per message failed with EMFILE there.
        n = NotifySocket()
        try:
            r = run_script("""
                import os, resource, drover_worker as dw
                print(dw.ready())
                resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # quick to use up
                held = []
                try:
                    while True:
                        held.append(os.open("/dev/null", os.O_RDONLY))
                except OSError as e:
                    print(e.errno)
                print(dw.heartbeat())
            """, env={"NOTIFY_SOCKET": n.path})
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(r.stdout.split(), ["True", "24", "True"])  # 24: EMFILE
            self.assertEqual([n.recv(1), n.recv(1)], [b"READY=1", b"WATCHDOG=1"])
        finally:
            n.close()

    def test_a_receiver_that_does_not_read_never_holds_a_worker(self):
        # drover's master, stalled, reads nothing, and its queue holds only
        # 10 datagrams: a send to it waited for as long as it did not read.
        # A worker held its stop at STOPPING=1 (seen with a SIGSTOPped
        # drover), and an asyncio launcher its whole loop at a heartbeat.
        # Now a heartbeat or a status is dropped at once, a change of state
        # waits up to NOTIFY_WAIT (1 s), and each says so (BlockingIOError).
        # READY=1 alone waits until it is taken (dropped, a worker that
        # served was killed at boot_timeout), unless a stop is asked.
        n = NotifySocket()
        try:
            p = spawn_script("""
                import os, signal, socket, threading, time, drover_worker as dw
                signal.alarm(8)  # the old SDK waited here until killed
                def fill():
                    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    filler.setblocking(False)
                    try:
                        while True:
                            filler.sendto(b"STATUS=filler", os.environ["NOTIFY_SOCKET"])
                    except BlockingIOError:
                        pass
                def attempt(call):
                    began = time.monotonic()
                    try:
                        call()
                        print("sent")
                    except BlockingIOError as e:
                        print("%.1f|%s" % (time.monotonic() - began, e), flush=True)
                fill()
                for call in (dw.heartbeat, lambda: dw.status("busy"), dw.stopping):
                    attempt(call)
                print("full", flush=True)
                # READY=1 waits past NOTIFY_WAIT until room comes: sent then.
                began = time.monotonic()
                print(dw.ready(), round(time.monotonic() - began, 1), flush=True)
                # Asked to stop, it gives up after NOTIFY_WAIT.
                fill()
                dw.stop_event.set()
                attempt(dw.ready)
            """, env={"NOTIFY_SOCKET": n.path})
            out = []
            while not out or out[-1] != "full":
                line = p.stdout.readline()
                if not line:
                    self.fail((out, p.communicate(timeout=LIMIT)[1]))
                out.append(line.rstrip("\n"))
            time.sleep(1.5 * dw.NOTIFY_WAIT)  # READY=1 waits meanwhile, past NOTIFY_WAIT
            n.recv()  # room for one
            rest, err = p.communicate(timeout=LIMIT)
            self.assertEqual(p.returncode, 0, (out, rest, err))
            dropped, kept = out[:2], out[2:3]
            for line, what in zip(dropped, ("WATCHDOG=1", "STATUS=busy")):
                took, why = line.split("|")
                self.assertLess(float(took), 0.5, line)
                self.assertIn("queue is full (its receiver is not reading): %s dropped" % what, why)
            ready, stopping = rest.splitlines()
            for line, what in ((kept[0], "STOPPING=1"), (stopping, "READY=1")):
                took, why = line.split("|")
                self.assertTrue(0.9 <= float(took) < 3, line)
                self.assertIn("queue stayed full for 1.0s (its receiver is not reading): %s not sent" % what, why)
            sent, took = ready.split()
            self.assertEqual(sent, "True", rest)
            self.assertGreaterEqual(float(took), 1.2, rest)
        finally:
            n.close()

    def test_a_launchers_dropped_heartbeats_are_logged_once_a_second(self):
        # The launchers' beat (_launcher.until_stopped: Hypercorn, Granian's
        # ASGI) to a master whose queue is full logged every WATCHDOG=1 it
        # dropped: here 20 a second. Now one line a second at most, counting
        # those not sent, and one once a beat is sent again.
        p = run_script("""
            import asyncio, json, os, select, shutil, socket, tempfile, time
            tmp = tempfile.mkdtemp()
            path = os.path.join(tmp, "notify")
            master = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            master.bind(path)
            os.environ.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="100000")
            import drover_worker as dw
            from drover_worker import _launcher
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            filler.setblocking(False)
            try:
                while True:
                    filler.sendto(b"STATUS=filler", path)
            except BlockingIOError:
                pass
            lines = []
            log = lambda line: lines.append((time.monotonic(), line))

            async def main():
                beats = asyncio.ensure_future(_launcher.until_stopped(log))
                await asyncio.sleep(1.2)  # stalled: some 24 beats dropped
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not any("sent again" in l for _, l in lines):
                    while select.select([master], [], [], 0)[0]:  # it reads again
                        master.recv(100)
                    await asyncio.sleep(0.02)
                dw.stop_event.set()
                await beats
            asyncio.run(main())
            shutil.rmtree(tmp)
            print(json.dumps(lines))
        """)
        self.assertEqual(p.returncode, 0, p.stderr)
        lines = json.loads(p.stdout)
        text = "\n".join(line for _, line in lines)
        for (t0, _), (t1, _) in zip(lines, lines[1:]):
            self.assertGreaterEqual(t1 - t0, 0.9, text)  # the old code: 0.05
        self.assertTrue(lines[0][1].startswith("cannot send WATCHDOG=1: [Errno 11] the notify socket's queue is full"),
                        text)
        self.assertIn("sent again", lines[-1][1], text)
        counted = sum(int(m.group(1)) if m else 1 for m in (
            re.search(r"; (\d+) not sent", line) for _, line in lines[:-1]))
        self.assertGreaterEqual(counted, 10, text)  # some 24 (fewer on a loaded machine)

    def test_heartbeat_failures_are_logged_at_most_once_a_second(self):
        # The rule of the launchers' and drover-wsgi's heartbeat lines
        # (drover_worker._HeartbeatLog), with a clock of its own: a master
        # that drops every other beat still gets a line a second at most,
        # and no failure goes uncounted.
        n = NotifySocket()
        now = [0.0]
        beats = dw._HeartbeatLog(clock=lambda: now[0])
        lines = []
        saved = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = n.path
        try:
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            filler.setblocking(False)
            for i in range(12):  # a beat every 0.25 s for 3 s
                full = i % 2 == 0
                try:
                    while full:
                        filler.sendto(b"STATUS=filler", n.path)
                except BlockingIOError:
                    pass
                if not full:
                    n.sock.setblocking(False)
                    try:
                        while True:
                            n.sock.recv(100)
                    except BlockingIOError:
                        pass
                beats.beat(lambda line: lines.append((now[0], line)))
                now[0] += 0.25
            filler.close()
        finally:
            if saved is None:
                del os.environ["NOTIFY_SOCKET"]
            else:
                os.environ["NOTIFY_SOCKET"] = saved
            n.close()
        self.assertEqual([(t, line.split(":")[0].split(";")[0]) for t, line in lines], [
            (0.0, "cannot send WATCHDOG=1"),
            (1.0, "cannot send WATCHDOG=1"),
            (2.0, "cannot send WATCHDOG=1"),
        ], lines)
        self.assertTrue(lines[1][1].endswith("; 2 not sent since the last line"), lines)  # at 0.5 and 1.0
        self.assertTrue(lines[2][1].endswith("; 2 not sent since the last line"), lines)
        # Sent again, past the second: the line says so, with what is left.
        n2 = NotifySocket()
        os.environ["NOTIFY_SOCKET"] = n2.path
        try:
            now[0] = 2.75
            beats.beat(lambda line: lines.append((now[0], line)))  # dropped at 2.5, not logged yet
            self.assertEqual(len(lines), 3, lines)
            now[0] = 3.0
            beats.beat(lambda line: lines.append((now[0], line)))
        finally:
            if saved is None:
                del os.environ["NOTIFY_SOCKET"]
            else:
                os.environ["NOTIFY_SOCKET"] = saved
            n2.close()
        self.assertEqual(lines[3], (3.0, "WATCHDOG=1 sent again after 3.0s; 1 more not sent since the last line"))

    def test_a_forked_child_notifies_as_itself(self):
        # The kept socket is the parent's: a child (a preload template's
        # worker) makes its own, and drover sees the child's pid.
        n = NotifySocket()
        try:
            n.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            r = run_script("""
                import os, drover_worker as dw
                dw.status("parent")
                pid = os.fork()
                if pid == 0:
                    dw.status("child")
                    os._exit(0)
                os.waitpid(pid, 0)
                print(os.getpid(), pid)
            """, env={"NOTIFY_SOCKET": n.path})
            self.assertEqual(r.returncode, 0, r.stderr)
            parent, child = map(int, r.stdout.split())
            import struct
            senders = []
            for _ in range(2):
                msg, anc, _, _ = n.sock.recvmsg(100, socket.CMSG_SPACE(12))
                pid = [struct.unpack("iII", d)[0] for _, t, d in anc if t == socket.SCM_CREDENTIALS]
                senders.append((msg, pid))
            self.assertEqual(senders, [(b"STATUS=parent", [parent]), (b"STATUS=child", [child])])
        finally:
            n.close()

    def test_abstract_socket(self):
        name = "drover-test-%d" % os.getpid()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind("\0" + name)
        try:
            r = run_script("import drover_worker as dw; print(dw.ready())", env={"NOTIFY_SOCKET": "@" + name})
            self.assertEqual(r.stdout.strip(), "True", r.stderr)
            s.settimeout(LIMIT)
            self.assertEqual(s.recv(100), b"READY=1")
        finally:
            s.close()

    def test_unset_is_a_no_op(self):
        r = run_script("import drover_worker as dw; print(dw.ready(), dw.status('x'))")
        self.assertEqual(r.stdout.strip(), "False False", r.stderr)

    def test_sender_is_the_process_itself(self):
        # drover checks the sender's pid (SO_PASSCRED): the datagram must come
        # from the worker, not from a helper process.
        n = NotifySocket()
        try:
            n.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            p = subprocess.Popen([sys.executable, "-c", "import drover_worker as dw, os; dw.ready(); print(os.getpid())"],
                                 env=env_with_sdk({"NOTIFY_SOCKET": n.path}), stdout=subprocess.PIPE,
                                 universal_newlines=True)
            out, _ = p.communicate(timeout=LIMIT)
            msg, anc, _, _ = n.sock.recvmsg(100, socket.CMSG_SPACE(12))
            import struct
            pid = [struct.unpack("iII", data)[0] for lvl, typ, data in anc if typ == socket.SCM_CREDENTIALS]
            self.assertEqual(msg, b"READY=1")
            self.assertEqual(pid, [int(out)])
        finally:
            n.close()

    def test_watchdog_interval(self):
        r = run_script("""
            import os, drover_worker as dw
            print(dw.watchdog_interval())
            os.environ["WATCHDOG_USEC"] = "2000000"
            print(dw.watchdog_interval())
            os.environ["WATCHDOG_PID"] = "1"
            print(dw.watchdog_interval())
        """)
        self.assertEqual(r.stdout.split(), ["None", "2.0", "None"], r.stderr)


if __name__ == "__main__":
    unittest.main()

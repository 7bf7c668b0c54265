"""drover_wsgi end to end, without drover: the worker is started as drover
would start it (socket at fd 3, LISTEN_PID, NOTIFY_SOCKET) and driven with
raw HTTP over the socket."""

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import unittest

from tests.helpers import (
    LIMIT,
    WSGI,
    Client,
    Worker,
    env_with_sdk,
    fill_queue,
    filter_everything_in,
    read_stderr_until,
    read_until,
    request,
)

GET = b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n"


def get(path):
    return GET % path.encode()


class ServerTest(unittest.TestCase):
    """One worker for the cases that do not stop it."""

    @classmethod
    def setUpClass(cls):
        cls.w = Worker("apps:app", args=["--threads", "4", "--keepalive", "1"])

    @classmethod
    def tearDownClass(cls):
        cls.w.signal(signal.SIGTERM)
        code, err = cls.w.wait()
        cls.w.close()
        assert code == 0, err

    def test_environ(self):
        body = b"hello body"
        raw = (b"POST /environ/x%20y?q=1&r=%20 HTTP/1.1\r\nHost: example.org:8080\r\nContent-Type: text/plain\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\nX-Custom: a\r\nX-Custom: b\r\n\r\n" + body)
        status, headers, out = request(self.w, raw)
        self.assertEqual(status, 200)
        env = json.loads(out)
        self.assertEqual(env["REQUEST_METHOD"], "POST")
        self.assertEqual(env["SCRIPT_NAME"], "")
        self.assertEqual(env["PATH_INFO"], "/environ/x y")
        self.assertEqual(env["QUERY_STRING"], "q=1&r=%20")
        self.assertEqual(env["RAW_URI"], "/environ/x%20y?q=1&r=%20")
        self.assertEqual(env["CONTENT_TYPE"], "text/plain")
        self.assertEqual(env["CONTENT_LENGTH"], str(len(body)))
        self.assertEqual(env["SERVER_NAME"], "127.0.0.1")
        self.assertEqual(env["SERVER_PORT"], str(self.w.addr[1]))
        self.assertEqual(env["SERVER_PROTOCOL"], "HTTP/1.1")
        self.assertEqual(env["REMOTE_ADDR"], "127.0.0.1")
        self.assertEqual(env["wsgi.url_scheme"], "http")
        self.assertEqual(env["version"], [1, 0])
        self.assertTrue(env["wsgi.multithread"] and env["wsgi.multiprocess"])
        self.assertFalse(env["wsgi.run_once"])
        self.assertEqual(env["headers"], {"HTTP_HOST": "example.org:8080", "HTTP_X_CUSTOM": "a, b"})
        self.assertEqual(env["body"], "hello body")
        self.assertIn("date", headers)

    def test_keep_alive_and_pipelining(self):
        with Client(self.w) as c:
            c.send(get("/pid"))
            s1, h1, b1 = c.response()
            c.send(get("/pid"))
            s2, h2, b2 = c.response()
            self.assertEqual((s1, s2), (200, 200))
            self.assertEqual(b1, b2, "same connection, same worker")
            self.assertNotIn("connection", h1)
            # Two requests in one packet: two responses, in order.
            c.send(get("/list") + get("/pid"))
            self.assertEqual(c.response()[2], b"abcdef")
            self.assertEqual(c.response()[2], b1)

    def test_http10_closes_by_default_and_keeps_alive_on_request(self):
        with Client(self.w) as c:
            c.send(b"GET /pid HTTP/1.0\r\n\r\n")
            status, headers, _ = c.response()
            self.assertEqual(headers.get("connection"), "close")
            self.assertTrue(c.eof_within(2))
        with Client(self.w) as c:
            c.send(b"GET /pid HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            _, headers, _ = c.response()
            self.assertEqual(headers.get("connection"), "keep-alive")
            c.send(b"GET /gen HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, body = c.response()
            # Unknown length on HTTP/1.0: delimited by the close.
            self.assertEqual((body, headers.get("connection")), (b"chunk0;chunk1;chunk2;", "close"))

    def test_framing(self):
        status, headers, body = request(self.w, get("/gen"))
        self.assertEqual((headers.get("transfer-encoding"), body), ("chunked", b"chunk0;chunk1;chunk2;"))
        status, headers, body = request(self.w, get("/list"))
        self.assertEqual((headers.get("content-length"), body), ("6", b"abcdef"))
        status, headers, body = request(self.w, get("/gen-empty"))
        self.assertEqual((headers.get("content-length"), body), ("0", b""))
        status, headers, body = request(self.w, get("/write"))
        self.assertEqual(body, b"written;returned")
        status, headers, body = request(self.w, get("/nocontent"))
        self.assertEqual(status, 204)
        self.assertNotIn("content-length", headers)
        self.assertNotIn("transfer-encoding", headers)
        status, headers, body = request(self.w, b"HEAD /pid HTTP/1.1\r\nHost: t\r\n\r\n", head_only=True)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-length"], str(len(str(self.w.proc.pid))))

    def test_head_sends_no_body_and_keeps_the_connection(self):
        with Client(self.w) as c:
            c.send(b"HEAD /gen HTTP/1.1\r\nHost: t\r\n\r\n" + get("/list"))
            status, headers, _ = c.response(head_only=True)
            self.assertEqual(status, 200)
            self.assertEqual(c.response()[2], b"abcdef")

    def test_app_errors(self):
        status, headers, body = request(self.w, get("/error"))
        self.assertEqual((status, headers.get("connection")), (500, "close"))
        # sys.exit() in the app is its failure too (a 500, both cores; the
        # pure-Python core closed the connection unanswered).
        status, headers, body = request(self.w, get("/sys-exit"))
        self.assertEqual((status, headers.get("connection")), (500, "close"))
        # Mid-body: the chunked body is not terminated, the connection closes.
        with Client(self.w) as c:
            c.send(get("/error-after-start"))
            with self.assertRaises((ValueError, ConnectionError)):
                c.response()
        status, headers, body = request(self.w, get("/exc-info"))
        self.assertEqual((status, body), (503, b"replaced"))
        self.assertIn("x-second", headers)
        self.assertNotIn("x-first", headers)
        for path in ("/bad-header", "/bad-header-name", "/empty-header-name", "/nul-in-header"):
            status, _, _ = request(self.w, get(path))
            self.assertEqual(status, 500, path)
        status, _, _ = request(self.w, get("/non-latin-1-header"))
        self.assertEqual(status, 500)
        status, headers, body = request(self.w, get("/bad-header-retried"))
        self.assertEqual((status, headers.get("x-retried"), body), (200, "1", b"retried"))
        self.assertNotIn("x-good", headers)
        # Outside 200-599: a 500 (before, a 103 went out as the final status,
        # with no body and the connection kept: the client waited on).
        for path in ("/interim-status", "/status-600", "/dict-headers"):
            status, headers, _ = request(self.w, get(path))
            self.assertEqual((status, headers.get("connection")), (500, "close"), path)
        # A result whose len() is 1 but yields more: all of it, streamed (before, both
        # cores sent the first block with its Content-Length and dropped the rest).
        status, headers, body = request(self.w, get("/len-lies"))
        self.assertEqual((status, headers.get("transfer-encoding"), body), (200, "chunked", b"abc"))
        status, headers, body = request(self.w, get("/list-header"))
        self.assertEqual((status, headers.get("x-list"), body), (200, "yes", b"ok"))
        # Content-Length promised, fewer bytes sent: the client sees the close.
        with Client(self.w) as c:
            c.send(get("/short"))
            with self.assertRaises(ConnectionError):
                c.response()
        # Still serving.
        self.assertEqual(request(self.w, get("/pid"))[0], 200)

    def test_request_bodies(self):
        with Client(self.w) as c:
            # The app reads 3 of 10 bytes; the rest is discarded before the next request.
            c.send(b"POST /partial HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n0123456789")
            self.assertEqual(c.response()[2], b"012")
            c.send(b"POST /lines HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\na\nbb\nccc")
            self.assertEqual(json.loads(c.response()[2]), ["a\n", "bb\n", "ccc"])
        with Client(self.w) as c:
            # Expect: 100-continue: the interim response comes when the app reads.
            c.send(b"POST /environ HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            status, _, _ = c.response()
            self.assertEqual(status, 100)
            c.send(b"data")
            status, _, body = c.response()
            self.assertEqual((status, json.loads(body)["body"]), (200, "data"))
        # A body sent slowly, in pieces.
        with Client(self.w) as c:
            c.send(b"POST /environ HTTP/1.1\r\nHost: t\r\nContent-Le")
            time.sleep(0.05)
            c.send(b"ngth: 6\r\n\r\nabc")
            time.sleep(0.05)
            c.send(b"def")
            self.assertEqual(json.loads(c.response()[2])["body"], "abcdef")

    def test_bad_requests_are_answered_and_closed(self):
        for raw, status in [
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
            (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 400),
            (b"GET / HTTP/3.0\r\nHost: t\r\n\r\n", 505),
            (b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        ]:
            with Client(self.w) as c:
                c.send(raw)
                got, headers, _ = c.response()
                self.assertEqual(got, status, raw[:40])
                self.assertEqual(headers.get("connection"), "close")
                self.assertTrue(c.eof_within(3), "closed after the error")

    def test_the_app_closes_the_connection(self):
        with Client(self.w) as c:
            c.send(get("/close"))
            _, headers, body = c.response()
            self.assertEqual((headers.get("connection"), body), ("close", b"ok"))
            self.assertTrue(c.eof_within(3))

    def test_an_idle_keep_alive_connection_times_out_with_eof(self):
        with Client(self.w) as c:
            c.send(get("/pid"))
            c.response()
            began = time.monotonic()
            self.assertTrue(c.eof_within(5))
            self.assertGreater(time.monotonic() - began, 0.5)

    def test_threads_serve_concurrently(self):
        began = time.monotonic()
        results = []
        ts = [threading.Thread(target=lambda: results.append(request(self.w, get("/sleep?ms=600"))[0]))
              for _ in range(4)]
        [t.start() for t in ts]
        [t.join(LIMIT) for t in ts]
        self.assertEqual(results, [200] * 4)
        self.assertLess(time.monotonic() - began, 2.0, "4 threads: the sleeps overlap")

    def test_a_client_that_sends_its_request_late_is_served(self):
        # A connection accepted before its request is parked until the
        # request comes: one that is quiet for a while must not be lost.
        with Client(self.w) as c:
            time.sleep(1.5)
            c.send(get("/pid"))
            self.assertEqual(c.response()[0], 200)

    def test_a_blocking_request_does_not_hold_the_others(self):
        # The thread that polls serves what it took; once it blocks, another
        # thread must take over the listener and the parked connections.
        with Client(self.w) as idle, Released(2.6) as release:
            idle.send(get("/pid"))
            self.assertEqual(idle.response()[0], 200)
            slow = threading.Thread(target=lambda: request(self.w, get("/hold?" + release.path)))
            slow.start()
            time.sleep(0.3)
            began = time.monotonic()
            idle.send(get("/pid"))
            self.assertEqual(idle.response()[0], 200)
            self.assertEqual(request(self.w, get("/pid"))[0], 200)
            self.assertLess(time.monotonic() - began, 2.0, "served while /hold runs")
            release.now()
            slow.join(LIMIT)

    def test_a_cpu_bound_request_does_not_hold_the_others_for_long(self):
        # A thread that runs (not blocked) keeps the right to poll for a
        # while (native core); past that, another thread takes over, and
        # the GIL's switch interval lets it answer.
        with Released(2.0) as release:
            spin = threading.Thread(target=lambda: request(self.w, get("/spin-until?" + release.path)))
            spin.start()
            time.sleep(0.3)
            began = time.monotonic()
            self.assertEqual(request(self.w, get("/pid"))[0], 200)
            self.assertLess(time.monotonic() - began, 1.0, "served while /spin-until runs")
            release.now()
            spin.join(LIMIT)

    def test_many_idle_connections_do_not_block_the_pool(self):
        idle = []
        try:
            for _ in range(10):  # more than the 4 threads
                c = Client(self.w)
                c.send(get("/pid"))
                c.response()
                idle.append(c)
            self.assertEqual(request(self.w, get("/pid"))[0], 200)
        finally:
            for c in idle:
                c.close()


class Released:
    """A file that releases the app's /hold requests (/hold?PATH): made by
    now(), or at the latest ``after`` seconds (so that a test whose fast
    request waits for the held one, the defect it looks for, fails on its
    time bound instead of waiting for its socket's timeout); removed at the
    end."""

    def __init__(self, after):
        self.path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "drover-wsgi-release-%d-%d" % (os.getpid(), id(self)))
        self.timer = threading.Timer(after, self.now)

    def now(self):
        with open(self.path, "w"):
            pass

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.timer.join()
        if os.path.exists(self.path):
            os.unlink(self.path)


class HeldResponsesTest(unittest.TestCase):
    """The native core holds a whole response while more requests of the same
    batch wait to be served, and sends the held ones together (pool.rs)."""

    def test_every_response_reaches_its_own_connection(self):
        with Worker("apps:app", args=["--threads", "4"]) as w:
            wrong = []

            def client(n):
                with Client(w) as c:
                    for i in range(150):
                        path = "/environ/%d-%d" % (n, i)
                        c.send(get(path))
                        status, _, body = c.response()
                        if status != 200 or json.loads(body)["PATH_INFO"] != path:
                            wrong.append((path, status, body[:80]))

            ts = [threading.Thread(target=client, args=(n,)) for n in range(16)]
            [t.start() for t in ts]
            [t.join(LIMIT) for t in ts]
            self.assertFalse(any(t.is_alive() for t in ts), "a client is still waiting")
            self.assertEqual(wrong, [])

    def test_a_held_response_does_not_wait_for_a_slow_request_after_it(self):
        # Both threads sleep; meanwhile a fast request and then a slow one
        # come on two kept-alive connections: the first thread free takes
        # both in one poll, serves the fast one (its response may be held,
        # the slow one being next), then sleeps in the slow one. The other
        # thread, free too, takes over and must send what is held.
        with Worker("apps:app", args=["--threads", "2"]) as w, Released(4.0) as release:
            fast, slow = Client(w), Client(w)
            for c in (fast, slow):
                c.send(get("/pid"))
                self.assertEqual(c.response()[0], 200)
            sleepers = [Client(w) for _ in range(2)]
            for c in sleepers:
                c.send(get("/sleep?ms=500"))
                w.notify.wait_for(b"STATUS=sleeping")
            began = time.monotonic()
            fast.send(get("/pid"))
            slow.send(get("/hold?" + release.path))
            self.assertEqual(fast.response()[0], 200)
            took = time.monotonic() - began
            self.assertLess(took, 2.5, "the fast response waited for the slow request")
            release.now()
            for c in sleepers:
                self.assertEqual(c.response()[0], 200)
            self.assertEqual(slow.response()[0], 200)
            for c in [fast, slow] + sleepers:
                c.close()

    def test_with_one_thread_a_held_response_does_not_wait_for_a_slow_request(self):
        # The one thread sleeps in a request while a fast request and then
        # a slow one come on two kept-alive connections; it takes both in
        # its next poll, serves the fast one (its response may be held, the
        # slow one being next), then sleeps in the slow one. No thread can
        # take over: the timer thread must send what is held.
        with Worker("apps:app", args=["--threads", "1"]) as w, Released(4.0) as release:
            fast, slow, sleeper = Client(w), Client(w), Client(w)
            for c in (fast, slow, sleeper):
                c.send(get("/pid"))
                self.assertEqual(c.response()[0], 200)
            sleeper.send(get("/sleep?ms=500"))
            w.notify.wait_for(b"STATUS=sleeping")
            began = time.monotonic()
            fast.send(get("/pid"))
            slow.send(get("/hold?" + release.path))
            self.assertEqual(sleeper.response()[0], 200)
            self.assertEqual(fast.response()[0], 200)
            took = time.monotonic() - began
            self.assertLess(took, 2.5, "the fast response waited for the slow request")
            release.now()
            self.assertEqual(slow.response()[0], 200)
            # The connection whose response the timer thread sent serves on.
            fast.send(get("/pid"))
            self.assertEqual(fast.response()[0], 200)
            for c in (fast, slow, sleeper):
                c.close()

    def test_a_held_response_its_client_does_not_read_costs_the_timer_thread_no_cpu(self):
        # As above, but the fast response is 8 MB and its client does not
        # read it while the slow request runs: the timer thread sends what
        # the socket takes and keeps the rest. It tried again every look
        # (1 ms) and copied the rest each time: 0.27 s of CPU in 2 s.
        with Worker("apps:app", args=["--threads", "1"]) as w:
            fast, slow, sleeper = Client(w), Client(w), Client(w)
            for c in (fast, slow, sleeper):
                c.send(get("/pid"))
                self.assertEqual(c.response()[0], 200)
            if _timer_thread(w.proc.pid) is None:
                self.skipTest("no timer thread: the pure-Python core holds no response")
            sleeper.send(get("/sleep?ms=500"))
            w.notify.wait_for(b"STATUS=sleeping")
            fast.send(get("/big?mib=8"))
            slow.send(get("/sleep?ms=2500"))
            self.assertEqual(sleeper.response()[0], 200)
            before = _timer_thread(w.proc.pid)
            time.sleep(2)
            cpu = (_timer_thread(w.proc.pid)[0] - before[0]) / os.sysconf("SC_CLK_TCK")
            status, _, body = fast.response()
            self.assertEqual((status, len(body)), (200, 8 << 20))
            self.assertEqual(slow.response()[0], 200)
            self.assertLess(cpu, 0.1, "CPU of the timer thread while the held response waited")
            for c in (fast, slow, sleeper):
                c.close()

    def test_a_thread_stuck_in_a_request_holding_nothing_is_not_watched_every_millisecond(self):
        # The one thread sleeps in a lone request: nothing is held, no thread
        # can take over; the timer thread has nothing to do but its calm
        # looks (CALM, 10 ms). It looked every millisecond (HANDOFF) for the
        # whole request: 1400 wake-ups in 1.5 s.
        with Worker("apps:app", args=["--threads", "1"]) as w:
            self.assertEqual(request(w, get("/pid"))[0], 200)
            if _timer_thread(w.proc.pid) is None:
                self.skipTest("no timer thread: the pure-Python core")
            with Client(w) as slow:
                slow.send(get("/sleep?ms=2500"))
                w.notify.wait_for(b"STATUS=sleeping")
                time.sleep(0.2)
                before = _timer_thread(w.proc.pid)
                time.sleep(1.5)
                wakeups = _timer_thread(w.proc.pid)[1] - before[1]
                self.assertEqual(slow.response()[0], 200)
            self.assertLess(wakeups, 500, "the timer thread's wake-ups in 1.5 s")


def _timer_thread(pid):
    """The native core's timer thread: (CPU time in clock ticks, voluntary
    context switches); None on the pure-Python core (it has none). It may
    start after the first request is served: waited for."""
    if os.environ.get("DROVER_WSGI_CORE") == "python":
        return None
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        for tid in os.listdir("/proc/%d/task" % pid):
            base = "/proc/%d/task/%s/" % (pid, tid)
            with open(base + "comm") as f:
                if f.read().strip() != "drover-wsgi-tim":  # comm: 15 characters
                    continue
            with open(base + "stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(base + "status") as f:
                switches = int(f.read().split("voluntary_ctxt_switches:")[1].split()[0])
            return int(fields[11]) + int(fields[12]), switches
        time.sleep(0.01)
    raise AssertionError("no thread drover-wsgi-timers in the worker")


class LifecycleTest(unittest.TestCase):
    """Stops, recycling and boot failures: one worker each."""

    def setUp(self):
        self.tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), "drover-wsgi-test-%d-%d" % (os.getpid(), id(self)))

    def tearDown(self):
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def cleanup_lines(self):
        try:
            with open(self.tmp) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def test_a_forked_child_returning_into_the_server_exits(self):
        # os.fork() in a view whose child returns: the child exits at once
        # (without answering, serving or running the registry), the worker
        # answers and serves on. Before, the child answered on the same
        # connection too, and lived on: under the native core it took over
        # the listeners and served requests outside drover's watch.
        with Worker("apps:app", args=["--threads", "2"], env={"APPS_CLEANUP_FILE": self.tmp}) as w:
            status, _, body = request(w, get("/fork"))
            self.assertEqual((status, body), (200, b"child exited 0"))
            pids = {request(w, get("/pid"))[2] for _ in range(8)}
            self.assertEqual(pids, {str(w.proc.pid).encode()})
            w.signal(signal.SIGTERM)
            code, err = w.wait()
            self.assertEqual(code, 0, err)
            self.assertIn("the child of os.fork() in a request returned from the application", err)
            self.assertEqual(self.cleanup_lines(), ["cleanup %d" % w.proc.pid], "the registry ran once, in the worker")

    def test_a_child_the_app_forks_ends_at_sigterm(self):
        # The child inherited the worker's stop handlers (it ignored SIGTERM)
        # and, under the native core, a pool thread's mask (every signal
        # blocked): Process.terminate() waited in vain, and so did the view.
        with Worker("apps:app", args=["--threads", "2"]) as w:
            status, _, body = request(w, get("/terminate-child"))
            self.assertEqual((status, body), (200, b"child exit -15"))
            # Nor the other handlers drover-wsgi sets: the child ignored
            # SIGUSR1 (the default ends it) and had SIGWINCH's wind-down.
            status, _, body = request(w, get("/child-signals"))
            self.assertEqual((status, body), (200, b"winch Handlers usr1 exit -10"))
            w.signal(signal.SIGTERM)
            code, err = w.wait()
            self.assertEqual(code, 0, err)

    def test_stop_signals_the_app_blocked_at_its_import_are_unblocked(self):
        # Before, the pool's threads inherited the mask: SIGTERM stayed
        # pending, and the stop waited for drover's SIGKILL, without the registry.
        env = {"APPS_CLEANUP_FILE": self.tmp, "APPS_BLOCK_STOP_SIGNALS": "1"}
        with Worker("apps:app", args=["--threads", "2"], env=env) as w:
            self.assertEqual(request(w, get("/pid"))[0], 200)
            w.signal(signal.SIGTERM)
            code, err = w.wait(timeout=10)
            self.assertEqual(code, 0, err)
            self.assertIn("the application blocked SIGINT, SIGTERM at its import", err)
            self.assertEqual(self.cleanup_lines(), ["cleanup %d" % w.proc.pid])

    def test_the_log_names_a_bad_status_or_header(self):
        with Worker("apps:app") as w:
            for path in ("/non-latin-1-header", "/interim-status", "/dict-headers"):
                self.assertEqual(request(w, get(path))[0], 500)
            w.signal(signal.SIGTERM)
            code, err = w.wait()
        self.assertEqual(code, 0, err)
        # The pure-Python core said "'latin-1' codec can't encode character
        # '\u20ac' in position 59", the native one '"€" cannot be encoded'.
        self.assertIn("ValueError: invalid header ('X-Euro', '\u20ac'): not latin-1", err)
        self.assertIn("ValueError: status '103 Early Hints': a response's status is 200 to 599", err)
        # Before, the pure-Python core sent {"XA": "1"} as "X: A"; the native
        # one said "'str' object is not an instance of 'tuple'".
        self.assertIn("TypeError: response headers are a list of (name, value) pairs, not a dict holding 'XA'", err)

    def test_a_client_that_stops_reading_a_streamed_body_is_dropped_at_the_io_timeout(self):
        # 300 MiB streamed to a client that reads 64 KiB and stops: the
        # connection ends about --io-timeout after the client's last take.
        # Before, the pure-Python core's blocking sendall() started its
        # SO_SNDTIMEO anew at every trickle of progress: the stream went on.
        with Worker("apps:app", args=["--threads", "2", "--io-timeout", "0.5"]) as w:
            s = w.connect()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(get("/stream?mib=300"))
            s.recv(65536)
            time.sleep(1.3)
            got = 0
            while True:
                data = s.recv(1 << 20)
                if not data:
                    break
                got += len(data)
            s.close()
            self.assertLess(got, 100 << 20, "the stream went on after the client stopped reading")
            self.assertEqual(request(w, get("/pid"))[0], 200)

    def test_graceful_stop(self):
        with Worker("apps:app", args=["--threads", "1"], env={"APPS_CLEANUP_FILE": self.tmp}) as w:
            idle = Client(w)
            idle.send(get("/pid"))
            idle.response()
            busy = Client(w)
            busy.send(get("/sleep?ms=800"))
            w.notify.wait_for(b"STATUS=sleeping")  # the only thread is busy now
            queued = Client(w)  # in the listen queue: nobody accepts while the pool is busy
            queued.send(get("/pid"))
            w.signal(signal.SIGTERM)
            self.assertEqual(busy.response()[:3:2], (200, b"slept 800"))
            status, headers, _ = queued.response()
            self.assertEqual((status, headers.get("connection")), (200, "close"), "queued connection served")
            self.assertTrue(idle.eof_within(5), "idle keep-alive connection closed with EOF")
            for c in (idle, busy, queued):  # answered: the worker's lingering closes end at once
                c.close()
            code, err = w.wait()
            self.assertEqual(code, 0, err)
            self.assertEqual(self.cleanup_lines(), ["cleanup %d" % w.proc.pid])
            w.notify.wait_for(b"STOPPING=1")
            self.assertIn("1 queued connection(s) taken", err)

    def test_a_stopping_worker_takes_what_was_queued_at_its_stop_not_later(self):
        # What arrives after a worker's stop is for the other workers (a
        # reload's new ones): here it stays in the queue, that this test
        # holds. Through TCP_INFO and, for a Unix socket, sock_diag (in the
        # core of DROVER_WSGI_CORE: tests/python.rs runs this for each). With
        # nothing queued at the stop, the log said "the queue is empty"
        # although it held the late connection: it was never looked at.
        release = self.tmp + ".release"
        for family in (socket.AF_INET, socket.AF_UNIX):
            for queued_at_stop in (1, 0):
                with self.subTest(family=family.name, queued_at_stop=queued_at_stop):
                    if os.path.exists(release):
                        os.unlink(release)
                    self._late_connection_left_in_queue(family, queued_at_stop, release)
        os.unlink(release)

    def _late_connection_left_in_queue(self, family, queued_at_stop, release):
        err = self._stop_with_a_late_connection(family, queued_at_stop, release, shutdown=False)
        self.assertIn("listeners closed (what was queued at the stop is taken): %d queued connection(s) taken"
                      % queued_at_stop, err)
        self.assertNotIn("cannot read the length", err)

    def test_a_stop_that_cannot_read_its_queue_length_says_so(self):
        # Without sock_diag's answer (no unix_diag module; or, as here and
        # under systemd's PrivateNetwork= with a socket unit, the worker in a
        # network namespace of its own, where the kernel does not find its
        # Unix listener by inode) a graceful stop
        # takes from the queue by the older rule. It did so without a word.
        prefix = None
        for candidate in (["unshare", "-n"], ["unshare", "-rn"]):
            try:
                if subprocess.run(candidate + ["true"], stderr=subprocess.DEVNULL, timeout=LIMIT).returncode == 0:
                    prefix = candidate
                    break
            except FileNotFoundError:
                break
        if prefix is None:
            self.skipTest("unshare cannot make a network namespace here")
        cmd = prefix + WSGI + ["--threads", "1", "apps:app"]
        with Worker("apps:app", command=cmd, family=socket.AF_UNIX) as w:
            busy = Client(w)
            busy.send(get("/sleep?ms=500"))
            w.notify.wait_for(b"STATUS=sleeping")  # the only thread is busy now
            queued = Client(w)
            queued.send(get("/pid"))
            w.signal(signal.SIGTERM)
            self.assertEqual(busy.response()[0], 200)
            self.assertEqual(queued.response()[0], 200)  # still taken, by the older rule
            busy.close()  # answered: the worker's lingering closes end at once
            queued.close()
            code, err = w.wait()
            self.assertEqual(code, 0, err)
        lines = [line for line in err.splitlines() if "stopping (graceful)" in line]
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].endswith(
            "stopping (graceful): 0 parked connection(s); cannot read the length of the listen queue of main "
            "(sock_diag failed: no unix_diag module in the kernel, or the socket was made in another network "
            "namespace, as with systemd's PrivateNetwork=): queued connections are taken while "
            "a request of the usual duration ends before the drain deadline, not only those queued at the stop"),
            lines[0])

    def test_at_a_shutdown_a_connection_that_arrives_after_the_stop_is_served(self):
        # At a shutdown drover's filter keeps new connections out, but a
        # handshake under way completes after it, maybe after the worker's
        # stop: such a connection is served, not left to a reset when the
        # last copy of the listener closes. The filter here lets everything
        # in, so that a connection can come after the stop.
        release = self.tmp + ".release"
        err = self._stop_with_a_late_connection(socket.AF_UNIX, 1, release, shutdown=True)
        self.assertIn("listeners closed (the queue is empty): 2 queued connection(s) taken", err)
        os.unlink(release)

    def _stop_with_a_late_connection(self, family, queued_at_stop, release, shutdown):
        """A worker of one busy thread, queued_at_stop connections queued,
        SIGTERM (behind a filter, as at drover's shutdown, if ``shutdown``),
        then one more connection: served at a shutdown, else left in the
        queue this test holds. Returns the worker's stderr."""
        with Worker("apps:app", args=["--threads", "1"], family=family) as w:
            busy = Client(w)
            busy.send(get("/hold?" + release))
            w.notify.wait_for(b"STATUS=holding")  # the only thread is busy now
            early = [Client(w) for _ in range(queued_at_stop)]
            for c in early:
                c.send(get("/pid"))
            if shutdown:
                filter_everything_in(w.listener)
            w.signal(signal.SIGTERM)
            # The queue's length is read before this line.
            err = read_stderr_until(w, "stopping (graceful)")
            late = Client(w)
            late.send(get("/pid"))
            with open(release, "w"):
                pass
            self.assertEqual(busy.response()[:3:2], (200, b"released"))
            for c in early + ([late] if shutdown else []):
                self.assertEqual(c.response()[0], 200)
            for c in [busy] + early + ([late] if shutdown else []):  # the lingering closes end at once
                c.close()
            code, rest = w.wait()
            err += rest
            self.assertEqual(code, 0, err)
            if not shutdown:
                w.listener.settimeout(LIMIT)
                conn, _ = w.listener.accept()  # the late connection, left in the queue
                with conn:
                    conn.settimeout(LIMIT)
                    self.assertEqual(conn.recv(100), get("/pid"))
            for c in [busy, late] + early:
                c.close()
            return err

    def test_a_request_already_on_an_idle_connection_is_served_at_stop(self):
        with Worker("apps:app", args=["--threads", "1"]) as w:
            idle = Client(w)
            idle.send(get("/pid"))
            idle.response()
            busy = Client(w)
            busy.send(get("/sleep?ms=600"))
            w.notify.wait_for(b"STATUS=sleeping")
            idle.send(get("/list"))  # arrives while the only thread is busy
            time.sleep(0.1)
            w.signal(signal.SIGTERM)
            status, headers, body = idle.response()
            self.assertEqual((status, body, headers.get("connection")), (200, b"abcdef", "close"))
            self.assertEqual(busy.response()[0], 200)
            idle.close()  # answered: the worker's lingering closes end at once
            busy.close()
            self.assertEqual(w.wait()[0], 0)

    def test_quick_stop_gives_in_flight_requests_a_second(self):
        with Worker("apps:app", env={"APPS_CLEANUP_FILE": self.tmp}) as w:
            slow = Client(w)
            slow.send(get("/sleep?ms=10000"))
            w.notify.wait_for(b"STATUS=sleeping")
            began = time.monotonic()
            w.signal(signal.SIGQUIT)
            code, err = w.wait()
            self.assertEqual(code, 0, err)
            self.assertLess(time.monotonic() - began, 4)
            self.assertEqual(len(self.cleanup_lines()), 1)
            self.assertIn("stopping (quick)", err)
            slow.close()

    def test_a_graceful_stop_escalates_to_quick(self):
        with Worker("apps:app") as w:
            slow = Client(w)
            slow.send(get("/sleep?ms=10000"))
            w.notify.wait_for(b"STATUS=sleeping")
            began = time.monotonic()
            w.signal(signal.SIGTERM)
            time.sleep(0.3)
            w.signal(signal.SIGQUIT)
            code, err = w.wait()
            self.assertEqual(code, 0, err)
            self.assertLess(time.monotonic() - began, 4)
            self.assertIn("abandoning 1 busy thread(s)", err)
            slow.close()

    def test_heartbeats_and_sigusr1(self):
        with Worker("apps:app", env={"WATCHDOG_USEC": "200000"}) as w:
            w.notify.wait_for(b"WATCHDOG=1", timeout=5)
            w.signal(signal.SIGUSR1)  # drover forwards it ("reopen logs"): not fatal
            time.sleep(0.1)
            self.assertEqual(request(w, get("/pid"))[0], 200)
            w.signal(signal.SIGTERM)
            self.assertEqual(w.wait()[0], 0)

    def test_heartbeats_a_stalled_master_drops_are_logged_once_a_second(self):
        # drover's master stalled (its notify queue full) drops every
        # WATCHDOG=1, and each was a line on standard error: two a second
        # per worker at drover's timeout = "1s", here 20 (a beat every 50
        # ms). Now a line a second at most, with the count of those not sent
        # since the last one, and a line once they are sent again.
        with Worker("apps:app", env={"WATCHDOG_USEC": "100000"}) as w:
            w.notify.wait_for(b"WATCHDOG=1", timeout=5)
            fill_queue(w.notify.path)
            stalled = time.monotonic()
            time.sleep(1.2)  # the stall: some 24 beats are dropped
            done = threading.Event()
            drain = threading.Thread(target=read_until, args=(w.notify.sock, done))
            drain.start()  # the master reads again
            try:
                err = read_stderr_until(w, "WATCHDOG=1 sent again")
            finally:
                done.set()
                drain.join()
            took = time.monotonic() - stalled
            w.signal(signal.SIGTERM)
            code, rest = w.wait()
            self.assertEqual(code, 0, err + rest)
        lines = [line for line in (err + rest).splitlines() if "WATCHDOG=1" in line]
        self.assertLessEqual(len(lines), took + 2, "\n".join(lines))
        self.assertRegex(lines[0], r"cannot send WATCHDOG=1: \[Errno 11\] the notify socket's queue is full "
                                   r"\(its receiver is not reading\): WATCHDOG=1 dropped$")
        self.assertRegex(lines[-1], r"WATCHDOG=1 sent again after \d+\.\ds(; \d+ more not sent since the last line)?$")
        counted = sum(int(m.group(1)) if m else 1 for m in (
            re.search(r"; (\d+) (?:more )?not sent", line) for line in lines[:-1]))
        counted += sum(int(m.group(1)) for m in re.finditer(r"; (\d+) more not sent", lines[-1]))
        self.assertGreaterEqual(counted, 10, "\n".join(lines))  # some 24 (fewer on a loaded machine)

    def test_a_pool_stuck_in_requests_stops_heartbeats(self):
        release = self.tmp + ".release"
        with Worker("apps:app", args=["--threads", "1"], env={"WATCHDOG_USEC": "300000"}) as w:
            w.notify.wait_for(b"WATCHDOG=1", timeout=5)
            stuck = Client(w)
            stuck.send(get("/hold?" + release))
            w.notify.wait_for(b"STATUS=holding")
            time.sleep(0.2)  # let a beat already in flight arrive
            w.notify.sock.setblocking(False)
            try:
                while w.notify.sock.recv(100):
                    pass
            except BlockingIOError:
                pass
            w.notify.sock.setblocking(True)
            with self.assertRaises(AssertionError):  # 4 beat intervals without one
                w.notify.wait_for(b"WATCHDOG=1", timeout=0.6)
            with open(release, "w"):
                pass
            self.assertEqual(stuck.response()[0], 200)
            w.notify.wait_for(b"WATCHDOG=1", timeout=5)  # progress again
            stuck.close()
            w.signal(signal.SIGTERM)
            code, err = w.wait()
            os.unlink(release)
            self.assertIn("all 1 threads busy", err)

    def test_max_requests_recycles(self):
        with Worker("apps:app", args=["--max-requests", "3", "--max-requests-jitter", "0"],
                    env={"APPS_CLEANUP_FILE": self.tmp}) as w:
            with Client(w) as c:
                for _ in range(2):
                    c.send(get("/pid"))
                    self.assertNotIn("connection", c.response()[1])
                c.send(get("/pid"))
                _, headers, _ = c.response()
                self.assertEqual(headers.get("connection"), "close", "the last request closes")
            code, err = w.wait()
            self.assertEqual(code, 0, err)
            w.notify.wait_for(b"STOPPING=1")
            self.assertIn("served 3 requests (--max-requests): recycling", err)
            self.assertEqual(len(self.cleanup_lines()), 1)

    def test_an_import_error_exits_3_with_the_traceback(self):
        with Worker("broken_app:app", ready=False) as w:
            code, err = w.wait()
            self.assertEqual(code, 3)
            self.assertIn("Traceback (most recent call last)", err)
            self.assertIn("ImportError: broken_app cannot be imported (on purpose)", err)
            self.assertIn("cannot boot: cannot load the application 'broken_app:app'", err)
        with Worker("apps:no_such_app", ready=False) as w:
            code, err = w.wait()
            self.assertEqual(code, 3)
            self.assertIn("AttributeError", err)

    def test_a_factory_and_a_unix_socket(self):
        with Worker("apps:factory()", family=socket.AF_UNIX) as w:
            status, _, body = request(w, get("/environ"))
            env = json.loads(body)
            self.assertEqual((status, env["REMOTE_ADDR"], env["SERVER_NAME"]), (200, "", "localhost"))
            w.signal(signal.SIGINT)
            self.assertEqual(w.wait()[0], 0)

    def test_without_drover_it_cannot_boot(self):
        r = subprocess.run(WSGI + ["apps:app"], env=env_with_sdk(), cwd=os.path.dirname(__file__),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=LIMIT, text=True)
        self.assertEqual(r.returncode, 3)
        self.assertIn("cannot boot: no listening sockets were passed", r.stderr)
        self.assertIn("to try the app without drover: --bind 127.0.0.1:8000 (development only)", r.stderr)

    def test_one_line_says_which_core_runs(self):
        # auto: the native core when it can be imported (.ci/python-env installs it).
        with Worker("apps:app", env={"DROVER_WSGI_CORE": "auto"}) as w:
            self.assertEqual(request(w, get("/pid"))[0], 200)
            w.signal(signal.SIGTERM)
            code, err = w.wait()
        self.assertEqual(code, 0, err)
        self.assertEqual(err.count(" core ("), 1, err)
        self.assertIn("native core (drover_wsgi_native ", err)
        with Worker("apps:app", args=["--core", "python"]) as w:
            w.signal(signal.SIGTERM)
            code, err = w.wait()
        self.assertIn("pure-Python core (--core python)", err)

    def test_without_the_native_core_auto_falls_back_and_native_cannot_boot(self):
        # A module of that name that is "not installed", first on the path.
        shim = os.path.join(os.path.dirname(self.tmp), "shim-%d" % os.getpid())
        os.makedirs(shim, exist_ok=True)
        with open(os.path.join(shim, "drover_wsgi_native.py"), "w") as f:
            f.write("raise ModuleNotFoundError(\"No module named 'drover_wsgi_native'\", name='drover_wsgi_native')\n")
        path = shim + os.pathsep + os.path.dirname(os.path.abspath(__file__))
        with Worker("apps:app", env={"PYTHONPATH": path, "DROVER_WSGI_CORE": "auto"}) as w:
            self.assertEqual(request(w, get("/pid"))[0], 200)
            w.signal(signal.SIGTERM)
            code, err = w.wait()
        self.assertEqual(code, 0, err)
        self.assertIn("pure-Python core (drover_wsgi_native is not installed; "
                      "build it from drover's source: pip install ./workers/python/native (CPython 3.10+, cargo))", err)
        with Worker("apps:app", args=["--core", "native"], env={"PYTHONPATH": path}, ready=False) as w:
            code, err = w.wait()
        self.assertEqual(code, 3, err)
        self.assertIn("cannot boot: --core native: drover_wsgi_native is not installed", err)
        with Worker("apps:app", env={"DROVER_WSGI_CORE": "rust"}, ready=False) as w:
            code, err = w.wait()
        self.assertEqual(code, 3, err)
        self.assertIn("DROVER_WSGI_CORE=rust: choose from auto, native, python", err)

    def test_a_native_module_that_raises_at_import_falls_back(self):
        # Not an ImportError (a broken build or install can raise anything):
        # auto still serves with the pure-Python core, --core native exits 3.
        shim = os.path.join(os.path.dirname(self.tmp), "shim-raises-%d" % os.getpid())
        os.makedirs(shim, exist_ok=True)
        with open(os.path.join(shim, "drover_wsgi_native.py"), "w") as f:
            f.write("raise RuntimeError('broken on purpose')\n")
        path = shim + os.pathsep + os.path.dirname(os.path.abspath(__file__))
        with Worker("apps:app", env={"PYTHONPATH": path, "DROVER_WSGI_CORE": "auto"}) as w:
            self.assertEqual(request(w, get("/pid"))[0], 200)
            w.signal(signal.SIGTERM)
            code, err = w.wait()
        self.assertEqual(code, 0, err)
        self.assertIn("pure-Python core (drover_wsgi_native cannot be imported: "
                      "RuntimeError: broken on purpose; ", err)
        with Worker("apps:app", args=["--core", "native"], env={"PYTHONPATH": path}, ready=False) as w:
            code, err = w.wait()
        self.assertEqual(code, 3, err)
        self.assertIn("cannot boot: --core native: drover_wsgi_native cannot be imported: "
                      "RuntimeError: broken on purpose", err)

    def test_a_stop_during_the_import_is_not_lost(self):
        # An app whose import takes a while; the stop comes in the middle of it.
        tmpdir = os.path.dirname(self.tmp)
        mod = "slow_import_%d" % os.getpid()
        path = os.path.join(tmpdir, mod + ".py")
        marker = self.tmp + ".importing"
        with open(path, "w") as f:
            f.write("import time\nopen(%r, 'w').close()\ntime.sleep(1)\n"
                    "def app(e, s):\n    s('200 OK', [])\n    return [b'']\n" % marker)
        try:
            with Worker("%s:app" % mod, args=["--chdir", tmpdir], ready=False) as w:
                deadline = time.monotonic() + LIMIT
                while not os.path.exists(marker) and time.monotonic() < deadline:
                    time.sleep(0.01)
                w.signal(signal.SIGTERM)
                code, err = w.wait()
                self.assertEqual(code, 0, err)
                self.assertNotIn("ready:", err)
        finally:
            os.unlink(path)
            if os.path.exists(marker):
                os.unlink(marker)


    def test_sigusr1_during_the_import_is_not_fatal(self):
        # drover forwards SIGUSR1 ("reopen your logs", logrotate) to every
        # worker, a booting one too (a reload's new generation): one that
        # comes while the app is imported must not kill the worker.
        tmpdir = os.path.dirname(self.tmp)
        mod = "slow_import_usr1_%d" % os.getpid()
        path = os.path.join(tmpdir, mod + ".py")
        marker = self.tmp + ".importing-usr1"
        with open(path, "w") as f:
            f.write("import time\nopen(%r, 'w').close()\ntime.sleep(0.5)\n"
                    "def app(e, s):\n    s('200 OK', [])\n    return [b'ok']\n" % marker)
        try:
            with Worker("%s:app" % mod, args=["--chdir", tmpdir], ready=False) as w:
                deadline = time.monotonic() + LIMIT
                while not os.path.exists(marker) and time.monotonic() < deadline:
                    time.sleep(0.01)
                w.signal(signal.SIGUSR1)
                w.notify.wait_for(b"READY=1")
                self.assertEqual(request(w, get("/"))[0], 200)
                w.signal(signal.SIGTERM)
                code, err = w.wait()
                self.assertEqual(code, 0, err)
        finally:
            os.unlink(path)
            if os.path.exists(marker):
                os.unlink(marker)


if __name__ == "__main__":
    unittest.main()

"""drover_wsgi's production features, end to end without drover: the access
log, the proxy settings, Unix-socket peers, chunked request bodies with
Expect: 100-continue, and the timeouts against slow clients."""

import json
import os
import re
import select
import signal
import socket
import struct
import tempfile
import time
import unittest

from tests.helpers import WSGI, Client, Worker, request, run_script

GET = b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n"


def get(path, extra=b""):
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: test\r\n" + extra + b"\r\n"


def stop(w):
    w.signal(signal.SIGTERM)
    code, err = w.wait()
    assert code == 0, err
    return err


class AccessLogTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "access.log")

    def tearDown(self):
        self.dir.cleanup()

    def lines(self):
        with open(self.path) as f:
            return f.read().splitlines()

    def test_off_by_default(self):
        with Worker("apps:app") as w:
            self.assertEqual(request(w, get("/pid"))[0], 200)
            err = stop(w)
        self.assertNotIn("GET /pid", err)

    def test_combined_to_a_file_with_gunicorns_atoms(self):
        with Worker("apps:app", args=["--access-logfile", self.path]) as w:
            request(w, b"GET /pid?x=1 HTTP/1.1\r\nHost: t\r\nReferer: http://r/\r\nUser-Agent: ua/1\r\n"
                       b"Authorization: Basic dXNlcjpwdw==\r\n\r\n")
            request(w, get("/nope"))
            stop(w)
        # (Written after each response, by two threads: in either order.)
        first, second = sorted(self.lines(), key=lambda line: "/nope" in line)
        m = re.fullmatch(r'127\.0\.0\.1 - user \[(\d\d/\w\w\w/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] '
                         r'"GET /pid\?x=1 HTTP/1\.1" 200 (\d+) "http://r/" "ua/1"', first)
        self.assertIsNotNone(m, first)
        self.assertGreater(int(m.group(2)), 0)
        self.assertRegex(second, r'^127\.0\.0\.1 - - \[.*\] "GET /nope HTTP/1\.1" 404 \d+ "-" "-"$')

    def test_common_and_custom_formats_and_request_time(self):
        fmt = ('%(s)s %(m)s %(U)s %(q)s %(H)s %(B)s %(L)s %(M)s %(D)s %(T)s %(p)s '
               '%({x-id}i)s %({content-type}o)s %({remote_addr}e)s %(zz)s')
        with Worker("apps:app", args=["--access-logfile", self.path, "--access-logformat", fmt]) as w:
            request(w, get("/sleep?ms=250", b"X-Id: abc\r\n"))
            pid = w.proc.pid
            stop(w)
        (line,) = self.lines()
        f = line.split(" ")
        self.assertEqual(f[:5], ["200", "GET", "/sleep", "ms=250", "HTTP/1.1"], line)
        self.assertGreater(int(f[5]), 0)
        seconds, ms, us, whole = float(f[6]), int(f[7]), int(f[8]), int(f[9])
        self.assertTrue(0.25 <= seconds < 5, line)
        self.assertTrue(250 <= ms < 5000 and 250000 <= us < 5000000 and whole == int(seconds), line)
        self.assertEqual(f[10:], ["<%d>" % pid, "abc", "text/plain", "127.0.0.1", "-"])
        with Worker("apps:app", args=["--access-logfile", self.path, "--access-logformat", "common"]) as w:
            request(w, get("/pid"))
            stop(w)
        self.assertRegex(self.lines()[1], r'^127\.0\.0\.1 - - \[.*\] "GET /pid HTTP/1\.1" 200 \d+$')

    def test_to_standard_output_or_error(self):
        with Worker("apps:app", args=["--access-logfile", "-"]) as w:
            request(w, get("/pid"))
            w.signal(signal.SIGTERM)
            out, err = w.proc.communicate(timeout=15)
        self.assertIn('"GET /pid HTTP/1.1" 200', out)
        self.assertNotIn('"GET /pid', err)
        with Worker("apps:app", args=["--access-logfile", "stderr"]) as w:
            request(w, get("/pid"))
            err = stop(w)
        self.assertIn('"GET /pid HTTP/1.1" 200', err)

    def test_errors_are_logged_too(self):
        # The server's 500 for an app that raised is logged with the bytes
        # of the body it was sent, as any answer (b was '-': "the app sent
        # nothing", a rule of its own); an empty body is 0, as Gunicorn and
        # nginx log it.
        with Worker("apps:app", args=["--access-logfile", self.path]) as w:
            status, _, body = request(w, get("/error"))
            self.assertEqual(status, 500, body)
            self.assertEqual(request(w, get("/nocontent"))[0], 204)
            stop(w)
        lines = sorted(self.lines(), key=lambda line: "/nocontent" in line)
        self.assertEqual(len(lines), 2, lines)
        self.assertRegex(lines[0], r'"GET /error HTTP/1\.1" 500 %d "-" "-"$' % len(body))
        self.assertGreater(len(body), 0)
        self.assertRegex(lines[1], r'"GET /nocontent HTTP/1\.1" 204 0 "-" "-"$')

    def test_an_app_that_raised_mid_body_is_logged_with_what_was_sent(self):
        # The app raised after its head and first chunk went out: the client
        # sees the connection end early, and the access log has its line,
        # with the status and the body bytes sent, as Gunicorn logs it (it
        # had no line at all).
        with Worker("apps:app", args=["--access-logfile", self.path, "--access-logformat", '"%(r)s" %(s)s %(b)s']) as w:
            with w.connect() as s:
                s.sendall(get("/error-after-start"))
                answer = b""
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    answer += data
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
            self.assertIn(b"first", answer)
            stop(w)
        self.assertEqual(self.lines(), ['"GET /error-after-start HTTP/1.1" 200 5'])

    def wait_for_lines(self, n):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.path.exists(self.path) and len(self.lines()) >= n:
                return self.lines()
            time.sleep(0.02)
        self.fail("no %d access log lines within 10 s: %r" % (n, self.lines() if os.path.exists(self.path) else None))

    def test_a_client_that_leaves_mid_response_is_logged_with_what_was_sent(self):
        # Gunicorn writes the line once the response ended, in a finally: a
        # client that leaves mid-response gets its line, with the body bytes
        # that went out. The pure-Python core wrote none; the native core
        # none for a streamed body, and for a whole one wrote its line before
        # sending, with every byte counted.
        mib = 32
        fmt = '"%(r)s" %(s)s %(b)s'
        with Worker("apps:app", args=["--access-logfile", self.path, "--access-logformat", fmt]) as w:
            for path in ("/stream?mib=%d" % mib, "/big?mib=%d" % mib):
                with w.connect() as s:
                    s.sendall(get(path))
                    self.assertTrue(s.recv(4096).startswith(b"HTTP/1.1 200 "))
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
                self.wait_for_lines(1 if path.startswith("/stream") else 2)
            stop(w)
        lines = self.lines()
        self.assertEqual(len(lines), 2, lines)
        for line, path in zip(lines, ("/stream?mib=%d" % mib, "/big?mib=%d" % mib)):
            m = re.fullmatch(r'"GET (\S+) HTTP/1\.1" 200 (\d+)', line)
            self.assertIsNotNone(m, lines)
            self.assertEqual(m.group(1), path)
            self.assertLess(int(m.group(2)), mib << 20, line)  # (0 if the reset came before any body byte)

    def test_a_body_longer_or_shorter_than_its_content_length(self):
        # A body longer than its Content-Length is cut at it, as Gunicorn
        # does: bytes past it on a kept-alive connection would be read as the
        # next response. The connection stays (its framing is right), b is
        # what was sent, and one line per response names the app's mistake.
        # Both cores cut it but closed the connection (a request pipelined
        # after it was lost), logged a line per block past it, and b counted
        # the bytes the app gave. A shorter body closes the connection.
        fmt = '"%(r)s" %(s)s %(b)s'
        with Worker("apps:app", args=["--access-logfile", self.path, "--access-logformat", fmt]) as w:
            for path in ("/over", "/over-gen"):
                with Client(w) as c:
                    c.send(get(path) + get("/pid"))
                    status, headers, body = c.response()
                    self.assertEqual((status, headers["content-length"], body), (200, "3", b"abc"))
                    self.assertEqual(c.response()[2], str(w.proc.pid).encode())
            for path in ("/short", "/short-list"):
                with Client(w) as c:
                    c.send(get(path) + get("/pid"))
                    with self.assertRaises(ConnectionError):  # 3 bytes of 10, then the close
                        c.response()
            err = stop(w)
        self.assertEqual(sorted(line for line in self.lines() if "/pid" not in line), [
            '"GET /over HTTP/1.1" 200 3', '"GET /over-gen HTTP/1.1" 200 3',
            '"GET /short HTTP/1.1" 200 3', '"GET /short-list HTTP/1.1" 200 3'])
        self.assertEqual(len([line for line in self.lines() if "/pid" in line]), 2)
        said = [line.split(": ", 1)[1] for line in err.splitlines() if "Content-Length" in line]
        self.assertEqual(said, [
            "GET %s: the application's body is longer than its Content-Length (3): the %d byte(s) past it "
            "were not sent (fix the Content-Length header the application sets)" % (path, n)
            for path, n in (("/over", 3), ("/over-gen", 5))])

    def test_an_internal_error_is_answered_and_logged(self):
        # The server's own failure on a request (here its proxy hook, broken
        # by the app's import): a 500, a line with the traceback, and an
        # access log line. The native core wrote no access log line; the
        # pure-Python core left the request unanswered.
        with Worker("broken_proxy_app:app", args=["--access-logfile", self.path]) as w:
            status, _, body = request(w, get("/pid", b"X-Forwarded-Proto: https\r\n"))
            self.assertEqual((status, body), (500, b"500 Internal Server Error: internal error\n"))
            err = stop(w)
        self.assertIn("internal error on GET /pid (answered 500):\nTraceback", err)
        self.assertIn("RuntimeError: the scheme hook broke", err)
        (line,) = self.lines()
        self.assertRegex(line, r'^127\.0\.0\.1 - - \[.*\] "GET /pid HTTP/1\.1" 500 %d "-" "-"$' % len(body))

    def test_a_request_the_server_refuses_is_logged_with_why(self):
        # A request refused once its head was read, before the app: a line
        # that names the cause, and its access log line, as for a bad
        # request body. Both cores logged nothing at all for them (an
        # operator could not tell why a client got a 400 behind nginx).
        with Worker("apps:app", args=["--access-logfile", self.path]) as w:
            status, _, body400 = request(w, get("/environ", b"X-Forwarded-Proto: https\r\nX-Forwarded-Ssl: off\r\n"))
            self.assertEqual(status, 400, body400)
            status, _, body500 = request(w, get("/other", b"SCRIPT_NAME: /app\r\n"))
            self.assertEqual(status, 500, body500)
            err = stop(w)
        self.assertIn("bad request on GET /environ: the secure scheme headers disagree: "
                      "X-Forwarded-Proto: https says https, X-Forwarded-Ssl: off says http\n", err)
        self.assertIn("cannot serve GET /other: the request path '/other' does not start with SCRIPT_NAME '/app'\n", err)
        lines = sorted(self.lines(), key=lambda line: "/other" in line)
        self.assertEqual(len(lines), 2, lines)
        # b: the bytes of the answer's body (it was "-").
        self.assertRegex(lines[0], r'^127\.0\.0\.1 - - \[.*\] "GET /environ HTTP/1\.1" 400 %d "-" "-"$' % len(body400))
        self.assertRegex(lines[1], r'^127\.0\.0\.1 - - \[.*\] "GET /other HTTP/1\.1" 500 %d "-" "-"$' % len(body500))

    def test_a_refused_request_head_is_logged_but_not_a_silent_connection(self):
        # A head the server refuses before there is a request (400, 431, 408)
        # gets an access log line with what is known, as nginx writes
        # '"-" 400', and one line on standard error says why (at most one
        # per 10 s: the other two are counted). A connection that sends no
        # byte (a load balancer's TCP check), closed or left to time out,
        # and a keep-alive connection that times out idle get no line, as in
        # nginx. Both cores logged nothing at all for a refused head.
        fmt = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(L)s'
        args = ["--access-logfile", self.path, "--access-logformat", fmt, "--header-timeout", "0.5",
                "--io-timeout", "1", "--keepalive", "0.3"]
        with Worker("apps:app", args=args) as w:
            w.connect().close()  # a TCP check: no byte
            silent = w.connect()  # no byte either: closed at the I/O timeout
            kept = Client(w)
            kept.send(get("/pid"))
            self.assertEqual(kept.response()[0], 200)
            answers = []
            bodies = []
            for raw in (b"GARBAGE\r\n\r\n", get("/", b"X-Big: " + b"a" * 9000 + b"\r\n"), b"GET / HTTP/1.1\r\n"):
                with w.connect() as s:
                    s.sendall(raw)
                    answer = s.makefile("rb").read()
                    answers.append(answer.split()[1])
                    bodies.append(len(answer.split(b"\r\n\r\n", 1)[1]))
            self.assertEqual(answers, [b"400", b"431", b"408"])
            self.assertEqual(silent.recv(1), b"")  # the server closed it
            self.assertTrue(kept.eof_within(5))  # idle past --keepalive
            silent.close()
            kept.close()
            err = stop(w)
        # In the order of the requests: each line is written once its answer
        # was sent, when the client may already have read it whole and sent
        # the next request, which another thread may log first.
        order = ("/pid", '"-" 400 ', '"-" 431 ', '"-" 408 ')
        lines = sorted(self.lines(), key=lambda line: next((i for i, key in enumerate(order) if key in line), 9))
        self.assertEqual(len(lines), 4, lines)
        self.assertRegex(lines[0], r'^127\.0\.0\.1 - - \[.*\] "GET /pid HTTP/1\.1" 200 \d+ "-" "-" ')
        # b: the bytes of the body the server answered with, as nginx logs
        # its error page's (it was "-").
        for line, status, body in zip(lines[1:], ("400", "431", "408"), bodies):
            self.assertRegex(line, r'^127\.0\.0\.1 - - \[[^]]*\] "-" %s %d "-" "-" \d+\.\d{6}$' % (status, body))
        self.assertGreaterEqual(float(lines[3].split()[-1]), 0.5, lines[3])  # from its first byte
        why = [line for line in err.splitlines() if "bad request head" in line]
        self.assertEqual(len(why), 1, err)
        # (the first refusal logged: the 400's, unless the race above)
        self.assertRegex(why[0], r"^drover_wsgi\[\d+\]: bad request head from 127\.0\.0\.1 \((400|431|408)\): \S")

    def test_a_tls_handshake_is_refused_with_its_cause(self):
        # A client that speaks HTTPS to the plain HTTP port: its ClientHello
        # was refused as "malformed request line", "a line ends in a bare LF"
        # or, with no LF in it, at the header timeout (408), by the bytes it
        # happened to hold. It is still a 400 with its access log line, and
        # the line on standard error names the cause and the remedy.
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with self.assertRaises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        self.assertEqual(hello[:2], b"\x16\x03")
        args = ["--access-logfile", self.path, "--header-timeout", "5"]
        with Worker("apps:app", args=args) as w:
            with w.connect() as s:
                s.sendall(hello)
                s.settimeout(3)  # not the header timeout's 408
                self.assertEqual(s.makefile("rb").readline().split()[1], b"400")
            err = stop(w)
        lines = self.lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r'^127\.0\.0\.1 - - \[[^]]*\] "-" 400 ')
        why = [line for line in err.splitlines() if "bad request head" in line]
        self.assertEqual(len(why), 1, err)
        self.assertRegex(why[0], r"^drover_wsgi\[\d+\]: bad request head from 127\.0\.0\.1 \(400\): TLS handshake "
                                 r"on a plain HTTP port: terminate TLS in front of drover, e\.g\. nginx$")

    def test_the_reason_for_refused_heads_is_rate_limited(self):
        # One line at most per REFUSAL_LOG_EVERY, which counts those it did
        # not show; every refusal still gets its access log line.
        import contextlib
        import io

        from drover_wsgi import server

        now = [100.0]
        refusals = server.HeadRefusals(None, clock=lambda: now[0])
        with contextlib.redirect_stderr(io.StringIO()) as out:
            refusals("10.0.0.1", 4242, 400, "malformed request line", 0.0, 42)
            now[0] += server.REFUSAL_LOG_EVERY - 0.5
            refusals("10.0.0.2", 4243, 431, "request head larger than 8192 bytes", 0.0, 55)
            refusals("", None, 408, "the request head did not arrive in time", 0.5, None)
            now[0] += 1
            refusals("10.0.0.3", 4244, 400, "malformed method", 0.0, 36)
        logged = [line.split(": ", 1)[1] for line in out.getvalue().splitlines()]
        self.assertEqual(logged, [
            "bad request head from 10.0.0.1 (400): malformed request line",
            "bad request head from 10.0.0.3 (400): malformed method; 2 more refused since the last such line",
        ])

    def test_B_is_a_number_when_no_response_could_be_sent(self):
        # B is the body bytes as a number, b the same or '-' when no answer
        # could be sent (the client left); B was 'None' for a failed app.
        from drover_wsgi.accesslog import AccessLog

        log = AccessLog(self.path, "%(s)s %(b)s %(B)s")
        try:
            self.assertEqual(log.line({}, "500", None, [], 0.0), "500 - 0")
        finally:
            log.close()
        with Worker("apps:app", args=["--access-logfile", self.path, "--access-logformat", "%(s)s %(b)s %(B)s"]) as w:
            body = request(w, get("/error"))[2]
            stop(w)
        self.assertEqual(self.lines(), ["500 %d %d" % (len(body), len(body))])

    def test_a_bad_format_cannot_boot(self):
        with Worker("apps:app", args=["--access-logfile", self.path, "--access-logformat", "%(h"], ready=False) as w:
            code, err = w.wait()
        self.assertEqual(code, 3)
        self.assertIn("invalid access log format", err)

    def test_sigusr1_reopens_the_file(self):
        with Worker("apps:app", args=["--access-logfile", self.path]) as w:
            request(w, get("/pid"))
            deadline = time.monotonic() + 10  # the line is written after the response
            while not (os.path.exists(self.path) and self.lines()) and time.monotonic() < deadline:
                time.sleep(0.02)
            os.rename(self.path, self.path + ".1")
            w.signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not os.path.exists(self.path) and time.monotonic() < deadline:
                time.sleep(0.02)
            request(w, get("/pid?after"))
            stop(w)
        self.assertIn("/pid?after", self.lines()[0])
        with open(self.path + ".1") as f:
            self.assertNotIn("after", f.read())


class ProxyTest(unittest.TestCase):
    def env(self, w, extra=b"", path="/environ"):
        status, _, body = request(w, get(path, extra))
        self.assertEqual(status, 200, body)
        return json.loads(body)

    def test_secure_scheme_headers_from_a_trusted_peer(self):
        with Worker("apps:app") as w:  # default: 127.0.0.1 and ::1 are trusted
            self.assertEqual(self.env(w)["wsgi.url_scheme"], "http")
            self.assertEqual(self.env(w, b"X-Forwarded-Proto: https\r\n")["wsgi.url_scheme"], "https")
            self.assertEqual(self.env(w, b"X-Forwarded-Ssl: on\r\n")["wsgi.url_scheme"], "https")
            self.assertEqual(self.env(w, b"X-Forwarded-Proto: http\r\n")["wsgi.url_scheme"], "http")
            status, _, body = request(w, get("/environ", b"X-Forwarded-Proto: https\r\nX-Forwarded-Ssl: off\r\n"))
            self.assertEqual(status, 400, body)
            env = self.env(w, b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Host: example.org\r\n")
            self.assertEqual(env["REMOTE_ADDR"], "127.0.0.1")  # as gunicorn: the peer, not the header
            self.assertEqual(env["headers"]["HTTP_X_FORWARDED_FOR"], "203.0.113.9")
            self.assertEqual(env["headers"]["HTTP_X_FORWARDED_HOST"], "example.org")
            env = self.env(w, b"SCRIPT_NAME: /app\r\n", "/app/environ")  # a forwarder header
            self.assertEqual((env["SCRIPT_NAME"], env["PATH_INFO"]), ("/app", "/environ"))
            stop(w)

    def test_the_script_name_variable_mounts_the_app_as_in_gunicorn(self):
        # Gunicorn's raw_env = ["SCRIPT_NAME=/app"] (drover's [env]): the
        # prefix is cut from PATH_INFO; a trusted proxy's header wins; a path
        # outside the prefix is a 500. drover-wsgi ignored the variable.
        with Worker("apps:app", env={"SCRIPT_NAME": "/app"}) as w:
            env = self.env(w, path="/app/environ")
            self.assertEqual((env["SCRIPT_NAME"], env["PATH_INFO"]), ("/app", "/environ"))
            env = self.env(w, b"SCRIPT_NAME: /other\r\n", "/other/environ")
            self.assertEqual((env["SCRIPT_NAME"], env["PATH_INFO"]), ("/other", "/environ"))
            status, _, body = request(w, get("/elsewhere"))
            self.assertEqual(status, 500, body)
            stop(w)

    def test_untrusted_peers_cannot_claim_https(self):
        for allowed in ("10.0.0.1", "192.168.0.0/16,::2"):
            with Worker("apps:app", args=["--forwarded-allow-ips", allowed]) as w:
                env = self.env(w, b"X-Forwarded-Proto: https\r\nX_Forwarded_Proto: https\r\n")
                self.assertEqual(env["wsgi.url_scheme"], "http")
                self.assertNotIn("HTTP_X_FORWARDED_PROTO_", env["headers"])
                self.assertEqual(self.env(w, b"SCRIPT_NAME: /app\r\n")["SCRIPT_NAME"], "")
                stop(w)
        with Worker("apps:app", args=["--forwarded-allow-ips", "127.0.0.0/8"]) as w:
            self.assertEqual(self.env(w, b"X-Forwarded-Proto: https\r\n")["wsgi.url_scheme"], "https")
            stop(w)

    def test_the_environment_variable_and_custom_headers(self):
        with Worker("apps:app", env={"FORWARDED_ALLOW_IPS": "10.9.9.9"},
                    args=["--secure-scheme-headers", "X-SCHEME=secure"]) as w:
            self.assertEqual(self.env(w, b"X-Scheme: secure\r\n")["wsgi.url_scheme"], "http")
            stop(w)
        with Worker("apps:app", env={"FORWARDED_ALLOW_IPS": "*"},
                    args=["--secure-scheme-headers", "X-SCHEME=secure"]) as w:
            self.assertEqual(self.env(w, b"X-Scheme: secure\r\n")["wsgi.url_scheme"], "https")
            self.assertEqual(self.env(w, b"X-Forwarded-Proto: https\r\n")["wsgi.url_scheme"], "http")
            stop(w)

    def test_a_bad_setting_is_named(self):
        with Worker("apps:app", args=["--forwarded-allow-ips", "10.0.0.300"], ready=False) as w:
            code, err = w.wait()
        self.assertEqual(code, 3)  # a usage error: "cannot boot", never respawned
        self.assertIn("'10.0.0.300' is not an IP address or network", err)

    def test_unix_peers_are_trusted_and_named_as_gunicorn_does(self):
        with Worker("apps:app", family=socket.AF_UNIX) as w:
            # An unnamed peer: REMOTE_ADDR is "", and no REMOTE_PORT.
            env = self.env(w, b"X-Forwarded-Proto: https\r\n")
            self.assertEqual((env["REMOTE_ADDR"], env["wsgi.url_scheme"]), ("", "https"))
            # A peer bound to a path: that path.
            path = os.path.join(os.path.dirname(w.addr), "client.sock")
            self.assertEqual(self.remote_addr_of_a_peer_bound_to(w, path), path)
            # A peer bound to an abstract name (no path): "", as for an
            # unnamed one (the pure-Python core gave "\x00name", a NUL byte
            # that went into the access log too).
            self.assertEqual(self.remote_addr_of_a_peer_bound_to(w, "\0drover-test-%d" % os.getpid()), "")
            stop(w)

    def remote_addr_of_a_peer_bound_to(self, w, name):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(name)
            s.settimeout(10)
            s.connect(w.addr)
            s.sendall(get("/environ"))
            data = b""
            while b"}" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])["REMOTE_ADDR"]


class BodyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.w = Worker("apps:app", args=["--threads", "2"])

    @classmethod
    def tearDownClass(cls):
        stop(cls.w)
        cls.w.close()

    def post(self, body, extra=b"", path="/environ"):
        return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n" + extra
                + b"\r\n" + body)

    def test_chunked_bodies(self):
        status, _, out = request(self.w, self.post(b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n"))
        self.assertEqual(status, 200, out)
        env = json.loads(out)
        self.assertEqual(env["body"], "hello world!")
        self.assertIsNone(env["CONTENT_LENGTH"])
        # readline() across chunks, and the connection carries on afterwards.
        with Client(self.w) as c:
            c.send(self.post(b"3\r\na\nb\r\n4\r\n\ncd\n\r\n0\r\n\r\n", path="/lines"))
            self.assertEqual(json.loads(c.response()[2]), ["a\n", "b\n", "cd\n"])
            c.send(get("/pid"))
            self.assertEqual(c.response()[0], 200)

    def test_a_chunked_body_sent_in_pieces_after_100_continue(self):
        with Client(self.w) as c:
            c.send(self.post(b"", b"Expect: 100-continue\r\n"))
            self.assertEqual(c.response(head_only=True)[0], 100)
            for piece in (b"4\r\nab", b"cd\r", b"\n0\r", b"\n\r\n"):
                c.send(piece)
                time.sleep(0.02)
            status, _, out = c.response()
            self.assertEqual((status, json.loads(out)["body"]), (200, "abcd"))

    def test_malformed_chunked_bodies_are_400(self):
        for body in (b"zz\r\nab\r\n0\r\n\r\n", b"2\r\nabc\r\n0\r\n\r\n", b"2\r\nab\r\n" + b"1" * 5000):
            with Client(self.w) as c:
                c.send(self.post(body))
                status, headers, out = c.response()
                self.assertEqual((status, headers.get("connection")), (400, "close"), (body, out))

    def test_the_app_may_leave_a_chunked_body_unread(self):
        with Client(self.w) as c:
            c.send(self.post(b"5\r\nhello\r\n0\r\n\r\n", path="/partial"))
            self.assertEqual(c.response()[2], b"hel")
            c.send(get("/pid"))
            self.assertEqual(c.response()[0], 200)


class SlowClientTest(unittest.TestCase):
    """A slow client (slowloris) cannot hold the only thread past the
    header and body timeouts: it gets a 408 and the next client is served."""

    def test_a_slow_head(self):
        with Worker("apps:app", args=["--threads", "1", "--header-timeout", "0.6"]) as w:
            slow = Client(w)
            began = time.monotonic()
            slow.send(b"GET /pid HTTP/1.1\r\n")
            for _ in range(20):  # a byte every 0.1 s: each read is in time, the head is not
                if select.select([slow.sock], [], [], 0.1)[0]:
                    break  # answered
                try:
                    slow.send(b"X")
                except OSError:
                    break
            status, headers, _ = slow.response()
            self.assertEqual((status, headers.get("connection")), (408, "close"))
            self.assertLess(time.monotonic() - began, 2.0)
            self.assertEqual(request(w, get("/pid"))[0], 200)
            slow.close()
            stop(w)

    def test_a_slow_body(self):
        args = ["--threads", "1", "--body-timeout", "0.6", "--body-min-rate", "0"]
        with Worker("apps:app", args=args) as w:
            slow = Client(w)
            began = time.monotonic()
            slow.send(b"POST /environ HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
            status, headers, _ = slow.response()
            self.assertEqual((status, headers.get("connection")), (408, "close"))
            self.assertLess(time.monotonic() - began, 2.0)
            self.assertEqual(request(w, get("/pid"))[0], 200)
            slow.close()
            stop(w)

    def test_a_body_that_keeps_coming_at_the_minimum_rate_gets_more_time(self):
        args = ["--threads", "1", "--body-timeout", "0.5", "--body-min-rate", "10"]
        with Worker("apps:app", args=args) as w:
            with Client(w) as c:
                c.send(b"POST /environ HTTP/1.1\r\nHost: t\r\nContent-Length: 30\r\n\r\n")
                for _ in range(3):  # 10 bytes (1 s more) every 0.25 s: 0.75 s in all
                    time.sleep(0.25)
                    c.send(b"0123456789")
                status, _, out = c.response()
                self.assertEqual((status, len(json.loads(out)["body"])), (200, 30))
            stop(w)


class OutOfDescriptorsTest(unittest.TestCase):
    def test_connections_already_accepted_are_served_while_accept_fails(self):
        # 40 file descriptors: the clients below take the rest, accept fails
        # with EMFILE. The thread used to sleep 100 ms at each failure, and
        # the level-triggered listener was ready at every poll: each request
        # of a connection accepted before took 100 ms or more, and every
        # failure was logged (10 lines a second).
        limited = [WSGI[0], "-c", "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40)); "
                   "sys.argv[1:1] = []; runpy.run_module('drover_wsgi', run_name='__main__', alter_sys=True)"]
        with Worker("apps:app", command=limited + ["--threads", "1", "apps:app"]) as w:
            with Client(w) as kept:
                kept.send(get("/pid"))
                self.assertEqual(kept.response()[0], 200)
                others = []
                for _ in range(60):
                    c = w.connect()
                    c.sendall(get("/pid"))
                    others.append(c)
                time.sleep(0.3)
                began = time.monotonic()
                for _ in range(20):
                    kept.send(get("/pid"))
                    self.assertEqual(kept.response()[0], 200)
                self.assertLess(time.monotonic() - began, 1.0)
                for c in others:
                    c.close()
            deadline = time.monotonic() + 10  # the worker accepts again once descriptors are free
            while True:
                try:
                    status = request(w, get("/pid"))[0]
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
            self.assertEqual(status, 200)
            err = stop(w)
        lines = [line for line in err.splitlines() if "accept on" in line]
        self.assertTrue(1 <= len(lines) <= 2, err)
        self.assertIn("Too many open files", lines[0])

    def test_the_wait_for_a_stop_needs_no_descriptor_once_serving(self):
        # The main thread made the pipe of its wait for a stop signal when it
        # got there; a pool that had accepted until EMFILE before (the test
        # above, on CPython 3.13 often) left it none: os.pipe() failed and the
        # worker died, closing every connection it held unanswered.
        r = run_script("""
            import os, resource, signal, socket, threading
            import drover_worker as dw
            from drover_wsgi import choose_core
            dw.install(exit_on_stop=False)
            server_class, _ = choose_core(os.environ["DROVER_WSGI_CORE"])
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            server = server_class(lambda environ, start_response: [], [listener], threads=1)
            server.start()
            held = []
            try:
                while True:  # what a pool that accepted until EMFILE leaves
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
            kind = server.wait_for_stop()
            print(kind, server.stop(kind))
        """, env={"DROVER_WSGI_CORE": os.environ.get("DROVER_WSGI_CORE", "auto")})
        self.assertEqual((r.returncode, r.stdout), (0, "graceful True\n"), r.stderr)


if __name__ == "__main__":
    unittest.main()


class KeepaliveRequestsTest(unittest.TestCase):
    """--keepalive-requests N: the Nth response on a connection says
    Connection: close and the connection ends cleanly (EOF, not a reset), so
    that a client's long-lived connections come back through the listen
    queue to whichever worker accepts first; 0: no limit."""

    @classmethod
    def setUpClass(cls):
        cls.w = Worker("apps:app", args=["--threads", "2", "--keepalive-requests", "3"])

    @classmethod
    def tearDownClass(cls):
        stop(cls.w)
        cls.w.close()

    def test_the_nth_response_closes_the_connection(self):
        # The last response streamed (chunked) as well as with a length.
        for last in ("/pid", "/gen"):
            with Client(self.w) as c:
                for _ in range(2):
                    c.send(get("/pid"))
                    status, headers, _ = c.response()
                    self.assertEqual((status, headers.get("connection")), (200, None), "kept alive")
                c.send(get(last))
                status, headers, body = c.response()
                self.assertEqual((status, headers.get("connection")), (200, "close"), last)
                self.assertTrue(body)
                self.assertTrue(c.eof_within(5), "closed with EOF after the 3rd response")

    def test_http10_keep_alive_is_counted_too(self):
        keep = b"GET /pid HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        with Client(self.w) as c:
            for expected in ("keep-alive", "keep-alive", "close"):
                c.send(keep)
                self.assertEqual(c.response()[1].get("connection"), expected)
            self.assertTrue(c.eof_within(5))

    def test_a_request_pipelined_after_the_last_is_not_answered_and_nothing_is_reset(self):
        # The 4th request is not read: the client sends it again on a new
        # connection (as after nginx's keepalive_requests). A large body
        # behind it is read and dropped by the lingering close: no reset.
        big = b"POST /environ HTTP/1.1\r\nHost: t\r\nContent-Length: 300000\r\n\r\n" + b"x" * 300000
        for fourth in (get("/pid"), big):
            with Client(self.w) as c:
                c.send(get("/pid") * 3 + fourth)
                answers = [c.response()[1].get("connection") for _ in range(3)]
                self.assertEqual(answers, [None, None, "close"])
                c.sock.settimeout(5)
                self.assertEqual(c.f.read(), b"", "the 4th request is not answered; EOF, not a reset")

    def test_zero_means_no_limit(self):
        with Worker("apps:app", args=["--threads", "1", "--keepalive-requests", "0"]) as w:
            with Client(w) as c:
                for i in range(50):
                    c.send(get("/pid"))
                    status, headers, _ = c.response()
                    self.assertEqual((status, headers.get("connection")), (200, None), "request %d" % (i + 1))
            stop(w)

    def test_a_negative_limit_is_refused(self):
        with Worker("apps:app", args=["--keepalive-requests", "-1"], ready=False) as w:
            code, err = w.wait()
        self.assertEqual(code, 3, err)  # cannot boot: drover does not respawn it
        self.assertIn("--keepalive-requests must not be negative", err)

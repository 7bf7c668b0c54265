"""WSGI apps used by the tests (imported by drover_wsgi as apps:NAME)."""

import json
import os
import signal
import sys
import time

import drover_worker


def _text(start_response, status, body, extra=()):
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))] + list(extra))
    return [body]


ENVIRON_KEYS = (
    "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE", "CONTENT_LENGTH",
    "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR", "RAW_URI",
    "wsgi.url_scheme", "wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once",
)


def app(environ, start_response):
    """Routes by path; see each branch."""
    path = environ["PATH_INFO"]
    if path == "/environ" or path.startswith("/environ/"):
        # The environ, as JSON, with the body read by wsgi.input.read().
        out = {k: environ.get(k) for k in ENVIRON_KEYS}
        out["headers"] = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
        out["body"] = environ["wsgi.input"].read().decode("latin-1")
        out["version"] = list(environ["wsgi.version"])
        body = json.dumps(out).encode()
        return _text(start_response, "200 OK", body, [("Content-Type", "application/json")])
    if path == "/lines":
        lines = [line.decode() for line in environ["wsgi.input"]]
        return _text(start_response, "200 OK", json.dumps(lines).encode())
    if path == "/partial":
        # Reads 3 bytes of the body and leaves the rest.
        got = environ["wsgi.input"].read(3)
        return _text(start_response, "200 OK", got)
    if path == "/gen":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"chunk%d;" % i for i in range(3))
    if path == "/gen-empty":
        start_response("200 OK", [])
        return iter([b"", b""])
    if path == "/list":
        start_response("200 OK", [])
        return [b"a", b"bc", b"", b"def"]
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written;")
        return [b"returned"]
    if path == "/error":
        raise RuntimeError("boom in the app")
    if path == "/sys-exit":
        sys.exit(1)  # a view that "exits": SystemExit is no Exception
    if path == "/error-after-start":
        def gen():
            yield b"first"
            raise RuntimeError("boom mid-body")
        start_response("200 OK", [])
        return gen()
    if path == "/exc-info":
        try:
            raise ValueError("handled")
        except ValueError:
            start_response("200 OK", [("X-First", "1")])
            start_response("503 Service Unavailable", [("X-Second", "1")], sys.exc_info())
        return [b"replaced"]
    if path == "/short":
        # Promises 10 bytes, sends 3.
        start_response("200 OK", [("Content-Length", "10")])
        return iter([b"abc"])
    if path == "/short-list":  # the same, as one block
        start_response("200 OK", [("Content-Length", "10")])
        return [b"abc"]
    if path == "/over":  # promises 3 bytes, gives 6
        start_response("200 OK", [("Content-Length", "3")])
        return [b"abcdef"]
    if path == "/over-gen":  # promises 3 bytes, gives 8, in blocks
        start_response("200 OK", [("Content-Length", "3")])
        return (block for block in [b"ab", b"cd", b"ef", b"gh"])
    if path == "/nocontent":
        start_response("204 No Content", [])
        return []
    if path == "/close":
        start_response("200 OK", [("Connection", "close"), ("Content-Length", "2")])
        return [b"ok"]
    if path == "/scheme-and-client":
        # What a proxy's headers made of them.
        return _text(start_response, "200 OK", ("%s %s" % (environ["wsgi.url_scheme"], environ["REMOTE_ADDR"])).encode())
    if path == "/pid":
        return _text(start_response, "200 OK", str(os.getpid()).encode(), [("X-Worker-Pid", str(os.getpid()))])
    if path == "/sleep":
        ms = int(environ["QUERY_STRING"].partition("=")[2] or "0")
        drover_worker.status("sleeping")  # lets a test wait until the request is in progress
        time.sleep(ms / 1000)
        return _text(start_response, "200 OK", b"slept %d" % ms)
    if path == "/hold":  # until the file named by the query exists (at most 15 s)
        drover_worker.status("holding")
        deadline = time.monotonic() + 15
        while not os.path.exists(environ["QUERY_STRING"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        return _text(start_response, "200 OK", b"released")
    if path == "/spin-until":  # CPU-bound until the file named by the query exists (at most 15 s)
        deadline = time.monotonic() + 15
        while not os.path.exists(environ["QUERY_STRING"]) and time.monotonic() < deadline:
            pass
        return _text(start_response, "200 OK", b"spun")
    if path == "/spin":  # CPU-bound: holds the GIL but at the switch interval
        ms = int(environ["QUERY_STRING"].partition("=")[2] or "0")
        until = time.monotonic() + ms / 1000
        while time.monotonic() < until:
            pass
        return _text(start_response, "200 OK", b"spun %d" % ms)
    if path == "/non-latin-1-header":
        start_response("200 OK", [("X-Euro", "\u20ac")])
        return [b"no"]
    if path == "/interim-status":  # a 1xx as the final status: the client would wait on
        start_response("103 Early Hints", [])
        return [b"no"]
    if path == "/status-600":
        start_response("600 Beyond", [])
        return [b"no"]
    if path == "/dict-headers":  # a dict: its keys, "XA" among them, are no pairs
        start_response("200 OK", {"XA": "1"})
        return [b"no"]
    if path == "/len-lies":  # len() says 1, the iteration yields 3 blocks
        class Lies:
            def __len__(self):
                return 1

            def __iter__(self):
                return iter([b"a", b"b", b"c"])
        start_response("200 OK", [])
        return Lies()
    if path == "/list-header":
        start_response("200 OK", [["X-List", "yes"]])  # a list, not a tuple: taken as gunicorn does
        return [b"ok"]
    if path == "/bad-header-retried":
        # A refused start_response leaves nothing behind: the app's second
        # call makes the whole head.
        try:
            start_response("200 OK", [("X-Good", "1"), ("X-Bad", "a\r\nInjected: 1")])
        except ValueError:
            start_response("200 OK", [("X-Retried", "1")])
        return [b"retried"]
    if path == "/bad-header":
        start_response("200 OK", [("X-Bad", "a\r\nInjected: 1")])
        return [b"no"]
    if path == "/bad-header-name":  # not a token (RFC 9110 5.1): refused as gunicorn does
        start_response("200 OK", [("X Bad", "v")])
        return [b"no"]
    if path == "/empty-header-name":
        start_response("200 OK", [("", "v")])
        return [b"no"]
    if path == "/nul-in-header":
        start_response("200 OK", [("X-Nul", "a\x00b")])
        return [b"no"]
    if path == "/closing-iter":
        class It:
            def __iter__(self):
                return iter([b"x"])

            def close(self):
                sys.stderr.write("closing-iter closed\n")
        start_response("200 OK", [])
        return It()
    if path == "/big":  # N MiB in one block, with its Content-Length
        mib = int(environ["QUERY_STRING"].partition("=")[2] or "1")
        return _text(start_response, "200 OK", b"x" * (mib << 20))
    if path == "/stream":  # N MiB, streamed (chunked) a MiB at a time
        mib = int(environ["QUERY_STRING"].partition("=")[2] or "1")
        start_response("200 OK", [])
        block = b"x" * (1 << 20)
        return (block for _ in range(mib))
    if path == "/fork":
        # A view that forks and lets the child return into the server (a bug:
        # a forked child must end with os._exit()); the parent reaps it.
        pid = os.fork()
        if pid == 0:
            return _text(start_response, "200 OK", b"from the child")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return _text(start_response, "200 OK", b"child exited %d" % os.waitstatus_to_exitcode(status))
            time.sleep(0.02)
        return _text(start_response, "200 OK", b"child %d still running" % pid)
    if path == "/child-signals":
        # A child forked in a view: its SIGWINCH handler, and how it ends at
        # SIGUSR1 (whose default action ends a process).
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, signal.getsignal(signal.SIGWINCH).__class__.__name__.encode())
                time.sleep(5)
            finally:
                os._exit(0)
        os.close(w)
        winch = os.read(r, 100)
        os.close(r)
        os.kill(pid, signal.SIGUSR1)
        _, status = os.waitpid(pid, 0)
        return _text(start_response, "200 OK", b"winch %s usr1 exit %d" % (winch, os.waitstatus_to_exitcode(status)))
    if path == "/terminate-child":
        # multiprocessing's fork start method, as an app uses it: a child
        # that Process.terminate() (SIGTERM) must end.
        import multiprocessing

        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
        child.terminate()
        child.join(5)
        code = child.exitcode
        if code is None:
            child.kill()
            child.join()
        return _text(start_response, "200 OK", b"child exit %s" % str(code).encode())
    return _text(start_response, "404 Not Found", b"not found")


CLEANUP_FILE = os.environ.get("APPS_CLEANUP_FILE")
if CLEANUP_FILE:
    @drover_worker.on_exit("apps-cleanup")
    def _cleanup():
        with open(CLEANUP_FILE, "a") as f:
            f.write("cleanup %d\n" % os.getpid())


if os.environ.get("APPS_BLOCK_STOP_SIGNALS"):
    # An app (or a library it imports) that blocks the stop signals.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})


def factory():
    return app

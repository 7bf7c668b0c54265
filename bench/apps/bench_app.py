"""The WSGI app of the benchmarks: the routes of the Rust reference worker.

    GET /              200 "hello from pid N"
    GET /sleep?ms=N    sleeps N ms, then 200 "slept N ms"

Every response has Content-Length and X-Worker-Pid, so the harness can tell
which worker answered. If BENCH_CLEANUP_FILE is set, an atexit handler appends
"cleanup pid=N" to it: the harness counts these lines to see whether a
worker's cleanup ran when it was stopped.
"""

import atexit
import os
import time

_cleanup_file = os.environ.get("BENCH_CLEANUP_FILE")


def _cleanup():
    if _cleanup_file:
        with open(_cleanup_file, "a") as f:
            f.write("cleanup pid=%d\n" % os.getpid())


atexit.register(_cleanup)


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        body = b"hello from pid %d" % os.getpid()
    elif path == "/sleep":
        ms = 0
        for part in environ.get("QUERY_STRING", "").split("&"):
            if part.startswith("ms="):
                ms = int(part[3:] or 0)
        time.sleep(ms / 1000.0)
        body = b"slept %d ms" % ms
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
        return [b"not found"]
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("X-Worker-Pid", str(os.getpid())),
        ],
    )
    return [body]

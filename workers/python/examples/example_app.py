"""The example WSGI app: the routes of drover's Rust reference worker
(workers/hello), served by drover_wsgi.

    drover -b 127.0.0.1:8000 -w 2 --set ready=notify -- \\
        drover-wsgi --chdir workers/python/examples example_app:app

Routes (any method; HEAD gets the headers only):
  /               200 "hello from pid N"
  /sleep?ms=N     sleeps N ms, then 200 "slept N ms"
  /cpu?ms=N       busy-loops N ms, then 200 "burned N ms of cpu"
  /crash          exits at once with status 1, without answering or cleaning up
  /hang           never answers, even when asked to stop (only SIGKILL ends it)
  anything else   404; a bad ms is a 400
Every response has Content-Length, Content-Type: text/plain and X-Worker-Pid.

Cleanup: if EXAMPLE_CLEANUP_FILE is set, a cleanup function registered with
the SDK appends "cleanup pid=N" to that file (the tests count the lines).
"""

import os
import time

import drover_worker

MAX_MS = 3_600_000
_PID = str(os.getpid())


@drover_worker.on_exit("example-cleanup")
def _cleanup():
    path = os.environ.get("EXAMPLE_CLEANUP_FILE")
    if path:
        with open(path, "a") as f:
            f.write("cleanup pid=%d\n" % os.getpid())


def _ms(query):
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key == "ms":
            if not value.isdigit() or int(value) > MAX_MS:
                raise ValueError("ms must be a number of milliseconds up to %d" % MAX_MS)
            return int(value)
    raise ValueError("missing ms=N")


def _respond(start_response, status, text):
    body = text.encode()
    start_response(status, [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(body))),
        ("X-Worker-Pid", _PID),
    ])
    return [body]


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/":
        return _respond(start_response, "200 OK", "hello from pid %s\n" % _PID)
    if path in ("/sleep", "/cpu"):
        try:
            ms = _ms(environ.get("QUERY_STRING", ""))
        except ValueError as e:
            return _respond(start_response, "400 Bad Request", "bad query: %s\n" % e)
        if path == "/sleep":
            time.sleep(ms / 1000)
            return _respond(start_response, "200 OK", "slept %d ms\n" % ms)
        end = time.monotonic() + ms / 1000
        while time.monotonic() < end:
            pass
        return _respond(start_response, "200 OK", "burned %d ms of cpu\n" % ms)
    if path == "/crash":
        os._exit(1)  # a worker dying mid-request: no response, no cleanup
    if path == "/hang":
        while True:  # a stuck request: ignores stops
            time.sleep(3600)
    return _respond(start_response, "404 Not Found", "not found\n")


application = app

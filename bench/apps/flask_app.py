"""The Flask-sized app of the preload scenario: Flask (with Werkzeug, Jinja2,
click, itsdangerous) imported, two routes like bench_app's.

    GET /              200 "hello from pid N"
    GET /sleep?ms=N    sleeps N ms, then 200 "slept N ms"

Every response has X-Worker-Pid. The pid is read per request: one read at
import would be the preloading process's.
"""

import atexit
import os
import time

from flask import Flask, request

app = Flask(__name__)
_cleanup_file = os.environ.get("BENCH_CLEANUP_FILE")


@atexit.register
def _cleanup():
    if _cleanup_file:
        with open(_cleanup_file, "a") as f:
            f.write("cleanup pid=%d\n" % os.getpid())


@app.route("/")
def hello():
    return "hello from pid %d" % os.getpid()


@app.route("/sleep")
def sleep():
    ms = int(request.args.get("ms", "0"))
    time.sleep(ms / 1000.0)
    return "slept %d ms" % ms


@app.after_request
def worker_pid(response):
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response

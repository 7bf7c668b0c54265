"""What some applications do when they are imported, which a server must
survive, each switched on by a variable (tests/python.rs, tests/third_party.rs):

* ``APP_SIGTERM_EXIT=1``: a SIGTERM handler of its own that calls
  ``sys.exit(0)`` (a common way to "exit cleanly" in a container), after
  writing ``own SIGTERM handler pid=N`` to stderr;
* ``APP_NON_DAEMON_THREAD=1``: a non-daemon thread, ``queue-consumer``, that
  never ends (a consumer or scheduler thread nobody made a daemon);
  ``APP_NON_DAEMON_THREAD=gil``: the same thread, which after the cleanup
  registry computes in C with the GIL held (a thread that compresses or
  hashes a large buffer), for 0.6 s from 0.2 s before the end of the stop
  budget (its length measured on this machine, at the stop): another
  Python thread waits that long for its turn there, as on a loaded machine;
* ``APP_TEARDOWN_HANG=1``: a module-level client whose finalizer waits
  (``__del__`` sleeps a minute), which runs in the interpreter's teardown.

The WSGI app is the example app (its routes, and its cleanup line in
``$EXAMPLE_CLEANUP_FILE``); asgi_habits.py has the FastAPI app."""

import os
import signal
import sys
import threading
import time

import drover_worker


def _own_sigterm_handler(signum, frame):
    sys.stderr.write("own SIGTERM handler pid=%d\n" % os.getpid())
    sys.stderr.flush()
    sys.exit(0)


_at_the_end = []  # (when the stop budget ends, the sum that takes 0.6 s), once the registry ran


def _registry_ran():
    began = time.monotonic()
    sum(range(10**6))
    n = int(10**6 * 0.6 / max(time.monotonic() - began, 1e-4))
    _at_the_end.append((time.monotonic() + drover_worker.remaining_budget(), n))


def _consume():
    computed = False
    while True:
        if _at_the_end and not computed:
            budget_ends, n = _at_the_end[0]
            time.sleep(max(0.0, budget_ends - 0.2 - time.monotonic()))
            sum(range(n))  # one C call, the GIL held throughout
            computed = True
        time.sleep(0.1)


class _Client:
    def __del__(self):
        time.sleep(60)  # "waits for its flush thread", which is long gone


if os.environ.get("APP_SIGTERM_EXIT"):
    signal.signal(signal.SIGTERM, _own_sigterm_handler)
if os.environ.get("APP_NON_DAEMON_THREAD"):
    threading.Thread(target=_consume, name="queue-consumer").start()
    if os.environ["APP_NON_DAEMON_THREAD"] == "gil":
        # Registered before example_app's cleanup, so it runs after it: last.
        drover_worker.on_exit(_registry_ran, name="start-computing")
if os.environ.get("APP_TEARDOWN_HANG"):
    client = _Client()

try:
    from example_app import app  # noqa: E402,F401
except ImportError:  # imported by asgi_habits, from elsewhere
    pass

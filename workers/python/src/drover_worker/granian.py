"""Run a WSGI app under Granian as a drover worker.

    python -m drover_worker.granian [options] module:app
    drover-granian [options] module:app

Granian's command line binds its own socket (or builds one per worker with
SO_REUSEPORT) and supervises its own worker processes: it cannot serve on
the socket drover passes. This launcher skips Granian's supervisor and runs
one Granian WSGI worker (its Rust HTTP server, ``granian._granian.WSGIWorker``)
in this process, on drover's socket at fd 3:

* ``X_DROVER_WILL_NOTIFY=1`` before the import, ``READY=1`` once the app is
  imported and the worker serves; an app that cannot be imported exits with
  status 3 ("cannot boot");
* SIGTERM and SIGINT: Granian's graceful shutdown (stop accepting, finish the
  requests in flight), bounded by the SDK's drain deadline; SIGQUIT: a quick
  stop (the drain is cut at its shorter deadline);
* then the SDK's cleanup registry runs, and the process exits 0.

It relies on Granian internals (the worker class and its arguments, the
callback scheduler), so it runs only with the Granian versions it was tested
with (``TESTED``); ``--untested-granian`` runs it with another one anyway.
Granian must be installed (``pip install granian==2.8.9``); this package does
not depend on it.
"""

import argparse
import importlib
import os
import socket
import sys
import threading
import time
import traceback
from typing import Any, List, Optional, Tuple

import drover_worker as dw

#: drover's "cannot boot".
CANNOT_BOOT = 3
#: The Granian versions this launcher was tested with (tests/third_party.rs).
TESTED = ("2.8.9",)
#: Granian's backpressure bounds the open connections of a worker (it holds a
#: permit from accept to close), not the requests in flight: a keep-alive
#: connection past it waits unserved. The default is Granian's own for one
#: worker process: its listen backlog (1024) over its worker count.
BACKPRESSURE = 1024


def _log(message: str) -> None:
    sys.stderr.write("drover_worker.granian[%d]: %s\n" % (os.getpid(), message))
    sys.stderr.flush()


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = dw.ArgumentParser(
        prog="drover-granian",
        description="Serve a WSGI application with Granian on the socket drover passes (fd 3).",
    )
    p.add_argument("app", help="module:app")
    p.add_argument("--blocking-threads", type=int, default=4,
                   help="Python threads that run the app (Granian's --blocking-threads; default 4)")
    p.add_argument("--runtime-threads", type=int, default=1, help="Rust I/O threads (as Granian's; default 1)")
    p.add_argument("--backpressure", type=int, default=BACKPRESSURE,
                   help="connections this process serves at once; more wait in the listen queue "
                        "(Granian's --backpressure; default %d)" % BACKPRESSURE)
    p.add_argument("--chdir", help="change to this directory (and import from it) before loading the app")
    p.add_argument("--untested-granian", action="store_true",
                   help="run with a Granian version other than %s" % ", ".join(TESTED))
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dw.begin_launch(args.chdir, _log)
    dw.install(exit_on_stop=False)
    try:
        socks = dw.listeners()
    except dw.ListenError as e:
        _log("cannot boot: %s" % e)
        return CANNOT_BOOT
    if len(socks) != 1 or socks[0].family == socket.AF_UNIX:
        _log("cannot boot: Granian serves one TCP socket here; drover passed %d socket(s)" % len(socks))
        return CANNOT_BOOT
    granian = _import_granian(args.untested_granian)
    if granian is None:
        return CANNOT_BOOT
    try:
        app = _load(args.app)
    except BaseException:
        sys.stderr.write(traceback.format_exc())
        _log("cannot boot: cannot load the application %r (traceback above)" % args.app)
        return CANNOT_BOOT
    if dw.stop_kind() is not None:
        _log("stopped before the server started")
        dw.run_cleanup()
        return 0
    drained = _serve(granian, app, socks[0], args)
    if not drained:
        _log("drain deadline reached with requests in flight: abandoning them")
    dw.run_cleanup()
    _log("stopped")
    if not drained:
        # Granian's threads still hold requests; do not wait for them.
        sys.stderr.flush()
        os._exit(0)
    return 0


def _import_granian(untested: bool) -> Any:
    try:
        import granian
        from granian import _futures, _granian, _loops, wsgi
    except ImportError as e:
        _log("cannot boot: Granian is not installed (pip install granian==%s): %s" % (TESTED[-1], e))
        return None
    if granian.__version__ not in TESTED and not untested:
        _log("cannot boot: Granian %s is not a version this launcher was tested with (%s); "
             "it uses Granian internals: pin granian==%s, or pass --untested-granian"
             % (granian.__version__, ", ".join(TESTED), TESTED[-1]))
        return None
    return argparse.Namespace(core=_granian, futures=_futures, loops=_loops, wsgi=wsgi)


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for name in (attr or "app").split("."):
        obj = getattr(obj, name)
    return obj


def _serve(granian: Any, app: Any, sock: Any, args: argparse.Namespace) -> bool:
    """Serves until a stop request and Granian's drain; False when the drain
    deadline came first."""
    core = granian.core
    threads = max(1, args.blocking_threads)
    backpressure = max(1, args.backpressure)
    # Granian never sets TCP_NODELAY on a connection: its own listener has it,
    # and accepted sockets inherit it. drover's listener does not, and when a
    # streamed body's first chunk is not ready as the headers go out, the body
    # waited for the client's delayed ACK (Nagle; ~40 ms a response under load).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # What Granian's own worker process builds (granian/server/mp.py,
    # _spawn_wsgi_worker), with drover's socket instead of Granian's.
    holder = core.SocketHolder(sock.fileno(), False, 1024)
    no_tls: Tuple[Any, ...] = (False, None, None, None, "tls1.3", None, [], False)
    worker = core.WSGIWorker(
        1, (None, holder), None, max(1, args.runtime_threads), 512, threads, 30, backpressure,
        "1", None, None, None, *no_tls, (None, None),
    )
    loop = granian.loops.loops.get("asyncio")
    callback = granian.wsgi._callback_wrapper(app, {}, None)
    scheduler = granian.futures._new_cbscheduler(loop, callback, impl_asyncio=True)
    shutdown = core.WorkerSignal()
    drained = threading.Event()
    # Granian calls this once its graceful shutdown is complete.
    shutdown.add_cb(drained.set)
    worker.serve_mtr(scheduler, loop, shutdown)
    _log("ready: serving %s with Granian (%d threads)" % (dw._describe(sock), threads))
    try:
        dw.ready()
    except OSError as e:
        _log("cannot send READY=1: %s" % e)
    while not dw.stop_event.wait(1.0):
        pass
    try:
        dw.stopping()
    except OSError:
        pass
    shutdown.set()
    # The deadline moves earlier on an escalation to a quick stop.
    while not drained.wait(0.05):
        if time.monotonic() >= dw.drain_deadline():
            return False
    return True


def console_main() -> None:
    """The ``drover-granian`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())

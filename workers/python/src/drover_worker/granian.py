"""Run a WSGI or ASGI app under Granian as a drover worker.

    python -m drover_worker.granian [options] module:app
    drover-granian [options] module:app

Granian's command line binds its own socket (or builds one per worker with
SO_REUSEPORT) and supervises its own worker processes: it cannot serve on
the socket drover passes. This launcher skips Granian's supervisor and runs
one Granian worker (its Rust HTTP server, ``granian._granian.WSGIWorker`` or
``ASGIWorker``) in this process, on drover's socket at fd 3 (TCP, or a Unix
socket as Granian's ``--uds``):

* ``X_DROVER_WILL_NOTIFY=1`` before the import, ``READY=1`` once the app is
  imported, its ASGI lifespan startup (if any) has completed and the worker
  serves; an app that cannot be imported, or whose lifespan startup fails,
  exits with status 3 ("cannot boot");
* behind a proxy, its ``X-Forwarded-Proto`` and ``X-Forwarded-For`` are
  believed from ``--forwarded-allow-ips`` and Unix-socket peers, as
  drover-uvicorn believes them (``drover_worker._forwarded``): Granian reads
  neither;
* SIGTERM and SIGINT: Granian's graceful shutdown (stop accepting, finish the
  requests in flight), bounded by the SDK's drain deadline, then the ASGI
  lifespan shutdown; SIGQUIT: a quick stop (the drain is cut at its shorter
  deadline);
* then the SDK's cleanup registry runs, then the ``atexit`` functions, and
  the process exits 0 without the interpreter's teardown, as Granian's own
  workers do: Granian's runtime threads run until the process ends, and one
  that touched the interpreter while it was torn down aborted the process.

``--interface`` chooses Granian's interface: ``wsgi``, ``asgi`` (with the
lifespan protocol), ``asginl`` (ASGI without it), or ``auto`` (the default):
ASGI when the app, or its ``__call__``, is a coroutine function (FastAPI,
Starlette, ...), WSGI otherwise.

It relies on Granian internals (the worker class and its arguments, the
callback scheduler), so it runs only with the Granian versions it was tested
with (``TESTED``); ``--untested-granian`` runs it with another one anyway.
Granian must be installed (``pip install granian==2.8.9``); this package does
not depend on it.
"""

import argparse
import asyncio
import inspect
import os
import socket
import sys
import threading
import traceback
from typing import Any, List, Optional, Set, Tuple

import drover_worker as dw
from drover_worker import _forwarded, _launcher

#: drover's "cannot boot".
CANNOT_BOOT = 3
#: The websocket close code for a server that restarts (RFC 6455 registry).
SERVICE_RESTART = 1012
#: The Granian versions this launcher was tested with (tests/third_party.rs).
TESTED = ("2.8.9",)
#: Granian's backpressure bounds the open connections of a worker (it holds a
#: permit from accept to close), not the requests in flight: a keep-alive
#: connection past it waits unserved. The default is Granian's own for one
#: worker process: its listen backlog (1024) over its worker count.
BACKPRESSURE = 1024
#: Seconds a new connection may stay silent before a worker accepts it
#: (TCP_DEFER_ACCEPT): Granian's default limit on a request's head (30 s).
DEFER_ACCEPT = 30


def _log(message: str) -> None:
    sys.stderr.write("drover_worker.granian[%d]: %s\n" % (os.getpid(), message))
    sys.stderr.flush()


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = dw.ArgumentParser(
        prog="drover-granian",
        description="Serve a WSGI or ASGI application with Granian on the socket drover passes (fd 3).",
    )
    p.add_argument("app", help="module:app")
    p.add_argument("--interface", choices=["auto", "wsgi", "asgi", "asginl"], default="auto",
                   help="as Granian's (asginl: ASGI without lifespan); auto (the default): ASGI when the app "
                        "or its __call__ is a coroutine function, WSGI otherwise")
    p.add_argument("--blocking-threads", type=int, default=4,
                   help="Python threads that run a WSGI app (Granian's --blocking-threads; default 4; "
                        "an ASGI app runs on the event loop)")
    p.add_argument("--runtime-threads", type=int, default=1, help="Rust I/O threads (as Granian's; default 1)")
    p.add_argument("--backpressure", type=int, default=BACKPRESSURE,
                   help="connections this process serves at once; more wait in the listen queue "
                        "(Granian's --backpressure; default %d)" % BACKPRESSURE)
    p.add_argument("--proxy-headers", dest="proxy_headers", action="store_true", default=True,
                   help="believe X-Forwarded-Proto and X-Forwarded-For from --forwarded-allow-ips and Unix-socket "
                        "peers, as drover-uvicorn (the default)")
    p.add_argument("--no-proxy-headers", dest="proxy_headers", action="store_false",
                   help="believe no proxy headers")
    p.add_argument("--forwarded-allow-ips", default=None,
                   help="the peers whose proxy headers are believed (addresses or networks, comma separated, or *; "
                        "default $FORWARDED_ALLOW_IPS, else 127.0.0.1,::1); Unix-socket peers always are")
    p.add_argument("--chdir", help="change to this directory (and import from it) before loading the app")
    p.add_argument("--untested-granian", action="store_true",
                   help="run with a Granian version other than %s" % ", ".join(TESTED))
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dw.begin_launch(args.chdir, _log)
    dw.install(exit_on_stop=False)
    trusted = _forwarded.trusted_from(args, _log)
    if trusted is False:
        return CANNOT_BOOT
    socks = _launcher.listeners(_log)
    if socks is None:
        return CANNOT_BOOT
    if len(socks) != 1:
        _log("cannot boot: Granian serves one socket here; drover passed %d socket(s)" % len(socks))
        return CANNOT_BOOT
    granian = _import_granian(args.untested_granian)
    if granian is None:
        return CANNOT_BOOT
    try:
        app = _launcher.load_app(args.app)
    except BaseException:
        _launcher.log_load_failure(args.app, _log)
        return CANNOT_BOOT
    # Again after the import: a stop handler the app installed is chained
    # after ours, not left in our place (it would stop us without a drain).
    dw.install(exit_on_stop=False)
    if dw.stop_kind() is not None:
        _log("stopped before the server started")
        dw.run_cleanup()
        return 0
    interface = _interface(app, args.interface)
    if interface == "wsgi":
        if trusted is not None:  # Granian reads no proxy headers
            app = _forwarded.wsgi(app, trusted)
        drained = _serve(granian, app, socks[0], args)
    else:
        if trusted is not None:
            app = _forwarded.asgi(app, trusted)
        try:
            drained = _serve_asgi(granian, app, socks[0], args, lifespan=interface == "asgi")
        except _StartupFailed as e:
            _log("cannot boot: the application's lifespan startup failed: %s" % e)
            return CANNOT_BOOT
    if not drained:
        _log("drain deadline reached with requests in flight: abandoning them")
    dw.run_cleanup()
    _log("stopped")
    if drained:
        dw._bound_exit(_log)
    # Granian's runtime threads run until the process ends (and, when the
    # drain was cut short, still hold requests): the interpreter's teardown
    # must not race them.
    dw._exit_skipping_teardown(wait_for_threads=drained)


def _import_granian(untested: bool) -> Any:
    try:
        import granian
        from granian import _futures, _granian, _loops, asgi, wsgi
    except ImportError as e:
        _log("cannot boot: Granian is not installed (pip install granian==%s): %s" % (TESTED[-1], e))
        return None
    if granian.__version__ not in TESTED and not untested:
        _log("cannot boot: Granian %s is not a version this launcher was tested with (%s); "
             "it uses Granian internals: pin granian==%s, or pass --untested-granian"
             % (granian.__version__, ", ".join(TESTED), TESTED[-1]))
        return None
    return argparse.Namespace(core=_granian, futures=_futures, loops=_loops, wsgi=wsgi, asgi=asgi)


def _interface(app: Any, wanted: str) -> str:
    """``--interface auto``: ASGI 3 apps are coroutine functions, or objects
    whose ``__call__`` is one (uvicorn's test too)."""
    if wanted != "auto":
        return str(wanted)
    call = app if inspect.isroutine(app) else type(app).__call__
    return "asgi" if inspect.iscoroutinefunction(call) else "wsgi"


def _listener(granian: Any, sock: Any) -> Any:
    """drover's socket as Granian's worker takes it."""
    unix = sock.family == socket.AF_UNIX
    if not unix:
        # Granian never sets TCP_NODELAY on a connection: its own listener
        # has it, and accepted sockets inherit it. drover's listener does
        # not, and when a streamed body's first chunk is not ready as the
        # headers go out, the body waited for the client's delayed ACK
        # (Nagle; ~40 ms a response under load).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Granian's graceful shutdown (hyper's) closes every connection it
        # has accepted but not yet read from: a request that arrived a moment
        # after the stop was reset, during a reload. Accepting a connection
        # only once its request has arrived leaves the silent ones in the
        # queue drover's socket keeps for the next generation (nginx's
        # "deferred"; a connection silent for the whole DEFER_ACCEPT is
        # accepted anyway). A Unix socket has no such option.
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
    return (None, granian.core.SocketHolder(sock.fileno(), unix, 1024))


def _serve_on(worker: Any, sock: Any) -> Any:
    """The worker's serving method for drover's socket (Granian has one for
    Unix sockets, as its ``--uds``)."""
    return worker.serve_mtr_uds if sock.family == socket.AF_UNIX else worker.serve_mtr


#: Granian's worker arguments for no TLS.
_NO_TLS: Tuple[Any, ...] = (False, None, None, None, "tls1.3", None, [], False)


def _serve(granian: Any, app: Any, sock: Any, args: argparse.Namespace) -> bool:
    """Serves until a stop request and Granian's drain; False when the drain
    deadline came first."""
    core = granian.core
    threads = max(1, args.blocking_threads)
    backpressure = max(1, args.backpressure)
    # What Granian's own worker process builds (granian/server/mp.py,
    # _spawn_wsgi_worker), with drover's socket instead of Granian's.
    worker = core.WSGIWorker(
        1, _listener(granian, sock), None, max(1, args.runtime_threads), 512, threads, 30, backpressure,
        "1", None, None, None, *_NO_TLS, (None, None),
    )
    loop = granian.loops.loops.get("asyncio")
    callback = granian.wsgi._callback_wrapper(app, {}, None)
    scheduler = granian.futures._new_cbscheduler(loop, callback, impl_asyncio=True)
    shutdown = core.WorkerSignal()
    drained = threading.Event()
    # Granian calls this once its graceful shutdown is complete.
    shutdown.add_cb(drained.set)
    _serve_on(worker, sock)(scheduler, loop, shutdown)
    _log("ready: serving %s with Granian (%d threads)" % (dw._describe(sock), threads))
    dw._send_or_log(dw.ready, "READY=1", _log)
    # WATCHDOG=1 from here when drover's timeout is set (Granian's threads
    # serve): without it drover aborted each worker at its first timeout.
    interval = dw.watchdog_interval()
    while not dw.stop_event.wait(interval / 2 if interval else 1.0):
        if interval:
            dw._beat(_log)
    dw._send_or_log(dw.stopping, "STOPPING=1", _log)
    shutdown.set()
    # The deadline moves earlier on an escalation to a quick stop.
    while not drained.wait(0.05):
        if _launcher.drain_over():
            return False
    return True


class _StartupFailed(Exception):
    pass


def _serve_asgi(granian: Any, app: Any, sock: Any, args: argparse.Namespace, lifespan: bool) -> bool:
    """Runs the lifespan startup, serves on this thread's event loop until a
    stop request and Granian's drain, then runs the lifespan shutdown; False
    when the drain deadline came first. Raises _StartupFailed."""
    core = granian.core
    loop = granian.loops.loops.get("asyncio")
    # What Granian's own worker process does (granian/server/mp.py,
    # _spawn_asgi_lifespan_worker), with drover's socket and the SDK's stop.
    handler = granian.asgi.LifespanProtocol(app) if lifespan else None
    if handler is not None:
        loop.run_until_complete(handler.startup())
        if handler.interrupt:
            if handler.exc is not None:
                sys.stderr.write("".join(traceback.format_exception(type(handler.exc), handler.exc,
                                                                    handler.exc.__traceback__)))
            raise _StartupFailed(repr(handler.exc) if handler.exc is not None else "lifespan.startup.failed")
        if dw.stop_kind() is not None:
            _log("stopped before the server started")
            loop.run_until_complete(_lifespan_shutdown(handler))
            return True
    state = handler.state if handler is not None else {}
    calls = _Calls()
    callback = granian.futures._future_watcher_wrapper(calls.counted(granian.asgi._callback_wrapper(app, {}, state, None)))
    worker = core.ASGIWorker(
        1, _listener(granian, sock), None, max(1, args.runtime_threads), 512, 1, 30, max(1, args.backpressure),
        "1", None, None, True, None, *_NO_TLS, (None, None),
    )
    scheduler = granian.futures._new_cbscheduler(loop, callback, impl_asyncio=True)
    shutdown = core.WorkerSignal()
    drained = asyncio.Event()
    # Granian calls this, from one of its threads, once its graceful shutdown
    # is complete.
    shutdown.add_cb(lambda: loop.call_soon_threadsafe(drained.set))
    _serve_on(worker, sock)(scheduler, loop, shutdown)
    _log("ready: serving %s with Granian (ASGI%s)" % (dw._describe(sock), "" if lifespan else ", no lifespan"))
    dw._send_or_log(dw.ready, "READY=1", _log)
    loop.run_until_complete(_launcher.until_stopped(_log))
    dw._send_or_log(dw.stopping, "STOPPING=1", _log)
    loop.run_until_complete(calls.close_websockets())
    shutdown.set()
    done: bool = loop.run_until_complete(_drain(drained)) and loop.run_until_complete(calls.finish())
    if handler is not None:
        loop.run_until_complete(_lifespan_shutdown(handler))
    return done


class _Calls:
    """The application's calls still running. Granian's drain is done once
    every response has been sent, but a call can go on after its response:
    Starlette's ``BackgroundTasks`` run then, in the same call. The process
    used to exit under them (the task neither finished nor saw a
    cancellation: a welcome email never sent, at every reload)."""

    def __init__(self) -> None:
        # On the loop's thread only.
        self.running = 0
        #: The ``send`` of each accepted websocket still open.
        self.websockets: Set[Any] = set()

    def counted(self, runner: Any) -> Any:
        async def call(scope: Any, proto: Any) -> Any:
            self.running += 1
            try:
                if scope.get("type") == "websocket":
                    proto = _Websocket(proto, self.websockets)
                return await runner(scope, proto)
            finally:
                self.running -= 1

        return call

    async def close_websockets(self) -> None:
        """Granian's shutdown drops open websockets without a close frame
        (the client sees 1006, an abnormal closure); as uvicorn does, each
        is closed with 1012 ("service restart") first, so that its client
        reconnects (to another worker) knowing why."""
        for send in list(self.websockets):
            try:
                await send({"type": "websocket.close", "code": SERVICE_RESTART})
            except Exception:
                pass  # closed meanwhile

    async def finish(self) -> bool:
        """Waits for the calls still running after Granian's drain, up to the
        drain deadline (False when it came first)."""
        while self.running:
            if _launcher.drain_over():
                return False
            await asyncio.sleep(0.05)
        return True


class _Websocket:
    """A websocket call's protocol, seen by the app, that keeps the
    connection's ``send`` in ``open`` from the app's accept to its close."""

    def __init__(self, proto: Any, open: Set[Any]) -> None:
        self.receive = proto.receive
        inner = proto.send

        async def send(message: Any) -> Any:
            kind = message.get("type")
            if kind == "websocket.accept":
                open.add(send)
            elif kind == "websocket.close":
                open.discard(send)
            return await inner(message)

        self.send = send


async def _drain(drained: asyncio.Event) -> bool:
    """Runs the requests in flight until Granian's drain is done (True) or
    the drain deadline, which moves earlier on a quick stop (False)."""
    while not drained.is_set():
        if _launcher.drain_over():
            return False
        try:
            await asyncio.wait_for(drained.wait(), 0.05)
        except asyncio.TimeoutError:
            pass
    return True


async def _lifespan_shutdown(handler: Any) -> None:
    """The lifespan shutdown, bounded by half the budget left (the other half
    is the registry's)."""
    try:
        await asyncio.wait_for(handler.shutdown(), max(0.1, dw.remaining_budget() / 2))
    except asyncio.TimeoutError:
        _log("the lifespan shutdown did not finish within its share of the budget: abandoned it")
    if handler.interrupt:
        _log("the application's lifespan shutdown failed: %r" % handler.exc)


def console_main() -> None:
    """The ``drover-granian`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())

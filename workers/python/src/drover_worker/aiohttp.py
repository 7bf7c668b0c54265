"""Run an aiohttp application as a drover worker, losing no request at a
reload or stop.

    drover_worker.aiohttp.run_app(app)           # instead of web.run_app(app, ...)
    drover-aiohttp [options] module:app          # or python -m drover_worker.aiohttp

``web.run_app`` under drover (with ``install_asyncio()``) loses requests at
every reload: at its stop aiohttp closes at once every connection with no
request in progress, one kept alive between two requests and one accepted
whose request it has not read yet, and a request on its way there is
answered by a close. This runs the app with aiohttp's own runner, and:

* serves on the sockets drover passes (``LISTEN_FDS``, every one of them);
* ``READY=1`` once ``on_startup`` has run and the sockets accept, and
  ``WATCHDOG=1`` from the event loop when drover's ``timeout`` is set;
* SIGTERM and SIGINT: ``STOPPING=1``; stop accepting (this worker's copies
  of the listeners are closed: what is queued is left to the other
  workers); every response from then on says ``Connection: close``; open
  websockets are closed with 1012 ("service restart"); then up to a second
  (never past the drain deadline) for connections between two requests to
  send their next one, which is answered; then aiohttp's shutdown
  (``on_shutdown``, the requests in flight until the SDK's drain deadline,
  ``on_cleanup``); then the SDK's registry; SIGQUIT: the same without the
  wait, bounded by the quick stop's deadline;
* a stop that the drain cannot end (a handler that ignores its
  cancellation) is abandoned once the drain deadline and half of the budget
  left have passed: the registry runs and the process exits 0.

It uses aiohttp internals (the connections' state, the runner's shutdown
timeout), so it checks for them and refuses an aiohttp without them
(tested: 3.14). aiohttp must be installed (``pip install
'drover-worker[aiohttp]'``); this package does not depend on it.
"""

import argparse
import asyncio
import inspect
import os
import sys
import time
import traceback
import weakref
from typing import Any, Dict, List, Optional

import drover_worker as dw
from drover_worker import _launcher

#: drover's "cannot boot".
CANNOT_BOOT = 3

#: The websocket close code for a server that restarts (RFC 6455 registry).
SERVICE_RESTART = 1012

#: The aiohttp versions this was tested with (major, minor).
TESTED = ((3, 14),)


def _log(message: str) -> None:
    sys.stderr.write("drover_worker.aiohttp[%d]: %s\n" % (os.getpid(), message))
    sys.stderr.flush()


class UnsupportedAiohttp(RuntimeError):
    """The installed aiohttp lacks an internal this module relies on."""


def _check_aiohttp() -> Any:
    import aiohttp
    from aiohttp import web, web_protocol, web_request, web_runner

    def has(cls: Any, name: str) -> bool:
        # Slots, class attributes, or the instance attributes BaseRequest
        # lists in its ATTRS.
        return name in getattr(cls, "__slots__", ()) or hasattr(cls, name) or name in getattr(cls, "ATTRS", ())

    missing = ["%s.%s" % (cls.__name__, name) for cls, name in [
        (web_protocol.RequestHandler, "_request_in_progress"),
        (web_protocol.RequestHandler, "_close"),
        (web_protocol.RequestHandler, "_force_close"),
        (web_protocol.RequestHandler, "_task_handler"),
        (web_runner.BaseRunner, "_shutdown_timeout"),
        (web_runner.BaseSite, "_server"),
        (web_request.BaseRequest, "_task"),
        (web.WebSocketResponse, "_writer"),
    ] if not has(cls, name)]
    if missing:
        raise UnsupportedAiohttp(
            "aiohttp %s lacks %s, which drover_worker.aiohttp relies on (tested: aiohttp %s); "
            "install one of those (pip install 'drover-worker[aiohttp]')"
            % (aiohttp.__version__, ", ".join(missing), ", ".join("%d.%d" % v for v in TESTED)))
    version = tuple(int(p) for p in aiohttp.__version__.split(".")[:2] if p.isdigit())
    if version not in TESTED:
        _log("aiohttp %s is not a version this was tested with (%s): a reload may lose requests"
             % (aiohttp.__version__, ", ".join("%d.%d" % v for v in TESTED)))
    return web


def run_app(app: Any, *, sock: Any = None, shutdown_timeout: Optional[float] = None,
            keepalive_timeout: float = 75.0, print: Any = None, **kwargs: Any) -> None:
    """``web.run_app`` for a drover worker: serves ``app`` (an
    ``Application``, or an awaitable of one) on drover's sockets (or on
    ``sock``, a socket or a list of them) until a stop signal, drains as the
    module says, then runs the SDK's registry and returns.

    ``shutdown_timeout`` bounds the wait for the requests in flight at the
    stop as aiohttp's does, but never past the SDK's drain deadline (the
    default: up to it). ``print``, ``keepalive_timeout`` and the other
    keyword arguments (``access_log``, ``access_log_format``,
    ``handler_cancellation``...) are ``web.run_app``'s; ``host``, ``port``,
    ``path``, ``handle_signals`` and ``loop`` are not taken: drover binds
    the sockets and the SDK handles the signals."""
    for name in ("host", "port", "path", "handle_signals", "loop", "reuse_address", "reuse_port"):
        if name in kwargs:
            raise TypeError("drover_worker.aiohttp.run_app() takes no %r: drover binds the sockets and "
                            "the SDK handles the signals" % name)
    if sock is None:
        socks: List[Any] = list(dw.listeners())
    else:
        socks = list(sock) if isinstance(sock, (list, tuple)) else [sock]
    _Server(_check_aiohttp(), socks, shutdown_timeout, print, dict(kwargs, keepalive_timeout=keepalive_timeout)).run(app)
    dw.run_cleanup()


class _Server:
    """aiohttp's AppRunner on drover's sockets, with a drain that loses no
    request."""

    def __init__(self, web: Any, socks: List[Any], shutdown_timeout: Optional[float], print_: Any,
                 kwargs: Any) -> None:
        self.web = web
        self.socks = socks
        self.shutdown_timeout = shutdown_timeout
        self.print = print_
        self.kwargs = kwargs
        self.ready = False
        #: From the stop on, every response says ``Connection: close``.
        self.closing = False
        #: Requests whose response went out without it, before the stop:
        #: their client may send another request on the connection.
        #: (By id: a request is a mapping, unhashable.)
        self.open_responses: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self.websockets: weakref.WeakSet[Any] = weakref.WeakSet()

    def run(self, app: Any) -> None:
        """Serves ``app`` on a loop of its own until the stop, and drains."""
        try:
            dw.will_notify()
        except OSError as e:
            _log("cannot tell drover that READY=1 will follow: %s" % e)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.serve(app))
        finally:
            try:
                tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in tasks:
                    t.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                asyncio.set_event_loop(None)

    async def serve(self, app: Any) -> None:
        web = self.web
        # The SDK's handlers on this loop: the stop sets stop_event and
        # stop_kind, SIGQUIT makes it quick. (Not aiohttp's, which would
        # raise GracefulExit and close every idle connection at once.)
        dw.install_asyncio()
        if inspect.isawaitable(app):
            app = await app
        if not isinstance(app, web.Application):
            raise TypeError("drover_worker.aiohttp serves a web.Application, not %r" % (app,))
        app.on_response_prepare.append(self._on_response_prepare)
        runner = web.AppRunner(app, handle_signals=False, **self.kwargs)
        await runner.setup()  # on_startup
        try:
            for s in self.socks:
                await web.SockSite(runner, s).start()
            if dw.stop_kind() is None:
                names = sorted(str(site.name) for site in runner.sites)
                _log("ready: serving %s with aiohttp" % ", ".join(names))
                if self.print:
                    self.print("======== Running on %s ========" % ", ".join(names))
                self.ready = True
                dw._send_or_log(dw.ready, "READY=1", _log)
                await _launcher.until_stopped(_log)
            dw._send_or_log(dw.stopping, "STOPPING=1", _log)
            await self._let_next_requests_in(runner)
        finally:
            # aiohttp's shutdown: on_shutdown, the requests in flight for up
            # to the runner's shutdown timeout (then cancelled), on_cleanup.
            drain = max(0.1, dw.drain_deadline() - time.monotonic())
            if self.shutdown_timeout is not None:
                drain = min(drain, self.shutdown_timeout)
            runner._shutdown_timeout = drain
            abandon = asyncio.ensure_future(_abandon_at_the_deadline(runner))
            try:
                await runner.cleanup()
            finally:
                abandon.cancel()

    async def _on_response_prepare(self, request: Any, response: Any) -> None:
        if isinstance(response, self.web.WebSocketResponse):
            self.websockets.add(response)
            if self.closing:  # accepted in the grace after the stop
                asyncio.ensure_future(self._close_websocket_once_open(response))
        elif self.closing:
            # Headers are made by now: say it, and have aiohttp close after.
            response.force_close()
            response.headers["Connection"] = "close"
        elif response.keep_alive:
            self.open_responses[id(request)] = request

    async def _let_next_requests_in(self, runner: Any) -> None:
        """Stops accepting, answers every response from now on with
        ``Connection: close``, closes the websockets, then waits (up to a
        second) until no open connection is between requests: once this
        returns, aiohttp's shutdown closes every connection with no request
        in progress, and a request on its way there (on a connection just
        accepted, or the next one on a kept-alive one) would get a close
        for an answer."""
        for site in runner.sites:
            if site._server is not None:
                # asyncio's Server: stops accepting and closes this process's
                # copy of the listener, not drover's.
                site._server.close()
        self.closing = True
        await self._close_websockets()
        server = runner.server
        if server is None:
            return

        def unsettled() -> bool:
            # A response that went out keep-alive before the stop, and
            # whose request has not ended: its client may send another.
            open_ = {id(r.protocol) for r in list(self.open_responses.values()) if r._task is not None}
            return any(_between_requests(c) or id(c) in open_ for c in server.connections if _open(c))

        await _launcher.let_next_requests_in(unsettled)

    async def _close_websockets(self) -> None:
        """aiohttp alone leaves an open websocket to its handler until the
        shutdown timeout, then cancels the handler and drops the connection
        (the client sees 1006, an abnormal closure): each is closed at once
        with 1012 ("service restart": the client reconnects, to another
        worker), and the handler's ``receive()`` returns a close."""
        closes = [asyncio.ensure_future(ws.close(code=SERVICE_RESTART, message=b"service restart"))
                  for ws in list(self.websockets) if not ws.closed]
        if closes:
            # Each waits for its client's close in reply (aiohttp's 10 s
            # at most): not the others' grace.
            await asyncio.wait(closes, timeout=_launcher.FIRST_BYTE_GRACE)


    async def _close_websocket_once_open(self, ws: Any) -> None:
        for _ in range(100):
            if ws._writer is not None:  # its prepare() has ended
                await ws.close(code=SERVICE_RESTART, message=b"service restart")
                return
            await asyncio.sleep(0.01)


def _open(connection: Any) -> bool:
    transport = connection.transport
    return transport is not None and not transport.is_closing() and not connection._force_close


def _between_requests(connection: Any) -> bool:
    """No request in progress: none read yet, or the last one answered."""
    return not connection._request_in_progress and not connection._close


async def _abandon_at_the_deadline(runner: Any) -> None:
    """At the drain deadline, the requests still in flight are cancelled:
    aiohttp's shutdown cancels a handler only once its shutdown timeout has
    passed twice (a wait for the handler, then a wait for the task it only
    asks to stop), and a quick stop, which moves the deadline earlier, would
    end with no ``on_cleanup``. Past the deadline and half of the budget
    left then (a handler that ignores its cancellation), the registry runs
    and the process exits, abandoning what still runs."""
    while not _launcher.drain_over():
        await asyncio.sleep(0.05)
    server = runner.server
    running = [c._task_handler for c in (server.connections if server is not None else [])
               if c._task_handler is not None and not c._task_handler.done()]
    if running:
        _log("drain deadline reached: cancelling %d request(s) in flight" % len(running))
        for task in running:
            task.cancel()
    await _launcher.abandon(_log, "the drain did not end: abandoning the requests in flight")


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = dw.ArgumentParser(
        prog="drover-aiohttp",
        description="Serve an aiohttp application on the sockets drover passes (LISTEN_FDS).",
    )
    p.add_argument("app", help="module:app, a web.Application, or a function (async or not) that returns one")
    p.add_argument("--keepalive-timeout", type=float, default=75.0, help="as web.run_app's (default 75)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="log no request")
    p.add_argument("--chdir", help="change to this directory (and import from it) before loading the app")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dw.begin_launch(args.chdir, _log)
    dw.install(exit_on_stop=False)  # a stop during the import is not lost
    socks = _launcher.listeners(_log)
    if socks is None:
        return CANNOT_BOOT
    try:
        web = _check_aiohttp()
    except ImportError:
        _log("cannot boot: aiohttp is not installed (pip install 'drover-worker[aiohttp]')")
        return CANNOT_BOOT
    except UnsupportedAiohttp as e:
        _log("cannot boot: %s" % e)
        return CANNOT_BOOT
    try:
        app = _launcher.load_app(args.app)
        if not isinstance(app, web.Application) and callable(app):
            app = app()
    except BaseException:
        _launcher.log_load_failure(args.app, _log)
        return CANNOT_BOOT
    extra: Dict[str, Any] = {"keepalive_timeout": args.keepalive_timeout}
    if not args.access_log:
        extra["access_log"] = None
    server = _Server(web, socks, None, None, extra)
    try:
        server.run(app)
    except Exception:
        sys.stderr.write(traceback.format_exc())
        if not server.ready:
            _log("cannot boot: the application's startup failed (traceback above)")
            dw.run_cleanup()
            return CANNOT_BOOT
    dw.run_cleanup()
    _log("stopped")
    dw._bound_exit(_log)
    return 0


def console_main() -> None:
    """The ``drover-aiohttp`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())

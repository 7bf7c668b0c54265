"""Run an ASGI (or WSGI) app under Hypercorn as a drover worker.

    python -m drover_worker.hypercorn [options] module:app
    drover-hypercorn [options] module:app

``hypercorn --bind fd://3`` serves on drover's socket, but sends no
``READY=1`` (drover cannot wait for the lifespan startup), serves from a
child process of its own, and exits 0 when the app cannot be imported
(Hypercorn 0.18.0). This launcher runs Hypercorn's asyncio worker
(``hypercorn.asyncio.run.worker_serve``) in this process, on the sockets
drover passes (``LISTEN_FDS``, TCP or Unix):

* ``X_DROVER_WILL_NOTIFY=1`` before the import, ``READY=1`` once the app is
  imported, its lifespan startup has completed and the sockets accept;
  an app that cannot be imported, or whose lifespan startup fails, exits
  with status 3 ("cannot boot");
* SIGTERM and SIGINT: Hypercorn's graceful shutdown (stop accepting, finish
  the requests in flight, lifespan shutdown), after up to a second in which
  every response says ``Connection: close`` and connections between
  requests may send one more (Hypercorn alone closes them at once, racing
  the client's next request), its ``graceful_timeout`` set to the SDK's
  drain deadline; SIGQUIT: the same with the quick stop's
  shorter deadline. Whatever is still running at the drain deadline plus
  the lifespan shutdown's share is abandoned;
* then the SDK's cleanup registry runs, and the process exits 0;
* ``WATCHDOG=1`` from the event loop when drover's ``timeout`` is set;
* behind a proxy, its ``X-Forwarded-Proto`` and ``X-Forwarded-For`` are
  believed from ``--forwarded-allow-ips`` and Unix-socket peers, as
  drover-uvicorn believes them (``drover_worker._forwarded``): Hypercorn reads
  neither.

Hypercorn starts serving, then awaits the shutdown trigger it is given:
the launcher's trigger sends ``READY=1`` and returns at the stop, once no
connection is between requests (Hypercorn then closes every connection
without one in progress). That order, ``worker_serve``'s arguments, its
per-connection ``TCPServer`` (which the launcher subclasses to see requests
start and end) and ``keep_alive_max_requests`` (set to 0 at the stop: every
response then says ``Connection: close``) are Hypercorn internals, so the
launcher runs only with the Hypercorn versions it was tested with
(``TESTED``); ``--untested-hypercorn`` runs it with another one anyway.
Hypercorn must be installed (``pip install hypercorn==0.18.0``); this
package does not depend on it.
"""

import argparse
import asyncio
import os
import sys
import time
import traceback
import weakref
from importlib.metadata import version
from typing import Any, List, Optional

import drover_worker as dw
from drover_worker import _forwarded, _launcher

#: drover's "cannot boot".
CANNOT_BOOT = 3
#: The websocket close code for a server that restarts (RFC 6455 registry).
SERVICE_RESTART = 1012
#: The Hypercorn versions this launcher was tested with (tests/third_party.rs).
TESTED = ("0.18.0",)


def _log(message: str) -> None:
    sys.stderr.write("drover_worker.hypercorn[%d]: %s\n" % (os.getpid(), message))
    sys.stderr.flush()


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = dw.ArgumentParser(
        prog="drover-hypercorn",
        description="Serve an ASGI application with Hypercorn on the sockets drover passes (LISTEN_FDS).",
    )
    p.add_argument("app", help="module:app")
    p.add_argument("--config", help="a Hypercorn configuration, as Hypercorn's --config: FILE.toml, "
                                    "python:MODULE or file:FILE.py (its binds and workers are ignored)")
    p.add_argument("--proxy-headers", dest="proxy_headers", action="store_true", default=True,
                   help="believe X-Forwarded-Proto and X-Forwarded-For from --forwarded-allow-ips and Unix-socket "
                        "peers, as drover-uvicorn (the default)")
    p.add_argument("--no-proxy-headers", dest="proxy_headers", action="store_false",
                   help="believe no proxy headers")
    p.add_argument("--forwarded-allow-ips", default=None,
                   help="the peers whose proxy headers are believed (addresses or networks, comma separated, or *; "
                        "default $FORWARDED_ALLOW_IPS, else 127.0.0.1,::1); Unix-socket peers always are")
    p.add_argument("--chdir", help="change to this directory (and import from it) before loading the app")
    p.add_argument("--untested-hypercorn", action="store_true",
                   help="run with a Hypercorn version other than %s" % ", ".join(TESTED))
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
    hypercorn = _import_hypercorn(args.untested_hypercorn)
    if hypercorn is None:
        return CANNOT_BOOT
    try:
        config = _config(hypercorn, args.config)
    except Exception as e:
        _log("cannot boot: cannot load the Hypercorn configuration %r: %s" % (args.config, e))
        return CANNOT_BOOT
    try:
        app = _launcher.load_app(args.app)
    except BaseException:
        _launcher.log_load_failure(args.app, _log)
        return CANNOT_BOOT
    # Again after the import: a stop handler the app installed is chained
    # after ours, not left in our place (it would stop us without a drain).
    dw.install(exit_on_stop=False)
    server = _Server(hypercorn, app, config, socks, trusted)
    try:
        asyncio.run(server.serve())
    except Exception:
        sys.stderr.write(traceback.format_exc())
        if not server.ready:
            _log("cannot boot: the application's lifespan startup failed (traceback above)")
            return CANNOT_BOOT
        _log("Hypercorn failed (traceback above)")
        dw.run_cleanup()
        return 1
    dw.run_cleanup()
    _log("stopped")
    dw._bound_exit(_log)
    return 0


def _import_hypercorn(untested: bool) -> Any:
    try:
        import hypercorn
        import hypercorn.asyncio.run
        import hypercorn.config
        import hypercorn.events
        import hypercorn.utils
    except ImportError as e:
        _log("cannot boot: Hypercorn is not installed (pip install hypercorn==%s): %s" % (TESTED[-1], e))
        return None
    found = version("hypercorn")
    if found not in TESTED and not untested:
        _log("cannot boot: Hypercorn %s is not a version this launcher was tested with (%s); "
             "it uses Hypercorn internals: pin hypercorn==%s, or pass --untested-hypercorn"
             % (found, ", ".join(TESTED), TESTED[-1]))
        return None
    return hypercorn


def _config(hypercorn: Any, path: Optional[str]) -> Any:
    """Hypercorn's configuration, loaded as its command line does."""
    Config = hypercorn.config.Config
    if path is None:
        return Config()
    if path.startswith("python:"):
        return Config.from_object(path[len("python:"):])
    if path.startswith("file:"):
        return Config.from_pyfile(path[len("file:"):])
    return Config.from_toml(path)


class _Server:
    """One Hypercorn worker on drover's sockets, whose shutdown trigger tells
    drover what happens."""

    def __init__(self, hypercorn: Any, app: Any, config: Any, socks: List[Any],
                 trusted: Optional[_forwarded.Trusted]) -> None:
        self.hypercorn = hypercorn
        self.app = hypercorn.utils.wrap_app(app, config.wsgi_max_body_size, None)
        if trusted is not None:
            # Hypercorn reads no proxy headers (a WSGI app's environ is made
            # from the scope: it gets them too).
            self.app = _forwarded.asgi(self.app, trusted)
        self.config = config
        self.socks = socks
        self.ready = False
        #: From the stop on, every response says ``Connection: close``.
        self.closing = False
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()

    async def serve(self) -> None:
        run = self.hypercorn.asyncio.run
        # worker_serve makes one TCPServer per connection: this one tells
        # which connections are between requests.
        run.TCPServer = _tracked(run.TCPServer, self.hypercorn.events.Updated, self)
        sockets = self.hypercorn.config.Sockets([], list(self.socks), [])
        await run.worker_serve(self.app, self.config, sockets=sockets, shutdown_trigger=self._trigger)

    async def _trigger(self) -> None:
        """Hypercorn awaits this once the lifespan startup is complete and
        its servers accept; it stops when this returns."""
        if dw.stop_kind() is None:
            _log("ready: serving %s with Hypercorn" % ", ".join(dw._describe(s) for s in self.socks))
            self.ready = True
            dw._send_or_log(dw.ready, "READY=1", _log)
            await _launcher.until_stopped(_log)
        dw._send_or_log(dw.stopping, "STOPPING=1", _log)
        # The drain deadline of the stop as it began: a stop that turns
        # quick during the wait below is bounded by the abandon, which exits
        # leaving the requests in flight unanswered (Hypercorn's own timeout
        # would cancel them, and answer each a 500).
        drain_deadline = dw.drain_deadline()
        await self._let_next_requests_in()
        # Hypercorn reads both when it shuts down, after this returns: the
        # drain gets the SDK's drain deadline, the lifespan shutdown half of
        # what is left after it (the other half is the registry's).
        drain = max(0.1, drain_deadline - time.monotonic())
        self.config.graceful_timeout = drain
        self.config.shutdown_timeout = max(0.1, (dw.remaining_budget() - drain) / 2)
        asyncio.ensure_future(self._abandon_at_the_deadline())

    async def _let_next_requests_in(self) -> None:
        """Stops accepting and answers every response from now on with
        ``Connection: close``, then waits (up to a second) until no open
        connection is between requests: once this returns, Hypercorn closes
        every connection without a request in progress, and a client whose
        request was on its way (on a connection accepted just before, or its
        next request on a kept-alive one) would see it closed unanswered
        (without this wait, 3 of 6 reloads under load on Python 3.13 had 1
        to 5 such requests, and 16 clients on kept-alive connections 27)."""
        loop = asyncio.get_running_loop()
        for sock in self.socks:
            loop.remove_reader(sock.fileno())  # asyncio's accept callback
        # Hypercorn's HTTP/1.1 answers Connection: close once a connection
        # has served keep_alive_max_requests, a value it reads per response.
        self.config.keep_alive_max_requests = 0
        self.closing = True
        connections = self.connections
        await self._close_websockets()
        await _launcher.let_next_requests_in(lambda: any(c.unsettled() for c in list(connections)))

    async def _close_websockets(self) -> None:
        """Hypercorn leaves an open websocket alone at its shutdown until its
        graceful_timeout, then cancels the app, and the client gets 1011
        ("internal error"): a reload held the old worker for the whole drain
        (up to 24 s of drover's default 30 s) and told every client that the
        server failed. As uvicorn does, each is closed at once with 1012
        ("service restart": the client reconnects, to another worker), and
        the app's receive gets ``websocket.disconnect`` with that code."""
        from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
        from wsproto.events import CloseConnection

        for connection in list(self.connections):
            protocol = getattr(getattr(connection, "protocol", None), "protocol", None)
            streams = [getattr(protocol, "stream", None)] + list(getattr(protocol, "streams", {}).values())
            for stream in streams:
                if not isinstance(stream, WSStream) or stream.state != ASGIWebsocketState.CONNECTED:
                    continue
                # CLOSED first: the app's return then sends no second close.
                stream.state = ASGIWebsocketState.CLOSED
                await stream._send_wsproto_event(CloseConnection(code=SERVICE_RESTART))
                if stream.app_put is not None:
                    await stream.app_put({"type": "websocket.disconnect", "code": SERVICE_RESTART})

    async def _abandon_at_the_deadline(self) -> None:
        """Hypercorn's own timeouts bound its drain and lifespan shutdown,
        except a quick stop's earlier deadline and, on Python 3.12 and
        later, asyncio's ``Server.wait_closed``, which waits for every
        connection: past the drain deadline and the lifespan shutdown's
        share of what is left, the registry runs and the process exits,
        abandoning what still runs."""
        while not _launcher.drain_over():
            await asyncio.sleep(0.05)
        await _launcher.abandon(_log, "drain deadline reached with requests in flight: abandoning them")


def _tracked(base: Any, updated: Any, server: _Server) -> Any:
    """Hypercorn's TCPServer, listed in ``server.connections``, that knows
    whether it is between requests (its protocol reports it idle, or it has
    not started one yet)."""
    if getattr(base, "drover_tracked", False):
        return base

    class Tracked(base):
        drover_tracked = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.idle = True
            # Whether its request started before the stop: its response
            # may have gone out without Connection: close.
            self.started_open = False
            server.connections.add(self)

        def unsettled(self) -> bool:
            """Open, and between requests or in one whose client may still
            send another on it."""
            return (self.idle or self.started_open) and not self.writer.is_closing()

        async def protocol_send(self, event: Any) -> None:
            if isinstance(event, updated):
                self.idle = event.idle
                self.started_open = not event.idle and not server.closing
            await super().protocol_send(event)

    return Tracked


def console_main() -> None:
    """The ``drover-hypercorn`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())

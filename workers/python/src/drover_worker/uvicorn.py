"""Run an ASGI app under uvicorn as a drover worker.

    python -m drover_worker.uvicorn [options] module:app
    drover-uvicorn [options] module:app

What ``uvicorn --fd 3`` lacks under drover, this adds:

* it serves on the sockets drover passes (``LISTEN_FDS``, every one of them,
  TCP or Unix), not on a socket uvicorn binds;
* ``X_DROVER_WILL_NOTIFY=1`` before the import (docs/protocol.md), and
  ``READY=1`` once the app is imported and its lifespan startup has
  completed, just before uvicorn accepts on the sockets: drover's ``ready = "notify"`` (and a reload) waits
  for real readiness;
* an app that cannot be imported (any exception, or no such attribute) exits
  with status 3, "cannot boot", so that drover stops instead of respawning it
  forever; a failed lifespan startup exits 3 too (uvicorn's own status);
* SIGTERM and SIGINT: uvicorn's graceful shutdown (stop accepting, finish
  in-flight requests, lifespan shutdown), after up to a second in which every
  response says ``Connection: close`` and connections between requests may
  send one more (uvicorn alone closes them at once, racing the client's next
  request), bounded by the SDK's drain deadline
  (``drover_worker.drain_deadline()``): requests still running then are
  cancelled, so that the rest of the budget is the cleanup's. SIGQUIT: a
  quick stop (uvicorn's force exit: no waiting, no lifespan shutdown);
* then the SDK's cleanup registry runs (``drover_worker.on_exit``), and the
  process exits 0;
* ``WATCHDOG=1`` from the event loop when drover's ``timeout`` is set, so a
  blocked loop is caught;
* SIGUSR1, which drover forwards when it reopens its log, is ignored unless
  the app handles it (its default action would kill the worker);
* ``preload = true``: the app is imported once per generation by a template
  (``drover_worker.preload``) and the workers are forked from it.
* behind a proxy on a Unix socket, its ``X-Forwarded-Proto`` and
  ``X-Forwarded-For`` are believed, as drover-wsgi believes a Unix-socket
  peer: uvicorn's ``--forwarded-allow-ips`` matches addresses, and such a
  peer has none (TCP peers are judged by it as before).

Uvicorn must be installed (``pip install uvicorn``); this package does not
depend on it. Options not listed here are uvicorn's defaults.
"""

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from typing import Any, List, Optional

import drover_worker as dw
from drover_worker import _launcher, preload

#: Uvicorn's own status for a failed startup, and drover's "cannot boot".
CANNOT_BOOT = 3


def _log(message: str) -> None:
    sys.stderr.write("drover_worker.uvicorn[%d]: %s\n" % (os.getpid(), message))
    sys.stderr.flush()


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = dw.ArgumentParser(
        prog="drover-uvicorn",
        description="Serve an ASGI application with uvicorn on the sockets drover passes (LISTEN_FDS).",
    )
    p.add_argument("app", help="module:app, as uvicorn's")
    p.add_argument("--factory", action="store_true", help="the app is a factory: call it (as uvicorn's --factory)")
    p.add_argument("--lifespan", choices=["auto", "on", "off"], default="auto", help="as uvicorn's (default auto)")
    p.add_argument("--loop", default="auto", help="as uvicorn's: auto, asyncio or uvloop (default auto)")
    p.add_argument("--http", default="auto", help="as uvicorn's: auto, h11 or httptools (default auto)")
    p.add_argument("--ws", default="auto", help="as uvicorn's (default auto)")
    p.add_argument("--log-level", default=None, help="as uvicorn's (default info)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="as uvicorn's")
    p.add_argument("--proxy-headers", dest="proxy_headers", action="store_true", default=True,
                   help="as uvicorn's (the default)")
    p.add_argument("--no-proxy-headers", dest="proxy_headers", action="store_false", help="as uvicorn's")
    p.add_argument("--forwarded-allow-ips", default=None, help="as uvicorn's")
    p.add_argument("--root-path", default="", help="as uvicorn's")
    p.add_argument("--timeout-keep-alive", type=int, default=5, help="as uvicorn's (default 5)")
    p.add_argument("--limit-concurrency", type=int, default=None, help="as uvicorn's")
    p.add_argument("--limit-max-requests", type=int, default=None,
                   help="as uvicorn's: exit after this many requests (drover starts a replacement at once)")
    p.add_argument("--chdir", help="change to this directory (and import from it) before loading the app")
    p.add_argument("--app-dir", help="import the app from this directory (put first on sys.path, as uvicorn's --app-dir)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dw.begin_launch(args.chdir, _log)
    if args.app_dir:
        sys.path.insert(0, os.path.abspath(args.app_dir))
    # The SDK's handlers first: a stop during the import is not lost, SIGQUIT
    # does not kill us, and the handlers uvicorn restores when it returns
    # (and the signal it then raises again) are ours, not the default action.
    # (A preload template handles stops itself: it just exits.)
    if not preload.active():  # type: ignore[no-untyped-call]
        dw.install(exit_on_stop=False)
    socks = _launcher.listeners(_log)
    if socks is None:
        return CANNOT_BOOT
    try:
        import uvicorn
    except ImportError:
        _log("cannot boot: uvicorn is not installed (pip install uvicorn)")
        return CANNOT_BOOT
    config = uvicorn.Config(
        args.app, factory=args.factory, lifespan=args.lifespan, loop=args.loop, http=args.http, ws=args.ws,
        log_level=args.log_level, access_log=args.access_log, proxy_headers=args.proxy_headers,
        forwarded_allow_ips=args.forwarded_allow_ips, root_path=args.root_path,
        timeout_keep_alive=args.timeout_keep_alive, limit_concurrency=args.limit_concurrency,
        limit_max_requests=args.limit_max_requests,
    )
    try:
        # With preload = true this process is the template: it imports the
        # app once per generation and returns here only in the workers it
        # forks (a reload then imports once, not once per worker).
        preload.run(config.load)  # type: ignore[no-untyped-call]
    except BaseException:  # uvicorn's own import error is a SystemExit(1)
        _launcher.log_load_failure(args.app, _log)
        return CANNOT_BOOT
    dw.install(exit_on_stop=False)  # a forked worker's; again, harmless, otherwise
    if any(s.family == socket.AF_UNIX for s in socks):
        _trust_unix_peers(config.loaded_app)
    if dw.stop_kind() is not None:
        return _stopped_before_start()
    server = _server_class(uvicorn.Server)(config)
    _quick_on_sigquit(server)
    try:
        server.run(sockets=list(socks))
    except SystemExit as e:
        if e.code not in (None, 0):
            _log("cannot boot: the application's startup failed (status %s)" % e.code)
            return CANNOT_BOOT if e.code == CANNOT_BOOT else int(e.code) if isinstance(e.code, int) else 1
        raise
    if not server.started:
        _log("cannot boot: the server did not start")
        return CANNOT_BOOT
    if server.limit_max_requests is not None and dw.stop_kind() is None:
        dw.stopping()  # --limit-max-requests: replaced at once, not a crash
    dw.run_cleanup()
    _log("stopped")
    dw._bound_exit(_log)
    return 0


def _trust_unix_peers(app: Any) -> None:
    """Makes uvicorn's proxy headers trust a Unix-socket peer, as drover-wsgi
    (and Gunicorn) do. uvicorn checks the peer's address against
    ``--forwarded-allow-ips``, and a Unix-socket peer has none: behind nginx
    on a Unix socket, ``X-Forwarded-Proto`` and ``X-Forwarded-For`` were
    ignored (an https site saw ``http``, and no client address), unless
    ``--forwarded-allow-ips '*'``, which also believes the leftmost,
    client-written, ``X-Forwarded-For`` entry. A TCP peer is judged as before,
    and so is the client address taken from the header."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    if isinstance(app, ProxyHeadersMiddleware):  # not with --no-proxy-headers
        app.trusted_hosts = _UnixPeersToo(app.trusted_hosts)  # type: ignore[assignment]  # duck-typed


class _UnixPeersToo:
    """uvicorn's trusted hosts, and the peer without an address: uvicorn
    gives ``scope["client"]`` as None for a Unix-socket peer."""

    def __init__(self, hosts: Any) -> None:
        self.hosts = hosts

    def __contains__(self, host: Optional[str]) -> bool:
        return host is None or host in self.hosts

    def get_trusted_client_address(self, x_forwarded_for: str) -> Any:
        return self.hosts.get_trusted_client_address(x_forwarded_for)


def _stopped_before_start() -> int:
    _log("stopped before the server started")
    dw.run_cleanup()
    return 0


def _server_class(base: Any) -> Any:
    class DroverServer(base):
        """uvicorn's Server, telling drover what happens."""

        async def startup(self, sockets: Optional[List[Any]] = None) -> None:
            # READY=1 between the lifespan startup and the first accept, not
            # after it: drover's sockets already listen (a connection waits in
            # their queue for the moment until uvicorn accepts), and drover
            # restores a boot_priority at READY=1, so that the first requests
            # are not served at the boot's priority.
            lifespan = self.lifespan
            await lifespan.startup()
            if not lifespan.should_exit and not self.should_exit:
                _log("ready: serving %s" % ", ".join(dw._describe(s) for s in sockets or []))
                dw._send_or_log(dw.ready, "READY=1", _log)
            lifespan.startup = _started  # done above; uvicorn's startup would run it again
            await super().startup(sockets=sockets)  # exits 3 if the lifespan startup failed
            if self.should_exit:
                return
            interval = dw.watchdog_interval()
            if interval:
                self._drover_beat = asyncio.ensure_future(_heartbeats(interval))

        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn's handler while it serves: the SDK's bookkeeping (the
            # stop's time and kind, for the budget) and the drain's bound.
            dw._stop_signal("graceful")
            self.config.timeout_graceful_shutdown = max(0.1, dw.drain_deadline() - time.monotonic())
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Optional[List[Any]] = None) -> None:
            dw._send_or_log(dw.stopping, "STOPPING=1", _log)
            if self.config.timeout_graceful_shutdown is None:
                self.config.timeout_graceful_shutdown = max(0.1, dw.drain_deadline() - time.monotonic())
            if not self.force_exit:
                await self._let_next_requests_in()
            await super().shutdown(sockets=sockets)

        async def _let_next_requests_in(self) -> None:
            """Stops accepting and answers every response from now on with
            ``Connection: close``, then waits (up to a second) until
            no open connection is between requests: uvicorn's shutdown closes
            such a connection at once, and a client whose request was on its
            way (on a connection accepted just before, or its next request on
            a kept-alive one) would see it closed unanswered."""
            for server in getattr(self, "servers", []):
                server.close()
            connections = self.server_state.connections
            # The lists of headers every request's cycle adds to its
            # response's: the current one (uvicorn no longer replaces it once
            # it stops serving) and the ones of the requests in flight, which
            # may hold the list of the second before (uvicorn makes a new one
            # every second, for its Date header). uvicorn's h11 protocol does
            # not say `Connection: close` itself when it closes after a
            # response: a client would send its next request on a closed
            # connection (in about 1 stop in 10, before these were added to).
            lists = [self.server_state.default_headers]
            lists += [c.cycle.default_headers for c in connections if getattr(c, "cycle", None) is not None]
            for headers in {id(h): h for h in lists}.values():
                headers.append((b"connection", b"close"))
            await _launcher.let_next_requests_in(lambda: any(_between_requests(c) for c in connections))

    return DroverServer


async def _started() -> None:
    """The lifespan startup, once it has run."""


def _between_requests(connection: Any) -> bool:
    """An open HTTP connection with no request in progress (none yet, or the
    last one answered)."""
    cycle = getattr(connection, "cycle", False)  # websockets have none
    if cycle is False or connection.transport.is_closing():
        return False
    return cycle is None or bool(getattr(cycle, "response_complete", False))


def _quick_on_sigquit(server: Any) -> None:
    """SIGQUIT (a quick stop, or drover's escalation): the SDK's handler,
    then uvicorn's force exit."""
    previous = signal.getsignal(signal.SIGQUIT)

    def quick(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        server.should_exit = True
        server.force_exit = True
        server.config.timeout_graceful_shutdown = 0.1

    dw._set_signal(signal.SIGQUIT, quick)


async def _heartbeats(interval: float) -> None:
    while True:
        dw._beat(_log)
        await asyncio.sleep(interval / 2)


def console_main() -> None:
    """The ``drover-uvicorn`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())

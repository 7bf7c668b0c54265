"""drover_wsgi: a WSGI worker for drover (standard library only, Python 3.8+).

    drover-wsgi [options] module:app
    python -m drover_wsgi [options] module:app

It serves the WSGI application ``module:app`` (``module`` alone means
``module:application``; ``module:make_app()`` calls a factory) on the listening
sockets drover passes (``LISTEN_FDS``), with a pool of threads, HTTP/1.1
keep-alive (at most ``--keepalive-requests`` requests per connection) and the
worker contract: ``READY=1`` once the app is imported and
the pool accepts, exit status 3 when the app cannot be imported, a graceful
stop on SIGTERM/SIGINT and a quick one on SIGQUIT, recycling after
``--max-requests``, and the cleanup registry of ``drover_worker`` run on every
stop. The current directory is put first on ``sys.path`` (as gunicorn does).
Before it imports the app it tells drover that READY=1 will follow
(``X_DROVER_WILL_NOTIFY=1``, see docs/protocol.md).

``--core`` picks the server core: ``native`` (the ``drover_wsgi_native``
extension module, ``pip install ./workers/python/native``), ``python`` (pure
Python) or ``auto`` (the default): native when it can be imported. One log
line at start says which runs (docs/drover-wsgi-native.md).

The modules: :mod:`drover_wsgi.http` (request parsing and its limits),
:mod:`drover_wsgi.server` (connections, bodies, responses, the pool and its
stop), :mod:`drover_wsgi.native` (the native core's adapter),
:mod:`drover_wsgi.accesslog`, :mod:`drover_wsgi.proxy`.
"""

import argparse
import importlib
import os
import random
import signal
import socket
import sys
import threading
from typing import Any, Callable, List, Optional, Tuple

import drover_worker as dw
from drover_worker import preload

from .accesslog import COMBINED, AccessLog
from .http import DEFAULT_LIMITS, MAX_HEAD, HTTPError, Limits, Request, parse_request, split_target
from .proxy import DEFAULT_FORWARDER_HEADERS, Proxy, default_allow_ips, mount_from_env, parse_scheme_headers
from .server import Server, log

__all__ = [
    "main", "console_main", "load_app", "parse_args", "Server", "AccessLog", "Proxy", "Limits",
    "DEFAULT_LIMITS", "MAX_HEAD", "HTTPError", "Request", "parse_request", "split_target",
]


def load_app(spec: str) -> Callable[..., Any]:
    """The WSGI callable named by ``module:attr`` (see the module docstring)."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "application"
    call = attr.endswith("()")
    if call:
        attr = attr[:-2]
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if call:
        obj = obj()
    if not callable(obj):
        raise TypeError("%s is not callable" % spec)
    return obj  # type: ignore[no-any-return]


def _seconds(text: str) -> Optional[float]:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return None if value == 0 else value


CORES = ("auto", "native", "python")
# drover-wsgi-native is not on a package index: it is built from drover's source.
NATIVE_HINT = "build it from drover's source: pip install ./workers/python/native (CPython 3.10+, cargo)"


def choose_core(choice: str) -> Tuple[Optional[Callable[..., Any]], str]:
    """The server class for ``--core`` and the start-up line that says which
    core runs (and, for the fallback, why); (None, why) when ``--core native``
    cannot be had."""
    if choice == "python":
        return Server, "pure-Python core (--core python)"
    from . import native

    module, why = native.load()
    if module is not None:
        return native.NativeServer, "native core (drover_wsgi_native %s)" % module.__version__
    if choice == "native":
        return None, "--core native: %s (%s)" % (why, NATIVE_HINT)
    return Server, "pure-Python core (%s; %s)" % (why, NATIVE_HINT)


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = dw.ArgumentParser(
        prog="drover-wsgi",
        description="Serve a WSGI application on the sockets drover passes (LISTEN_FDS).",
    )
    p.add_argument("app", help="module:app (module alone: module:application; module:factory() calls it)")
    p.add_argument("--threads", type=int, default=4, help="threads serving requests (default 4)")
    p.add_argument("--max-requests", type=int, default=0, help="exit 0 after this many requests (default 0: never)")
    p.add_argument("--max-requests-jitter", type=int, default=0, help="add up to this many, at random, to --max-requests")
    p.add_argument("--keepalive", type=float, default=5.0, help="seconds an idle keep-alive connection is kept (default 5)")
    p.add_argument("--keepalive-requests", type=int, default=1000,
                   help="requests a connection may carry: the Nth response says Connection: close, so that "
                        "long-lived clients reconnect and spread over the workers (default 1000, 0: no limit)")
    p.add_argument("--io-timeout", type=float, default=30.0,
                   help="seconds to wait for a client's bytes within a request, or for it to take a response (default 30)")
    p.add_argument("--header-timeout", type=_seconds, default=20.0,
                   help="seconds a request head may take from its first byte; then 408 (default 20, 0: no limit)")
    p.add_argument("--body-timeout", type=_seconds, default=20.0,
                   help="seconds a request body may take from the end of its head, plus 1 s per "
                        "--body-min-rate bytes received; then 408 (default 20, 0: no limit)")
    p.add_argument("--body-min-rate", type=int, default=500,
                   help="bytes per second that earn a slow body more time (default 500, 0: none)")
    p.add_argument("--limit-request-line", type=int, default=4094,
                   help="longest request line in bytes, as gunicorn's; longer is a 400 (default 4094, 0: 8190)")
    p.add_argument("--limit-request-fields", type=int, default=100,
                   help="most header fields, as gunicorn's; more is a 431 (default 100, at most 32768)")
    p.add_argument("--limit-request-field-size", "--limit-request-field_size", type=int, default=8190,
                   help="longest header field line in bytes, as gunicorn's; longer is a 431 (default 8190, 0: no limit)")
    p.add_argument("--access-logfile", metavar="FILE",
                   help="write an access log line per request to FILE ('-' or 'stdout': standard output, "
                        "'stderr': standard error); off by default")
    p.add_argument("--access-logformat", default=COMBINED,
                   help="gunicorn's access_log_format, or 'combined' (the default) or 'common'")
    p.add_argument("--forwarded-allow-ips", default=None,
                   help="peers (addresses or networks, comma separated, or '*') whose secure scheme and forwarder "
                        "headers are trusted (default $FORWARDED_ALLOW_IPS or '127.0.0.1,::1'; Unix peers always)")
    p.add_argument("--secure-scheme-headers", default=None,
                   help="NAME=VALUE,... meaning HTTPS (default X-FORWARDED-PROTOCOL=ssl,X-FORWARDED-PROTO=https,"
                        "X-FORWARDED-SSL=on; '' for none)")
    p.add_argument("--forwarder-headers", default=DEFAULT_FORWARDER_HEADERS,
                   help="header names with '_' a trusted proxy may set (default SCRIPT_NAME,PATH_INFO)")
    p.add_argument("--core", default=None, metavar="{auto,native,python}",
                   help="the server core: native (drover_wsgi_native, pip install ./workers/python/native), "
                        "python (pure Python) or auto: native when it can be imported (default $DROVER_WSGI_CORE or auto)")
    p.add_argument("--chdir", help="change to this directory (and import from it) before loading the app")
    p.add_argument("--bind", help="development only: bind this address when not started by drover (host:port or unix:/path)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.max_requests < 0 or args.max_requests_jitter < 0:
        p.error("--max-requests and --max-requests-jitter must not be negative")
    if args.keepalive_requests < 0:
        p.error("--keepalive-requests must not be negative")
    if args.body_min_rate < 0:
        p.error("--body-min-rate must not be negative")
    if args.core is None:
        args.core = os.environ.get("DROVER_WSGI_CORE") or "auto"
        if args.core not in CORES:
            p.error("DROVER_WSGI_CORE=%s: choose from %s" % (args.core, ", ".join(CORES)))
    elif args.core not in CORES:
        p.error("--core %s: choose from %s" % (args.core, ", ".join(CORES)))
    try:
        args.limits = Limits(args.limit_request_line, args.limit_request_fields, args.limit_request_field_size)
        scheme_headers = None if args.secure_scheme_headers is None else parse_scheme_headers(args.secure_scheme_headers)
        args.proxy = Proxy(args.forwarded_allow_ips if args.forwarded_allow_ips is not None else default_allow_ips(),
                           scheme_headers, args.forwarder_headers)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Before the import (which may be slow): drover may wait for READY=1, and
    # forwards SIGUSR1 to booting workers too (see _on_sigusr1).
    usr1_ignored_here = dw.begin_launch(args.chdir, log)
    # Early, so that a stop during the import is not lost; again after the
    # import, so that handlers the app installed are chained, not lost. (A
    # preload template handles stops itself: it just exits.)
    if not preload.active():
        dw.install(exit_on_stop=False)  # we drain, then run the registry ourselves
    passed = "LISTEN_FDS" in os.environ
    try:
        socks = dw.listeners_or_bind(args.bind) if args.bind else dw.listeners()
        if not socks:
            raise dw.ListenError("no listening sockets (LISTEN_FDS=0)")
        for s in socks:
            if s.type != socket.SOCK_STREAM or not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise dw.ListenError("inherited fd %d (%s) is not a listening stream socket" % (s.fileno(), s.name))
    except (dw.ListenError, OSError) as e:
        alone = "" if passed or args.bind else "; to try the app without drover: --bind 127.0.0.1:8000 (development only)"
        log("cannot boot: %s%s" % (e, alone))
        return 3
    server_class, core_line = choose_core(args.core)
    if server_class is None:
        log("cannot boot: %s" % core_line)
        return 3
    log(core_line)
    access_log = None
    opened_by = os.getpid()
    if args.access_logfile:
        try:
            access_log = AccessLog(args.access_logfile, args.access_logformat)
        except (OSError, ValueError) as e:
            log("cannot boot: access log: %s" % e)
            return 3
    try:
        # With preload = true, this process is the template: it loads the app
        # once and returns here only in the workers it forks.
        app = preload.run(lambda: load_app(args.app))
    except BaseException:
        import traceback

        sys.stderr.write(traceback.format_exc())
        log("cannot boot: cannot load the application %r (traceback above)" % args.app)
        return 3
    if access_log is not None and os.getpid() != opened_by:
        # Forked by a preload template, which opened the file at its boot and
        # gets no SIGUSR1: since a log rotation, its descriptor is the old file's.
        try:
            access_log.reopen()
        except OSError as e:
            log("cannot reopen the access log: %s" % e)
    app = mount_from_env(app)  # Gunicorn's SCRIPT_NAME=/prefix in the environment
    dw.install(exit_on_stop=False)
    _unblock_stop_signals()
    _on_sigusr1(access_log, usr1_ignored_here)

    max_requests = args.max_requests
    if max_requests and args.max_requests_jitter:
        max_requests += random.randint(0, args.max_requests_jitter)
    server = server_class(app, socks, threads=args.threads, keepalive=args.keepalive,
                    keepalive_requests=args.keepalive_requests, io_timeout=args.io_timeout,
                    max_requests=max_requests, limits=args.limits, proxy=args.proxy, access_log=access_log,
                    header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                    body_min_rate=args.body_min_rate)
    _on_sigwinch(server)
    server.start()
    interval = dw.watchdog_interval()
    if interval:
        threading.Thread(target=server.heartbeats, args=(interval,), name="drover-heartbeat", daemon=True).start()
    if dw.stop_kind() is None:
        dw._send_or_log(dw.ready, "READY=1", log)
        log("ready: %s, %d thread(s), serving %s" % (
            args.app, server.nthreads, ", ".join("%s (%s)" % (dw._describe(s), s.name) for s in socks)))

    kind = server.wait_for_stop()
    dw._send_or_log(dw.stopping, "STOPPING=1", log)
    if kind == "recycle":
        log("served %d requests (--max-requests): recycling" % max_requests)
    finished = server.stop(kind)
    server.linger_leftovers()
    dw.run_cleanup()
    log("stopped")
    if not finished:
        # Threads still run a request: do not let interpreter shutdown wait
        # for (or trip over) them. atexit handlers still run.
        dw._exit_skipping_teardown(wait_for_threads=False)
    dw._bound_exit(log)
    return 0


def _unblock_stop_signals() -> None:
    """The stop signals, unblocked if the app blocked them at its import
    (``signal.pthread_sigmask``, itself or through a library): the pool's
    threads would inherit the mask, and every stop wait for drover's SIGKILL
    without the cleanup registry."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}
    if blocked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        log("the application blocked %s at its import (signal.pthread_sigmask): unblocked, "
            "or a stop would wait for drover's SIGKILL" % ", ".join(sorted(signal.Signals(s).name for s in blocked)))


def _on_sigusr1(access_log: Optional[AccessLog], ignored_here: bool = False) -> None:
    """drover forwards SIGUSR1 ("reopen log files"): the access log file is
    reopened; without one, it is ignored (its default action would kill us).
    A handler the app installed is left alone (``ignored_here``: main()
    ignored it during the import, so SIG_IGN is still ours)."""
    current = signal.getsignal(signal.SIGUSR1)
    if current != signal.SIG_DFL and not (ignored_here and current == signal.SIG_IGN):
        return
    if access_log is None:
        dw._set_signal(signal.SIGUSR1, signal.SIG_IGN)
        return

    def reopen(signum: int, frame: Any) -> None:
        try:
            access_log.reopen()
        except OSError as e:
            log("cannot reopen the access log: %s" % e)

    dw._set_signal(signal.SIGUSR1, reopen)


def _on_sigwinch(server: Any) -> None:
    """drover sends SIGWINCH when its pre-stop delay begins (SIGTERM with
    ``prestop_delay``): serve on, but answer with ``Connection: close`` so
    that no idle keep-alive connection is left when the stop comes. A
    handler the app installed is left alone."""
    if signal.getsignal(signal.SIGWINCH) != signal.SIG_DFL:
        return

    def wind_down(signum: int, frame: Any) -> None:
        server.winding_down = True

    dw._set_signal(signal.SIGWINCH, wind_down)


def console_main() -> None:
    """The ``drover-wsgi`` console script."""
    sys.exit(main())

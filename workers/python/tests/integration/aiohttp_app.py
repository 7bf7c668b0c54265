"""An aiohttp app as a drover worker, the way one is usually written:
``web.run_app`` on drover's socket, which installs its own SIGINT and SIGTERM
handlers with ``loop.add_signal_handler`` (they raise GracefulExit), and the
SDK's ``install_asyncio()`` called from ``on_startup``, after them.

Routes: ``/`` answers ``hello from pid N``; ``/sleep?s=S`` answers after S
seconds. ``on_cleanup`` (aiohttp's) and a function in the SDK's registry each
append a line to ``$APP_CLEANUP_FILE``.
"""

import asyncio
import os
import sys

from aiohttp import web

import drover_worker as dw


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello from pid %d\n" % os.getpid())


async def sleep(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "1")))
    return web.Response(text="slept\n")


def note(line: str) -> None:
    with open(os.environ["APP_CLEANUP_FILE"], "a") as f:
        f.write("%s pid=%d\n" % (line, os.getpid()))


async def on_startup(app: web.Application) -> None:
    dw.install_asyncio()  # after run_app's handlers: chained to them
    dw.ready()


async def on_cleanup(app: web.Application) -> None:
    note("aiohttp on_cleanup")


def main() -> None:
    try:
        (sock,) = dw.listeners()
    except (dw.ListenError, ValueError) as e:
        print("cannot boot: %s" % e, file=sys.stderr)
        sys.exit(3)
    dw.on_exit(lambda: note("registry"), name="note")
    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/sleep", sleep)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    web.run_app(app, sock=sock, print=None, shutdown_timeout=5)


if __name__ == "__main__":
    main()

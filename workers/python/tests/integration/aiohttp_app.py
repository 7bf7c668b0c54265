"""An aiohttp app as a drover worker, the way one is usually written:
``web.run_app`` on drover's socket, which installs its own SIGINT and SIGTERM
handlers with ``loop.add_signal_handler`` (they raise GracefulExit), and the
SDK's ``install_asyncio()`` called from ``on_startup``, after them. With
``APP_RUN=drover``, ``drover_worker.aiohttp.run_app`` instead (the SDK's
drain, which loses no request at a reload), and the app is importable as
``integration.aiohttp_app:app`` for ``drover-aiohttp``.

Routes: ``/`` answers ``hello from pid N``; ``/sleep?s=S`` answers after S
seconds; ``/ws`` echoes websocket messages and, when the socket closes,
appends ``websocket closed CODE`` to ``$APP_CLEANUP_FILE``. ``on_cleanup``
(aiohttp's) and a function in the SDK's registry each append a line to
``$APP_CLEANUP_FILE`` (when it is set).
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


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str(msg.data)
    note("websocket closed %s" % ws.close_code)
    return ws


def note(line: str) -> None:
    if "APP_CLEANUP_FILE" not in os.environ:
        return
    with open(os.environ["APP_CLEANUP_FILE"], "a") as f:
        f.write("%s pid=%d\n" % (line, os.getpid()))


async def on_startup(app: web.Application) -> None:
    if os.environ.get("APP_RUN") != "drover":
        dw.install_asyncio()  # after run_app's handlers: chained to them
        dw.ready()


async def on_cleanup(app: web.Application) -> None:
    note("aiohttp on_cleanup")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/sleep", sleep)
    app.router.add_get("/ws", echo)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def app() -> web.Application:
    """For ``drover-aiohttp integration.aiohttp_app:app``."""
    dw.on_exit(lambda: note("registry"), name="note")
    return make_app()


def main() -> None:
    if os.environ.get("APP_RUN") == "drover":
        import drover_worker.aiohttp

        dw.on_exit(lambda: note("registry"), name="note")
        drover_worker.aiohttp.run_app(make_app(), access_log=None)
        return
    try:
        (sock,) = dw.listeners()
    except (dw.ListenError, ValueError) as e:
        print("cannot boot: %s" % e, file=sys.stderr)
        sys.exit(3)
    dw.on_exit(lambda: note("registry"), name="note")
    web.run_app(make_app(), sock=sock, print=None, shutdown_timeout=5, access_log=None)


if __name__ == "__main__":
    main()

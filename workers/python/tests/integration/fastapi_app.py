"""A FastAPI app for the ASGI launchers' tests (uvicorn, Granian): a slow
import (0.5 s, as a real app's imports and connections take), a lifespan
that notes its startup and shutdown, the SDK's registry, and routes:
``/`` answers ``{"pid": N}`` and ``/sleep?s=S`` ``{"slept": S}`` after S
seconds (``/sleep?ms=N``: ``slept N ms``, as the other test workers);
``/ws`` is a websocket that echoes text and notes how it ended
(``websocket disconnect code=N``); ``/background?s=S`` answers at once and
then runs a background task (Starlette's ``BackgroundTasks``) that notes
``background task done`` after S seconds; ``/client`` answers the scheme
and client address the app sees (``{"scheme": "https", "client": "..."}``).

Notes go to ``$APP_CLEANUP_FILE`` when it is set. ``$APP_STARTUP_SECONDS``
makes the lifespan startup take that long; ``$APP_STARTUP_FAIL`` makes it
raise."""

import asyncio
import contextlib
import os
import time
from typing import AsyncIterator, Dict, Optional, Union

from fastapi import BackgroundTasks, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse

import drover_worker as dw

time.sleep(float(os.environ.get("APP_IMPORT_SECONDS", "0.5")))


def note(line: str) -> None:
    path = os.environ.get("APP_CLEANUP_FILE")
    if path:
        with open(path, "a") as f:
            f.write("%s pid=%d\n" % (line, os.getpid()))


dw.on_exit(lambda: note("registry"), name="note")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await asyncio.sleep(float(os.environ.get("APP_STARTUP_SECONDS", "0")))
    if os.environ.get("APP_STARTUP_FAIL"):
        raise RuntimeError("the lifespan startup fails (on purpose)")
    note("lifespan startup")
    yield
    note("lifespan shutdown")


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def hello() -> Dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/sleep", response_model=None)
async def sleep(s: float = 1.0, ms: Optional[int] = None) -> Union[Dict[str, float], PlainTextResponse]:
    if ms is not None:
        await asyncio.sleep(ms / 1000)
        return PlainTextResponse("slept %d ms\n" % ms)
    await asyncio.sleep(s)
    return {"slept": s}


@app.get("/client")
async def client(request: Request) -> Dict[str, Optional[str]]:
    return {"scheme": request.url.scheme, "client": request.client.host if request.client else None}


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect as e:
        note("websocket disconnect code=%d" % e.code)


async def _background(s: float) -> None:
    await asyncio.sleep(s)
    note("background task done")


@app.get("/background")
async def background(tasks: BackgroundTasks, s: float = 1.0) -> Dict[str, bool]:
    tasks.add_task(_background, s)
    return {"queued": True}

"""A FastAPI app for the uvicorn launcher's tests: a slow import (0.5 s, as
a real app's imports and connections take), a lifespan that notes its
startup and shutdown, the SDK's registry, and two routes: ``/`` answers
``hello from pid N`` and ``/sleep?s=S`` after S seconds.

Notes go to ``$APP_CLEANUP_FILE`` when it is set."""

import asyncio
import contextlib
import os
import time
from typing import AsyncIterator, Dict

from fastapi import FastAPI

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
    note("lifespan startup")
    yield
    note("lifespan shutdown")


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def hello() -> Dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/sleep")
async def sleep(s: float = 1.0) -> Dict[str, float]:
    await asyncio.sleep(s)
    return {"slept": s}

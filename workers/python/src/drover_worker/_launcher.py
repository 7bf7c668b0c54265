"""What the Granian, Hypercorn and uvicorn launchers share (private)."""

import asyncio
import importlib
import os
import sys
import time
import traceback
from typing import Any, Callable, List, Optional

import drover_worker as dw

#: On a graceful stop, how long a connection between two requests (just
#: accepted, or kept alive) may take to send its next one.
FIRST_BYTE_GRACE = 1.0


def load_app(target: str) -> Any:
    """``module:attr.path`` (``app`` when no attribute is given), imported."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for name in (attr or "app").split("."):
        obj = getattr(obj, name)
    return obj


def listeners(log: Callable[[str], None]) -> Optional[List[dw.Listener]]:
    """drover's sockets, or None once the reason it cannot boot is logged."""
    try:
        return dw.listeners()
    except dw.ListenError as e:
        log("cannot boot: %s" % e)
        return None


def log_load_failure(target: str, log: Callable[[str], None]) -> None:
    """In an ``except`` around the app's import: its traceback, then why the
    launcher cannot boot."""
    sys.stderr.write(traceback.format_exc())
    log("cannot boot: cannot load the application %r (traceback above)" % target)


async def until_stopped(log: Callable[[str], None]) -> None:
    """Returns at the first stop request, sending ``WATCHDOG=1`` meanwhile
    when drover's ``timeout`` is set. The SDK's signal handlers (``install``)
    set ``stop_event``; they run only when the main thread runs Python code,
    which the loop does when it wakes: every 50 ms here."""
    interval = dw.watchdog_interval()
    beat = 0.0
    while not dw.stop_event.is_set():
        if interval and time.monotonic() >= beat:
            beat = time.monotonic() + interval / 2
            dw._beat(log)
        await asyncio.sleep(0.05)


def drain_over() -> bool:
    """The SDK's drain deadline has passed (it moves earlier when the stop
    turns quick). ``drain_deadline()`` is never earlier than the moment it
    is called, so it is read before the clock, never after."""
    deadline = dw.drain_deadline()
    return time.monotonic() >= deadline


async def abandon(log: Callable[[str], None], why: str) -> None:
    """The last resort of a drain past its deadline: half of the stop's
    budget left (it shrinks if the stop turns quick) for the server's own
    shutdown to end what runs, then ``why`` is logged, the registry runs and
    the process exits 0, abandoning whatever still runs."""
    end = float("inf")
    while True:
        end = min(end, time.monotonic() + dw.remaining_budget() / 2)
        if time.monotonic() >= end:
            break
        await asyncio.sleep(0.05)
    log(why)
    dw.run_cleanup()
    sys.stderr.flush()
    os._exit(0)


async def let_next_requests_in(unsettled: Callable[[], bool]) -> None:
    """Waits while ``unsettled()`` (some open connection is between two
    requests, its client maybe sending the next one), up to FIRST_BYTE_GRACE
    and a quarter of the stop's budget, and no longer once the stop is
    quick. The ASGI servers' shutdown closes such a connection at once, and
    the request on its way would be lost; the launchers have every response
    say ``Connection: close`` from the stop on, so that the connections
    settle as their next requests come in."""
    deadline = time.monotonic() + min(FIRST_BYTE_GRACE, dw.remaining_budget() / 4)
    while time.monotonic() < deadline and dw.stop_kind() != "quick" and unsettled():
        await asyncio.sleep(0.01)

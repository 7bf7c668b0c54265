"""drover's scoreboard: this worker's request counts in the shared-memory file
drover created (``DROVER_SCOREBOARD``, record ``DROVER_SCOREBOARD_INDEX``),
which drover reads when its ``/metrics`` is scraped. The layout is in drover's
docs/protocol.md ("The scoreboard").

    board = Scoreboard.from_env()      # None when drover gave no record
    started = board.begin()            # a request starts
    ...
    board.end(started)                 # counted, with its latency

Each word is an aligned 64-bit integer written with a single store; the
threads of one process serialize their updates with a lock (Python has no
atomic add), so drover reads whole values.
"""

from __future__ import annotations  # X | None in signatures on Python 3.8 and 3.9

import mmap
import os
import threading
import time
from collections.abc import Mapping
from typing import Optional

MAGIC = b"DROVERSB"
VERSION = 1
HEADER = 64
RECORD = 256
PID, BUSY, REQUESTS, LATENCY_SUM_US, BUCKETS = 0, 1, 2, 3, 4
#: Bucket upper bounds in microseconds; a last bucket holds the rest.
BOUNDS_US = (
    1000,
    2500,
    5000,
    10000,
    25000,
    50000,
    100000,
    250000,
    500000,
    1000000,
    2500000,
    5000000,
    10000000,
)


class Scoreboard:
    """One worker's record, mapped."""

    def __init__(self, mm: mmap.mmap, index: int) -> None:
        self._mm = mm
        self._words = memoryview(mm).cast("Q")
        self._base = (HEADER + index * RECORD) // 8
        self._lock = threading.Lock()
        self._words[self._base + PID] = os.getpid()

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None
    ) -> Optional[Scoreboard]:
        """The record drover gave this worker, or None (no record, a file
        this SDK does not understand, or one it cannot open)."""
        env = os.environ if environ is None else environ
        path = env.get("DROVER_SCOREBOARD")
        try:
            index = int(env.get("DROVER_SCOREBOARD_INDEX", ""))
        except ValueError:
            return None
        if not path or index < 0:
            return None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER + (index + 1) * RECORD:
                return None
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        header = mm[:HEADER]
        if (
            header[:8] != MAGIC
            or int.from_bytes(header[8:12], "little") != VERSION
            or int.from_bytes(header[12:16], "little") != RECORD
        ):
            mm.close()
            return None
        return cls(mm, index)

    def begin(self) -> float:
        """A request starts: in progress until :meth:`end`."""
        with self._lock:
            self._words[self._base + BUSY] += 1
        return time.monotonic()

    def end(self, started: float) -> None:
        """The request that :meth:`begin` returned ``started`` for is done."""
        us = max(0, int((time.monotonic() - started) * 1e6))
        bucket = len(BOUNDS_US)
        for i, bound in enumerate(BOUNDS_US):
            if us <= bound:
                bucket = i
                break
        w, base = self._words, self._base
        with self._lock:
            w[base + BUCKETS + bucket] += 1
            w[base + LATENCY_SUM_US] += us
            w[base + REQUESTS] += 1
            w[base + BUSY] -= 1

"""Database reads shared by a burst of requests: one read per key at a time, run in a thread, joined by
every request that arrived before it began.

Under load a replica otherwise read its span once per query (a quarter of its CPU: the ORM's work, not
the database's) and, on a burst of a client's first requests, its key once per request, each read
queueing in the event loop's thread pool behind records and each other. Sharing a read is safe for
freshness: a request joins only a read that began after the request arrived, so it sees every change
committed before it arrived (a node moved, a key revoked), as its own read would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SharedReads(Generic[K, V]):
    """``read(key)`` (blocking, run in a thread) at most once at a time per key, per event loop's owner."""

    def __init__(self, read: Callable[[K], V]) -> None:
        self._read = read
        self._reading: dict[K, tuple[float, asyncio.Future[V]]] = {}

    async def get(self, key: K, arrived: float | None = None) -> V:
        """``read(key)`` as of no earlier than ``arrived`` (monotonic clock; default now); what it raises,
        every request sharing it gets."""
        since = time.monotonic() if arrived is None else arrived
        entry = self._reading.get(key)
        if entry is None or entry[0] < since:
            began = time.monotonic()
            reading = asyncio.ensure_future(asyncio.to_thread(self._read, key))
            entry = (began, reading)
            self._reading[key] = entry
            reading.add_done_callback(lambda done: self._done(key, done))
        return await asyncio.shield(entry[1])

    def _done(self, key: K, done: asyncio.Future[V]) -> None:
        entry = self._reading.get(key)
        if entry is not None and entry[1] is done:
            del self._reading[key]
        if not done.cancelled():
            done.exception()  # retrieved here: a failure reaches the requests that shared it, not the log

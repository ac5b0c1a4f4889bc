"""What planning a query reads from the database (its span and the span's enabled nodes), read once for
every query of that span that arrived before the read began.

Under load this read was a quarter of the replica's CPU (the ORM's work, not the database's) and queued
in the event loop's thread pool behind records and keys. Sharing a read is safe for freshness: a query
only joins a read that began after the query arrived, so it sees every change committed before it
arrived, as its own read would.
"""

from __future__ import annotations

import asyncio
import time

from spanner.schemas import NodeOut, SpanOut
from spanner.storage import Repository

SpanRead = tuple[SpanOut, list[NodeOut]]


class SpanReads:
    """One read per span at a time (per replica), shared by the queries that arrived before it began."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._reading: dict[str, tuple[float, asyncio.Future[SpanRead]]] = {}

    async def read(self, span: str, arrived: float) -> SpanRead:
        """The span and its enabled nodes as of no earlier than ``arrived`` (monotonic clock); NotFound
        for an unknown span."""
        entry = self._reading.get(span)
        if entry is None or entry[0] < arrived:
            reading = asyncio.ensure_future(asyncio.to_thread(self._repo.span_for_query, span))
            entry = (time.monotonic(), reading)
            self._reading[span] = entry
            entry[1].add_done_callback(lambda done: self._done(span, done))
        return await asyncio.shield(entry[1])

    def _done(self, span: str, done: asyncio.Future[SpanRead]) -> None:
        entry = self._reading.get(span)
        if entry is not None and entry[1] is done:
            del self._reading[span]
        if not done.cancelled():
            done.exception()  # retrieved here: a failure reaches the queries that joined, not the log

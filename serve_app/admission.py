"""Admission control: a spanning query is answered by its deadline, or refused at once.

Each replica runs at most ``admission_max_active`` spanning queries at once; up to
``admission_max_waiting`` more wait for a slot. A query that finds the waiting room full is refused at
once with 503 and ``Retry-After``; a waiting query that has not got a slot while enough of its deadline
is left to ask the archives is refused then (still before its deadline). An admitted query runs with what
is left of its deadline, counted from its arrival, so the time it waited is not added on top.

Why a bound at all: past a point, more concurrent queries only lengthen every query (archive pools,
node actors and the replica's threads queue them), and a query answered after its caller gave up is
work thrown away. Serve's own queue (``max_ongoing_requests``) knows nothing of deadlines, so it is set
above what admission lets through and admission decides.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from spanner.errors import SpannerError

MIN_RUN_S = 0.2
"""A query admitted with less of its deadline left than this could not ask any archive: refused instead."""


class Overloaded(SpannerError):
    """The replica cannot answer this query before its deadline: HTTP 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.args = (message, retry_after_s)  # pickles with both arguments


class Admission:
    """Slots for spanning queries on one replica (one event loop)."""

    def __init__(self, max_active: int, max_waiting: int) -> None:
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._recent: deque[float] = deque(maxlen=64)  # durations of recent queries, for Retry-After

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after_s(self) -> int:
        """A hint for the caller: about how long until a slot frees, in whole seconds (1 to 60)."""
        if not self._recent:
            return 1
        mean = sum(self._recent) / len(self._recent)
        return max(1, min(60, math.ceil(mean * (1 + self.waiting / max(1, self.max_active)))))

    @asynccontextmanager
    async def slot(self, timeout_s: float, arrived: float) -> AsyncIterator[float]:
        """Hold a slot while the body runs; yields the seconds left of the deadline
        (``arrived`` + ``timeout_s``, monotonic clock). Raises Overloaded instead of running late."""
        deadline = arrived + timeout_s
        if self.active >= self.max_active or self._waiters:
            await self._wait(deadline)
        else:
            self.active += 1
        started = time.monotonic()
        try:
            yield max(0.0, deadline - started)
        finally:
            self._recent.append(time.monotonic() - started)
            self._release()

    async def _wait(self, deadline: float) -> None:
        if len(self._waiters) >= self.max_waiting:
            raise Overloaded(f"the spanner is at capacity ({self.active} queries running, {self.waiting} "
                             "waiting); retry later", self.retry_after_s())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            budget = max(0.0, deadline - MIN_RUN_S - time.monotonic())
            await asyncio.wait_for(asyncio.shield(waiter), timeout=budget)
        except TimeoutError:
            if waiter.done():  # handed a slot just as the wait ended: give it on
                self._release()
            raise Overloaded("the spanner is at capacity and no slot freed in time to ask the archives "
                             "before this query's deadline; retry later", self.retry_after_s()) from None
        except asyncio.CancelledError:
            if waiter.done():
                self._release()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _release(self) -> None:
        """Hand the slot to the longest waiter still waiting, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: ``active`` stays
                return
        self.active -= 1

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
    """Slots for spanning queries on one replica (one event loop).

    The number of slots adapts (additive increase, multiplicative decrease): a query that ends more
    than ``LATE_S`` after it meant to shrinks the limit by a quarter (once per slot time), one that ends
    in time grows it by about one per ``limit`` queries, up to ``max_active``. So when the machine, the
    database or the archives cannot keep up, fewer queries run at once and each still ends by its
    deadline; the rest wait or are refused. A waiting query is refused at once when the expected wait
    (its place in the queue times the recent slot time, over the limit) would leave it too little of its
    deadline.
    """

    LATE_S = 0.1
    """A query whose body ends more than this after it meant to (half its reserve before its deadline)
    counts as late: what is left of the reserve is the answer's way out through Serve's proxy, which the
    replica cannot see and which takes up to about 1 s on a loaded machine. Not 0: a merge of a few
    milliseconds past the cut-off is no sign of overload."""

    def __init__(self, max_active: int, max_waiting: int) -> None:
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.limit = float(max_active)
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._slot_s: float | None = None  # moving average of how long a slot is held; None before any
        self._span_timeout_s: dict[str, float] = {}  # the last deadline seen per span, for ``precheck``
        self._cut_at = 0.0  # when the limit was last cut (monotonic clock)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def capacity(self) -> int:
        return max(1, int(self.limit))

    def expected_wait_s(self, place: int, timeout_s: float = 0.0) -> float:
        """About how long the ``place``-th waiter waits for a slot. Before any slot has been held (a cold
        replica meeting a burst) a slot is assumed held for the whole ``timeout_s``: the most a query can
        take, so the burst's excess is refused at once instead of waiting out its deadline in line."""
        slot_s = timeout_s if self._slot_s is None else self._slot_s
        return place * slot_s / self.capacity

    def retry_after_s(self, timeout_s: float = 0.0) -> int:
        """A hint for the caller: about how long until a slot frees, in whole seconds (1 to 60)."""
        return max(1, min(60, math.ceil(self.expected_wait_s(self.waiting + 1, timeout_s))))

    def precheck(self, span: str, timeout_s: float | None) -> None:
        """Refuse at once, before any database work, a query that could not get a slot in time: its
        ``timeout_s``, else the last one seen for its span. Planning a doomed query would only slow the
        rest (its reads queue with the records of running queries)."""
        deadline_s = timeout_s if timeout_s is not None else self._span_timeout_s.get(span)
        if deadline_s is None or (self.active < self.capacity and not self._waiters):
            return
        self._refuse_if_hopeless(time.monotonic() + deadline_s, deadline_s, 0.0)

    def _refuse_if_hopeless(self, deadline: float, timeout_s: float, reserve_s: float) -> None:
        if len(self._waiters) >= self.max_waiting:
            raise Overloaded(f"the spanner is at capacity ({self.active} queries running, {self.waiting} "
                             "waiting); retry later", self.retry_after_s(timeout_s))
        expected = self.expected_wait_s(self.waiting + 1, timeout_s)
        if time.monotonic() + expected > deadline - reserve_s - MIN_RUN_S:
            raise Overloaded(f"the spanner is at capacity: a slot would free in about {expected:.1f} s, too "
                             "late for this query's deadline; retry later", self.retry_after_s(timeout_s))

    @asynccontextmanager
    async def slot(
        self, timeout_s: float, arrived: float, span: str = "", reserve_s: float = 0.0
    ) -> AsyncIterator[float]:
        """Hold a slot while the body runs; yields the seconds left of the deadline
        (``arrived`` + ``timeout_s``, monotonic clock). Raises Overloaded instead of running late.
        ``reserve_s``: what the body keeps back at the end for its answer (the coordinator's reserve): a
        waiter gives up that much earlier, so its refusal too leaves by the deadline."""
        self._span_timeout_s[span] = timeout_s
        deadline = arrived + timeout_s
        if self.active < self.capacity and not self._waiters:
            self.active += 1
        else:
            await self._wait(deadline, timeout_s, reserve_s)
        started = time.monotonic()
        if deadline - reserve_s - started < min(MIN_RUN_S, (timeout_s - reserve_s) / 2):
            # Reading, planning or a late wake-up (a starved replica) took the deadline: a fan-out now
            # would answer every node ``timeout``, late, and spend what the queries behind it need.
            self._release()
            raise Overloaded("the spanner is at capacity: this query reached a slot with too little of its "
                             "deadline left to ask the archives; retry later", self.retry_after_s(timeout_s))
        try:
            yield max(0.0, deadline - started)
        finally:
            ended = time.monotonic()
            # Late against when the body meant to be done: half its reserve before the deadline (the
            # coordinator's cut-off for the node actors), the other half being the answer's way out.
            self._learn(ended - started, ended - (deadline - reserve_s / 2))
            self._release()

    def _learn(self, held_s: float, late_s: float) -> None:
        self._slot_s = held_s if self._slot_s is None else 0.9 * self._slot_s + 0.1 * held_s
        if late_s > self.LATE_S:
            # One cut per slot time: the queries that end late together came from the same moment, and
            # cutting once for each would take the limit to 1.
            now = time.monotonic()
            if now - self._cut_at >= held_s:
                self.limit = max(1.0, self.limit * 0.75)
                self._cut_at = now
        else:
            self.limit = min(float(self.max_active), self.limit + 1.0 / self.limit)

    async def _wait(self, deadline: float, timeout_s: float, reserve_s: float) -> None:
        self._refuse_if_hopeless(deadline, timeout_s, reserve_s)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            budget = max(0.0, deadline - reserve_s - MIN_RUN_S - time.monotonic())
            await asyncio.wait_for(asyncio.shield(waiter), timeout=budget)
        except TimeoutError:
            if waiter.done():  # handed a slot just as the wait ended: give it on
                self._release()
            raise Overloaded("the spanner is at capacity and no slot freed in time to ask the archives "
                             "before this query's deadline; retry later",
                             self.retry_after_s(timeout_s)) from None
        except asyncio.CancelledError:
            if waiter.done():
                self._release()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _release(self) -> None:
        """Free the slot, then hand free slots to the longest waiters still waiting."""
        self.active -= 1
        while self._waiters and self.active < self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

"""Query records written after the answer has gone: a bounded queue drained by one writer task.

A spanning query's answer does not wait for its record: the record (and, with events on, its outbox
events, in the same transaction: spanner.storage) is queued and written by a task of the replica's
event loop, a batch per thread hop. Nothing is dropped:

- a full queue makes the next query wait for room (for at most ``enqueue_timeout_s``, then 503):
  the database sets the pace, as it did when every answer waited for its own record;
- a write that fails because the database is unreachable is tried again every ``retry_s`` until it
  succeeds; the queue holds it meanwhile;
- the replica's shutdown drains the queue (``close``).

What a crash of the replica's process loses is what the queue held: the records (with their events)
of the queries answered in the last moments, at most ``capacity``. Reads of records on this replica
(``settled``) first wait for the records queued before them (a few seconds at most), so a client
reads its own query back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from spanner.errors import StorageError

LOG = logging.getLogger(__name__)

Job = Callable[[], object]
READ_WAIT_S = 5.0  # how long a read of records waits for the ones queued before it


class RecordWriter:
    """``after_batch`` runs in the writer's thread after each written batch (e.g. nudge the event relay)."""

    def __init__(
        self,
        *,
        capacity: int = 1000,
        batch: int = 64,
        enqueue_timeout_s: float = 30.0,
        retry_s: float = 1.0,
        after_batch: Callable[[], None] | None = None,
        linger_s: float = 0.005,
    ) -> None:
        self._linger_s = linger_s
        self._after_batch = after_batch
        self._capacity = capacity
        self._batch = batch
        self._enqueue_timeout_s = enqueue_timeout_s
        self._retry_s = retry_s
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._submitted = 0
        self._written = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._closed = False
        self._pending_puts: set[asyncio.Future[None]] = set()

    @property
    def pending(self) -> int:
        return self._submitted - self._written

    def _start(self) -> asyncio.Queue[Job]:
        """The queue and its writer task, made on the first use in the running loop."""
        if self._queue is None:
            self._queue = asyncio.Queue(self._capacity)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(self._queue), name="record-writer")
        return self._queue

    async def submit(self, job: Job) -> None:
        """Queue ``job`` (a blocking write, run in a worker thread) while its answer can still be
        refused: waits while the queue is full, then raises StorageError (503)."""
        if self._closed:
            raise StorageError("the ingress is shutting down; the query was not recorded")
        queue = self._start()
        try:
            await asyncio.wait_for(queue.put(job), self._enqueue_timeout_s)
        except TimeoutError as exc:
            raise StorageError(
                f"{queue.qsize()} query records are waiting for the database; try again when it has caught up"
            ) from exc
        self._submitted += 1

    async def hand_over(self, job: Job) -> None:
        """Queue ``job`` whose answer has already gone (or failed to go): it cannot be refused any more.
        Call ``reserve()`` before answering, so that ``settled()`` waits for it from then on. With the
        queue full this waits for room as long as it takes (the request stays open, which keeps the
        number of waiting records bounded by the requests in flight); after shutdown it writes at once.
        The put goes on even if the caller is cancelled."""
        if self._closed or self._queue is None:
            put = asyncio.ensure_future(asyncio.to_thread(_write_until_done, [job], self._retry_s))
            # Written here rather than by the writer task: count it, or close() and settled() wait
            # their full timeout for a record that is already in.
            put.add_done_callback(self._written_directly)
        elif not self._queue.full():
            self._queue.put_nowait(job)
            return
        else:
            put = asyncio.ensure_future(self._queue.put(job))
        self._pending_puts.add(put)
        put.add_done_callback(self._pending_puts.discard)
        await asyncio.shield(put)

    def _written_directly(self, _put: asyncio.Future[None]) -> None:
        self._written += 1
        self._wake()

    def reserve(self) -> None:
        """Count a record that ``hand_over`` will queue once its answer has gone."""
        self._start()
        self._submitted += 1

    async def settled(self, timeout_s: float | None = READ_WAIT_S) -> None:
        """Returns once every record queued (or reserved) before this call is written, or after
        ``timeout_s`` (a read then shows what is written so far)."""
        target = self._submitted
        if self._written >= target:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            LOG.warning("%d query records are not written yet; reading without them", self.pending)

    async def close(self, timeout_s: float = 15.0) -> None:
        """Refuse new records and write what is queued (at shutdown)."""
        self._closed = True
        if self._queue is None or self._task is None:
            return
        await self.settled(timeout_s)
        if self.pending:
            LOG.error("shutdown: %d query records were not written within %g s", self.pending, timeout_s)
        self._task.cancel()

    async def _run(self, queue: asyncio.Queue[Job]) -> None:
        while True:
            batch = [await queue.get()]
            # The first record of a batch waits a moment: its answer is still on its way out through
            # this process, and a write holding the GIL meanwhile would delay it; records of answers
            # given meanwhile join the batch.
            await asyncio.sleep(self._linger_s)
            while len(batch) < self._batch and not queue.empty():
                batch.append(queue.get_nowait())
            left = batch
            while left:
                left = await asyncio.to_thread(_write, left, self._after_batch)
                if left:
                    await asyncio.sleep(self._retry_s)
            for _ in batch:
                queue.task_done()
            self._written += len(batch)
            self._wake()

    def _wake(self) -> None:
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, waiter in self._waiters:
            if target <= self._written:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                still.append((target, waiter))
        self._waiters = still


def _write_until_done(jobs: list[Job], retry_s: float) -> None:
    while jobs := _write(jobs, None):
        time.sleep(retry_s)


def _write(jobs: list[Job], after: Callable[[], None] | None) -> list[Job]:
    """Run the jobs in order; the ones from the first the database refused on, to try again later."""
    for i, job in enumerate(jobs):
        try:
            job()
        except StorageError as exc:
            LOG.warning("query records wait for the database (%d queued here): %s", len(jobs) - i, exc)
            return jobs[i:]
        except Exception:  # a record the database will never take: trying again would block the rest
            LOG.exception("a query record could not be written and is dropped")
    if after is not None:
        try:
            after()
        except Exception:  # the records are in; what follows them must not stop the writer
            LOG.exception("the step after a batch of query records failed")
    return []

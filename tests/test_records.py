"""The record writer: answers do not wait for their records, and no record is lost on the way."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve_app.records import RecordWriter
from spanner.errors import StorageError


def test_records_are_written_in_order_and_settled_waits_for_them() -> None:
    written: list[int] = []
    gate = threading.Event()

    def job(n: int) -> None:
        gate.wait(5)
        written.append(n)

    async def main() -> None:
        writer = RecordWriter(batch=4)
        for n in range(10):
            await writer.submit(lambda n=n: job(n))
        assert writer.pending == 10 and written == []  # the caller did not wait for the writes
        gate.set()
        await asyncio.wait_for(writer.settled(), 5)
        assert written == list(range(10)) and writer.pending == 0
        await writer.close()

    asyncio.run(main())


def test_a_full_queue_makes_the_next_record_wait_then_refuses_with_storage_error() -> None:
    gate = threading.Event()

    async def main() -> None:
        writer = RecordWriter(capacity=2, batch=1, enqueue_timeout_s=0.2)
        await writer.submit(lambda: gate.wait(5))  # taken by the writer, blocks it
        await asyncio.sleep(0.05)
        await writer.submit(lambda: None)
        await writer.submit(lambda: None)  # the queue is full now
        with pytest.raises(StorageError, match="waiting for the database"):
            await writer.submit(lambda: None)
        gate.set()
        await asyncio.wait_for(writer.settled(), 5)
        await writer.submit(lambda: None)  # room again
        await writer.close()
        assert writer.pending == 0

    asyncio.run(main())


def test_a_database_outage_is_waited_out_and_nothing_is_lost() -> None:
    written: list[str] = []
    failures = {"left": 3}
    nudges: list[int] = []

    def flaky() -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise StorageError("database error at sqlite://: unable to open database file")
        written.append("first")

    async def main() -> None:
        writer = RecordWriter(retry_s=0.01, after_batch=lambda: nudges.append(1))
        await writer.submit(flaky)
        await writer.submit(lambda: written.append("second"))
        await asyncio.wait_for(writer.settled(), 5)
        await writer.close()

    asyncio.run(main())
    assert written == ["first", "second"]  # the order holds across the retries
    assert nudges  # the relay hears of the events once the batch is in


def test_close_writes_what_is_queued_and_refuses_more() -> None:
    written: list[int] = []

    async def main() -> None:
        writer = RecordWriter()
        for n in range(5):
            await writer.submit(lambda n=n: written.append(n))
        await writer.close()
        assert written == list(range(5))
        with pytest.raises(StorageError, match="shutting down"):
            await writer.submit(lambda: None)

    asyncio.run(main())


def test_a_record_the_database_never_takes_is_logged_and_does_not_block_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    written: list[str] = []

    def broken() -> None:
        raise ValueError("not a valid record")

    async def main() -> None:
        writer = RecordWriter()
        await writer.submit(broken)
        await writer.submit(lambda: written.append("next"))
        await asyncio.wait_for(writer.settled(), 5)
        await writer.close()

    asyncio.run(main())
    assert written == ["next"]
    assert any("could not be written" in r.getMessage() for r in caplog.records)


def test_a_failing_step_after_the_batch_does_not_stop_the_writer(caplog: pytest.LogCaptureFixture) -> None:
    written: list[int] = []

    def after() -> None:
        raise RuntimeError("relay gone")

    async def main() -> None:
        writer = RecordWriter(after_batch=after)
        await writer.submit(lambda: written.append(1))
        await asyncio.wait_for(writer.settled(), 5)
        await writer.submit(lambda: written.append(2))
        await asyncio.wait_for(writer.settled(), 5)
        await writer.close()

    asyncio.run(main())
    assert written == [1, 2]
    assert any("after a batch" in r.getMessage() for r in caplog.records)


def test_a_reserved_record_is_waited_for_until_handed_over_even_after_shutdown() -> None:
    written: list[str] = []

    async def main() -> None:
        writer = RecordWriter()
        writer.reserve()  # the answer is on its way out
        reader = asyncio.ensure_future(writer.settled(5))
        await asyncio.sleep(0.05)
        assert not reader.done()  # a read waits for the record of an answer already given
        await writer.hand_over(lambda: written.append("answered"))
        await asyncio.wait_for(reader, 5)
        assert written == ["answered"]
        await writer.close()
        await writer.hand_over(lambda: written.append("late"))  # after shutdown: written at once
        assert written == ["answered", "late"]

    asyncio.run(main())


def test_a_read_waits_a_bounded_time_for_a_record_never_handed_over() -> None:
    async def main() -> None:
        writer = RecordWriter()
        writer.reserve()
        await asyncio.wait_for(writer.settled(0.1), 5)  # returns: the read shows what is written

    asyncio.run(main())


def test_a_record_handed_over_during_shutdown_counts_as_written(caplog: pytest.LogCaptureFixture) -> None:
    written: list[str] = []

    async def main() -> None:
        writer = RecordWriter()
        writer.reserve()  # the answer is on its way out when shutdown begins
        closing = asyncio.ensure_future(writer.close(timeout_s=5))
        await asyncio.sleep(0.05)
        await writer.hand_over(lambda: written.append("answered"))  # written at once: the writer is closed
        # close() returns as soon as the record is in, not after its 5 s timeout
        await asyncio.wait_for(closing, 1)
        assert writer.pending == 0
        writer.reserve()
        await writer.hand_over(lambda: written.append("late"))
        await asyncio.wait_for(writer.settled(5), 1)  # nothing left to wait for
        assert writer.pending == 0

    asyncio.run(main())
    assert written == ["answered", "late"]
    assert not any("were not written" in r.getMessage() for r in caplog.records)

"""The association pool against simulated PACS: reuse, dead idle associations noticed, idle ones released,
no response lost on a reused association, aborted associations dropped, no thread per association."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from actors.pool import AssociationPool
from simulator.dataset import generate_uniform
from simulator.scp import SimulatedPacs, SimulatorConfig
from simulator.wire import WireSimulatedPacs
from spanner.dicom_constants import STUDY_ROOT_FIND
from spanner.nodespec import ActorTuning, NodeSpec


@pytest.fixture()
def sim() -> Iterator[WireSimulatedPacs]:
    with WireSimulatedPacs(SimulatorConfig(ae_title="POOL"), generate_uniform(2, 0, 2)) as s:
        yield s


def spec_for(port: int, **kwargs: object) -> NodeSpec:
    return NodeSpec(name="p", ae_title="POOL", host="127.0.0.1", port=port, calling_ae_title="SPANNER",
                    connect_timeout_s=2, dimse_timeout_s=5, **kwargs)  # type: ignore[arg-type]


async def until(condition: Callable[[], bool], within_s: float = 3.0) -> None:
    """Wait for ``condition`` to hold (the event loop runs meanwhile); fail after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


STUDIES = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY \x20\x00\x0d\x00\x00\x00\x00\x00"  # implicit VR LE


def test_reuse(sim: WireSimulatedPacs) -> None:
    async def body() -> None:
        pool = AssociationPool(spec_for(sim.port), 30.0)
        assoc, reused = await pool.acquire()
        assert not reused
        pool.give_back(assoc, reusable=True)
        again, reused = await pool.acquire()
        assert reused and again is assoc
        assert await again.echo() == 0
        pool.give_back(again, reusable=True)
        await pool.close_all()

    asyncio.run(body())
    assert sim.counters.associations == 1


def test_idle_association_whose_peer_went_away_is_noticed_without_polling(sim: WireSimulatedPacs) -> None:
    async def body() -> None:
        pool = AssociationPool(spec_for(sim.port), 30.0)
        assoc, _ = await pool.acquire()
        pool.give_back(assoc, reusable=True)
        await asyncio.to_thread(sim.stop)  # aborts every association the simulator holds
        await until(lambda: not assoc.is_open)  # its reader task sees the A-ABORT / close on its own
        await asyncio.to_thread(sim.start)
        pool.spec = spec_for(sim.port)
        started = time.monotonic()
        fresh, reused = await pool.acquire()
        assert not reused and fresh is not assoc and time.monotonic() - started < 1.0
        assert await fresh.echo() == 0
        pool.give_back(fresh, reusable=False)
        await pool.close_all()

    asyncio.run(body())


def test_idle_associations_are_released_after_idle_s(sim: WireSimulatedPacs) -> None:
    async def body() -> None:
        pool = AssociationPool(spec_for(sim.port), 0.2)
        assoc, _ = await pool.acquire()
        pool.give_back(assoc, reusable=True)
        assert pool.idle == 1
        await until(lambda: pool.idle == 0)  # its own timer hands it to a release
        await pool.close_all()  # waits for releases under way
        assert not assoc.is_open

    asyncio.run(body())
    deadline = time.monotonic() + 3
    while sim.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.active_associations == 0


def test_a_reused_association_loses_no_response_of_a_fast_archive() -> None:
    """300 queries back to back on one kept association against an archive that answers at once."""
    with WireSimulatedPacs(SimulatorConfig(ae_title="POOL"), generate_uniform(3, 0, 20)) as fast:
        async def body() -> list[int]:
            pool = AssociationPool(spec_for(fast.port), 30.0)
            counts = []
            for msg_id in range(1, 301):
                assoc, _ = await pool.acquire()
                pending = [r async for r in assoc.find(STUDY_ROOT_FIND, STUDIES, msg_id) if r.pending]
                counts.append(len(pending))
                pool.give_back(assoc, reusable=True)
            await pool.close_all()
            return counts

        counts = asyncio.run(body())
        assert fast.counters.associations == 1
    assert counts == [20] * 300


def test_no_thread_per_association(sim: WireSimulatedPacs) -> None:
    """Eight open associations cost the process no thread: they are tasks on one event loop."""
    async def body() -> int:
        pool = AssociationPool(spec_for(sim.port, max_associations=8), 30.0)
        before = threading.active_count()
        held = [(await pool.acquire())[0] for _ in range(8)]
        during = threading.active_count()
        for assoc in held:
            pool.give_back(assoc, reusable=True)
        await pool.close_all()
        return during - before

    assert asyncio.run(body()) == 0


@pytest.mark.parametrize("engine", [SimulatedPacs, WireSimulatedPacs])
def test_an_association_the_archive_aborts_is_not_released_but_dropped_at_once(
        engine: type[SimulatedPacs] | type[WireSimulatedPacs]) -> None:
    """Against an archive that aborts after its first match, every query ends ``aborted`` at once
    (a release would wait the ACSE timeout for an answer that cannot come: ``timeout`` instead)."""
    from actors.pacs_node import PacsNodeImpl
    from spanner.query import Level, NodeQuery

    config = SimulatorConfig(ae_title="ABORTS", fault="abort", abort_after=1)
    with engine(config, generate_uniform(2, 0, 5)) as aborting:
        spec = NodeSpec(name="ab", ae_title="ABORTS", host="127.0.0.1", port=aborting.port,
                        calling_ae_title="SPANNER", connect_timeout_s=5, dimse_timeout_s=30)

        async def queries() -> list[tuple[str, float]]:
            node = PacsNodeImpl(spec, ActorTuning(log_level="WARNING"))
            outcomes = []
            try:
                for _ in range(30):
                    outcome, matches = await node.find(NodeQuery(Level.STUDY), timeout_s=3.0)
                    outcomes.append((outcome.status.value, outcome.elapsed_ms))
                    assert len(matches) == 1
            finally:
                await node.close()
            return outcomes

        outcomes = asyncio.run(queries())
    assert {status for status, _ in outcomes} == {"aborted"}, outcomes
    assert max(elapsed for _, elapsed in outcomes) < 2000, outcomes


def test_a_query_that_cannot_get_a_slot_before_its_deadline_is_throttled_at_once() -> None:
    """The only slot is held by a query whose deadline lies after the second query's: ``throttled`` now,
    not at the second query's deadline."""
    from actors.pacs_node import PacsNodeImpl
    from spanner.query import Level, NodeQuery

    config = SimulatorConfig(ae_title="POOL", latency_ms=3000)
    with WireSimulatedPacs(config, generate_uniform(2, 0, 2)) as slow:
        async def body() -> tuple[str, str, float]:
            tuning = ActorTuning(log_level="WARNING", cancel_grace_s=0.2)
            node = PacsNodeImpl(spec_for(slow.port, max_associations=1), tuning)
            try:
                first = asyncio.ensure_future(node.find(NodeQuery(Level.STUDY), timeout_s=1.5))
                await asyncio.sleep(0.2)
                started = time.monotonic()
                second, _ = await node.find(NodeQuery(Level.STUDY), timeout_s=0.8)
                waited = time.monotonic() - started
                return (await first)[0].status.value, second.status.value, waited
            finally:
                await node.close()

        first, second, waited = asyncio.run(body())
    assert (first, second) == ("timeout", "throttled")
    assert waited < 0.4  # at once, not at its deadline 0.8 s later


def test_a_response_identifier_nothing_can_read_ends_that_query_aborted_and_frees_its_slot() -> None:
    """An archive whose pending identifier neither the fast reader nor pydicom can read (here a VR
    that does not exist): the query ends ``aborted`` with a reason, nothing raises past the actor, and
    the association is dropped, not kept in use."""
    from actors.pacs_node import PacsNodeImpl
    from spanner.dicom_constants import EXPLICIT_VR_LE, VERIFICATION
    from spanner.dimse.acceptor import Acceptor, AcceptorConfig, FindResult, Handlers, Request
    from spanner.query import Level, NodeQuery

    unreadable = b"\x08\x00\x05\x00YS\x02\x00AB"  # explicit VR LE, VR "YS"

    async def on_find(request: Request) -> AsyncIterator[FindResult]:
        yield FindResult(0xFF00, unreadable)
        yield FindResult(0xFF00, unreadable)
        yield FindResult(0x0000)

    async def body() -> tuple[str, str | None, int]:
        acceptor = Acceptor(AcceptorConfig("GARBLED", (VERIFICATION, STUDY_ROOT_FIND),
                                           transfer_syntaxes=(EXPLICIT_VR_LE,)), Handlers(find=on_find))
        port = await acceptor.start("127.0.0.1", 0)
        spec = NodeSpec(name="garbled", ae_title="GARBLED", host="127.0.0.1", port=port,
                        calling_ae_title="SPANNER", connect_timeout_s=2, dimse_timeout_s=5)
        node = PacsNodeImpl(spec, ActorTuning(log_level="WARNING"))
        try:
            outcome, _ = await node.find(NodeQuery(Level.STUDY), timeout_s=3.0)
            await until(lambda: node._pool.in_use == 0)
            return outcome.status.value, outcome.error, node._pool.idle
        finally:
            await node.close()
            await acceptor.close()

    status, error, idle = asyncio.run(body())
    assert status == "aborted"
    assert error is not None and "cannot be read" in error
    assert idle == 0


def test_a_retrieval_lease_holds_a_slot_until_released_or_its_deadline(sim: WireSimulatedPacs) -> None:
    """The store actor's move holds one of the node's slots: with one slot, a query meanwhile is
    ``throttled``; after release the next lease is granted; an unreleased lease ends at its deadline."""
    from actors.pacs_node import PacsNodeImpl
    from spanner.query import Level, NodeQuery

    async def body() -> tuple[list[str | None], int]:
        tuning = ActorTuning(log_level="WARNING", cancel_grace_s=0.1)
        node = PacsNodeImpl(spec_for(sim.port, max_associations=1), tuning)
        seen: list[str | None] = []
        try:
            refused, lease = await node.lease(timeout_s=5)
            seen.append(None if refused is None else refused.status.value)
            query, _ = await node.find(NodeQuery(Level.STUDY), timeout_s=0.3)
            seen.append(query.status.value)
            await node.release(lease)
            refused, _ = await node.lease(timeout_s=0.3)  # granted, never released
            seen.append(None if refused is None else refused.status.value)
            await until(lambda: node.in_flight == 0)  # its deadline (0.3 s) and the grace end it
            query, matches = await node.find(NodeQuery(Level.STUDY), timeout_s=2)
            seen.append(query.status.value)
            return seen, len(matches)
        finally:
            await node.close()

    seen, matches = asyncio.run(body())
    assert seen == [None, "throttled", None, "ok"] and matches == 2

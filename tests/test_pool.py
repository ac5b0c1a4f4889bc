"""The association pool against a simulated PACS: reuse, parking idle associations, dead ones replaced."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from actors.dimse import build_ae
from actors.pool import IDLE_POLL_S, AssociationPool
from simulator.dataset import generate_uniform
from simulator.scp import STUDY_ROOT_FIND, SimulatedPacs, SimulatorConfig
from spanner.nodespec import NodeSpec


@pytest.fixture()
def sim() -> Iterator[SimulatedPacs]:
    with SimulatedPacs(SimulatorConfig(ae_title="POOL"), generate_uniform(2, 0, 2)) as s:
        yield s


def pool_for(sim: SimulatedPacs, idle_s: float = 30.0) -> AssociationPool:
    spec = NodeSpec(
        name="p",
        ae_title="POOL",
        host="127.0.0.1",
        port=sim.port,
        calling_ae_title="SPANNER",
        connect_timeout_s=2,
        dimse_timeout_s=5,
    )
    return AssociationPool(build_ae(spec), spec, idle_s)


def test_reuse_and_parking(sim: SimulatedPacs) -> None:
    pool = pool_for(sim)
    assoc, reused = pool.acquire()
    assert not reused
    pool.give_back(assoc, reusable=True)
    deadline = time.monotonic() + 2
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.01)
    assert assoc._is_paused and assoc.dul._run_loop_delay == IDLE_POLL_S
    again, reused = pool.acquire()
    assert reused and again is assoc
    assert again.send_c_echo().Status == 0
    pool.give_back(again, reusable=True)
    assert sim.counters.associations == 1
    pool.close_all()


def test_parked_association_whose_peer_went_away_is_replaced_at_once(sim: SimulatedPacs) -> None:
    pool = pool_for(sim)
    assoc, _ = pool.acquire()
    pool.give_back(assoc, reusable=True)
    sim.stop()  # aborts every association the simulator holds
    sim.start()  # same port? no: a new one; point the pool at it
    pool._spec = pool._spec.__class__(
        **{**{f: getattr(pool._spec, f) for f in pool._spec.__slots__}, "port": sim.port}
    )
    time.sleep(IDLE_POLL_S * 4)
    started = time.monotonic()
    fresh, reused = pool.acquire()
    assert not reused and fresh is not assoc
    assert time.monotonic() - started < 2.0
    assert fresh.send_c_echo().Status == 0
    pool.give_back(fresh, reusable=False)


def test_idle_associations_are_released_after_idle_s(sim: SimulatedPacs) -> None:
    pool = pool_for(sim, idle_s=0.2)
    assoc, _ = pool.acquire()
    pool.give_back(assoc, reusable=True)
    time.sleep(0.3)
    assert pool.reap() == 1 and pool.idle == 0
    deadline = time.monotonic() + 3
    while sim.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.active_associations == 0


def test_a_reused_association_loses_no_response_of_a_fast_archive() -> None:
    """pynetdicom's reactor could take the first response of a C-FIND sent right after the previous one
    ended (its pause flag is stale for a moment); against an archive that answers at once that lost a
    match in about one query of 200. The pool hands out associations whose reactor really waits."""
    from pydicom.dataset import Dataset

    from simulator.wire import WireSimulatedPacs

    with WireSimulatedPacs(SimulatorConfig(ae_title="POOL"), generate_uniform(3, 0, 20)) as fast:
        pool = pool_for(fast)  # type: ignore[arg-type]
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ""
        counts = []
        for _ in range(300):
            assoc, _ = pool.acquire()
            pending = [ds for status, ds in assoc.send_c_find(identifier, STUDY_ROOT_FIND)
                       if status.Status in (0xFF00, 0xFF01)]
            counts.append(len(pending))
            pool.give_back(assoc, reusable=True)
        pool.close_all()
    assert fast.counters.associations == 1
    assert counts == [20] * 300


def test_associations_are_handed_out_with_their_reactor_waiting(sim: SimulatedPacs) -> None:
    """The property behind the test above, exactly: whether fresh or reused, the reactor thread is
    blocked at its cleared checkpoint when the pool hands the association out."""
    def _reactor_waiting(assoc: Any) -> bool:  # its thread is a waiter of the checkpoint's condition
        return bool(assoc._reactor_checkpoint._cond._waiters)

    pool = pool_for(sim)
    fresh, _ = pool.acquire()
    assert _reactor_waiting(fresh) and not fresh._reactor_checkpoint.is_set()
    assert fresh.send_c_echo().Status == 0  # pynetdicom resumes the reactor when a send_c_*() ends
    assert fresh._reactor_checkpoint.is_set()
    pool.give_back(fresh, reusable=True)
    again, reused = pool.acquire()
    assert reused and _reactor_waiting(again) and not again._reactor_checkpoint.is_set()
    pool.give_back(again, reusable=False)


def _count_dul_timeouts(monkeypatch: pytest.MonkeyPatch, dul: Any) -> list[int]:
    """How often ``dul``'s thread woke from its wait by the time bound rather than by an event (its
    zero-timeout selects are pynetdicom's own readiness checks)."""
    from spanner import reactor

    timeouts = [0]
    real = reactor.select.select

    def counting(*args: Any) -> Any:
        ready = real(*args)
        if threading.current_thread() is dul and args[3] and not ready[0]:
            timeouts[0] += 1
        return ready

    monkeypatch.setattr(reactor.select, "select", counting)
    return timeouts


def test_a_dul_waiting_on_a_slow_archive_sleeps_on_its_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the archive takes 1 s, the DUL thread wakes by its bound (0.2 s) only, not every 1 ms;
    the answer and the release still arrive at once (the socket and the wake-up pipe end the wait)."""
    from pydicom.dataset import Dataset

    from spanner import reactor

    config = SimulatorConfig(ae_title="POOL", latency_ms=1000)
    with SimulatedPacs(config, generate_uniform(2, 0, 2)) as slow:
        pool = pool_for(slow)
        assoc, _ = pool.acquire()
        timeouts = _count_dul_timeouts(monkeypatch, assoc.dul)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        started = time.monotonic()
        statuses = [int(status.Status) for status, _ in assoc.send_c_find(query, STUDY_ROOT_FIND)]
        elapsed = time.monotonic() - started
        assert statuses[-1] == 0 and len(statuses) == 3  # two studies, then success
        assert 1.0 <= elapsed < 1.0 + reactor.MAX_WAIT_S
        assert timeouts[0] <= 1.0 / reactor.MAX_WAIT_S + 2  # polling every 1 ms would be about 1000
        woken_by_bound = timeouts[0]
        assoc.release()  # stop_dul wakes the thread: no wait for the bound
        assert not assoc.dul.is_alive()
        assert timeouts[0] == woken_by_bound
        pool.give_back(assoc, reusable=False)


def test_an_association_the_archive_aborts_is_not_released_but_dropped_at_once() -> None:
    """Against an archive that aborts after its first match, every query ends ``aborted`` at once.

    Releasing such an association waited the whole ACSE timeout for an answer that cannot come, and
    the node answered ``timeout`` at its deadline instead (5 queries in 25 before the fix).
    """
    import asyncio

    from actors.pacs_node import PacsNodeImpl
    from spanner.nodespec import ActorTuning
    from spanner.query import Level, NodeQuery

    config = SimulatorConfig(ae_title="ABORTS", fault="abort", abort_after=1)
    with SimulatedPacs(config, generate_uniform(2, 0, 5)) as aborting:
        spec = NodeSpec(name="ab", ae_title="ABORTS", host="127.0.0.1", port=aborting.port,
                        calling_ae_title="SPANNER", connect_timeout_s=5, dimse_timeout_s=30)
        node = PacsNodeImpl(spec, ActorTuning(log_level="WARNING"))

        async def queries() -> list[tuple[str, float]]:
            outcomes = []
            for _ in range(30):
                outcome, matches = await node.find(NodeQuery(Level.STUDY), timeout_s=3.0)
                outcomes.append((outcome.status.value, outcome.elapsed_ms))
                assert len(matches) == 1
            return outcomes

        try:
            outcomes = asyncio.run(queries())
        finally:
            node.close()
    assert {status for status, _ in outcomes} == {"aborted"}, outcomes
    assert max(elapsed for _, elapsed in outcomes) < 2000, outcomes

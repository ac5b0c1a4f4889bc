"""The association pool against a simulated PACS: reuse, parking idle associations, dead ones replaced."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from actors.dimse import build_ae
from actors.pool import IDLE_POLL_S, AssociationPool
from spanner.nodespec import NodeSpec
from spanner.simulator.dataset import generate_uniform
from spanner.simulator.scp import SimulatedPacs, SimulatorConfig


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

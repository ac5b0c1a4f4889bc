"""Admission control: a spanning query is answered by its deadline (+1 s) or refused at once with 503 and
Retry-After. The slot logic in this process (no Ray), then a Serve app with one slot and a hanging archive."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

from serve_app.admission import MIN_RUN_S, Admission, Overloaded
from serve_app.timing import ServerTiming, arrived, phase
from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorConfig
from tests.conftest import Api, migrate


def test_slots_are_handed_on_in_order_and_the_full_waiting_room_refuses_at_once() -> None:
    async def scenario() -> list[str]:
        admission = Admission(max_active=1, max_waiting=1)
        said: list[str] = []

        async def query(name: str, hold_s: float, timeout_s: float) -> None:
            arrived = time.monotonic()
            try:
                async with admission.slot(timeout_s, arrived) as left:
                    said.append(f"{name} in with {left:.1f}")
                    await asyncio.sleep(hold_s)
            except Overloaded as exc:
                waited = time.monotonic() - arrived
                said.append(f"{name} refused after {waited:.1f} retry {exc.retry_after_s}")

        await query("warm", 0.3, 5.0)  # a slot held once: the replica knows how long one takes
        said.clear()
        first = asyncio.create_task(query("a", 0.3, 5.0))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(query("b", 0.0, 5.0))
        await asyncio.sleep(0.01)
        await query("c", 0.0, 5.0)  # the waiting room (1) is taken by b
        await asyncio.gather(first, second)
        assert (admission.active, admission.waiting) == (0, 0)
        return said

    said = asyncio.run(scenario())
    assert said[0] == "a in with 5.0"
    assert said[1].startswith("c refused after 0.0 retry 1")
    assert said[2] == "b in with 4.7"


def test_a_cold_replica_refuses_at_once_the_part_of_a_burst_it_could_not_admit_in_time() -> None:
    """Before any slot has been held, a slot is assumed held for the whole deadline: of a burst of 10
    on 2 slots with a 2 s deadline, 2 run, the first in line waits (its expected wait, place times 2 s over
    2 slots, is under 2 s - MIN_RUN_S) and the other 7 are refused at once instead of queueing until
    their deadline."""
    async def scenario() -> tuple[int, list[float], int]:
        admission = Admission(max_active=2, max_waiting=100)
        ran, refused_after = 0, list[float]()

        async def query() -> None:
            nonlocal ran
            arrived = time.monotonic()
            try:
                async with admission.slot(2.0, arrived):
                    ran += 1
                    await asyncio.sleep(0.1)
            except Overloaded:
                refused_after.append(time.monotonic() - arrived)

        await asyncio.gather(*(query() for _ in range(10)))
        return ran, refused_after, admission.active + admission.waiting

    ran, refused_after, left = asyncio.run(scenario())
    assert ran == 2 + 1 and len(refused_after) == 7 and left == 0
    assert max(refused_after) < 0.05


def test_queries_that_end_late_together_cut_the_slots_once() -> None:
    """Eight queries that all overrun a 0.3 s deadline by 0.2 s together cut 8 slots to 6, not to 8 times
    0.75^8; one that ends in time afterwards lets the limit grow again."""
    async def scenario() -> tuple[float, float]:
        admission = Admission(max_active=8, max_waiting=8)

        async def query(hold_s: float, timeout_s: float) -> None:
            async with admission.slot(timeout_s, time.monotonic()):
                await asyncio.sleep(hold_s)

        await asyncio.gather(*(query(0.5, 0.3) for _ in range(8)))
        after_late = admission.limit
        await query(0.0, 1.0)
        return after_late, admission.limit

    after_late, after_quick = asyncio.run(scenario())
    assert after_late == 6.0
    assert after_quick > after_late


def test_a_merge_a_few_milliseconds_past_the_cut_off_does_not_cut_the_slots() -> None:
    """With no reserve (node_grace_s 0) a query whose archive is silent ends a few milliseconds past its
    deadline: no sign of overload, so an idle replica keeps its slots."""
    async def scenario() -> float:
        admission = Admission(max_active=4, max_waiting=4)
        async with admission.slot(0.2, time.monotonic(), reserve_s=0.0):
            await asyncio.sleep(0.21)
        return admission.limit

    assert asyncio.run(scenario()) == 4.0


def test_a_waiter_whose_deadline_nears_is_refused_before_it() -> None:
    async def scenario() -> tuple[float, int]:
        admission = Admission(max_active=1, max_waiting=4)
        await _hold(admission, 0.05)  # slots have been quick: the waiter expects a short wait
        holder = asyncio.create_task(_hold(admission, 2.0))
        await asyncio.sleep(0.01)
        arrived = time.monotonic()
        with pytest.raises(Overloaded, match="before this query's deadline") as refused:
            async with admission.slot(1.0, arrived):
                raise AssertionError("must not run")
        waited = time.monotonic() - arrived
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        assert (admission.active, admission.waiting) == (0, 0)
        return waited, refused.value.retry_after_s

    waited, retry = asyncio.run(scenario())
    assert 1.0 - MIN_RUN_S - 0.1 <= waited <= 1.0
    assert retry >= 1


def test_a_query_that_reaches_its_slot_with_too_little_deadline_left_is_refused_not_run() -> None:
    async def scenario() -> None:
        admission = Admission(max_active=1, max_waiting=1)
        with pytest.raises(Overloaded, match="too little of its deadline"):
            async with admission.slot(1.0, time.monotonic() - 0.9):  # reading and planning took 0.9 s
                raise AssertionError("must not run")
        assert (admission.active, admission.waiting) == (0, 0)

    asyncio.run(scenario())


async def _hold(admission: Admission, hold_s: float) -> None:
    async with admission.slot(10.0, time.monotonic()):
        await asyncio.sleep(hold_s)


@pytest.fixture(scope="module")
def hanging() -> Iterator[SimulatedPacs]:
    sim = SimulatedPacs(SimulatorConfig(ae_title="HANGPACS", fault="hang"), generate_fleet(8, 1, 3)[0])
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def quick() -> Iterator[SimulatedPacs]:
    sim = SimulatedPacs(SimulatorConfig(ae_title="QUICKPACS"), generate_fleet(9, 1, 3)[0])
    sim.start()
    yield sim
    sim.stop()


@contextmanager
def _app(api: Api, ray_session: str, tmp_path_factory: pytest.TempPathFactory, name: str,
         overrides: dict[str, object], delete: bool = True) -> Iterator[Api]:
    """A spanner app of its own (SQLite, namespace, route /<name>) with ``overrides`` of the settings;
    ``delete`` False: the caller deletes it (``spanner-<name>``)."""
    from ray import serve

    from serve_app.app import AppArgs, build_app

    var_dir = tmp_path_factory.mktemp(name)
    url = f"sqlite:///{var_dir}/spanner.db"
    migrate(url)
    namespace = f"{ray_session}-{name}"
    settings = dict(api.settings) | {"namespace": namespace, "var_dir": str(var_dir), "database_url": url,
                                     **overrides}
    serve.run(build_app(AppArgs(settings=settings)), name=f"spanner-{name}", route_prefix=f"/{name}")
    client = Api(f"{api.base_url}/{name}", namespace, settings)
    try:
        yield client
    finally:
        client.http.close()
        if delete:
            serve.delete(f"spanner-{name}")


@pytest.fixture(scope="module")
def narrow(api: Api, ray_session: str, tmp_path_factory: pytest.TempPathFactory, hanging: SimulatedPacs,
           quick: SimulatedPacs) -> Iterator[Api]:
    """An app that runs one spanning query at once and lets one wait."""
    overrides = {"admission_max_active": 1, "admission_max_waiting": 1, "node_grace_s": 0.5}
    with _app(api, ray_session, tmp_path_factory, "admission", overrides) as client:
        client.add_node("hang", hanging.port, ae_title="HANGPACS")
        client.add_node("quick", quick.port, ae_title="QUICKPACS")
        yield client


def test_under_overload_every_query_is_answered_by_its_deadline_or_refused_at_once(narrow: Api) -> None:
    timeout_s = 2.0
    body = {"level": "PATIENT", "filters": {"PatientID": "*"}, "timeout_s": timeout_s}

    def ask(_: int) -> tuple[int, float, dict[str, str], dict[str, object]]:
        started = time.monotonic()
        with httpx.Client(base_url=narrow.base_url, timeout=30) as http:
            response = http.post("/api/v1/queries", json=body, headers={"Cache-Control": "no-cache"})
        return response.status_code, time.monotonic() - started, dict(response.headers), response.json()

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    statuses = sorted(status for status, *_ in answers)
    assert all(elapsed <= timeout_s + 1.0 for _, elapsed, _, _ in answers), answers
    answered = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] == 503]
    assert len(answered) + len(refused) == 6, statuses
    assert answered, statuses
    for _, _, _, answer in answered:
        assert answer["status"] == "partial"
        by_node = {o["node"]: o["status"] for o in answer["nodes"]}  # type: ignore[union-attr]
        assert by_node["quick"] == "ok" and by_node["hang"] in ("timeout", "throttled")
    at_once = [a for a in refused if a[1] < 1.0]
    assert at_once, "with one slot and one waiting place, some of 6 must be refused at once"
    for _, _, headers, answer in refused:
        assert int(headers["retry-after"]) >= 1 and "capacity" in str(answer["detail"])


@pytest.fixture(scope="module")
def stalling(api: Api, ray_session: str, tmp_path_factory: pytest.TempPathFactory, hanging: SimulatedPacs,
             quick: SimulatedPacs) -> Iterator[tuple[Api, str]]:
    """An app of two slots and two waiting places over three nodes: one archive that hangs, one that
    answers, and one whose node actor the test stops (SIGSTOP), so that it never answers."""
    overrides = {"admission_max_active": 2, "admission_max_waiting": 2, "node_grace_s": 1.0}
    with _app(api, ray_session, tmp_path_factory, "stalling", overrides) as client:
        stalled = f"stalled-{uuid.uuid4().hex[:8]}"  # actor names are global to the test's look-up below
        client.add_node("hang", hanging.port, ae_title="HANGPACS")
        client.add_node("quick", quick.port, ae_title="QUICKPACS")
        client.add_node(stalled, quick.port, ae_title="QUICKPACS")
        yield client, stalled


def _actor_pid(node: str) -> int:
    from cluster.ray_internals import actor_table

    pids = [int(info["Pid"]) for info in actor_table().values()
            if info.get("Name") == f"node:{node}" and info.get("State") == "ALIVE" and info.get("Pid")]
    assert len(pids) == 1, f"node actor of {node}: {pids}"
    return pids[0]


def test_a_burst_is_answered_by_the_deadline_though_a_node_actor_never_answers(
    stalling: tuple[Api, str],
) -> None:
    """Eight queries at once against two slots, with an archive that hangs and a node actor that is
    stopped: each is answered (partial) or refused by its deadline + 1 s. The reserve for the way
    back (``node_grace_s``) is kept inside the deadline, not added after it; the replica's own part
    (Server-Timing ``app``) ends by the deadline, with slack for a loaded machine."""
    app, stalled = stalling
    timeout_s = 2.0
    body = {"level": "PATIENT", "filters": {"PatientID": "*"}, "timeout_s": timeout_s}
    warm = app.http.post("/api/v1/queries", json=body, headers={"Cache-Control": "no-cache"})
    assert warm.status_code == 200, warm.text  # every node's actor exists (and the stalled one's pid)
    pid = _actor_pid(stalled)

    def ask(_: int) -> tuple[int, float, dict[str, str], dict[str, object]]:
        started = time.monotonic()
        with httpx.Client(base_url=app.base_url, timeout=30) as http:
            response = http.post("/api/v1/queries", json=body, headers={"Cache-Control": "no-cache"})
        return response.status_code, time.monotonic() - started, dict(response.headers), response.json()

    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
    finally:
        os.kill(pid, signal.SIGCONT)
    late = [(status, round(elapsed, 2)) for status, elapsed, _, _ in answers if elapsed > timeout_s + 1.0]
    assert late == [], f"{len(late)} of 8 answered later than deadline + 1 s: {late}"
    # Answered: partial, or failed (502) where a loaded machine kept even the quick archive from
    # answering in time; either way by the deadline, with the stopped actor's node timed out.
    answered = [a for a in answers if a[0] in (200, 502)]
    assert answered and all(a[0] in (200, 502, 503) for a in answers), [a[0] for a in answers]
    for status, _, headers, answer in answered:
        assert answer["status"] == ("partial" if status == 200 else "failed")
        by_node = {o["node"]: o["status"] for o in answer["nodes"]}  # type: ignore[union-attr]
        assert set(by_node) == {"quick", "hang", stalled} and by_node[stalled] == "timeout", by_node
        assert by_node["hang"] in ("timeout", "throttled") and (status == 502 or by_node["quick"] == "ok")
        app_ms = float(headers["server-timing"].split(",")[0].removeprefix("app;dur="))
        assert app_ms <= (timeout_s + 0.5) * 1000, headers["server-timing"]
    for status, _, headers, answer in answers:
        if status == 503:
            assert int(headers["retry-after"]) >= 1 and "capacity" in str(answer["detail"])


def test_late_queries_shrink_the_number_of_slots() -> None:
    """Queries ending well past their deadline (the machine cannot keep up) leave fewer slots."""

    async def scenario() -> int:
        admission = Admission(max_active=4, max_waiting=4)
        for _ in range(3):
            async with admission.slot(0.2, time.monotonic()) as left:
                await asyncio.sleep(left + 0.9)
        return admission.capacity

    assert asyncio.run(scenario()) < 4


def test_the_deadline_counts_from_when_the_request_reached_the_app_and_server_timing_says_how_long() -> None:
    shared_state: dict[str, object] = {}  # a server may hand every request the same state dict

    async def slow_dependency() -> None:
        await asyncio.sleep(0.2)  # authentication under load: before the handler, inside the deadline

    app = FastAPI()
    app.add_middleware(ServerTiming)

    @app.get("/t", dependencies=[Depends(slow_dependency)])
    async def handler(request: Request) -> dict[str, float | None]:
        with phase("work"):
            await asyncio.sleep(0.05)
        return {"arrived": arrived(request), "now": time.monotonic()}

    async def shared_scope_app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] == "http":
            scope["state"] = shared_state
        await app(scope, receive, send)  # type: ignore[arg-type]

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=shared_scope_app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return list(await asyncio.gather(client.get("/t"), client.get("/t")))

    responses = asyncio.run(go())
    for response in responses:
        body = response.json()
        assert body["now"] - body["arrived"] >= 0.2  # counted from before the dependency ran
        metrics = dict(m.strip().split(";", 1) for m in response.headers["server-timing"].split(","))
        assert set(metrics) == {"app", "loop", "work", "received"}
        assert float(metrics["app"].removeprefix("dur=")) >= 250  # dependency and handler
        assert float(metrics["work"].removeprefix("dur=")) >= 50
        assert abs(float(metrics["received"].removeprefix("desc=").strip('"')) - time.time()) < 5
    assert shared_state == {}  # each request's arrival is its own, the shared dict untouched

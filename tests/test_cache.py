"""The query cache: key normalisation, both backends, a Redis outage, and hits through the running API."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorConfig
from spanner.cache import NO_GENERATION, MemoryCache, QueryIdentity, RedisCache, cache_key, make_cache
from spanner.errors import ConfigError
from spanner.query import normalise_filters, normalise_return_keys
from spanner.settings import load_settings
from tests.conftest import Api, migrate, require
from tests.peers.ports import ClosedPort, free_port, wait_for_port

SPEC_A = {"name": "a", "ae_title": "A", "host": "127.0.0.1", "port": 104, "priority": 1}
SPEC_B = {"name": "b", "ae_title": "B", "host": "127.0.0.1", "port": 105, "priority": 2}


def ident(filters: dict[str, Any] | None = None, return_keys: list[str] | None = None,
          **kw: Any) -> QueryIdentity:
    """An identity as the ingress builds it: filters and return keys normalised first."""
    values: dict[str, Any] = {
        "span": "all", "nodes": (SPEC_A, SPEC_B), "level": "STUDY", "dedup": "merge_all", "limit": 100,
        "offset": 0, "failure_strategy": "best_effort", "minimum_nodes": 1,
    } | kw
    return QueryIdentity(filters=normalise_filters(filters or {}),
                         return_keys=normalise_return_keys(return_keys or []), **values)


def key(identity: QueryIdentity, gens: tuple[str, ...] = (NO_GENERATION, NO_GENERATION),
        prefix: str = "spanner:") -> str:
    return cache_key(prefix, identity, gens)


def answer(status: str = "success", **extra: Any) -> dict[str, Any]:
    return {"query_id": uuid.uuid4().hex, "status": status, "level": "STUDY", "span": "all", "total": 1,
            "matches": [{"dataset": {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}, "nodes": ["a"]}],
            "nodes": [], "elapsed_ms": 12.5, "reason": None, "cache": "miss", **extra}


# --- the key ---------------------------------------------------------------------------------------------

def test_equivalent_queries_share_one_key() -> None:
    base = key(ident({"PatientName": "DOE*", "StudyDate": "20240101-", "AccessionNumber": "*"},
                     ["StudyDescription", "InstitutionName"]))
    assert base.startswith("spanner:q:") and len(base) == len("spanner:q:") + 64
    same = [
        ident({"AccessionNumber": "", "StudyDate": "20240101-", "PatientName": "DOE*"},  # order, '*' as ''
              ["InstitutionName", "StudyDescription"]),
        ident({"(0008,0050)": None, "00100010": "DOE*", "StudyDate": " 20240101- "},  # tags, null, blanks
              ["InstitutionName", "StudyDescription", "InstitutionName", "PatientID"]),  # dup, default key
        ident({"PatientName": "DOE*", "StudyDate": "20240101-", "AccessionNumber": "*"},
              ["StudyDescription", "InstitutionName", "AccessionNumber"], minimum_nodes=2),  # filtered key
    ]
    assert {key(i) for i in same} == {base}


@pytest.mark.parametrize("change", [
    {"filters": {"PatientName": "DOE"}}, {"level": "SERIES"}, {"limit": 10}, {"offset": 1},
    {"dedup": "first_wins"}, {"failure_strategy": "fail_fast"}, {"span": "other"}, {"nodes": (SPEC_A,)},
    {"nodes": (SPEC_A, SPEC_B | {"port": 106})}, {"nodes": (SPEC_B, SPEC_A)},
    {"return_keys": ["InstitutionName"]},
    {"failure_strategy": "minimum", "minimum_nodes": 2},
])
def test_what_changes_the_answer_changes_the_key(change: dict[str, Any]) -> None:
    change = dict(change)
    filters = change.pop("filters", {"PatientName": "DOE*"})
    return_keys = change.pop("return_keys", [])
    nodes = change.get("nodes", (SPEC_A, SPEC_B))
    gens = tuple(NO_GENERATION for _ in nodes)
    assert key(ident(filters, return_keys, **change), gens) != key(ident({"PatientName": "DOE*"}))


def test_generation_and_prefix_are_part_of_the_key() -> None:
    one = ident({"PatientID": "P1"})
    assert key(one, ("0", "x1")) != key(one)
    assert key(one, prefix="other:") != key(one)


# --- the in-process LRU ----------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def memory(**kw: Any) -> tuple[MemoryCache, Clock]:
    clock = Clock()
    args: dict[str, Any] = {"prefix": "t:", "max_bytes": 1 << 20, "max_entries": 100,
                            "max_total_bytes": 1 << 24}
    return MemoryCache(**(args | kw), clock=clock), clock


def test_memory_cache_hit_ttl_and_per_request_fields() -> None:
    cache, clock = memory()
    q = ident({"PatientID": "P1"})
    miss = cache.lookup(q)
    assert miss.key is not None and miss.answer is None
    assert cache.store(miss.key, answer(), ttl_s=60)
    hit = cache.lookup(q)
    assert hit.answer is not None and hit.answer["total"] == 1
    assert "query_id" not in hit.answer and "cache" not in hit.answer
    assert cache.lookup(q, read=False).answer is None  # Cache-Control: no-cache
    clock.now += 59.9
    assert cache.lookup(q).answer is not None
    clock.now += 0.2
    assert cache.lookup(q).answer is None and len(cache) == 0


def test_only_success_answers_of_bounded_size_are_kept() -> None:
    cache, _ = memory(max_bytes=2000)
    key_ = cache.lookup(ident()).key
    assert not cache.store(key_, answer("partial"), 60)
    assert not cache.store(key_, answer("failed"), 60)
    assert not cache.store(key_, answer(), 0)
    assert not cache.store(None, answer(), 60)
    big = answer(matches=[{"dataset": {"00081030": {"vr": "LO", "Value": ["x" * 64]}}, "nodes": ["a"]}] * 30)
    assert not cache.store(key_, big, 60)
    assert not cache.store(key_, answer(matches=[{}] * 40), 60)  # refused before serialising
    assert len(cache) == 0
    assert cache.store(key_, answer(), 60)


def test_memory_cache_is_bounded_in_entries_and_bytes_least_recently_used_first() -> None:
    cache, _ = memory(max_entries=3)
    keys = [cache.lookup(ident({"PatientID": f"P{i}"})).key for i in range(5)]
    for k in keys[:3]:
        cache.store(k, answer(), 60)
    assert cache.lookup(ident({"PatientID": "P0"})).answer is not None  # P0 is now the most recent
    cache.store(keys[3], answer(), 60)
    assert cache.lookup(ident({"PatientID": "P1"})).answer is None  # P1 was the least recent
    assert cache.lookup(ident({"PatientID": "P0"})).answer is not None and len(cache) == 3
    size = cache.total_bytes // 3
    small, _ = memory(max_total_bytes=size * 2 + size // 2)
    for k in keys[:3]:
        small.store(k, answer(), 60)
    assert len(small) == 2 and small.total_bytes <= size * 2 + size // 2


def test_changing_a_node_drops_the_answers_that_involved_it() -> None:
    cache, _ = memory()
    both, only_b = ident(), ident(nodes=(SPEC_B,))
    for q in (both, only_b):
        cache.store(cache.lookup(q).key, answer(), 60)
    cache.invalidate_node("a")
    assert cache.lookup(both).answer is None
    assert cache.lookup(only_b).answer is not None


def test_an_answer_computed_while_its_node_changed_is_never_served() -> None:
    """The key is taken before the query runs: a store racing the invalidation lands under the old one."""
    cache, _ = memory()
    before = cache.lookup(ident())
    cache.invalidate_node("b")
    cache.store(before.key, answer(), 60)
    assert cache.lookup(ident()).answer is None


def test_make_cache_picks_the_backend_and_connects_to_nothing() -> None:
    assert isinstance(make_cache(load_settings()), MemoryCache)
    remote = make_cache(load_settings(redis_url="redis://127.0.0.1:1/0"))  # nothing listens there: fine
    assert isinstance(remote, RedisCache)
    remote.close()
    with pytest.raises(ConfigError, match="REDIS_URL"):
        make_cache(load_settings(redis_url="http://example/"))


# --- Redis -----------------------------------------------------------------------------------------------

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> Iterator[str]:
    """An isolated key prefix on the shared Redis, and every key under it deleted afterwards."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        require(False, "Redis at 127.0.0.1:6379")
    name = f"spanner-test-{uuid.uuid4().hex[:8]}:"
    yield name
    keys = list(client.scan_iter(match=f"{name}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_redis_cache_hit_ttl_and_invalidation_shared_by_replicas(prefix: str) -> None:
    one, two = (RedisCache(REDIS_URL, prefix, 1 << 20) for _ in range(2))  # two replicas, one Redis
    other = RedisCache(REDIS_URL, "spanner-test-other:", 1 << 20)
    try:
        q = ident({"PatientID": "P1"})
        k = one.lookup(q).key
        assert k is not None and k.startswith(prefix)
        assert one.store(k, answer(), 30)
        hit = two.lookup(q)
        assert hit.answer is not None and hit.answer["matches"][0]["nodes"] == ["a"]
        assert 0 < redis.Redis.from_url(REDIS_URL).ttl(k) <= 30
        assert other.lookup(q).answer is None  # another deployment's prefix
        two.invalidate_node("b")
        assert one.lookup(q).answer is None
        assert not one.store(one.lookup(q).key, answer("partial"), 30)
    finally:
        for cache in (one, two, other):
            cache.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


class OwnRedis:
    """A redis-server of this test on a free loopback port, stopped and restarted by its PID."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        require(binary is not None, "redis-server")
        assert binary is not None
        self.binary, self.folder, self.port = binary, folder, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self, paused: bool) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "spanner.cache" and r.levelno == logging.WARNING]


def test_a_redis_outage_is_a_miss_with_one_warning_until_it_recovers(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spanner.cache")
    cache = RedisCache(own_redis.url, "t:", 1 << 20, timeout_s=0.2, retry_s=0.05)
    q = ident({"PatientID": "P1"})
    try:
        assert cache.store(cache.lookup(q).key, answer(), 60)
        assert cache.lookup(q).answer is not None

        own_redis.stop()  # down: connection refused
        for _ in range(20):
            assert cache.lookup(q).answer is None
            assert not cache.store(cache.lookup(q).key, answer(), 60)
            cache.invalidate_node("a")
            time.sleep(0.01)
        assert not cache.available
        assert len(cache_warnings(caplog)) == 1 and "unavailable" in cache_warnings(caplog)[0]

        own_redis.start()  # back (empty: nothing on disk)
        time.sleep(0.06)
        assert cache.store(cache.lookup(q).key, answer(), 60) and cache.lookup(q).answer is not None
        assert cache.available and any("back" in r.getMessage() for r in caplog.records)
        assert len(cache_warnings(caplog)) == 1

        own_redis.pause(True)  # slow: accepts nothing, answers nothing
        started = time.monotonic()
        assert cache.lookup(q).answer is None
        assert time.monotonic() - started < 1.0  # the socket timeout, not a hang
        resting = time.monotonic()
        assert cache.lookup(q).answer is None
        assert time.monotonic() - resting < 0.05  # skipped while resting after the failure
        assert len(cache_warnings(caplog)) == 2  # a second outage: a second warning
        own_redis.pause(False)
        time.sleep(0.06)
        assert cache.lookup(q).answer is not None and cache.available
    finally:
        cache.close()


# --- through the running API (in-process LRU: the api fixture has no REDIS_URL) -------------------------

@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatedPacs]:
    instances = generate_fleet(seed=7, nodes=1, patients=4)[0]
    with SimulatedPacs(SimulatorConfig(ae_title="CACHE_SIM"), instances) as s:
        yield s


@pytest.fixture(scope="module")
def cached_span(api: Api, sim: SimulatedPacs) -> Iterator[str]:
    api.add_node("cache-sim", sim.port, ae_title="CACHE_SIM")
    api.add_span("cache-span", ["cache-sim"], ae_title="CACHE_SPAN", cache_ttl_s=60)
    yield "cache-span"
    api.http.delete("/api/v1/spans/cache-span")
    api.http.delete("/api/v1/nodes/cache-sim")


def ask(api: Api, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    response = api.http.post("/api/v1/queries", json={"level": "STUDY", **body}, headers=headers)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def without_per_request(a: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in a.items() if k not in ("query_id", "elapsed_ms", "cache")}


def test_a_repeated_query_is_a_hit_with_its_own_id_and_record(api: Api, cached_span: str) -> None:
    tag = uuid.uuid4().hex[:6]  # a query no other test asked
    first = ask(api, span=cached_span, filters={"PatientID": "*", "AccessionNumber": f"{tag}*"})
    assert first["cache"] == "miss" and first["status"] == "success"
    second = ask(api, span=cached_span, nodes=["cache-sim"],
                 filters={"(0008,0050)": f"{tag}*", "PatientID": ""})  # same query, written otherwise
    assert second["cache"] == "hit" and second["query_id"] != first["query_id"]
    assert without_per_request(second) == without_per_request(first)
    record = api.http.get(f"/api/v1/queries/{second['query_id']}").json()
    assert (record["status"], record["cache"]) == ("success", "hit")
    assert record["elapsed_ms"] == second["elapsed_ms"]
    assert api.http.get(f"/api/v1/queries/{first['query_id']}").json()["cache"] == "miss"


def test_no_cache_bypasses_the_lookup_but_stores_and_no_store_does_not(api: Api, cached_span: str) -> None:
    tag = uuid.uuid4().hex[:6]
    body: dict[str, Any] = {"span": cached_span, "filters": {"AccessionNumber": f"{tag}*"}}
    assert ask(api, **body)["cache"] == "miss"
    assert ask(api, **body)["cache"] == "hit"
    assert ask(api, headers={"Cache-Control": "no-cache"}, **body)["cache"] == "miss"
    assert ask(api, **body)["cache"] == "hit"
    fresh: dict[str, Any] = {"span": cached_span, "filters": {"AccessionNumber": f"{tag}x*"}}
    assert ask(api, headers={"Cache-Control": "No-Cache"}, **fresh)["cache"] == "miss"
    assert ask(api, **fresh)["cache"] == "hit"  # the bypassing query stored its answer
    other: dict[str, Any] = {"span": cached_span, "filters": {"AccessionNumber": f"{tag}y*"}}
    assert ask(api, headers={"Cache-Control": "no-store"}, **other)["cache"] == "miss"
    assert ask(api, **other)["cache"] == "miss"


def test_changing_the_node_drops_its_cached_answers(api: Api, cached_span: str, sim: SimulatedPacs) -> None:
    body: dict[str, Any] = {"span": cached_span, "filters": {"AccessionNumber": f"{uuid.uuid4().hex[:6]}*"}}
    ask(api, **body)
    assert ask(api, **body)["cache"] == "hit"
    assert api.http.patch("/api/v1/nodes/cache-sim", json={"priority": 5}).status_code == 200
    assert ask(api, **body)["cache"] == "miss"
    assert ask(api, **body)["cache"] == "hit"
    api.add_node("cache-sim", sim.port, ae_title="CACHE_SIM")  # a PUT (priority back to its default)
    assert [ask(api, **body)["cache"] for _ in range(2)] == ["miss", "hit"]
    api.add_node("cache-sim", sim.port, ae_title="CACHE_SIM")  # the same PUT again: the spec is unchanged,
    assert ask(api, **body)["cache"] == "miss"  # but the node's generation moved on


def test_the_span_ttl_bounds_an_entry_and_zero_turns_caching_off(api: Api, cached_span: str) -> None:
    api.add_span("cache-short", ["cache-sim"], ae_title="CACHE_SHORT", cache_ttl_s=1)
    api.add_span("cache-off", ["cache-sim"], ae_title="CACHE_OFF", cache_ttl_s=0)
    try:
        assert ask(api, span="cache-short")["cache"] == "miss"
        assert ask(api, span="cache-short")["cache"] == "hit"
        time.sleep(1.2)
        assert ask(api, span="cache-short")["cache"] == "miss"
        assert [ask(api, span="cache-off")["cache"] for _ in range(2)] == ["miss", "miss"]
    finally:
        api.http.delete("/api/v1/spans/cache-short")
        api.http.delete("/api/v1/spans/cache-off")


def test_a_partial_answer_is_not_cached(api: Api, cached_span: str) -> None:
    closed = ClosedPort()
    api.add_node("cache-down", closed.port, ae_title="DOWN", connect_timeout_s=1)
    api.add_span("cache-partial", ["cache-sim", "cache-down"], ae_title="CACHE_PARTIAL")
    try:
        answers = [ask(api, span="cache-partial") for _ in range(2)]
        assert [(a["status"], a["cache"]) for a in answers] == [("partial", "miss")] * 2
    finally:
        api.http.delete("/api/v1/spans/cache-partial")
        api.http.delete("/api/v1/nodes/cache-down")
        closed.release()


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def test_a_hit_is_faster_than_a_miss(api: Api, cached_span: str) -> None:
    """Client-side latency through the HTTP API, next to GET /health (the Serve round trip alone);
    the figures are printed (run with -s to see them)."""
    body = {"level": "STUDY", "span": cached_span, "filters": {"AccessionNumber": "*"}}
    api.http.post("/api/v1/queries", json=body)  # warm the entry and the actor's association
    timings: dict[str, list[float]] = {"health": [], "hit": [], "miss": []}
    server_ms: dict[str, list[float]] = {"hit": [], "miss": []}
    for i in range(900):
        kind = ("health", "hit", "miss")[i % 3]
        headers = {"Cache-Control": "no-cache"} if kind == "miss" else None
        started = time.perf_counter()
        if kind == "health":
            api.http.get("/health")
        else:
            response = api.http.post("/api/v1/queries", json=body, headers=headers)
        timings[kind].append((time.perf_counter() - started) * 1000)
        if kind != "health":
            assert response.json()["cache"] == kind
            server_ms[kind].append(response.json()["elapsed_ms"])
    figures = {k: (percentile(v, 50), percentile(v, 95)) for k, v in timings.items()}
    for kind, (p50, p95) in figures.items():
        inside = f"; in the handler p50 {percentile(server_ms[kind], 50):.2f} ms" if kind in server_ms else ""
        print(f"\n{kind}: n={len(timings[kind])} p50 {p50:.2f} ms p95 {p95:.2f} ms{inside}")
    assert figures["hit"][0] < figures["miss"][0]


# --- through a second app with REDIS_URL, whose Redis goes away mid-test ------------------------------

@pytest.fixture
def api_redis(api: Api, ray_session: str, own_redis: OwnRedis, tmp_path: Path) -> Iterator[Api]:
    from ray import serve

    from serve_app.app import AppArgs, build_app

    namespace = f"{ray_session}-redis"
    database = f"sqlite:///{tmp_path / 'redis-app.db'}"
    migrate(database)
    settings = dict(api.settings) | {"namespace": namespace, "database_url": database,
                                     "redis_url": own_redis.url, "cache_retry_s": 0.2,
                                     "cache_prefix": f"t-{uuid.uuid4().hex[:6]}:"}
    serve.run(build_app(AppArgs(settings=settings)), name="spanner-redis", route_prefix="/redis")
    client = Api(f"{api.base_url}/redis", namespace, settings)
    yield client
    client.http.close()
    serve.delete("spanner-redis")


def test_through_the_api_with_redis_an_outage_costs_only_the_cache(
    api_redis: Api, own_redis: OwnRedis, sim: SimulatedPacs
) -> None:
    api_redis.add_node("redis-sim", sim.port, ae_title="CACHE_SIM")
    try:
        assert [ask(api_redis)["cache"] for _ in range(2)] == ["miss", "hit"]
        own_redis.stop()
        during = [ask(api_redis) for _ in range(5)]  # 200 every time, from the archive
        assert {(a["status"], a["cache"]) for a in during} == {("success", "miss")}
        own_redis.start()
        time.sleep(0.3)
        kinds = [ask(api_redis)["cache"] for _ in range(3)]
        assert kinds[-1] == "hit", kinds
    finally:
        api_redis.http.delete("/api/v1/nodes/redis-sim")

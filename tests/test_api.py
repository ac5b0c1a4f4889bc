"""The HTTP API: node and span management, the query record, and clear 4xx answers to bad input."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from actors import registry
from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorConfig
from tests.conftest import Api


@pytest.fixture(scope="module")
def pacs(api: Api) -> Iterator[SimulatedPacs]:
    with SimulatedPacs(
        SimulatorConfig(ae_title="API_SIM"), generate_fleet(seed=3, nodes=1, patients=5)[0]
    ) as sim:
        api.add_node("api-sim", sim.port, ae_title="API_SIM")
        yield sim
        api.http.delete("/api/v1/nodes/api-sim")


def detail(response: object) -> str:
    return str(response.json()["detail"])  # type: ignore[attr-defined]


def test_health_ready_and_docs(api: Api, pacs: SimulatedPacs) -> None:
    assert api.http.get("/health").json() == {"status": "up"}
    ready = api.http.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["actors"]["api-sim"].startswith("alive")
    assert api.http.get("/docs").status_code == 200
    paths = api.http.get("/openapi.json").json()["paths"]
    assert {"/api/v1/queries", "/api/v1/nodes/{name}/echo", "/api/v1/spans/{name}"} <= set(paths)


def test_node_lifecycle_reconfigures_and_stops_its_actor(api: Api, pacs: SimulatedPacs) -> None:
    created = api.http.post(
        "/api/v1/nodes", json={"name": "life", "ae_title": "API_SIM", "host": "127.0.0.1", "port": pacs.port}
    )
    assert created.status_code == 201, created.text
    try:
        dup = api.http.post(
            "/api/v1/nodes", json={"name": "life", "ae_title": "X", "host": "127.0.0.1", "port": 104}
        )
        assert dup.status_code == 409 and "life" in detail(dup)
        handle = registry.lookup("life", api.namespace)
        assert handle is not None
        patched = api.http.patch("/api/v1/nodes/life", json={"max_associations": 2})
        assert patched.status_code == 200 and patched.json()["max_associations"] == 2
        import ray

        spec = ray.get(registry.lookup("life", api.namespace).spec.remote())  # type: ignore[union-attr]
        assert spec.max_associations == 2, "PATCH should give the node a reconfigured actor"
        echo = api.http.post("/api/v1/nodes/life/echo")
        assert echo.status_code == 200 and echo.json()["status"] == "ok", echo.text
        disabled = api.http.patch("/api/v1/nodes/life", json={"enabled": False})
        assert disabled.status_code == 200
        assert registry.lookup("life", api.namespace) is None
        assert api.http.patch("/api/v1/nodes/life", json={"enabled": True}).status_code == 200
        assert registry.lookup("life", api.namespace) is not None
    finally:
        assert api.http.delete("/api/v1/nodes/life").status_code == 204
    assert registry.lookup("life", api.namespace) is None
    assert api.http.get("/api/v1/nodes/life").status_code == 404
    assert api.http.delete("/api/v1/nodes/life").status_code == 404


def test_spans_narrow_the_query_and_all_holds_every_enabled_node(api: Api, pacs: SimulatedPacs) -> None:
    api.add_span("api-span", ["api-sim"], ae_title="API_SPAN", timeout_s=5, max_results=3)
    try:
        span = api.http.get("/api/v1/spans/all").json()
        assert "api-sim" in span["nodes"] and span["ae_title"] == "SPANNER"
        status, answer = api.query(level="STUDY", span="api-span")
        assert status == 200 and answer["status"] == "success"
        assert [o["node"] for o in answer["nodes"]] == ["api-sim"]  # type: ignore[union-attr,index]
        assert len(answer["matches"]) <= 3  # type: ignore[arg-type]
        over = api.http.post("/api/v1/queries", json={"level": "STUDY", "span": "api-span", "limit": 4})
        assert over.status_code == 422 and "max_results" in detail(over)
        assert api.http.delete("/api/v1/spans/all").status_code == 409
    finally:
        api.http.delete("/api/v1/spans/api-span")


def test_paging_is_stable_and_total_counts_before_limit(api: Api, pacs: SimulatedPacs) -> None:
    status, full = api.query(level="IMAGE", nodes=["api-sim"], span="all", limit=1000)
    assert status == 200
    total = full["total"]
    assert total == len(full["matches"]) > 4  # type: ignore[arg-type]
    pages = [api.query(level="IMAGE", nodes=["api-sim"], limit=2, offset=o)[1] for o in range(0, 4, 2)]
    assert all(p["total"] == total for p in pages)
    assert [m for p in pages for m in p["matches"]] == full["matches"][:4]  # type: ignore[index]


def test_every_query_is_recorded(api: Api, pacs: SimulatedPacs) -> None:
    status, answer = api.query(level="PATIENT", filters={"PatientID": "PAT*"}, nodes=["api-sim"])
    assert status == 200
    record = api.http.get(f"/api/v1/queries/{answer['query_id']}").json()
    assert record["filters"] == {"PatientID": "PAT*"}
    assert record["requester"] == "127.0.0.1"
    assert record["outcomes"][0]["node"] == "api-sim" and record["total"] == answer["total"]
    recent = api.http.get("/api/v1/queries", params={"limit": 5}).json()
    assert recent[0]["id"] == answer["query_id"]
    assert api.http.get("/api/v1/queries/0123456789abcdef").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"level": "STUDY", "filters": {"NoSuchKeyword": "x"}}, 422, "unknown DICOM keyword"),
        ({"level": "FOO"}, 422, "level"),
        ({"filters": {}}, 422, "level"),
        ({"level": "STUDY", "filters": {"StudyDate": "20240201-20240101"}}, 422, "ends before it starts"),
        ({"level": "STUDY", "filters": {"StudyDate": "2024-01-01"}}, 422, "StudyDate"),
        ({"level": "STUDY", "filters": {"StudyInstanceUID": "1.2.*"}}, 422, "not a UID"),
        ({"level": "STUDY", "limit": -1}, 422, "limit"),
        ({"level": "STUDY", "offset": -5}, 422, "offset"),
        ({"level": "STUDY", "span": "nope"}, 404, "nope"),
        ({"level": "STUDY", "nodes": ["ghost"]}, 422, "ghost"),
        ({"level": "STUDY", "timeout_s": 0}, 422, "timeout_s"),
        ({"level": "STUDY", "colour": "blue"}, 422, "colour"),
    ],
)
def test_bad_queries_get_a_clear_4xx_and_the_service_keeps_serving(
    api: Api, pacs: SimulatedPacs, body: dict[str, object], status: int, words: str
) -> None:
    response = api.http.post("/api/v1/queries", json=body)
    assert response.status_code == status, response.text
    assert words in detail(response)
    assert api.http.get("/health").status_code == 200


def test_malformed_json_is_a_422_that_says_so(api: Api) -> None:
    response = api.http.post(
        "/api/v1/queries", content=b'{"level": "STUDY",', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON" in detail(response)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"ae_title": "ABCDEFGHIJKLMNOPQ"}, "at most 16"),
        ({"ae_title": "BAD\\AE"}, "backslash"),
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"name": "Bad Name"}, "name"),
        ({"additional_filters": {"Nope": "1"}}, "Nope"),
    ],
)
def test_bad_nodes_are_refused_with_the_reason(api: Api, body: dict[str, object], words: str) -> None:
    node = {"name": "bad-node", "ae_title": "OK", "host": "127.0.0.1", "port": 104} | body
    response = api.http.post("/api/v1/nodes", json=node)
    assert response.status_code == 422, response.text
    assert words in detail(response)
    assert api.http.get("/api/v1/nodes/bad-node").status_code == 404


def test_span_with_unknown_node_is_refused(api: Api) -> None:
    response = api.http.post(
        "/api/v1/spans", json={"name": "ghosts", "ae_title": "GHOSTS", "nodes": ["ghost"]}
    )
    assert response.status_code == 422 and "ghost" in detail(response)


def test_a_large_answer_is_packed_whole_and_pages_in_order(api: Api) -> None:
    """1,200 studies from one archive: more than the node actor packs on its event loop (off it, then)."""
    from actors.pacs_node import PACK_ON_LOOP_MAX
    from simulator.dataset import generate_uniform

    studies = PACK_ON_LOOP_MAX + 200
    with SimulatedPacs(SimulatorConfig(ae_title="BIG_SIM"), generate_uniform(5, 0, studies)) as sim:
        api.add_node("big-sim", sim.port, ae_title="BIG_SIM")
        try:
            pages = [api.query(level="STUDY", nodes=["big-sim"], limit=1000, offset=o, timeout_s=60)
                     for o in (0, 1000)]
            assert [status for status, _ in pages] == [200, 200], pages[0][1]
            assert all(p["status"] == "success" and p["total"] == studies for _, p in pages)
            matches = [m for _, p in pages for m in p["matches"]]  # type: ignore[attr-defined]
            assert len(matches) == studies
            assert len({m["dataset"]["0020000D"]["Value"][0] for m in matches}) == studies
            status, page = api.query(level="STUDY", nodes=["big-sim"], limit=50, offset=980, timeout_s=60)
            assert status == 200 and page["total"] == studies
            assert page["matches"] == matches[980:1030]
        finally:
            api.http.delete("/api/v1/nodes/big-sim")

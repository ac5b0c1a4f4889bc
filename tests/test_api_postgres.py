"""The same API over PostgreSQL (DATABASE_URL): nodes, spans, a spanning query and its record."""

from __future__ import annotations

import pytest

from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorConfig
from tests.conftest import Api

pytestmark = pytest.mark.postgres


def test_query_and_record_on_postgresql(api_pg: Api) -> None:
    fleet = generate_fleet(seed=5, nodes=2, patients=6)
    with (
        SimulatedPacs(SimulatorConfig(ae_title="PG_A"), fleet[0]) as a,
        SimulatedPacs(SimulatorConfig(ae_title="PG_B"), fleet[1]) as b,
    ):
        api_pg.add_node("pg-a", a.port, ae_title="PG_A", priority=1)
        api_pg.add_node("pg-b", b.port, ae_title="PG_B", priority=2)
        api_pg.add_span("pg-span", ["pg-a", "pg-b"], ae_title="PG_SPAN", dedup="first_wins")
        try:
            status, answer = api_pg.query(level="STUDY", span="pg-span")
            assert status == 200 and answer["status"] == "success", answer
            expected = {str(ds.StudyInstanceUID) for node in fleet for ds in node}
            got = {m["dataset"]["0020000D"]["Value"][0] for m in answer["matches"]}  # type: ignore[union-attr,index]
            assert got == expected
            record = api_pg.http.get(f"/api/v1/queries/{answer['query_id']}")
            assert record.status_code == 200 and record.json()["span"] == "pg-span"
            assert api_pg.http.get("/api/v1/spans/pg-span").json()["dedup"] == "first_wins"
        finally:
            api_pg.http.delete("/api/v1/spans/pg-span")
            api_pg.http.delete("/api/v1/nodes/pg-a")
            api_pg.http.delete("/api/v1/nodes/pg-b")

"""The repository against both backends: a SQLite file and the real PostgreSQL server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text

from spanner.errors import Conflict, InvalidConfig, InvalidQuery, NotFound, StorageError
from spanner.outcome import NodeOutcome, OutcomeStatus
from spanner.schemas import (
    Dedup,
    FailureStrategy,
    NodeIn,
    NodePatch,
    NodePut,
    SpanIn,
    SpanPatch,
    SpanPut,
)
from spanner.storage import Repository, create_schema, make_engine
from spanner.storage.tables import metadata


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'var' / 'spanner.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    eng = make_engine(url)
    metadata.drop_all(eng)  # the PostgreSQL database lives for the session: start every test empty
    create_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def repo(engine: Engine) -> Repository:
    return Repository(engine)


def node(name: str, **kw: Any) -> NodeIn:
    return NodeIn.model_validate({"name": name, "ae_title": name.upper().replace("-", "_")[:16],
                                  "host": "127.0.0.1", "port": 11112, **kw})


def put(n: NodeIn, **kw: Any) -> NodePut:
    return NodePut.model_validate({**n.model_dump(exclude={"name"}), **kw})


def span(name: str, nodes: list[str], **kw: Any) -> SpanIn:
    ae_title = f"SPAN_{name.upper()}"[:16]
    return SpanIn.model_validate({"name": name, "ae_title": ae_title, "nodes": nodes, **kw})


def span_put(name: str, nodes: list[str], **kw: Any) -> SpanPut:
    return SpanPut.model_validate({"ae_title": f"SPAN_{name.upper()}"[:16], "nodes": nodes, **kw})


# --- engine ------------------------------------------------------------------------------------------

def test_sqlite_engine_creates_folder_and_uses_wal(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "spanner.db"
    eng = make_engine(f"sqlite:///{target}")
    assert target.parent.is_dir()
    assert not target.exists()  # nothing connects before first use
    with eng.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert (conn.execute(text("PRAGMA busy_timeout")).scalar() or 0) > 0
    eng.dispose()


def test_sqlite_memory_engine_is_shared() -> None:
    eng = make_engine("sqlite://")
    create_schema(eng)
    repo = Repository(eng)
    repo.create_node(node("a"))
    assert [n.name for n in repo.list_nodes()] == ["a"]


def test_rollback_really_rolls_back(tmp_path: Path) -> None:
    # On SQLite, SQLAlchemy (not the sqlite3 module) issues BEGIN: a failed transaction must leave nothing
    eng = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    create_schema(eng)
    with pytest.raises(RuntimeError), eng.begin() as conn:
        conn.execute(text(
            "INSERT INTO query_records (id, created_at, span, level, filters, requester, status, total, "
            "outcomes, elapsed_ms) "
            "VALUES ('x', '2024-01-01 00:00:00', 'all', 'STUDY', '{}', 't', 'ok', 0, '[]', 1.0)"))
        raise RuntimeError("boom")
    assert Repository(eng).list_queries() == []


def test_unreachable_database_is_a_storage_error() -> None:
    eng = make_engine("postgresql://nobody:secret@127.0.0.1:1/nothing")  # constructing must not connect
    repo = Repository(eng)
    with pytest.raises(StorageError) as info:
        repo.ping()
    assert "127.0.0.1:1" in str(info.value)
    assert "secret" not in str(info.value)
    assert isinstance(info.value.__cause__, Exception)
    with pytest.raises(StorageError):
        repo.list_nodes()


def test_missing_schema_is_a_storage_error(tmp_path: Path) -> None:
    repo = Repository(make_engine(f"sqlite:///{tmp_path / 'empty.db'}"))
    with pytest.raises(StorageError, match="nodes"):
        repo.list_nodes()


def test_ping(repo: Repository) -> None:
    repo.ping()


def test_tables(engine: Engine) -> None:
    assert {"nodes", "spans", "span_nodes", "query_records"} <= set(inspect(engine).get_table_names())


# --- nodes -------------------------------------------------------------------------------------------

def test_node_crud(repo: Repository) -> None:
    created = repo.create_node(node("pacs-b", additional_filters={"00080080": "EAST*"}, max_queries_per_s=5))
    repo.create_node(node("pacs-a"))
    assert created.name == "pacs-b"
    assert created.additional_filters == {"InstitutionName": "EAST*"}
    assert created.created_at.tzinfo is not None and created.created_at.utcoffset() == timedelta(0)
    assert created.created_at == created.updated_at

    got = repo.get_node("pacs-b")
    assert got == created
    assert [n.name for n in repo.list_nodes()] == ["pacs-a", "pacs-b"]

    replaced = repo.replace_node("pacs-b", put(node("pacs-b"), port=104, query_models=["patient_root"]))
    assert replaced.port == 104
    assert replaced.query_models == ["patient_root"]
    assert replaced.additional_filters == {}  # PUT replaces everything
    assert replaced.max_queries_per_s is None
    assert replaced.created_at == created.created_at
    assert replaced.updated_at >= created.updated_at

    change = NodePatch.model_validate({"enabled": False, "calling_ae_title": "ME"})
    patched = repo.patch_node("pacs-b", change)
    assert patched.enabled is False and patched.calling_ae_title == "ME" and patched.port == 104
    cleared = repo.patch_node("pacs-b", NodePatch.model_validate({"calling_ae_title": None}))
    assert cleared.calling_ae_title is None and cleared.enabled is False

    repo.delete_node("pacs-b")
    assert [n.name for n in repo.list_nodes()] == ["pacs-a"]
    with pytest.raises(NotFound, match="pacs-b"):
        repo.get_node("pacs-b")


def test_node_missing(repo: Repository) -> None:
    with pytest.raises(NotFound):
        repo.replace_node("ghost", put(node("ghost")))
    with pytest.raises(NotFound):
        repo.patch_node("ghost", NodePatch())
    with pytest.raises(NotFound):
        repo.delete_node("ghost")


def test_node_duplicate_is_conflict(repo: Repository) -> None:
    repo.create_node(node("pacs-a"))
    with pytest.raises(Conflict, match="'pacs-a' already exists"):
        repo.create_node(node("pacs-a", port=104))
    assert repo.get_node("pacs-a").port == 11112


def test_node_round_trip_of_every_field(repo: Repository) -> None:
    full = node("full", calling_ae_title="CALLER", enabled=False, priority=-5, max_associations=64,
                max_queries_per_s=2.5, connect_timeout_s=1.5, dimse_timeout_s=9, query_timeout_s=12,
                reuse_associations=False, query_models=["patient_root"],
                additional_filters={"InstitutionName": "A*", "Modality": "MR"})
    out = repo.create_node(full)
    assert out.model_dump(exclude={"created_at", "updated_at"}) == full.model_dump()


# --- spans -------------------------------------------------------------------------------------------

@pytest.fixture
def fleet(repo: Repository) -> Repository:
    repo.create_node(node("east", priority=20))
    repo.create_node(node("west", priority=10))
    repo.create_node(node("north", enabled=False))
    repo.ensure_default_span(ae_title="SPANNER")
    return repo


def test_span_crud(fleet: Repository) -> None:
    repo = fleet
    created = repo.create_span(span("rad", ["west", "east"], description="radiology", dedup="first_wins",
                                    allowed_calling_aets=["WS1"]))
    assert created.nodes == ["west", "east"]  # the order as written
    assert created.dedup is Dedup.FIRST_WINS
    assert created.allowed_calling_aets == ["WS1"]
    assert repo.get_span("rad") == created
    assert [s.name for s in repo.list_spans()] == ["all", "rad"]

    replaced = repo.replace_span("rad", span_put("rad", ["east", "north"], failure_strategy="minimum",
                                                 minimum_nodes=2))
    assert replaced.nodes == ["east", "north"]
    assert replaced.failure_strategy is FailureStrategy.MINIMUM
    assert replaced.description is None and replaced.allowed_calling_aets == []
    assert replaced.created_at == created.created_at

    patched = repo.patch_span("rad", SpanPatch.model_validate({"timeout_s": 30, "nodes": ["west", "east"]}))
    assert patched.timeout_s == 30 and patched.nodes == ["west", "east"] and patched.minimum_nodes == 2

    repo.delete_span("rad")
    with pytest.raises(NotFound):
        repo.get_span("rad")
    with pytest.raises(NotFound):
        repo.delete_span("rad")
    with pytest.raises(NotFound):
        repo.replace_span("rad", span_put("rad", ["east"]))
    with pytest.raises(NotFound):
        repo.patch_span("rad", SpanPatch())
    assert {n.name for n in repo.list_nodes()} == {"east", "west", "north"}  # nodes outlive spans


def test_span_duplicate_name_and_ae_title(fleet: Repository) -> None:
    fleet.create_span(span("rad", ["east"]))
    with pytest.raises(Conflict, match="'rad' already exists"):
        fleet.create_span(span("rad", ["west"]))
    with pytest.raises(Conflict, match="AE title 'SPAN_RAD' is already used by span 'rad'"):
        fleet.create_span(SpanIn.model_validate({"name": "other", "ae_title": "SPAN_RAD", "nodes": ["east"]}))
    with pytest.raises(Conflict, match="'SPANNER' is already used by span 'all'"):
        fleet.patch_span("rad", SpanPatch.model_validate({"ae_title": "SPANNER"}))
    assert fleet.patch_span("rad", SpanPatch.model_validate({"ae_title": "SPAN_RAD"})).ae_title == "SPAN_RAD"


def test_span_unknown_nodes(fleet: Repository) -> None:
    with pytest.raises(InvalidConfig, match="unknown node\\(s\\) 'ghost', 'phantom'"):
        fleet.create_span(span("rad", ["east", "ghost", "phantom"]))
    with pytest.raises(NotFound):
        fleet.get_span("rad")
    fleet.create_span(span("rad", ["east"]))
    with pytest.raises(InvalidConfig, match="'ghost'"):
        fleet.replace_span("rad", span_put("rad", ["ghost"]))
    with pytest.raises(InvalidConfig, match="'ghost'"):
        fleet.patch_span("rad", SpanPatch.model_validate({"nodes": ["ghost"]}))
    assert fleet.get_span("rad").nodes == ["east"]


def test_span_policy_checked_with_its_name(fleet: Repository) -> None:
    fleet.create_span(span("rad", ["east", "west"]))
    with pytest.raises(InvalidConfig, match="at least one node"):
        fleet.replace_span("rad", span_put("rad", []))
    with pytest.raises(InvalidConfig, match="minimum_nodes: required"):
        fleet.patch_span("rad", SpanPatch.model_validate({"failure_strategy": "minimum"}))
    with pytest.raises(InvalidConfig, match="3 is more than the 2 node"):
        fleet.patch_span("rad", SpanPatch.model_validate({"failure_strategy": "minimum", "minimum_nodes": 3}))
    change = SpanPatch.model_validate({"failure_strategy": "minimum", "minimum_nodes": 2})
    ok = fleet.patch_span("rad", change)
    assert ok.minimum_nodes == 2
    with pytest.raises(InvalidConfig, match="more than the 1 node"):
        fleet.patch_span("rad", SpanPatch.model_validate({"nodes": ["east"]}))


def test_deleting_a_node_removes_it_from_spans(fleet: Repository, engine: Engine) -> None:
    fleet.create_span(span("rad", ["east", "west"]))
    fleet.create_span(span("cardio", ["west"]))
    fleet.delete_node("west")
    assert fleet.get_span("rad").nodes == ["east"]
    assert fleet.get_span("cardio").nodes == []  # left empty: the span stays, queries on it reach nobody
    assert fleet.span_nodes("cardio") == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM span_nodes WHERE node_name = 'west'")).scalar() == 0
    fleet.create_node(node("west"))  # the name is free again and joins no span by itself
    assert fleet.get_span("rad").nodes == ["east"]


def test_foreign_key_cascades_in_the_database(fleet: Repository, engine: Engine) -> None:
    fleet.create_span(span("rad", ["east", "west"]))
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM nodes WHERE name = 'east'"))
    assert fleet.get_span("rad").nodes == ["west"]


def test_span_nodes_are_enabled_members_by_priority(fleet: Repository) -> None:
    fleet.create_span(span("rad", ["east", "north", "west"]))
    assert [n.name for n in fleet.span_nodes("rad")] == ["west", "east"]  # north disabled; west priority 10
    fleet.patch_node("north", NodePatch.model_validate({"enabled": True, "priority": 1}))
    assert [n.name for n in fleet.span_nodes("rad")] == ["north", "west", "east"]
    with pytest.raises(NotFound):
        fleet.span_nodes("ghost")


def test_span_for_query_reads_what_get_span_and_span_nodes_read(fleet: Repository) -> None:
    fleet.create_span(span("rad", ["east", "north", "west"]))
    for name in ("rad", "all"):
        got, enabled = fleet.span_for_query(name)
        assert got == fleet.get_span(name)
        assert enabled == fleet.span_nodes(name)
    assert [n.name for n in fleet.span_for_query("rad")[1]] == ["west", "east"]  # north disabled
    with pytest.raises(NotFound, match="ghost"):
        fleet.span_for_query("ghost")


def test_all_span(fleet: Repository) -> None:
    repo = fleet
    everything = repo.get_span("all")
    assert everything.ae_title == "SPANNER"
    assert everything.nodes == ["east", "west"]  # every enabled node, north is disabled
    assert [n.name for n in repo.span_nodes("all")] == ["west", "east"]

    repo.create_node(node("south"))
    assert repo.get_span("all").nodes == ["east", "south", "west"]
    repo.patch_node("east", NodePatch.model_validate({"enabled": False}))
    assert repo.get_span("all").nodes == ["south", "west"]
    assert [s.nodes for s in repo.list_spans() if s.name == "all"] == [["south", "west"]]

    with pytest.raises(Conflict, match="reserved"):
        repo.create_span(span("all", ["east"]))
    with pytest.raises(Conflict, match="cannot be deleted"):
        repo.delete_span("all")

    patched = repo.patch_span("all", SpanPatch.model_validate({"timeout_s": 42, "nodes": ["east"]}))
    assert patched.timeout_s == 42
    assert patched.nodes == ["south", "west"]  # membership is not the client's to choose
    body = span_put("all", ["east"], ae_title="SPANNER", failure_strategy="minimum", minimum_nodes=2)
    replaced = repo.replace_span("all", body)
    assert replaced.failure_strategy is FailureStrategy.MINIMUM and replaced.timeout_s == 10
    assert replaced.nodes == ["south", "west"]

    again = repo.ensure_default_span(ae_title="OTHER")  # idempotent; keeps what was configured
    assert again.ae_title == "SPANNER" and again.failure_strategy is FailureStrategy.MINIMUM


def test_all_span_created_by_replace_when_missing(repo: Repository) -> None:
    with pytest.raises(NotFound):
        repo.get_span("all")
    created = repo.replace_span("all", span_put("all", [], ae_title="GATEWAY"))
    assert created.ae_title == "GATEWAY" and created.nodes == []


def test_default_span_ae_title_clash(repo: Repository) -> None:
    repo.create_node(node("east"))
    repo.create_span(SpanIn.model_validate({"name": "rad", "ae_title": "SPANNER", "nodes": ["east"]}))
    with pytest.raises(Conflict, match="'SPANNER' is already used by span 'rad'"):
        repo.ensure_default_span(ae_title="SPANNER")


# --- query records -----------------------------------------------------------------------------------

def record(repo: Repository, **kw: Any) -> Any:
    values: dict[str, Any] = {
        "span": "all", "level": "STUDY", "filters": {"PatientID": "123", "StudyDate": "20240101-"},
        "requester": "WS1", "status": "ok", "total": 2,
        "outcomes": [{"node": "east", "status": "ok", "matches": 2, "elapsed_ms": 5.5, "error": None}],
        "elapsed_ms": 12.25, **kw,
    }
    return repo.record_query(**values)


def test_query_record_round_trip(repo: Repository) -> None:
    outcome = NodeOutcome(node="west", status=OutcomeStatus.TIMEOUT, elapsed_ms=10_000.0, error="no answer")
    outcomes = [{"node": "east", "status": "ok", "matches": 2}, outcome]
    stored = record(repo, outcomes=outcomes, status="partial", error=None)
    assert len(stored.id) == 32
    got = repo.get_query(stored.id)
    assert got == stored
    assert got.filters == {"PatientID": "123", "StudyDate": "20240101-"}
    assert got.outcomes[1]["status"] == "timeout" and got.outcomes[1]["error"] == "no answer"
    assert got.created_at.utcoffset() == timedelta(0)
    assert abs(got.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert got.elapsed_ms == 12.25 and got.total == 2 and got.requester == "WS1" and got.level == "STUDY"

    failed = record(repo, status="failed", total=0, outcomes=[], error="every node failed", query_id="abc")
    assert repo.get_query("abc").error == "every node failed" and failed.id == "abc"
    with pytest.raises(Conflict):
        record(repo, query_id="abc")
    with pytest.raises(NotFound, match="'nope'"):
        repo.get_query("nope")


def test_query_records_newest_first(repo: Repository) -> None:
    base = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    ids = [record(repo, created_at=base + timedelta(seconds=i)).id for i in range(5)]
    # a zone other than UTC is stored as the same instant
    cet = timezone(timedelta(hours=1))
    late = record(repo, created_at=datetime(2024, 5, 1, 13, 30, tzinfo=cet))  # 12:30 UTC
    assert late.created_at == datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    listed = repo.list_queries()
    assert [q.id for q in listed] == [late.id, *reversed(ids)]
    assert [q.id for q in repo.list_queries(limit=2, offset=1)] == [ids[4], ids[3]]
    assert repo.list_queries(limit=10, offset=6) == []
    assert all(q.created_at.tzinfo is not None for q in listed)
    with pytest.raises(InvalidQuery, match="may not be negative"):
        repo.list_queries(limit=-1)
    with pytest.raises(InvalidQuery, match="at most 1,000,000,000"):
        repo.list_queries(offset=2**63)


def test_naive_created_at_refused(repo: Repository) -> None:
    with pytest.raises(StorageError, match="naive"):
        record(repo, created_at=datetime(2024, 1, 1))


# --- several writers ---------------------------------------------------------------------------------

def test_concurrent_writers_do_not_fail(engine: Engine) -> None:
    """Threads on two engines (as two processes would be) patch and record at once without 'locked' errors."""
    other = make_engine(engine.url)
    repos = [Repository(engine), Repository(other)]
    repos[0].create_node(node("east"))
    errors: list[BaseException] = []

    def work(index: int) -> None:
        repo = repos[index % 2]
        try:
            for step in range(15):
                repo.patch_node("east", NodePatch.model_validate({"priority": index * 100 + step}))
                record(repo, requester=f"t{index}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other.dispose()
    assert errors == []
    assert len(repos[0].list_queries(limit=1000)) == 60

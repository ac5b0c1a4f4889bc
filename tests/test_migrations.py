"""Alembic migrations on SQLite and PostgreSQL: from empty, from the previous revision, down and up again,
unversioned create_all files, the autogenerate diff, and the app refusing a schema that is behind."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text
from typer.testing import CliRunner

from cli.main import app
from cluster.launcher import prepare_database
from serve_app.services import Services
from spanner.errors import ConfigError
from spanner.nodespec import RetrieveMethod
from spanner.schemas import Channel, DestinationIn, NodeIn
from spanner.settings import get_settings, load_settings
from spanner.storage import (
    Audit,
    Repository,
    create_schema,
    make_engine,
    require_current_schema,
    upgrade_database,
)
from spanner.storage.schema import (
    FIRST_REVISION,
    MIGRATIONS_DIR,
    downgrade_database,
    head_revision,
    schema_diff,
    schema_state,
)
from spanner.storage.tables import metadata

HEAD = "0007"
PREVIOUS = "0006"
BEFORE_DESTINATIONS = "0005"
BEFORE_ASSERTED = "0004"
BEFORE_OUTBOX = "0003"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pg_admin(postgres_url: str) -> Iterator[object]:
    """A psycopg2 connection to the maintenance database of the session's server."""
    import psycopg2

    conn = psycopg2.connect(postgres_url.rsplit("/", 1)[0] + "/postgres")
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend (PostgreSQL: one of its own, dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'var' / 'spanner.db'}"
        return
    admin = request.getfixturevalue("pg_admin")
    base = request.getfixturevalue("postgres_url")
    name = f"spanner_mig_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    eng = make_engine(url)
    yield eng
    eng.dispose()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def columns(engine: Engine, table: str) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns(table)}


def test_the_head_is_the_last_revision_and_ships_in_the_package() -> None:
    assert head_revision() == HEAD
    assert (MIGRATIONS_DIR / "env.py").is_file() and (MIGRATIONS_DIR / "script.py.mako").is_file()
    versions = sorted(p.name[:4] for p in (MIGRATIONS_DIR / "versions").glob("0*.py"))
    assert versions == ["0001", "0002", "0003", "0004", "0005", "0006", "0007"]


def test_upgrade_from_empty_builds_exactly_the_code_tables(engine: Engine) -> None:
    result = upgrade_database(engine)
    assert (result.before, result.after, result.stamped, result.changed) == (None, HEAD, None, True)
    assert tables(engine) == set(metadata.tables) | {"alembic_version"}
    assert schema_diff(engine) == [], "autogenerate would change something: migrations and tables.py differ"
    repo = Repository(engine)
    repo.create_node(NodeIn(name="n1", ae_title="N1", host="127.0.0.1", port=104))
    record = repo.record_query(span="all", level="STUDY", filters={}, requester="t", status="success",
                               total=0, outcomes=[], elapsed_ms=1.0, cache="hit")
    assert repo.get_query(record.id).cache == "hit"
    again = upgrade_database(engine)
    assert (again.before, again.after, again.changed) == (HEAD, HEAD, False)


def test_upgrade_from_the_previous_revision_keeps_the_data(engine: Engine) -> None:
    assert upgrade_database(engine, FIRST_REVISION).after == FIRST_REVISION
    assert "cache" not in columns(engine, "query_records")
    assert schema_diff(engine) != []  # the code is ahead of 0001
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO query_records (id, created_at, span, level, filters, requester, status, total, "
            "outcomes, elapsed_ms) VALUES ('q1', :at, 'all', 'STUDY', '{}', 'old', 'success', 3, '[]', 9.5)"
        ), {"at": "2026-01-02 03:04:05"})
    result = upgrade_database(engine)
    assert (result.before, result.after) == (FIRST_REVISION, HEAD)
    assert schema_diff(engine) == []
    old = Repository(engine).get_query("q1")
    assert (old.requester, old.total, old.cache) == ("old", 3, None)


def test_upgrade_from_the_revision_before_head_gives_nodes_c_move_and_no_placement(engine: Engine) -> None:
    assert upgrade_database(engine, PREVIOUS).after == PREVIOUS
    assert "retrieve_method" not in columns(engine, "nodes")
    _insert_old_node(engine)
    result = upgrade_database(engine)
    assert (result.before, result.after) == (PREVIOUS, HEAD)
    assert schema_diff(engine) == []
    kept = Repository(engine).get_node("kept")
    assert (kept.retrieve_method, kept.placement) == (RetrieveMethod.C_MOVE, {})
    assert downgrade_database(engine, PREVIOUS).after == PREVIOUS
    assert "placement" not in columns(engine, "nodes")


def test_upgrade_from_before_destinations_adds_them_and_keeps_nodes(engine: Engine) -> None:
    assert upgrade_database(engine, BEFORE_DESTINATIONS).after == BEFORE_DESTINATIONS
    assert "destinations" not in tables(engine)
    _insert_old_node(engine)
    assert upgrade_database(engine).after == HEAD
    repo = Repository(engine)
    assert [node.name for node in repo.list_nodes()] == ["kept"]
    made = repo.create_destination(DestinationIn(name="ws1", ae_title="WS1", host="127.0.0.1", port=11112))
    assert repo.get_destination_by_ae("WS1") == made
    assert downgrade_database(engine, BEFORE_DESTINATIONS).after == BEFORE_DESTINATIONS
    assert "destinations" not in tables(engine)


def _insert_old_node(engine: Engine) -> None:
    """A node as the revisions before 0007 stored it (the code's model has columns they lack)."""
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO nodes (name, ae_title, host, port, enabled, priority, max_associations, "
            "connect_timeout_s, dimse_timeout_s, reuse_associations, query_models, additional_filters, "
            "created_at, updated_at) VALUES ('kept', 'KEPT', '127.0.0.1', 104, true, 100, 4, 5.0, 30.0, "
            "true, '[\"study_root\"]', '{}', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"))


def test_upgrade_from_before_the_asserted_caller_adds_it_and_keeps_records(
        engine: Engine) -> None:
    assert upgrade_database(engine, BEFORE_ASSERTED).after == BEFORE_ASSERTED
    assert "asserted_ae" not in columns(engine, "query_records")
    with engine.begin() as conn:  # the code's tables are ahead of this schema: raw SQL, as 0004 wrote it
        conn.execute(text(
            "INSERT INTO query_records (id, created_at, span, level, filters, requester, status, total, "
            "outcomes, elapsed_ms, principal, channel, client) VALUES ('q4', :at, 'all', 'STUDY', '{}', "
            "'r', 'success', 2, '[]', 2.0, 'ae:OLDWS', 'dimse', '10.0.0.1')"
        ), {"at": "2026-01-02 03:04:05"})
    result = upgrade_database(engine)
    assert (result.before, result.after) == (BEFORE_ASSERTED, HEAD)
    assert schema_diff(engine) == []
    repo = Repository(engine)
    old = repo.get_query("q4")
    assert (old.principal, old.total, old.asserted_ae, old.asserted_peer) == ("ae:OLDWS", 2, None, None)
    repo.record_query(query_id="q5", span="all", level="STUDY", filters={}, requester="r", status="success",
                      total=0, outcomes=[], elapsed_ms=1.0,
                      audit=Audit(principal="front", channel=Channel.DIMSE, client="127.0.0.1",
                                  asserted_ae="WS1", asserted_peer="10.1.2.3"))
    new = repo.get_query("q5")
    assert (new.principal, new.asserted_ae, new.asserted_peer) == ("front", "WS1", "10.1.2.3")
    assert downgrade_database(engine, BEFORE_ASSERTED).after == BEFORE_ASSERTED
    assert "asserted_ae" not in columns(engine, "retrieval_records")


def test_upgrade_from_before_the_outbox_adds_it_and_keeps_records(engine: Engine) -> None:
    assert upgrade_database(engine, BEFORE_OUTBOX).after == BEFORE_OUTBOX
    assert "event_outbox" not in tables(engine) and "node_health" not in tables(engine)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO query_records (id, created_at, span, level, filters, requester, status, total, "
            "outcomes, elapsed_ms, cache) VALUES ('q3', :at, 'all', 'STUDY', '{}', 'r', 'success', 1, '[]', "
            "2.0, 'miss')"
        ), {"at": "2026-01-02 03:04:05"})
    result = upgrade_database(engine)
    assert (result.before, result.after) == (BEFORE_OUTBOX, HEAD)
    assert schema_diff(engine) == []
    repo = Repository(engine)
    assert repo.get_query("q3").total == 1
    repo.record_query(span="all", level="STUDY", filters={}, requester="r", status="success", total=0,
                      outcomes=[{"node": "n1", "status": "ok"}], elapsed_ms=1.0, emit=True)
    assert [e.routing_key for e in repo.pending_events()] == ["query.completed", "node.health"]
    assert downgrade_database(engine, BEFORE_OUTBOX).after == BEFORE_OUTBOX
    assert "event_outbox" not in tables(engine)


def test_downgrade_to_base_and_up_again(engine: Engine) -> None:
    upgrade_database(engine)
    assert downgrade_database(engine, FIRST_REVISION).after == FIRST_REVISION
    assert "cache" not in columns(engine, "query_records")
    assert downgrade_database(engine, "base").after is None
    assert tables(engine) <= {"alembic_version"}
    assert upgrade_database(engine).after == HEAD
    assert schema_diff(engine) == []
    if engine.dialect.name == "sqlite":  # migrations turn foreign keys off for batch mode: back on after
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        repo = Repository(engine)
        repo.create_node(NodeIn(name="n1", ae_title="N1", host="127.0.0.1", port=104))
        with pytest.raises(Exception, match="FOREIGN KEY"), engine.begin() as conn:
            conn.execute(text("INSERT INTO span_nodes (span_name, node_name, position) "
                              "VALUES ('x', 'n1', 0)"))


def test_a_file_made_by_create_all_before_migrations_is_stamped_at_the_first_revision(engine: Engine) -> None:
    upgrade_database(engine, FIRST_REVISION)  # the 0001 tables are what create_all made back then
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text(
            "INSERT INTO spans (name, ae_title, timeout_s, failure_strategy, dedup, max_results, "
            "allowed_calling_aets, cache_ttl_s, created_at, updated_at) VALUES ('s', 'S', 5, "
            "'best_effort', 'merge_all', 10, '[]', 60, :at, :at)"
        ), {"at": "2026-01-02 03:04:05"})
    state = schema_state(engine)
    assert state.unversioned and state.current is None
    with pytest.raises(ConfigError, match=r"unversioned schema .* run `spanner db upgrade`"):
        require_current_schema(engine)
    result = upgrade_database(engine)
    assert (result.before, result.stamped, result.after, result.drift) == (None, FIRST_REVISION, HEAD, [])
    assert Repository(engine).get_span("s").max_results == 10


def test_a_create_schema_file_of_the_current_code_is_stamped_at_head(engine: Engine) -> None:
    create_schema(engine)
    result = upgrade_database(engine)
    assert (result.stamped, result.after, result.drift) == (HEAD, HEAD, [])


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_unversioned_files_from_before_retrievals_get_the_table_and_foreign_tables_are_refused(
    engine: Engine,
) -> None:
    upgrade_database(engine, FIRST_REVISION)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("DROP TABLE retrieval_records"))
    assert upgrade_database(engine).stamped == FIRST_REVISION
    assert "retrieval_records" in tables(engine) and schema_diff(engine) == []
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("DROP TABLE span_nodes"))
    with pytest.raises(ConfigError, match="not made by spanner"):
        upgrade_database(engine)


def test_the_app_refuses_a_schema_behind_head(url: str, engine: Engine, tmp_path: Path) -> None:
    settings = load_settings(database_url=url, var_dir=str(tmp_path), demo_fleet=False)
    with pytest.raises(ConfigError) as empty:
        Services(settings)
    expected = (f"database schema is at nothing (empty database), the code needs {HEAD}: "
                "run `spanner db upgrade`")
    assert expected in str(empty.value)
    upgrade_database(engine, FIRST_REVISION)
    with pytest.raises(ConfigError) as behind:
        Services(settings)
    assert f"database schema is at {FIRST_REVISION}, the code needs {HEAD}: run `spanner db upgrade`" \
        in str(behind.value)
    upgrade_database(engine)
    require_current_schema(engine)  # at head: no complaint
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(ConfigError, match="9999, which this code does not know"):
        Services(settings)


def test_make_run_upgrades_the_embedded_sqlite_but_only_checks_a_configured_database(
    tmp_path: Path, engine: Engine, url: str
) -> None:
    said: list[str] = []
    embedded = load_settings(var_dir=str(tmp_path / "embedded"))
    prepare_database(embedded, said.append)
    assert any(f"empty -> {HEAD}" in line for line in said)
    made = make_engine(embedded.effective_database_url)
    with made.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == HEAD
    made.dispose()
    configured = load_settings(var_dir=str(tmp_path), database_url=url)
    with pytest.raises(ConfigError, match="spanner db upgrade"):
        prepare_database(configured, said.append)
    assert tables(engine) == set()


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_spanner_db_upgrade_prints_from_and_to(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        first = runner.invoke(app, ["db", "upgrade"], terminal_width=200)
        assert first.exit_code == 0, first.output
        assert f"empty -> {HEAD}" in first.output
        second = runner.invoke(app, ["db", "upgrade"], terminal_width=200)
        assert f"{HEAD} -> {HEAD} (already current)" in second.output
    finally:
        get_settings.cache_clear()
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    try:
        failed = CliRunner().invoke(app, ["db", "upgrade"], terminal_width=200)
        assert failed.exit_code == 1 and "cannot read the schema version" in failed.output
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_alembic_check_through_the_shipped_ini_finds_nothing_to_do(url: str, engine: Engine) -> None:
    """The developer path (`alembic check`) sees the same: migrations and tables.py agree."""
    upgrade_database(engine)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), "-c", str(MIGRATIONS_DIR / "alembic.ini"), "check"],
        capture_output=True, text=True, cwd=ROOT, env=os.environ | {"DATABASE_URL": url}, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No new upgrade operations detected" in done.stdout + done.stderr

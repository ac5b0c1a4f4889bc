"""Schema versions: the Alembic migrations in spanner/migrations, driven from code (no alembic.ini).

`spanner db upgrade` (and `make run` on the embedded SQLite in development) moves a database to the
head revision; the Serve app only checks, and refuses to start on a schema that is behind, because
replicas migrating concurrently at start-up would race and a half-migrated production database is
worse than a clear message. Files made by ``create_all`` before migrations existed carry every table
but no version: they are recognised and stamped at the first revision (or at head when they already
match the code's tables exactly, as create_schema in tests makes them), then upgraded like any other.

SQLAlchemy and Alembic errors are translated here: StorageError when the database cannot be reached
or written, ConfigError when its version does not fit this code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from alembic import command, context
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, MetaData, Table, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from spanner.errors import ConfigError, StorageError
from spanner.storage.engine import describe_db_error
from spanner.storage.tables import metadata

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
FIRST_REVISION = "0001"
UPGRADE_COMMAND = "spanner db upgrade"
FIRST_TABLES = frozenset({"nodes", "spans", "span_nodes", "query_records", "retrieval_records"})
"""The tables of the first revision, i.e. what ``create_all`` made before migrations existed."""
LATE_LEGACY_TABLES = frozenset({"retrieval_records"})
"""Added while create_all still ruled: a file from before it gets the table as create_all would have."""
LATER_COLUMNS = {"retrieval_records": frozenset({"principal", "channel", "client", "patient_id",
                                                 "asserted_ae", "asserted_peer"})}
"""Columns later revisions add to a late legacy table: left out when it is made at the first revision."""
_PG_LOCK_KEY = 0x5350414E  # "SPAN": two upgrades of one PostgreSQL database run one after the other


@dataclass(frozen=True, slots=True)
class SchemaState:
    current: str | None
    head: str
    tables: frozenset[str]
    """The spanner tables present (whatever the version says)."""

    @property
    def unversioned(self) -> bool:
        """Tables but no version: made by create_all before migrations existed."""
        return self.current is None and bool(self.tables)

    def describe(self) -> str:
        if self.current is not None:
            return self.current
        return "an unversioned schema (made before migrations)" if self.tables else "nothing (empty database)"


@dataclass(frozen=True, slots=True)
class UpgradeResult:
    before: str | None
    after: str | None
    stamped: str | None = None
    """The revision an unversioned (create_all) schema was adopted at before upgrading, if it was."""
    drift: list[str] = field(default_factory=list)
    """After adopting an unversioned schema: how it still differs from the code's tables (empty: none)."""

    @property
    def changed(self) -> bool:
        return self.before != self.after

    @property
    def from_label(self) -> str:
        return self.before or ("unversioned" if self.stamped else "empty")


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration in code; with ``connection``, env.py migrates over it."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _scripts().get_current_head()
    if head is None:
        raise ConfigError(f"no migration found in {MIGRATIONS_DIR}: the installation is incomplete")
    return head


def _where(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


@contextmanager
def _translated(engine: Engine, doing: str) -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot {doing} the database at {_where(engine)}: {describe_db_error(exc)}") \
            from exc
    except CommandError as exc:
        raise ConfigError(f"cannot {doing} the database at {_where(engine)}: {exc}") from exc


def schema_state(engine: Engine) -> SchemaState:
    head = head_revision()
    with _translated(engine, "read the schema version of"), engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        tables = frozenset(inspect(connection).get_table_names()) & (FIRST_TABLES | set(metadata.tables))
    return SchemaState(current=current, head=head, tables=tables)


def require_current_schema(engine: Engine) -> None:
    """Raise ConfigError, naming the command to run, unless the database is at the head revision."""
    state = schema_state(engine)
    if state.current == state.head:
        return
    where = _where(engine)
    known = {script.revision for script in _scripts().walk_revisions()}
    if state.current is not None and state.current not in known:
        raise ConfigError(f"database schema is at {state.current}, which this code does not know (a newer "
                          f"spanner migrated it): run that release or a newer one (database: {where})")
    raise ConfigError(f"database schema is at {state.describe()}, the code needs {state.head}: "
                      f"run `{UPGRADE_COMMAND}` (database: {where})")


def upgrade_database(engine: Engine, revision: str = "head") -> UpgradeResult:
    """Migrate to ``revision`` (head); an unversioned create_all schema is stamped at FIRST_REVISION first."""
    before = schema_state(engine)
    stamped = _adopt_unversioned(engine, before) if before.unversioned else None
    with _translated(engine, "upgrade"), migration_connection(engine) as connection:
        command.upgrade(alembic_config(connection), revision)
    after = schema_state(engine).current
    drift = schema_diff(engine) if stamped else []
    return UpgradeResult(before=before.current, after=after, stamped=stamped, drift=drift)


def downgrade_database(engine: Engine, revision: str) -> UpgradeResult:
    """Migrate down to ``revision`` ("base" removes every table); for development and tests."""
    before = schema_state(engine).current
    with _translated(engine, "downgrade"), migration_connection(engine) as connection:
        command.downgrade(alembic_config(connection), revision)
    return UpgradeResult(before=before, after=schema_state(engine).current)


def _first_revision_table(name: str) -> Table:
    """The code's table without the columns later revisions add, i.e. as create_all made it back then."""
    source = metadata.tables[name]
    skip = LATER_COLUMNS.get(name, frozenset())
    snapshot = MetaData(naming_convention=metadata.naming_convention)
    return Table(name, snapshot, *(column._copy() for column in source.columns if column.name not in skip))


def _adopt_unversioned(engine: Engine, state: SchemaState) -> str:
    """Stamp a create_all schema: at head if it matches the code's tables, else at FIRST_REVISION."""
    missing = FIRST_TABLES - state.tables
    if missing - LATE_LEGACY_TABLES:
        raise ConfigError(
            f"the database at {_where(engine)} has some spanner tables ({', '.join(sorted(state.tables))}) "
            f"but not {', '.join(sorted(missing))}, and no schema version: it was not made by spanner; "
            "point DATABASE_URL elsewhere or move the file away"
        )
    with _translated(engine, "adopt the unversioned schema of"), migration_connection(engine) as connection:
        if missing:
            with connection.begin():
                for name in sorted(missing):
                    _first_revision_table(name).create(connection)
        with connection.begin():
            in_step = not _differences(connection)
        revision = state.head if in_step else FIRST_REVISION
        command.stamp(alembic_config(connection), revision)
    return revision


def schema_diff(engine: Engine) -> list[str]:
    """What autogenerate would change to make the database match the code's tables (empty: in step)."""
    with _translated(engine, "compare the schema of"), engine.connect() as connection:
        return _differences(connection)


def _differences(connection: Connection) -> list[str]:
    migration = MigrationContext.configure(connection, opts={"compare_type": True})
    return [repr(change) for change in compare_metadata(migration, metadata)]


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection to migrate over. SQLite gets foreign keys off for the duration, as batch mode needs:
    it copies a table and drops the original, and with foreign keys on that drop would cascade."""
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:  # only outside a transaction does the pragma take effect: issue it on the driver's own
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        try:
            yield connection
        finally:
            if sqlite:
                connection.rollback()
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]


def configure_context(connection: Connection) -> None:
    """Run the migrations over ``connection`` (called by env.py) in one transaction on both backends.

    Our SQLite engine issues BEGIN itself, so its DDL is transactional too: a failed upgrade leaves
    the previous version intact. On PostgreSQL an advisory lock makes a second upgrader wait, then
    find nothing left to do.
    """
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=sqlite,
        compare_type=True,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise StorageError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")

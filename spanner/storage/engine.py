"""Engines for the two supported backends, tuned for several processes sharing one database.

SQLite gets WAL (readers never block the writer), a busy timeout (writers queue instead of failing),
enforced foreign keys, and BEGIN issued by SQLAlchemy rather than by the sqlite3 module, so that a
write transaction can take the write lock up front (``BEGIN IMMEDIATE``) instead of failing with
"database is locked" when it upgrades a read. PostgreSQL gets ``pool_pre_ping`` so a restarted
server costs one reconnect, not a failed request. Nothing here connects until first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from spanner.errors import StorageError
from spanner.storage.tables import metadata

SQLITE_BUSY_TIMEOUT_MS = 15_000
BEGIN_OPTION = "spanner_sqlite_begin"
"""Execution option naming the SQLite BEGIN mode ("DEFERRED" or "IMMEDIATE") of a transaction."""


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql://...``); creates a SQLite file's folder."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True, echo=echo)

    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or parsed.query.get("mode") == "memory"
    if not in_memory and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    kwargs: dict[str, Any] = {"connect_args": connect_args}
    if in_memory:
        kwargs["poolclass"] = StaticPool  # one shared connection, or every checkout sees an empty database
    engine = create_engine(parsed, echo=echo, **kwargs)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def normalise_url(url: str | URL) -> URL:
    """The URL with an explicit driver where the project has one: SQLAlchemy 2.1 maps a bare
    ``postgresql://`` to psycopg 3, but the dependency is psycopg2 (``postgres://`` is accepted too)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # sqlite3 must not BEGIN by itself; _sqlite_on_begin does
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable enough with WAL, and much faster
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    mode = connection.get_execution_options().get(BEGIN_OPTION, "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {'IMMEDIATE' if mode == 'IMMEDIATE' else 'DEFERRED'}")


def create_schema(engine: Engine) -> None:
    """Create the tables that are missing, unversioned: for throwaway databases in tests only.

    Real databases are made and moved by the migrations (spanner.storage.schema, `spanner db upgrade`);
    the Serve app refuses a database without a current schema version.
    """
    try:
        metadata.create_all(engine)
    except SQLAlchemyError as exc:
        where = engine.url.render_as_string(hide_password=True)
        raise StorageError(f"cannot create the database schema at {where}: {describe_db_error(exc)}") \
            from exc


def describe_db_error(exc: SQLAlchemyError) -> str:
    """The driver's own first line, without SQLAlchemy's SQL echo and background link."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

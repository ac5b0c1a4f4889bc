"""Alembic environment: the target is spanner.storage.tables.metadata, on SQLite or PostgreSQL.

A connection handed over in ``config.attributes["connection"]`` (spanner.storage.schema does) is used
as it is; otherwise (the alembic CLI) an engine is built for ``sqlalchemy.url`` or the configured
database, always through make_engine, which picks the installed PostgreSQL driver.
SQLite cannot ALTER most things, so its migrations run in batch mode (copy, alter, rename).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from spanner.storage.engine import make_engine, normalise_url
from spanner.storage.schema import configure_context, migration_connection
from spanner.storage.tables import metadata

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from spanner.settings import load_settings

    return load_settings().effective_database_url


def run_offline() -> None:
    """Emit the SQL instead of running it (``alembic upgrade head --sql``)."""
    url = normalise_url(_url())
    context.configure(
        url=url,
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=url.get_backend_name() == "sqlite",
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        configure_context(given)
        return
    engine = make_engine(_url())
    try:
        with migration_connection(engine) as connection:
            configure_context(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()

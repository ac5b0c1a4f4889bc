"""Persistence of nodes, spans and query records behind one Repository (SQLite or PostgreSQL)."""

from spanner.storage.engine import create_schema, make_engine
from spanner.storage.repository import Audit, OutboxEvent, Repository
from spanner.storage.schema import (
    UpgradeResult,
    head_revision,
    require_current_schema,
    schema_state,
    upgrade_database,
)

__all__ = [
    "Audit",
    "OutboxEvent",
    "Repository",
    "UpgradeResult",
    "create_schema",
    "head_revision",
    "make_engine",
    "require_current_schema",
    "schema_state",
    "upgrade_database",
]

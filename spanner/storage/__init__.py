"""Persistence of nodes, spans and query records behind one Repository (SQLite or PostgreSQL)."""

from spanner.storage.engine import create_schema, make_engine
from spanner.storage.repository import Repository

__all__ = ["Repository", "create_schema", "make_engine"]

"""The tables, in portable types so one schema serves SQLite (development) and PostgreSQL (production).

Membership of spans is an association table whose foreign keys cascade, so deleting a node takes it
out of every span in the same statement. Timestamps are stored as UTC and always read back aware.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Named constraints keep future Alembic migrations deterministic on both backends.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Json = JSON().with_variant(JSONB(), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no zone, so it stores UTC and gets it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the storage keeps aware UTC datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UtcDateTime(),
        dict[str, Any]: Json,
        dict[str, str]: Json,
        list[str]: Json,
        list[dict[str, Any]]: Json,
        bool: Boolean(),
        float: Float(),
        int: Integer(),
    }


class NodeRow(Base):
    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int]
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    enabled: Mapped[bool] = mapped_column(index=True)
    priority: Mapped[int]
    max_associations: Mapped[int]
    max_queries_per_s: Mapped[float | None]
    connect_timeout_s: Mapped[float]
    dimse_timeout_s: Mapped[float]
    query_timeout_s: Mapped[float | None]
    reuse_associations: Mapped[bool]
    query_models: Mapped[list[str]]
    additional_filters: Mapped[dict[str, str]]
    retrieve_method: Mapped[str] = mapped_column(String(16))
    placement: Mapped[dict[str, str]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class SpanRow(Base):
    __tablename__ = "spans"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    timeout_s: Mapped[float]
    failure_strategy: Mapped[str] = mapped_column(String(32))
    minimum_nodes: Mapped[int | None]
    dedup: Mapped[str] = mapped_column(String(32))
    max_results: Mapped[int]
    allowed_calling_aets: Mapped[list[str]]
    cache_ttl_s: Mapped[int]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class SpanNodeRow(Base):
    """One node in one span; ``position`` keeps the order the span was written in."""

    __tablename__ = "span_nodes"

    span_name: Mapped[str] = mapped_column(String(64), ForeignKey("spans.name", ondelete="CASCADE"),
                                           primary_key=True)
    node_name: Mapped[str] = mapped_column(String(64), ForeignKey("nodes.name", ondelete="CASCADE"),
                                           primary_key=True, index=True)
    position: Mapped[int]


class DestinationRow(Base):
    """A DICOM destination the spanner may send to (revision 0006); its AE title names it in a retrieval,
    so no two destinations share one."""

    __tablename__ = "destinations"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int]
    allowed_calling_aets: Mapped[list[str]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class QueryRecordRow(Base):
    __tablename__ = "query_records"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    span: Mapped[str] = mapped_column(String(64), index=True)  # no foreign key: history outlives spans
    level: Mapped[str] = mapped_column(String(16))
    filters: Mapped[dict[str, Any]]
    requester: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))
    total: Mapped[int]
    outcomes: Mapped[list[dict[str, Any]]]
    elapsed_ms: Mapped[float]
    error: Mapped[str | None] = mapped_column(Text)
    cache: Mapped[str | None] = mapped_column(String(8))  # hit | miss; null before revision 0002
    # Audit (revision 0003; null on older rows): which key asked, over which channel, from where, about whom.
    principal: Mapped[str | None] = mapped_column(String(255), index=True)
    channel: Mapped[str | None] = mapped_column(String(8))
    client: Mapped[str | None] = mapped_column(String(255))
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    # Revision 0005: the DICOM caller as the front asserted it, apart from the key that asked.
    asserted_ae: Mapped[str | None] = mapped_column(String(16), index=True)
    asserted_peer: Mapped[str | None] = mapped_column(String(255))


class RetrievalRecordRow(Base):
    __tablename__ = "retrieval_records"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    span: Mapped[str] = mapped_column(String(64), index=True)
    level: Mapped[str] = mapped_column(String(16))
    uids: Mapped[dict[str, Any]]
    destination_ae: Mapped[str] = mapped_column(String(16))
    requester: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))
    dimse_status: Mapped[int | None]
    completed: Mapped[int]
    failed: Mapped[int]
    warning: Mapped[int]
    parts: Mapped[list[dict[str, Any]]]
    elapsed_ms: Mapped[float]
    error: Mapped[str | None] = mapped_column(Text)
    principal: Mapped[str | None] = mapped_column(String(255), index=True)
    channel: Mapped[str | None] = mapped_column(String(8))
    client: Mapped[str | None] = mapped_column(String(255))
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    # Revision 0005: the DICOM caller as the front asserted it, apart from the key that asked.
    asserted_ae: Mapped[str | None] = mapped_column(String(16), index=True)
    asserted_peer: Mapped[str | None] = mapped_column(String(255))


class ApiKeyRow(Base):
    """An API key: only its SHA-256 is kept (the token has full entropy, so no salt or slow hash is
    needed); ``prefix`` names the key in lists and logs without revealing it."""

    __tablename__ = "api_keys"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(16))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class OutboxRow(Base):
    """An event waiting for the broker (``published_at`` null) or already handed to it.

    Written in the same transaction as the record it tells of, so an event exists exactly when its
    record does; the relay publishes in ``id`` order. ``sqlite_autoincrement`` keeps SQLite from
    reusing the id of a purged last row, which would put a new event before an old one.
    """

    __tablename__ = "event_outbox"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(32), unique=True)
    routing_key: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    published_at: Mapped[datetime | None] = mapped_column(index=True)


class NodeHealthRow(Base):
    """The last health the spanner saw of a node (``up``/``down``): a change is a ``node.health`` event.

    No foreign key: a query recorded while its node is being deleted must not fail on it; deleting a
    node deletes its row here.
    """

    __tablename__ = "node_health"

    node_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    health: Mapped[str] = mapped_column(String(16))
    since: Mapped[datetime]


metadata = Base.metadata

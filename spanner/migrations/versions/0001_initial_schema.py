"""The initial schema: nodes, spans and their members, query and retrieval records.

Exactly what ``metadata.create_all`` made before migrations existed, so such databases are stamped at
this revision rather than re-created. Types are written out here (not imported from tables.py): a
revision is a frozen snapshot, and the code's tables will move on.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _json() -> sa.JSON[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)  # tables.UtcDateTime stores UTC in this column type


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("max_associations", sa.Integer(), nullable=False),
        sa.Column("max_queries_per_s", sa.Float(), nullable=True),
        sa.Column("connect_timeout_s", sa.Float(), nullable=False),
        sa.Column("dimse_timeout_s", sa.Float(), nullable=False),
        sa.Column("query_timeout_s", sa.Float(), nullable=True),
        sa.Column("reuse_associations", sa.Boolean(), nullable=False),
        sa.Column("query_models", _json(), nullable=False),
        sa.Column("additional_filters", _json(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_nodes")),
    )
    op.create_index(op.f("ix_nodes_enabled"), "nodes", ["enabled"], unique=False)

    op.create_table(
        "spans",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("timeout_s", sa.Float(), nullable=False),
        sa.Column("failure_strategy", sa.String(length=32), nullable=False),
        sa.Column("minimum_nodes", sa.Integer(), nullable=True),
        sa.Column("dedup", sa.String(length=32), nullable=False),
        sa.Column("max_results", sa.Integer(), nullable=False),
        sa.Column("allowed_calling_aets", _json(), nullable=False),
        sa.Column("cache_ttl_s", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_spans")),
        sa.UniqueConstraint("ae_title", name=op.f("uq_spans_ae_title")),
    )

    op.create_table(
        "span_nodes",
        sa.Column("span_name", sa.String(length=64), nullable=False),
        sa.Column("node_name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["node_name"], ["nodes.name"], name=op.f("fk_span_nodes_node_name_nodes"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["span_name"], ["spans.name"], name=op.f("fk_span_nodes_span_name_spans"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("span_name", "node_name", name=op.f("pk_span_nodes")),
    )
    op.create_index(op.f("ix_span_nodes_node_name"), "span_nodes", ["node_name"], unique=False)

    op.create_table(
        "query_records",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("span", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("filters", _json(), nullable=False),
        sa.Column("requester", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("outcomes", _json(), nullable=False),
        sa.Column("elapsed_ms", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_query_records")),
    )
    op.create_index(op.f("ix_query_records_created_at"), "query_records", ["created_at"], unique=False)
    op.create_index(op.f("ix_query_records_span"), "query_records", ["span"], unique=False)

    op.create_table(
        "retrieval_records",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("span", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("uids", _json(), nullable=False),
        sa.Column("destination_ae", sa.String(length=16), nullable=False),
        sa.Column("requester", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("dimse_status", sa.Integer(), nullable=True),
        sa.Column("completed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("warning", sa.Integer(), nullable=False),
        sa.Column("parts", _json(), nullable=False),
        sa.Column("elapsed_ms", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrieval_records")),
    )
    op.create_index(op.f("ix_retrieval_records_created_at"), "retrieval_records", ["created_at"],
                    unique=False)
    op.create_index(op.f("ix_retrieval_records_span"), "retrieval_records", ["span"], unique=False)


def downgrade() -> None:
    for table in ("retrieval_records", "query_records", "span_nodes", "spans", "nodes"):
        op.drop_table(table)  # their indexes go with them

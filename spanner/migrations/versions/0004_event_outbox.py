"""event_outbox (events waiting for RabbitMQ, written with the record they tell of) and node_health.

With RABBITMQ_URL set, every query and retrieval record is written together with its event in one
transaction, and the relay publishes the outbox in id order; a broker outage leaves events here until
it returns. ``node_health`` remembers the last health seen of each node, so a change is told once.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)  # tables.UtcDateTime stores UTC in this column type


def upgrade() -> None:
    op.create_table(
        "event_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True,
                  nullable=False),
        sa.Column("event_id", sa.String(length=32), nullable=False),
        sa.Column("routing_key", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
                  nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("published_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_event_outbox_event_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_event_outbox_published_at"), "event_outbox", ["published_at"], unique=False)
    op.create_table(
        "node_health",
        sa.Column("node_name", sa.String(length=64), nullable=False),
        sa.Column("health", sa.String(length=16), nullable=False),
        sa.Column("since", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("node_name", name=op.f("pk_node_health")),
    )


def downgrade() -> None:
    op.drop_table("node_health")
    op.drop_index(op.f("ix_event_outbox_published_at"), table_name="event_outbox")
    op.drop_table("event_outbox")

"""API keys (api_keys) and the audit columns of query_records and retrieval_records.

Every query and retrieval now says who asked (``principal``: a key's name, ``ae:<CALLING_AE>`` or
``anonymous``), over which ``channel`` (http or dimse), from which ``client`` address, and which
``patient_id`` it concerned (indexed: "who looked at this patient?" is the audit's main question).
Rows recorded before this revision keep nulls there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

RECORD_TABLES = ("query_records", "retrieval_records")


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)  # tables.UtcDateTime stores UTC in this column type


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("revoked_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("hash", name=op.f("uq_api_keys_hash")),
    )
    for table in RECORD_TABLES:
        with op.batch_alter_table(table) as batch:  # batch: SQLite rebuilds the table
            batch.add_column(sa.Column("principal", sa.String(length=255), nullable=True))
            batch.add_column(sa.Column("channel", sa.String(length=8), nullable=True))
            batch.add_column(sa.Column("client", sa.String(length=255), nullable=True))
            batch.add_column(sa.Column("patient_id", sa.String(length=64), nullable=True))
            batch.create_index(batch.f(f"ix_{table}_principal"), ["principal"], unique=False)
            batch.create_index(batch.f(f"ix_{table}_patient_id"), ["patient_id"], unique=False)


def downgrade() -> None:
    for table in RECORD_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(batch.f(f"ix_{table}_patient_id"))
            batch.drop_index(batch.f(f"ix_{table}_principal"))
            batch.drop_column("patient_id")
            batch.drop_column("client")
            batch.drop_column("channel")
            batch.drop_column("principal")
    op.drop_table("api_keys")

"""query_records.cache: whether an answer came from the query cache ("hit") or the archives ("miss").

A hit is recorded like any query but takes a few milliseconds; without this column the history could
not tell a fast archive from a cached answer. Null for queries recorded before this revision.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("query_records") as batch:  # batch: SQLite rebuilds the table
        batch.add_column(sa.Column("cache", sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("query_records") as batch:
        batch.drop_column("cache")

"""Nodes: how an archive gives up instances (``retrieve_method``) and where its actor runs (``placement``).

Existing nodes keep today's behaviour: C-MOVE to the spanner's storage SCP, on any Ray node.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("retrieve_method", sa.String(length=16), nullable=False,
                                   server_default="c-move"))
        batch.add_column(sa.Column("placement", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
                                   nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("placement")
        batch.drop_column("retrieve_method")

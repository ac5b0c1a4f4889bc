"""The DICOM caller as the front asserted it, kept apart from the key that asked.

``principal`` now always names the API key that made the request (or ``anonymous``); a DICOM request
also records the calling AE title and peer address the DICOM front asserted (``asserted_ae``,
``asserted_peer``), which only a key of role ``dicom_front`` may assert. Older rows keep nulls there
(and, for DICOM requests made before, ``ae:<CALLING_AE>`` as principal).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

RECORD_TABLES = ("query_records", "retrieval_records")


def upgrade() -> None:
    for table in RECORD_TABLES:
        with op.batch_alter_table(table) as batch:  # batch: SQLite rebuilds the table
            batch.add_column(sa.Column("asserted_ae", sa.String(length=16), nullable=True))
            batch.add_column(sa.Column("asserted_peer", sa.String(length=255), nullable=True))
            batch.create_index(batch.f(f"ix_{table}_asserted_ae"), ["asserted_ae"], unique=False)


def downgrade() -> None:
    for table in RECORD_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(batch.f(f"ix_{table}_asserted_ae"))
            batch.drop_column("asserted_peer")
            batch.drop_column("asserted_ae")

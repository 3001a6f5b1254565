"""Image sizes as 64-bit integers (BIGINT): PostgreSQL's INTEGER stops at 2 GiB.

SQLite's INTEGER holds 64 bits already; batch mode copies the table there, for the declared type.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
COLUMNS = ("virtual_bytes", "file_bytes")


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        for column in COLUMNS:
            batch.alter_column(column, existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        for column in COLUMNS:
            batch.alter_column(column, existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False)

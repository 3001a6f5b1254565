"""host_datastores.total_mb: a datastore's capacity as each host sees it (the web client's inventory shows
capacity, free and used; the agent reports the file system's size beside its free space)."""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.add_column("host_datastores", sa.Column("total_mb", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("host_datastores", "total_mb")

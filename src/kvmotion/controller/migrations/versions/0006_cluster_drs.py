"""clusters.drs_json: a cluster's DRS settings (automation level, migration threshold) and its rules (VM–VM
affinity and anti-affinity, VM–host; must or should), as ``models.drs.DrsConfig``."""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.add_column("clusters", sa.Column("drs_json", sa.Text(), nullable=False, server_default="{}"))


def downgrade() -> None:
    op.drop_column("clusters", "drs_json")

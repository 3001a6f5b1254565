"""controller_leader: the controller that leads the controllers of one database (``controller.leader``): its
name, advertised URL, term and since when; one row, written by each new leader."""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_table("controller_leader",
                    sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("name", sa.String(64), nullable=False),
                    sa.Column("url", sa.String(264), nullable=False),
                    sa.Column("term", sa.Integer(), nullable=False),
                    sa.Column("since", sa.Float(), nullable=False))


def downgrade() -> None:
    op.drop_table("controller_leader")

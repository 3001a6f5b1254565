"""An index on tasks.state: the scheduler rereads the unfinished tasks every second."""
from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_index("ix_tasks_state", "tasks", ["state"])


def downgrade() -> None:
    op.drop_index("ix_tasks_state", table_name="tasks")

"""An index on tasks (finished_at, id): each scrape of /metrics reads only the migrations finished since the last
one, in that order (controller/metrics.py)."""
from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_index("ix_tasks_finished_at_id", "tasks", ["finished_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_tasks_finished_at_id", table_name="tasks")

"""An index on tasks (created_at, id): GET /tasks pages the journal newest first by that key (controller/listing.py),
each page read from the index, not by sorting the whole table."""
from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.create_index("ix_tasks_created_at_id", "tasks", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_tasks_created_at_id", table_name="tasks")

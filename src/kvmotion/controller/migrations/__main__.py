"""``python -m kvmotion.controller.migrations "what changed"``: write the next revision (``versions/NNNN_*.py``)
from the difference between the models (``controller/db.py``) and the schema of the newest revision (a scratch
SQLite database brought to it). Read what it wrote, and add what autogenerate cannot see (a rename, moving data,
a server default) before committing; ``tests/unit/test_schema_unit.py`` checks the result on both databases."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command

from kvmotion.controller import dbengine, schema

USAGE = 'usage: python -m kvmotion.controller.migrations "what changed"'


def new_revision(message: str) -> Path:
    """The file of the revision written after ``schema.head()``."""
    rev_id = f"{int(schema.head()) + 1:04d}"
    with tempfile.TemporaryDirectory() as scratch:
        engine = dbengine.create(f"sqlite:///{Path(scratch) / 'head.db'}")
        try:
            schema.upgrade(engine)
            with engine.begin() as conn:
                script = command.revision(schema.alembic_config(conn), message=message, autogenerate=True,
                                          rev_id=rev_id)
        finally:
            engine.dispose()
    assert script is not None and not isinstance(script, list)
    return Path(script.path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].strip():
        print(USAGE, file=sys.stderr)
        return 2
    print(new_revision(args[0].strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

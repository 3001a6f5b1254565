"""Unit-test fixtures: fresh controller databases, SQLite files or, when ``$KVMOTION_TEST_PG_URL`` is set, schemas
on that PostgreSQL server (tests/unit/dbtools.py). ``db_url`` is one; ``new_db(name)`` makes as many as a test
needs (two controllers). Every test that uses them is marked ``db``, so ``KVMOTION_TEST_PG_URL=… pytest -m db
tests/unit`` runs the database tests again on PostgreSQL (scripts/test.sh does)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from dbtools import pg_base, pg_schema


@pytest.fixture
def new_db(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``new_db(name)``: the URL of a fresh, empty database (dropped after the test on PostgreSQL)."""
    base = pg_base()
    with ExitStack() as stack:
        def make(name: str = "c") -> str:
            return f"sqlite:///{tmp_path / f'{name}.db'}" if base is None else stack.enter_context(pg_schema(base))
        yield make


@pytest.fixture
def db_url(new_db: Callable[[str], str]) -> str:
    return new_db("c")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "new_db" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.db)

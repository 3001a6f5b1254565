"""The controller database of a unit test: a SQLite file, or, when ``$KVMOTION_TEST_PG_URL`` names a PostgreSQL
database (scripts/pg.sh prints one), a schema of the test's own in it, dropped after the test. The ``db_url``
fixture (tests/unit/conftest.py) hands one out; a test using it is marked ``db`` (``pytest -m db`` runs only those).

On PostgreSQL the test's URL sets ``search_path`` to its schema, ``application_name`` to the schema's name (so the
connections a test left open can be ended before the schema is dropped) and ``synchronous_commit=off`` (speed;
durability is not under test)."""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine, make_url

PG_ENV = "KVMOTION_TEST_PG_URL"
PREFIX = "kvt_"                      # kvt_<pid>_<n>: a schema of one test of the pytest process <pid>
_counter = itertools.count()
_swept: set[str] = set()


def pg_base() -> str | None:
    """The PostgreSQL database the tests use, else None (SQLite)."""
    return os.environ.get(PG_ENV) or None


def admin_engine(base: str) -> Engine:
    return create_engine(make_url(base).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT",
                         connect_args={"connect_timeout": 5, "options": "-c lock_timeout=10000"})


@contextmanager
def pg_schema(base: str) -> Iterator[str]:
    """A fresh schema in ``base`` for one test: the URL that works in it; dropped afterwards, with the
    connections the test left open ended first."""
    name = f"{PREFIX}{os.getpid()}_{next(_counter)}"
    admin = admin_engine(base)
    try:
        with admin.connect() as conn:
            _sweep(conn, base)
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
        options = quote(f"-c search_path={name} -c synchronous_commit=off")
        sep = "&" if "?" in base else "?"
        yield f"{base}{sep}options={options}&application_name={name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :n "
                              "AND pid <> pg_backend_pid()"), {"n": name})
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        admin.dispose()


def _sweep(conn: Any, base: str) -> None:
    """Once per process and database: drop the schemas of test processes that are gone (killed mid-test)."""
    if base in _swept:
        return
    _swept.add(base)
    for (name,) in conn.execute(text("SELECT nspname FROM pg_namespace WHERE nspname LIKE :p"),
                                {"p": PREFIX.replace("_", r"\_") + "%"}):
        pid = name[len(PREFIX):].split("_")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


def query(engine: Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """The rows of one SQL statement, on either database (commits what it changed)."""
    with engine.begin() as conn:
        result = conn.execute(text(sql), params)
        return [tuple(r) for r in result] if result.returns_rows else []


def all_text(engine: Engine) -> str:
    """Every row of every table, as text: what someone reading the database would see."""
    with engine.connect() as conn:
        return "\n".join(str(tuple(r)) for table in inspect(conn).get_table_names()
                         for r in conn.execute(text(f'SELECT * FROM "{table}"')))

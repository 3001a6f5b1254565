"""The controller's database engine: SQLite (embedded, the default) or PostgreSQL (psycopg 3), each call with a
deadline. SQLite: a statement waits at most ``DB_TIMEOUT_S`` for a lock. PostgreSQL: connecting takes at most
``DB_TIMEOUT_S``, a statement runs at most ``STATEMENT_TIMEOUT_S`` (server side), and TCP keepalives and
``tcp_user_timeout`` end a call to a server that vanished (client side). Any other URL is refused with its fix."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError

from kvmotion.common.errors import ConfigInvalid, DatabaseUnusable
from kvmotion.common.private import create_private, keep_private

DB_TIMEOUT_S = 5.0
STATEMENT_TIMEOUT_S = 30.0
TCP_USER_TIMEOUT_S = 30.0
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
POSTGRESQL_DRIVERS = ("postgresql", "postgresql+psycopg")      # a bare postgresql:// means psycopg 3 here
URL_FORMS = "sqlite:////var/lib/kvmotion/controller/controller.db or postgresql+psycopg://USER@HOST/DATABASE"
# a dead server or network is noticed within about 10 + 3 * 5 s of silence (libpq: TCP connections only)
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


def parse(url: str, source: str = "") -> URL:
    """The URL of a supported database (SQLite, or PostgreSQL through psycopg 3), else a ``ConfigInvalid`` naming
    ``database_url`` and its fix; the message never repeats the URL (it may hold a password)."""
    details = {"file": source, "keys": ["database_url"]}
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigInvalid("database_url is not a database URL", remedy=f"write it as {URL_FORMS}",
                            details=details) from None
    if parsed.drivername in POSTGRESQL_DRIVERS:
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return parsed
    raise ConfigInvalid(f"database_url: the database {parsed.drivername!r} is not supported",
                        remedy=f"use SQLite or PostgreSQL: {URL_FORMS}", details=details)


def is_sqlite(url: str | URL) -> bool:
    return (make_url(url) if isinstance(url, str) else url).get_backend_name() == "sqlite"


def shown(url: str | URL) -> str:
    """The URL to show in a message or a log: without its password."""
    try:
        return (make_url(url) if isinstance(url, str) else url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(not a URL)"


def create(url: str) -> Engine:
    """An engine on ``url``; nothing connects yet."""
    parsed = parse(url)
    return _sqlite(parsed) if is_sqlite(parsed) else _postgresql(parsed)


def _sqlite(url: URL) -> Engine:
    _private_sqlite(url)
    engine = create_engine(url, connect_args={"timeout": DB_TIMEOUT_S, "check_same_thread": False},
                           pool_pre_ping=True)

    @event.listens_for(engine, "connect")
    def _pragmas(conn: Any, _: Any) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
    return engine


def _private_sqlite(url: URL) -> None:
    """The SQLite file holds wrapped secrets and token hashes: created 0600 before SQLite opens it (SQLite gives
    its -wal and -shm files the database's mode), and an existing one and its companions tightened."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    create_private(Path(database))
    for suffix in SQLITE_COMPANIONS:
        keep_private(Path(database + suffix))


def postgresql_connect_args(url: URL) -> dict[str, Any]:
    """libpq settings for the deadlines (see the module); a setting the URL gives itself wins, and its ``options``
    come after ours (the server takes the last value of a setting)."""
    ours: dict[str, Any] = {"connect_timeout": int(DB_TIMEOUT_S), "tcp_user_timeout": int(TCP_USER_TIMEOUT_S * 1000),
                            "application_name": "kvmotion-controller", **KEEPALIVES}
    args = {k: v for k, v in ours.items() if k not in url.query}
    given = url.query.get("options", "")
    args["options"] = " ".join(filter(None, [f"-c statement_timeout={int(STATEMENT_TIMEOUT_S * 1000)}",
                                             given if isinstance(given, str) else " ".join(given)]))
    return args


def _postgresql(url: URL) -> Engine:
    try:
        importlib.import_module("psycopg")      # its absence (or libpq's) is named here, not at the first query
    except ImportError as exc:
        raise DatabaseUnusable(f"PostgreSQL needs psycopg 3 and the libpq library: {exc}",
                               remedy="install libpq (Debian: apt-get install libpq5), or psycopg's own build "
                                      "of it (pip install 'psycopg[binary]')",
                               details={"database": shown(url)}) from exc
    return create_engine(url, connect_args=postgresql_connect_args(url), pool_pre_ping=True)

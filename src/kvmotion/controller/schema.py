"""The schema of the controller's database: Alembic revisions (``controller/migrations/versions``), brought to the
newest (head) at every start by ``upgrade``, in one transaction on PostgreSQL (SQLite commits each DDL statement:
back the file up before an upgrade, docs/deploy.md).

A database made before the migrations (``create_all``: its tables, no ``alembic_version``) is adopted: the
baseline's tables it lacks are made, it is stamped at the baseline, then upgraded. A database at a revision this
release does not know (a newer release upgraded it) is refused, not touched."""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from kvmotion import __version__
from kvmotion.common.errors import DatabaseUnusable

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BASELINE = "0001"
LEGACY_TABLE = "hosts"              # every database the controller made before the migrations has it
LOCK_ID = 0x6B766D6F746E            # PostgreSQL advisory lock ("kvmotn"): one controller migrates at a time
UPGRADE_TIMEOUT_S = 600.0           # PostgreSQL: a statement of a migration (a big table's index) may run this long


@functools.cache
def scripts() -> ScriptDirectory:
    """The revisions this release knows (read once per process)."""
    return ScriptDirectory(str(MIGRATIONS))


def head() -> str:
    found = scripts().get_current_head()
    assert found is not None, "the migrations have one head"
    return found


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the controller's migrations; ``env.py`` runs on ``connection``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def current(connection: Connection) -> str | None:
    """The database's revision (None: no ``alembic_version`` row)."""
    return MigrationContext.configure(connection).get_current_revision()


def baseline() -> ModuleType:
    """The baseline revision's module (its ``METADATA``: the tables before the migrations)."""
    return scripts().get_revision(BASELINE).module


def upgrade(engine: Engine) -> list[str]:
    """Bring the database to ``head()``; the revisions applied, oldest first (none when it is there already)."""
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:       # batch mode copies a table: with foreign keys on, dropping the old one would cascade
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                return _migrate(conn)
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def _migrate(conn: Connection) -> list[str]:
    if conn.dialect.name == "postgresql":          # wait for another controller's migration, then see its result
        conn.execute(text(f"SET LOCAL statement_timeout = {int(UPGRADE_TIMEOUT_S * 1000)}"))
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": LOCK_ID})
    have = current(conn)
    if have == head():
        return []
    _check_known(have, conn)
    if have is None and inspect(conn).has_table(LEGACY_TABLE):
        log.warning("the database was made before schema migrations: adopting it at revision %s", BASELINE)
        baseline().METADATA.create_all(conn)           # the tables an older release had not made yet
        command.stamp(alembic_config(conn), BASELINE)
        have = BASELINE
    applied = _after(have)
    log.info("database schema: revision %s -> %s (%s)", have or "none", head(), ", ".join(applied))
    command.upgrade(alembic_config(conn), "head")
    return applied


def _check_known(revision: str | None, conn: Connection) -> None:
    if revision is None:
        return
    try:
        scripts().get_revision(revision)
    except CommandError:
        raise DatabaseUnusable(
            f"the database is at schema revision {revision!r}, which kvmotion {__version__} does not know (its newest "
            f"is {head()!r}): a newer release upgraded it", details={"database": conn.engine.url.render_as_string(
                hide_password=True), "revision": revision},
            remedy="run that newer release, or restore the backup taken before the upgrade") from None


def _after(revision: str | None) -> list[str]:
    """The revisions an upgrade from ``revision`` applies, oldest first."""
    return [s.revision for s in reversed(list(scripts().iterate_revisions(head(), revision or "base")))
            if s.revision != revision]

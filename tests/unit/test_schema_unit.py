"""The controller's schema migrations (Alembic, ``kvmotion.controller.schema``), on SQLite and, with
$KVMOTION_TEST_PG_URL, on PostgreSQL (the ``db_url`` fixture): the migrated schema is the models', the baseline is
the schema before migrations, a database made by the old ``create_all`` is adopted with its rows, an upgrade is
idempotent, and a database of a newer release is refused untouched."""
from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from dbtools import query
from kvmotion.common.errors import DatabaseUnusable
from kvmotion.controller import dbengine, schema
from kvmotion.controller.db import Base, make_engine
from kvmotion.controller.migrations import __main__ as migrations_main

GiB = 1 << 30


def schema_diff(engine: Engine) -> list[tuple]:
    """What Alembic's autogenerate finds between the database and the models (types compared too)."""
    with engine.connect() as conn:
        found = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    return [d if isinstance(d, tuple) else tuple(d) for d in found]      # a column's changes come as a list


def upgrade_to(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        command.upgrade(schema.alembic_config(conn), revision)


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def legacy_database(url: str, without: tuple[str, ...] = ()) -> Engine:
    """A database as the controller made it before migrations (``create_all`` of the baseline's tables, no
    ``alembic_version``), less the tables ``without`` (an older release had not made them yet), with rows."""
    engine = dbengine.create(url)
    meta = schema.baseline().METADATA
    meta.create_all(engine, tables=[t for t in meta.sorted_tables if t.name not in without])
    query(engine, "INSERT INTO hosts (name, address, state, facts_json, last_seen, added_at, last_error, maintenance, "
                  "secret_wrapped) VALUES ('h1', 'https://198.18.0.11:8770', 'connected', '{}', 1, 1, '', 0, 'w')")
    query(engine, "INSERT INTO vms (uuid, name, host, power_state, spec_json, policy_json, created_at, updated_at) "
                  "VALUES ('u1', 'vm1', 'h1', 'poweredOn', '{}', '{}', 1, 2)")
    query(engine, "INSERT INTO images (name, state, source_format, format, virtual_bytes, file_bytes, sha256, "
                  "copies_json, created_at) VALUES ('deb', 'ready', 'vmdk', 'qcow2', 1048576, 4096, 'ab', '[]', 3)")
    return engine


def test_the_migrated_schema_is_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    assert schema_diff(engine) == []
    assert query(engine, "SELECT version_num FROM alembic_version") == [(schema.head(),)]
    assert schema.head() != schema.BASELINE          # the upgrade path is exercised by real revisions


def key(d: tuple) -> tuple[str, str]:
    """A schema difference as (what, name): the index's or table's name, or the added column's."""
    return (d[0], d[1].name if d[0] in ("add_index", "add_table") else d[3].name)


def test_the_baseline_is_the_schema_before_migrations_and_each_revision_is_what_it_says(db_url: str) -> None:
    """At the baseline, the models differ by exactly what the later revisions change: the index on tasks.state
    (0002), the 64-bit image sizes (0003), the index on tasks (finished_at, id) (0004), the datastores' capacity
    (0005), the clusters' DRS settings (0006), the controller_leader table (0007) and the index on tasks
    (created_at, id) (0008); so the comparison sees differences, and the baseline is the rest."""
    engine = dbengine.create(db_url)
    upgrade_to(engine, schema.BASELINE)
    diff = schema_diff(engine)
    assert [(d[0], d[1].name) for d in diff if d[0] == "add_table"] == [("add_table", "controller_leader")]
    assert {(d[0], d[1].name) for d in diff if d[0] == "add_index"} == {("add_index", "ix_tasks_state"),
                                                                        ("add_index", "ix_tasks_finished_at_id"),
                                                                        ("add_index", "ix_tasks_created_at_id")}
    assert sorted((d[0], d[2], d[3].name) for d in diff if d[0] == "add_column") == [
        ("add_column", "clusters", "drs_json"), ("add_column", "host_datastores", "total_mb")]
    assert sorted((d[0][0], d[0][2], d[0][3]) for d in diff
                  if d[0] not in ("add_index", "add_column", "add_table")) == [
        ("modify_type", "images", "file_bytes"), ("modify_type", "images", "virtual_bytes")]
    assert len(diff) == 8
    upgrade_to(engine, "0002")
    assert len(schema_diff(engine)) == 7
    upgrade_to(engine, "0003")
    assert sorted(key(d) for d in schema_diff(engine)) == [
        ("add_column", "drs_json"), ("add_column", "total_mb"), ("add_index", "ix_tasks_created_at_id"),
        ("add_index", "ix_tasks_finished_at_id"), ("add_table", "controller_leader")]
    upgrade_to(engine, "0004")
    assert sorted(key(d) for d in schema_diff(engine)) == [
        ("add_column", "drs_json"), ("add_column", "total_mb"), ("add_index", "ix_tasks_created_at_id"),
        ("add_table", "controller_leader")]
    upgrade_to(engine, "0005")
    assert sorted(key(d) for d in schema_diff(engine)) == [
        ("add_column", "drs_json"), ("add_index", "ix_tasks_created_at_id"), ("add_table", "controller_leader")]
    upgrade_to(engine, "0006")
    assert sorted(key(d) for d in schema_diff(engine)) == [
        ("add_index", "ix_tasks_created_at_id"), ("add_table", "controller_leader")]
    upgrade_to(engine, "0007")
    assert [key(d) for d in schema_diff(engine)] == [("add_index", "ix_tasks_created_at_id")]
    upgrade_to(engine, "head")
    assert schema_diff(engine) == []


def test_a_database_made_before_migrations_is_adopted_and_upgraded_with_its_rows(db_url: str) -> None:
    before = legacy_database(db_url, without=("domain_self", "domain_members"))    # a release before domains
    assert "alembic_version" not in tables(before) and "domain_members" not in tables(before)
    before.dispose()
    engine = make_engine(db_url)
    assert query(engine, "SELECT version_num FROM alembic_version") == [(schema.head(),)]
    assert schema_diff(engine) == [] and {"domain_self", "domain_members"} <= tables(engine)
    assert query(engine, "SELECT name, host, power_state, updated_at FROM vms") == [("vm1", "h1", "poweredOn", 2.0)]
    assert query(engine, "SELECT name, secret_wrapped FROM hosts") == [("h1", "w")]
    query(engine, "UPDATE images SET virtual_bytes = :v WHERE name = 'deb'", v=40 * GiB)    # past 32 bits now
    assert query(engine, "SELECT virtual_bytes, file_bytes FROM images") == [(40 * GiB, 4096)]


def test_an_upgrade_is_idempotent(db_url: str) -> None:
    engine = make_engine(db_url)
    query(engine, "INSERT INTO clusters (name, evc_mode, policy_json) VALUES ('c1', NULL, :p)", p=json.dumps({}))
    assert schema.upgrade(engine) == []                       # at head: nothing runs
    again = make_engine(db_url)                               # the next start
    assert query(again, "SELECT version_num FROM alembic_version") == [(schema.head(),)]
    assert query(again, "SELECT name FROM clusters") == [("c1",)] and schema_diff(again) == []


def test_a_fresh_database_gets_every_revision_in_order(db_url: str) -> None:
    engine = dbengine.create(db_url)
    assert schema.upgrade(engine) == ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008"]
    assert schema.upgrade(engine) == []


def test_a_database_of_a_newer_release_is_refused_untouched(db_url: str) -> None:
    engine = make_engine(db_url)
    query(engine, "UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(DatabaseUnusable) as exc:
        make_engine(db_url)
    assert exc.value.details["revision"] == "9999" and "newer release" in exc.value.message
    assert "backup" in exc.value.remedy and "kvmotion_test:kvmotion_test@" not in str(exc.value.details)
    assert query(engine, "SELECT version_num FROM alembic_version") == [("9999",)]


def test_the_alembic_environment_ships_with_the_package() -> None:
    """env.py and the revisions are modules of packages (so the wheel holds them); the template of new revisions
    is package data; each revision's file is named by its id, and they form one line from the baseline."""
    assert (schema.MIGRATIONS / "env.py").is_file() and (schema.MIGRATIONS / "__init__.py").is_file()
    assert (schema.MIGRATIONS / "versions" / "__init__.py").is_file()
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["kvmotion.controller.migrations"]
    assert all((schema.MIGRATIONS / f).is_file() for f in shipped) and "script.py.mako" in shipped
    revisions = [s.revision for s in schema.scripts().walk_revisions()]
    assert revisions[-1] == schema.BASELINE and revisions[0] == schema.head() and len(set(revisions)) == len(revisions)
    for rev in revisions:
        assert Path(schema.scripts().get_revision(rev).path).name.startswith(f"{rev}_")


def test_the_next_revision_is_written_from_the_models(tmp_path: Path, monkeypatch) -> None:
    """``python -m kvmotion.controller.migrations MSG`` (on a copy of the migrations): the file is named by the next
    id, follows the head, and, the models being the head's schema, holds no operation."""
    copy = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    head = schema.head()
    monkeypatch.setattr(schema, "MIGRATIONS", copy)
    schema.scripts.cache_clear()
    try:
        assert migrations_main.main(["a new column"]) == 0
        assert migrations_main.main([]) == 2
    finally:
        schema.scripts.cache_clear()
    body = (copy / "versions" / f"{int(head) + 1:04d}_a_new_column.py").read_text()
    assert f"down_revision: Union[str, Sequence[str], None] = {head!r}" in body and "op." not in body

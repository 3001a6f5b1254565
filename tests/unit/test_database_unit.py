"""The controller's database backends (``kvmotion.controller.dbengine``): which URLs are taken, the explicit
``pki_dir`` a PostgreSQL controller needs, every call's deadline, and what PostgreSQL refuses where SQLite is lax
(texts longer than their column, NUL characters, LIKE's case) handled alike on both. Tests taking ``db_url`` run
on PostgreSQL too when $KVMOTION_TEST_PG_URL is set."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DataError, OperationalError

from dbtools import query
from kvmotion.common.errors import ConfigInvalid, DatabaseUnusable
from kvmotion.controller import dbengine, schema, tasks
from kvmotion.controller import main as controller_main
from kvmotion.controller.api import create_app
from kvmotion.controller.config import ControllerConfig
from kvmotion.controller.db import Host, make_engine, make_sessionmaker
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.service import Controller
from kvmotion.models.agent import DatastoreFact, HostFacts, PortGroupFact

PG = "postgresql+psycopg://kv:s3cret-pw@db.example:5432/kvmotion"


# -- configuration ----------------------------------------------------------------------------------------------
def test_a_postgresql_controller_needs_an_explicit_pki_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid) as exc:
        ControllerConfig.resolve(None, {"database_url": PG})
    assert exc.value.details["keys"] == ["pki_dir"] and "pki_dir" in exc.value.message
    assert "pki_dir =" in exc.value.remedy and "--pki-dir" in exc.value.remedy
    assert "s3cret-pw" not in str(exc.value) + str(exc.value.details)
    with pytest.raises(ConfigInvalid):                # the service refuses too, before it connects to anything
        Controller(PG, token_dir=tmp_path)
    cfg = ControllerConfig.resolve(None, {"database_url": PG, "pki_dir": tmp_path / "pki"})
    assert cfg.pki == tmp_path / "pki" and cfg.tokens == tmp_path and cfg.sqlite_file is None


@pytest.mark.parametrize("url", ["mysql://kv:s3cret-pw@db/kvmotion", "s3cret-pw", "oracle+cx://a:s3cret-pw@b/c"])
def test_an_unsupported_database_url_is_named_with_its_fix_and_no_password(url: str) -> None:
    with pytest.raises(ConfigInvalid) as exc:
        ControllerConfig.resolve(None, {"database_url": url, "pki_dir": "/srv/pki"})
    assert exc.value.details["keys"] == ["database_url"] and "database_url" in exc.value.message
    assert "postgresql+psycopg://" in exc.value.remedy and "s3cret-pw" not in str(exc.value)


def test_a_bare_postgresql_url_means_psycopg_and_the_urls_own_settings_win() -> None:
    url = dbengine.parse("postgresql://kv@db/kvmotion?connect_timeout=2&options=-c%20statement_timeout%3D9000")
    assert url.drivername == "postgresql+psycopg"
    args = dbengine.postgresql_connect_args(url)
    assert "connect_timeout" not in args and args["tcp_user_timeout"] == 30000 and args["keepalives"] == 1
    assert args["options"] == "-c statement_timeout=30000 -c statement_timeout=9000"     # the last one counts
    assert dbengine.shown(PG) == "postgresql+psycopg://kv:***@db.example:5432/kvmotion"


# -- deadlines --------------------------------------------------------------------------------------------------
def test_every_connection_carries_its_deadline(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "30s"
        else:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == dbengine.DB_TIMEOUT_S * 1000


def test_a_statement_past_its_deadline_fails_instead_of_hanging(db_url: str, monkeypatch) -> None:
    """PostgreSQL: the server cancels a statement past ``statement_timeout``. SQLite: a writer waits at most the
    busy timeout for another's lock."""
    monkeypatch.setattr(dbengine, "STATEMENT_TIMEOUT_S", 0.2)
    monkeypatch.setattr(dbengine, "DB_TIMEOUT_S", 0.2)
    engine = make_engine(db_url)
    if engine.dialect.name == "postgresql":
        with pytest.raises(OperationalError, match="statement timeout"), engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(5)"))
        return
    with engine.connect() as holder:
        holder.exec_driver_sql("BEGIN IMMEDIATE")            # holds the write lock
        with pytest.raises(OperationalError, match="locked"), engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO clusters (name, policy_json) VALUES ('c1', '{}')")
        holder.exec_driver_sql("ROLLBACK")


def test_an_unreachable_server_is_a_clear_error_without_the_password(tmp_path: Path, capsys) -> None:
    with socket.socket() as s:                            # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"postgresql+psycopg://kv:s3cret-pw@127.0.0.1:{s.getsockname()[1]}/kvmotion"
    with pytest.raises(DatabaseUnusable) as exc:
        make_engine(url)
    assert "s3cret-pw" not in str(exc.value) + str(exc.value.details) and "kv:***@127.0.0.1" in exc.value.message
    assert "database_url" in exc.value.remedy
    with pytest.raises(SystemExit) as stop:               # kvmotion-server stops with the error and its fix
        controller_main.main(["--db", url, "--pki-dir", str(tmp_path / "pki")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "kvmotion-server: fix:" in err and "s3cret-pw" not in err


# -- what PostgreSQL refuses, handled alike on both ---------------------------------------------------------------
def facts(portgroups: list[PortGroupFact], datastores: list[DatastoreFact]) -> HostFacts:
    return HostFacts(name="h1", agent_version="0", qemu_version="7.2", accelerator="tcg", cpu_model="qemu64",
                     cpu_features=[], cpu_count=2, mem_total_mb=2048, mem_free_mb=1024, mgmt_address="198.18.0.11",
                     mgmt_family="ipv4", migration_interfaces=[], portgroups=portgroups, datastores=datastores)


def test_host_facts_that_do_not_fit_are_left_out_with_a_note_not_cut_or_crashing(db_url: str) -> None:
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as s:
        s.add(Host(name="h1", address="https://198.18.0.11:8770"))
    alias = "docker bridge " + "x" * 200                         # a bridge alias may be 256 characters
    ds = [DatastoreFact(uuid="1" * 36, name="shared", path="/ds/shared", readable=True, shared=True),
          DatastoreFact(uuid="2" * 36, name="n" * 300, path="/ds/odd", readable=True)]
    Inventory(sessions).store_facts("h1", facts([PortGroupFact(name="VM Network", bridge="vmnet"),
                                                 PortGroupFact(name=alias, bridge="docker0")], ds))
    assert query(sessions.kw["bind"], "SELECT name, bridge FROM networks") == [("VM Network", "vmnet")]
    assert query(sessions.kw["bind"], "SELECT uuid FROM datastores") == [("1" * 36,)]
    host = Inventory(sessions).get_host("h1")
    assert host.state == "connected" and "port group 'docker bridge" in host.last_error
    assert "datastore at '/ds/odd' left out: its name is too long" in host.last_error


def test_timestamps_keep_their_microseconds_and_sizes_their_64_bits(db_url: str) -> None:
    """Float columns are double precision on PostgreSQL (a 4-byte REAL would round a timestamp to minutes)."""
    engine = make_engine(db_url)
    now = time.time()
    query(engine, "INSERT INTO revoked_certs (serial, host, revoked_at) VALUES ('ab', 'h1', :t)", t=now)
    query(engine, "INSERT INTO images (name, state, source_format, format, virtual_bytes, file_bytes, sha256, "
                  "copies_json, created_at) VALUES ('big', 'ready', 'raw', 'qcow2', :v, :v, '', '[]', :t)",
          v=(1 << 40) + 1, t=now)
    assert query(engine, "SELECT revoked_at FROM revoked_certs") == [(now,)]
    assert query(engine, "SELECT virtual_bytes, created_at FROM images") == [((1 << 40) + 1, now)]


def test_a_task_is_found_by_a_prefix_of_its_id_in_any_case_with_no_wildcards(db_url: str) -> None:
    sessions = make_sessionmaker(make_engine(db_url))
    j = tasks.TaskJournal.create(sessions, "vmotion", "u1", "vm1", "h1", "h2", {})
    assert tasks.get_task(sessions, j.id[:8].upper()).id == j.id          # LIKE ignores case on SQLite only
    with pytest.raises(Exception, match="not found"):
        tasks.get_task(sessions, "%")                                      # no wildcard: '%' matches nothing


def test_a_nul_in_a_path_is_bad_input_and_audited(tmp_path: Path, db_url: str) -> None:
    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    with TestClient(create_app(ctl)) as client:
        admin = {"Authorization": f"Bearer {(tmp_path / 'admin.token').read_text().strip()}"}
        r = client.post("/api/v1/vms/a%00b/start", headers=admin)
        assert r.status_code == 422 and "NUL" in r.json()["error"]["message"] and r.json()["error"]["remedy"]
        assert client.get("/api/v1/tasks?x=%00", headers=admin).status_code == 422
        audit = client.get("/api/v1/audit", params={"limit": 1}, headers=admin).json()
        assert (audit[0]["path"], audit[0]["status"]) == ("/api/v1/vms/a\\0b/start", 422)


def test_a_value_the_database_refuses_is_a_422_not_a_crash(tmp_path: Path, db_url: str, monkeypatch) -> None:
    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)

    def refused(*_: object) -> None:
        raise DataError("INSERT …", {}, Exception("value too long for type character varying(64)"))
    with TestClient(create_app(ctl)) as client:
        monkeypatch.setattr(ctl.tokens, "list", refused)
        admin = {"Authorization": f"Bearer {(tmp_path / 'admin.token').read_text().strip()}"}
        err = client.get("/api/v1/tokens", headers=admin).json()["error"]
        assert err["code"] == "INVALID_INPUT" and "does not fit the database" in err["message"] and err["remedy"]


def test_two_starts_at_once_migrate_once(db_url: str) -> None:
    """Controllers starting together on one new database: one migrates, the other waits (PostgreSQL: an
    advisory lock) or finds it done; both end at the newest revision and nothing ran twice."""
    applied: list[list[str]] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            applied.append(schema.upgrade(dbengine.create(db_url)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    if dbengine.is_sqlite(db_url):
        pytest.skip("one controller per SQLite file: concurrent starts are a PostgreSQL case")
    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and sorted(applied, key=len) == [[], ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008"]]

"""Storing a host's facts (``hostfacts.store_facts``) writes only what changed: a report that repeats what is stored
writes no datastore link and no port group (only the host's own row: its facts and last_seen), a changed link or
port group is updated in place, a new one inserted, a gone one deleted; the notes and the host's state as before.
Statements are counted with a SQLAlchemy event listener, on SQLite and (``-m db``) PostgreSQL."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from dbtools import query
from kvmotion.controller.db import Host, make_engine, make_sessionmaker
from kvmotion.controller.inventory import Inventory
from kvmotion.models.agent import HostFacts, PortGroupFact
from test_checks_unit import facts as checks_facts


def report(host: str = "h1", **kw: Any) -> HostFacts:
    """Two datastores (``shared`` seen by others too) and two port groups."""
    kw.setdefault("datastores", ("shared", "local"))
    kw.setdefault("groups", ("VM Network", "VLAN 100"))
    return checks_facts(host, **kw)


@pytest.fixture
def inv(db_url: str) -> Inventory:
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as s:
        s.add_all([Host(name="h1", address="https://198.18.0.11:8770"),
                   Host(name="h2", address="https://198.18.0.12:8770")])
    return Inventory(sessions)


def engine(inv: Inventory) -> Engine:
    return inv.sessions.kw["bind"]


@contextmanager
def writes(inv: Inventory) -> Iterator[list[str]]:
    """The writes run meanwhile, as 'VERB table' (an executemany counts once)."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        words = statement.split()
        if words[0] in ("INSERT", "DELETE"):
            seen.append(f"{words[0]} {words[2]}")
        elif words[0] == "UPDATE":
            seen.append(f"UPDATE {words[1]}")
    event.listen(engine(inv), "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine(inv), "before_cursor_execute", record)


def links(inv: Inventory) -> list[tuple[Any, ...]]:
    return query(engine(inv), "SELECT host, datastore, path, accessible, free_mb, total_mb FROM host_datastores "
                              "ORDER BY host, datastore")


def portgroups(inv: Inventory) -> list[tuple[Any, ...]]:
    return query(engine(inv), "SELECT host, name, bridge FROM networks ORDER BY host, name")


def test_the_same_facts_again_write_no_link_nor_port_group(inv: Inventory) -> None:
    inv.store_facts("h1", report())
    before, first_seen = (links(inv), portgroups(inv)), inv.get_host("h1").last_seen
    with writes(inv) as done:
        inv.store_facts("h1", report())
    assert done == ["UPDATE hosts"]                       # its facts and last_seen, nothing else
    assert (links(inv), portgroups(inv)) == before and len(before[0]) == 2 and len(before[1]) == 2
    host = inv.get_host("h1")
    assert host.state == "connected" and host.last_error == "" and host.last_seen >= first_seen


def test_changed_free_space_and_bridge_are_updated_in_place(inv: Inventory) -> None:
    inv.store_facts("h1", report())
    changed = report(free_mb=1234)                               # the host's free memory
    changed.datastores[1].free_mb, changed.datastores[1].total_mb = 777, 9000
    changed.portgroups[1].bridge = "vmnet2"
    with writes(inv) as done:
        inv.store_facts("h1", changed)
    assert sorted(done) == ["UPDATE host_datastores", "UPDATE hosts", "UPDATE networks"]
    assert [r[4:] for r in links(inv)] == [(777, 9000), (0, 0)]     # id-local, then id-shared
    assert portgroups(inv) == [("h1", "VLAN 100", "vmnet2"), ("h1", "VM Network", "vmnet")]
    assert inv.get_host("h1").facts["mem_free_mb"] == 1234        # the facts the API returns: the new ones
    local = next(d for d in inv.datastores() if d["name"] == "local")
    assert (local["free_mb"], local["capacity_mb"]) == (777, 9000)


def test_gone_entries_are_deleted_and_new_ones_inserted(inv: Inventory) -> None:
    inv.store_facts("h1", report())
    with writes(inv) as done:
        inv.store_facts("h1", report(datastores=("shared", "fast"), groups=("VM Network", "VLAN 200")))
    assert sorted(done) == ["DELETE host_datastores", "DELETE networks", "INSERT datastores",
                            "INSERT host_datastores", "INSERT networks", "UPDATE hosts"]
    assert [r[1] for r in links(inv)] == ["id-fast", "id-shared"]
    assert [r[1] for r in portgroups(inv)] == ["VLAN 200", "VM Network"]


def test_a_disconnected_host_is_connected_again_by_the_same_facts(inv: Inventory) -> None:
    inv.store_facts("h1", report())
    inv.mark_disconnected("h1", "agent unreachable")
    with writes(inv) as done:
        inv.store_facts("h1", report())
    host = inv.get_host("h1")
    assert done == ["UPDATE hosts"] and (host.state, host.last_error) == ("connected", "")


def test_a_datastore_is_renamed_by_its_only_host_not_when_others_see_it(inv: Inventory) -> None:
    inv.store_facts("h1", report())
    inv.store_facts("h2", report("h2", datastores=("shared",)))
    renamed = report()
    renamed.datastores[1].name = "local-renamed"               # only h1 sees it: renamed
    renamed.datastores[0].name = "mine"                        # h2 sees it too: not renamed, h1 unlinked
    inv.store_facts("h1", renamed)
    assert sorted((d["name"], tuple(d["hosts"])) for d in inv.datastores()) == [
        ("local-renamed", ("h1",)), ("shared", ("h2",))]
    assert "datastore id-shared is 'shared' (shared) on h2, not 'mine'" in inv.get_host("h1").last_error
    inv.store_facts("h1", report(datastores=("shared", "local-renamed")))    # agreeing again: linked again
    assert [r[:2] for r in links(inv)] == [("h1", "id-local-renamed"), ("h1", "id-shared"), ("h2", "id-shared")]
    assert inv.get_host("h1").last_error == ""


def test_an_entry_reported_twice_is_kept_once_with_a_note(inv: Inventory) -> None:
    twice = report()
    twice.portgroups.append(PortGroupFact(name="VM Network", bridge="other"))
    twice.datastores.append(twice.datastores[0].model_copy(update={"path": "/ds/again"}))
    inv.store_facts("h1", twice)
    inv.store_facts("h1", twice)
    host = inv.get_host("h1")
    assert host.state == "connected" and "port group 'VM Network' reported twice" in host.last_error
    assert "datastore id-shared reported twice: the one at '/ds/again' left out" in host.last_error
    assert ("h1", "VM Network", "vmnet") in portgroups(inv) and len(links(inv)) == 2

"""A host's facts into the inventory's tables: its datastores and port groups (``Inventory.store_facts``).

The agent's report is trusted for this host only: a datastore other hosts see keeps what its first host reported
(a host that disagrees is not linked to it, and its error says why), and an entry whose text does not fit its
column (a bridge alias longer than a port group name may be) is left out with a note, never stored cut short:
PostgreSQL refuses such a row where SQLite would keep it, and one odd bridge must not stop the host's refresh.

Only what changed is written (the monitor stores every host's facts every round, and most rounds change nothing
but free space): the host's links to its datastores (with those datastores) and its port groups are read once,
a row the report repeats is left alone, one that differs is updated in place, and only a new one is inserted or a
gone one deleted. An entry reported twice (the same datastore UUID or port group name) is kept once, with a note."""
from __future__ import annotations

import time
from typing import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.controller.db import Datastore, Host, HostDatastore, Network, too_long
from kvmotion.models.agent import DatastoreFact, HostFacts, PortGroupFact

MAX_ERROR_CHARS = 1000
Linked = tuple[HostDatastore, Datastore]      # one of the host's links, with its datastore


def store_facts(sessions: sessionmaker[Session], name: str, facts: HostFacts) -> None:
    """``facts`` of the host ``name`` (already checked to be that host's), in one transaction: what is stored
    read first, then only the writes that differ (the host's row itself always: its facts and last_seen). The
    host's row is locked first (PostgreSQL; SQLite has one writer anyway): two stores of one host at once (the
    monitor's and a move's refresh) take turns, never both inserting the same new link."""
    with sessions.begin() as s:
        h = s.get(Host, name, with_for_update=True)
        if h is None:
            return
        notes = store_datastores(s, name, facts.datastores) + store_portgroups(s, name, facts.portgroups)
        h.facts_json, h.state, h.last_seen = facts.model_dump_json(), "connected", time.time()
        h.last_error = "; ".join(notes)[:MAX_ERROR_CHARS]


def store_datastores(s: Session, host: str, reported: Sequence[DatastoreFact]) -> list[str]:
    """The host's links made to match ``reported`` (one SELECT of its links and their datastores, then only the
    writes needed); the notes on what was left out."""
    stored: dict[str, Linked] = {
        link.datastore: (link, ds) for link, ds in s.execute(
            select(HostDatastore, Datastore).join(Datastore, Datastore.uuid == HostDatastore.datastore)
            .where(HostDatastore.host == host)).all()}
    notes: list[str] = []
    seen: set[str] = set()
    kept: set[str] = set()
    for d in reported:
        if not d.uuid:
            continue
        if d.uuid in seen:
            notes.append(f"datastore {d.uuid[:64]} reported twice: the one at {d.path[:80]!r} left out")
            continue
        seen.add(d.uuid)
        note = _link_datastore(s, host, d, stored.get(d.uuid))
        if note:
            notes.append(note)
        else:
            kept.add(d.uuid)
    for uuid, (link, _) in stored.items():
        if uuid not in kept:
            s.delete(link)
    return notes


def _link_datastore(s: Session, host: str, d: DatastoreFact, stored: Linked | None) -> str | None:
    """Link the host to the datastore (made at its first host's report), or update its link in place; a note when
    it is not linked (the caller then drops a link it had)."""
    values = {"path": d.path, "accessible": int(d.readable), "free_mb": d.free_mb, "total_mb": d.total_mb}
    wanted = {"name": d.name, "kind": d.kind, "shared": int(d.shared)}
    long = too_long(Datastore(uuid=d.uuid, **wanted)) + too_long(HostDatastore(host=host, datastore=d.uuid,
                                                                               **values))
    if long:
        return f"datastore at {d.path[:80]!r} left out: its {' and '.join(long)} is too long"
    ds = stored[1] if stored is not None else s.get(Datastore, d.uuid)
    if ds is not None and _differ(ds, wanted):
        others = s.scalars(select(HostDatastore.host).where(HostDatastore.datastore == d.uuid,
                                                            HostDatastore.host != host)).all()
        if others:
            return (f"datastore {d.uuid} is {ds.name!r} ({'shared' if ds.shared else 'local'}) on "
                    f"{', '.join(sorted(others))}, not {d.name!r}")
    if ds is None:
        s.add(Datastore(uuid=d.uuid, **wanted))
    else:
        _update(ds, wanted)
    if stored is None:
        s.add(HostDatastore(host=host, datastore=d.uuid, **values))
    else:
        _update(stored[0], values)
    return None


def store_portgroups(s: Session, host: str, reported: Sequence[PortGroupFact]) -> list[str]:
    """The host's port groups made to match ``reported`` (one SELECT, then only the writes needed); the notes on
    what was left out."""
    stored = {n.name: n for n in s.scalars(select(Network).where(Network.host == host)).all()}
    notes: list[str] = []
    kept: set[str] = set()
    for p in reported:
        row = Network(host=host, name=p.name, bridge=p.bridge)
        if (long := too_long(row)):
            notes.append(f"port group {p.name[:40]!r}… left out: its {' and '.join(long)} is too long")
        elif p.name in kept:
            notes.append(f"port group {p.name!r} reported twice: the one on {p.bridge!r} left out")
        elif (old := stored.get(p.name)) is None:
            kept.add(p.name)
            s.add(row)
        else:
            kept.add(p.name)
            _update(old, {"bridge": p.bridge})
    for name, old in stored.items():
        if name not in kept:
            s.delete(old)
    return notes


def _differ(row: object, values: dict[str, object]) -> bool:
    return any(getattr(row, k) != v for k, v in values.items())


def _update(row: object, values: dict[str, object]) -> None:
    """Only the attributes that differ are set (an unchanged row is not written)."""
    for k, v in values.items():
        if getattr(row, k) != v:
            setattr(row, k, v)

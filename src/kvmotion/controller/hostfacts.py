"""A host's facts into the inventory's tables: its datastores and port groups (``Inventory.store_facts``).

The agent's report is trusted for this host only: a datastore other hosts see keeps what its first host reported
(a host that disagrees is not linked to it, and its error says why), and an entry whose text does not fit its
column (a bridge alias longer than a port group name may be) is left out with a note, never stored cut short:
PostgreSQL refuses such a row where SQLite would keep it, and one odd bridge must not stop the host's refresh."""
from __future__ import annotations

import time

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.controller.db import Datastore, Host, HostDatastore, Network, too_long
from kvmotion.models.agent import DatastoreFact, HostFacts

MAX_ERROR_CHARS = 1000


def store_facts(sessions: sessionmaker[Session], name: str, facts: HostFacts) -> None:
    """``facts`` of the host ``name`` (already checked to be that host's), in one transaction."""
    with sessions.begin() as s:
        h = s.get(Host, name)
        if h is None:
            return
        h.facts_json, h.state, h.last_seen = facts.model_dump_json(), "connected", time.time()
        s.execute(delete(HostDatastore).where(HostDatastore.host == name))
        s.execute(delete(Network).where(Network.host == name))
        notes = []
        for d in facts.datastores:
            note = _link_datastore(s, name, d) if d.uuid else None
            if note:
                notes.append(note)
        for p in facts.portgroups:
            row = Network(host=name, name=p.name, bridge=p.bridge)
            if (long := too_long(row)):
                notes.append(f"port group {p.name[:40]!r}… left out: its {' and '.join(long)} is too long")
            else:
                s.add(row)
        h.last_error = "; ".join(notes)[:MAX_ERROR_CHARS]


def _link_datastore(s: Session, host: str, d: DatastoreFact) -> str | None:
    """Link the host to the datastore (made at its first host's report); a note when it is not linked."""
    link = HostDatastore(host=host, datastore=d.uuid, path=d.path, accessible=int(d.readable), free_mb=d.free_mb,
                         total_mb=d.total_mb)
    long = too_long(Datastore(uuid=d.uuid, name=d.name, kind=d.kind)) + too_long(link)
    if long:
        return f"datastore at {d.path[:80]!r} left out: its {' and '.join(long)} is too long"
    ds = s.get(Datastore, d.uuid)
    others = s.scalars(select(HostDatastore.host).where(HostDatastore.datastore == d.uuid)).all()
    if ds is not None and others and (ds.name, ds.kind, ds.shared) != (d.name, d.kind, int(d.shared)):
        return (f"datastore {d.uuid} is {ds.name!r} ({'shared' if ds.shared else 'local'}) on "
                f"{', '.join(sorted(others))}, not {d.name!r}")
    ds = ds or Datastore(uuid=d.uuid, name=d.name)
    ds.name, ds.kind, ds.shared = d.name, d.kind, int(d.shared)
    s.add(ds)
    s.add(link)
    return None

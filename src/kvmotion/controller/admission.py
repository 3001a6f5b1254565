"""Admission control: which queued migrations may start now, and each running one's share of its links.

Pure functions (no I/O): the scheduler in ``service`` feeds them the current state and carries out the result.
Limits (SPEC §3): per host 4 concurrent migrations below 10 GbE and 8 at 10 GbE or more, counted on source and
destination; 128 vMotions per datastore; every migration keeps at least 250 Mbit/s of each link it uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvmotion.checks.context import DATASTORE_LIMIT, MIN_LINK_MBPS, host_slots

PRIORITY_ORDER = {"high": 0, "normal": 1}
STORAGE_PER_HOST = 2          # concurrent Storage vMotions per host (vSphere's limit)
STORAGE_PER_DATASTORE = 8     # concurrent Storage vMotions per datastore


@dataclass(frozen=True)
class Link:
    host: str
    mbps: int

    @property
    def slots(self) -> int:
        return host_slots(self.mbps)


@dataclass(frozen=True)
class Request:
    task_id: str
    source: str
    destination: str
    datastores: frozenset[str]
    priority: str = "normal"
    created_at: float = 0.0
    cap_mbps: int | None = None          # the request's own bandwidth cap, if any
    local: bool = False                  # nothing crosses hosts (Storage vMotion, a cold move on one host)


@dataclass
class Plan:
    start: list[str] = field(default_factory=list)                 # task ids to start now, in order
    waiting: dict[str, str] = field(default_factory=dict)          # task id -> why it waits
    position: dict[str, int] = field(default_factory=dict)         # task id -> 1-based place in the queue


def _on_host(running: list[Request], host: str) -> int:
    return sum(1 for r in running if host in (r.source, r.destination))


def queue_order(queued: list[Request]) -> list[Request]:
    """High priority first, then first come, first served."""
    return sorted(queued, key=lambda r: (PRIORITY_ORDER.get(r.priority, 1), r.created_at, r.task_id))


def _storage_blocker(req: Request, running: list[Request]) -> str | None:
    storage = [r for r in running if r.local]
    n = sum(1 for r in storage if r.source == req.source)
    if n >= STORAGE_PER_HOST:
        return f"{req.source} runs {n} of its {STORAGE_PER_HOST} Storage vMotion slots"
    for ds in sorted(req.datastores):
        n = sum(1 for r in storage if ds in r.datastores)
        if n >= STORAGE_PER_DATASTORE:
            return f"datastore {ds} has {n} of its {STORAGE_PER_DATASTORE} Storage vMotions"
    return None


def _blocker(req: Request, running: list[Request], links: dict[str, Link], ds_limit: int) -> str | None:
    if req.local:        # same host, no network: only the storage limits apply
        return _storage_blocker(req, running)
    running = [r for r in running if not r.local]
    for host in (req.source, req.destination):
        link = links.get(host)
        if link is None:
            return f"host {host} has no known migration link"
        n = _on_host(running, host)
        if n >= link.slots:
            return f"{host} runs {n} of its {link.slots} migration slots"
        if link.mbps / (n + 1) < MIN_LINK_MBPS:
            return f"{host}'s {link.mbps} Mbit/s link cannot give another migration {MIN_LINK_MBPS} Mbit/s"
    for ds in sorted(req.datastores):
        n = sum(1 for r in running if ds in r.datastores)
        if n >= ds_limit:
            return f"datastore {ds} has {n} of its {ds_limit} migrations"
    return None


def plan(queued: list[Request], running: list[Request], links: dict[str, Link],
         ds_limit: int = DATASTORE_LIMIT) -> Plan:
    """Admit in queue order; a request blocked on one host does not hold back requests on other hosts."""
    out = Plan()
    active = list(running)
    for req in queue_order(queued):
        why = _blocker(req, active, links, ds_limit)
        if why is None:
            out.start.append(req.task_id)
            active.append(req)
        else:
            out.waiting[req.task_id] = why
    for i, req in enumerate((r for r in queue_order(queued) if r.task_id in out.waiting), start=1):
        out.position[req.task_id] = i
    return out


def shares_mbps(running: list[Request], links: dict[str, Link]) -> dict[str, int]:
    """Each running migration's bandwidth: an equal share of the narrowest of its two links."""
    out = {}
    running = [r for r in running if not r.local]
    for req in running:
        per_link = []
        for host in (req.source, req.destination):
            link = links.get(host)
            n = _on_host(running, host)
            if link is not None and n:
                per_link.append(link.mbps // n)
        share = min(per_link) if per_link else MIN_LINK_MBPS
        out[req.task_id] = min(share, req.cap_mbps) if req.cap_mbps else share
    return out

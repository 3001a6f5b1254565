"""Prometheus metrics of the controller (``GET /metrics``, a viewer's token; docs/metrics.md): its migrations, its
admission queue, its hosts and VMs, in the text exposition format 0.0.4.

``FleetCollector`` is a prometheus_client custom collector: nothing is counted at import or between scrapes, each
scrape builds its metric families from the database, in the worker thread the route renders in (every query under
the engine's deadlines, ``dbengine``). It stays cheap at fleet scale:

- what finished migrations did (counters, histograms) is an in-memory aggregate, ``FinishedMoves``, that reads each
  finished task once, in pages of ``PAGE`` rows in the order of the index on tasks (finished_at, id), one statement
  a page. After a start it reads every finished migration, at most ``MAX_PAGES`` pages per scrape, and the page
  leaves the migration families out until the whole journal is read (never a partial count); then each scrape
  reads those finished since. A restart rebuilds it from the task journal, so no counter falls back to zero. A
  task whose finishing transaction committed after a later one's is still read: each scrape looks ``OVERLAP_S``
  back, leaving out (in SQL) the ids it read there already.
- what is now (the queue, hosts, VMs) is counted by three queries per scrape (GROUP BY or one row per host).

prometheus_client writes the format (label values escaped, histogram buckets cumulative and closed by +Inf): fewer
lines, and fewer ways to get it wrong, than writing it by hand.
"""
from __future__ import annotations

import json
import math
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from kvmotion import __version__
from kvmotion.controller.db import VM, Host, Task
from kvmotion.controller.tasks import MIGRATION_KINDS, TERMINAL_STATES
from kvmotion.migration.kinds import KINDS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"      # the text exposition format 0.0.4
PAGE = 500                      # finished tasks read per statement
OVERLAP_S = 60.0                # each read looks this far behind the newest finish it saw (late commits; a clock
                                # stepped back further loses the moves finished meanwhile until the next start)
MAX_PAGES = 50                  # pages read per scrape at most (the first scrapes after a start: see the module)
MAX_EXCLUDED = 5000             # ids left out in SQL at most (more: skipped as they are read)
UNFINISHED_STATES = ("queued", "running", "unknown")
HOST_STATES = ("connected", "disconnected")
DURATION_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
PAUSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)
WAIT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
MEMORY_KINDS = tuple(str(k) for k, v in KINDS.items() if v.moves_memory)
FILE_KINDS = tuple(str(k) for k, v in KINDS.items() if v.moves_files is not False)


@dataclass(frozen=True)
class HistogramSpec:
    name: str
    help: str
    buckets: tuple[float, ...]
    kinds: tuple[str, ...]          # the kinds that have the figure (a series each, from the start)


DURATION = HistogramSpec("kvmotion_migration_duration_seconds", "Duration of successful migrations, start to end "
                         "(the task's total_time_s)", DURATION_BUCKETS, MIGRATION_KINDS)
DOWNTIME = HistogramSpec("kvmotion_migration_downtime_seconds", "Downtime of successful live migrations as QEMU "
                         "reports it (the task's downtime_ms)", PAUSE_BUCKETS, MEMORY_KINDS)
GUEST_PAUSE = HistogramSpec("kvmotion_migration_guest_pause_seconds", "Guest pause of successful live migrations, "
                            "source stopped to destination running (the task's guest_pause_ms): the part of a "
                            "client's gap the controller observes", PAUSE_BUCKETS, MEMORY_KINDS)
ADMISSION_WAIT = HistogramSpec("kvmotion_admission_wait_seconds", "Time finished migrations waited in the admission "
                               "queue, queued to started (never-started ones are left out)", WAIT_BUCKETS,
                               MIGRATION_KINDS)
HISTOGRAMS = (DURATION, DOWNTIME, GUEST_PAUSE, ADMISSION_WAIT)


@dataclass
class Histogram:
    """Counts per bucket (not cumulative; the last is +Inf) and the sum of what was observed."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1        # le: the first bound >= value
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts):
            running += n
            out.append((bound, float(running)))
        return out


def number(value: Any) -> float | None:
    """A finite, non-negative number from a task's result, else None (missing, null, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def moved_bytes(result: dict[str, Any]) -> dict[str, float]:
    """Bytes a move sent, by what: memory (live kinds' ``bytes_sent``), disk (a shared-nothing move's ``disks``, a
    Storage vMotion's ``mirror``, a cold move's ``copy``)."""
    out = {}
    if (memory := number(result.get("bytes_sent"))) is not None:
        out["memory"] = memory
    disk = [number(part.get("bytes")) for key in ("disks", "mirror", "copy")
            if isinstance(part := result.get(key), dict)]
    if any(d is not None for d in disk):
        out["disk"] = sum(d for d in disk if d is not None)
    return out


def seconds(result: dict[str, Any]) -> dict[HistogramSpec, float]:
    """The figures of a successful move's result, in seconds, by the histogram they go to."""
    found = {DURATION: number(result.get("total_time_s"))}
    for spec, key in ((DOWNTIME, "downtime_ms"), (GUEST_PAUSE, "guest_pause_ms")):
        ms = number(result.get(key))
        found[spec] = ms / 1000.0 if ms is not None else None
    return {spec: value for spec, value in found.items() if value is not None}


def _result(text: str | None) -> dict[str, Any]:
    try:
        out = json.loads(text or "{}")
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


class FinishedMoves:
    """What finished migrations did, read from the task journal once each (see the module)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.results: Counter[tuple[str, str]] = Counter()        # (kind, success|error) -> tasks
        self.bytes: Counter[tuple[str, str]] = Counter()          # (kind, memory|disk) -> bytes
        self.histograms: dict[tuple[str, str], Histogram] = {}    # (histogram name, kind) -> histogram
        self.mark: float | None = None          # the newest finished_at read so far; None: nothing read yet
        self.recent: dict[str, float] = {}      # the ids read within OVERLAP_S of the mark -> their finished_at
        self.complete = False                   # the whole journal has been read once (the counters are whole)

    def update(self, sessions: sessionmaker[Session]) -> None:
        """Read the migrations finished since the last update: at most ``MAX_PAGES`` pages, so a scrape's work is
        bounded; the first reads after a start go on over as many scrapes as the journal needs (``complete``)."""
        with self.lock:
            after = None if self.mark is None else (self.mark - OVERLAP_S, "")
            known = list(self.recent) if len(self.recent) <= MAX_EXCLUDED else []
            for _ in range(MAX_PAGES):
                rows = _finished_page(sessions, after, known)
                self._take(rows)
                if len(rows) < PAGE:
                    self.complete = True
                    break
                after = (rows[-1].finished_at, rows[-1].id)
            if self.mark is not None:
                self.recent = {i: at for i, at in self.recent.items() if at >= self.mark - OVERLAP_S}

    def _take(self, rows: list[Any]) -> None:
        for row in rows:
            if row.kind in MIGRATION_KINDS and row.state in TERMINAL_STATES and row.id not in self.recent:
                self._add(row.kind, row.state, row.created_at, row.started_at, _result(row.result_json))
                self.recent[row.id] = row.finished_at
            self.mark = row.finished_at if self.mark is None else max(self.mark, row.finished_at)

    def _add(self, kind: str, state: str, created_at: float, started_at: float, result: dict[str, Any]) -> None:
        self.results[(kind, state)] += 1
        for what, n in moved_bytes(result).items():
            self.bytes[(kind, what)] += n
        if started_at > 0:
            self.histogram(ADMISSION_WAIT, kind).observe(max(0.0, started_at - created_at))
        if state == "success":
            for spec, value in seconds(result).items():
                self.histogram(spec, kind).observe(value)

    def histogram(self, spec: HistogramSpec, kind: str) -> Histogram:
        return self.histograms.setdefault((spec.name, kind), Histogram(spec.buckets))


def _finished_page(sessions: sessionmaker[Session], after: tuple[float, str] | None, known: list[str]) -> list[Any]:
    """Up to PAGE finished migrations after ``(finished_at, id)`` (None: from the first), in that order, but for
    the ``known`` ids: a range of the index on (finished_at, id), read in its order. A finished task has a
    finished_at; the caller checks kind and state: a condition on them here would let a database without
    statistics (SQLite, a PostgreSQL table not yet analysed) scan and sort every finished task for each page."""
    q = (select(Task.id, Task.kind, Task.state, Task.created_at, Task.started_at, Task.finished_at, Task.result_json)
         .where(Task.finished_at > 0))
    if known:
        q = q.where(Task.id.not_in(known))
    if after is not None:
        at, task_id = after
        q = q.where(tuple_(Task.finished_at, Task.id) > tuple_(at, task_id))     # a range of the index
    with sessions() as s:
        return list(s.execute(q.order_by(Task.finished_at, Task.id).limit(PAGE)).all())


@dataclass(frozen=True)
class Fleet:
    """What is now: unfinished migrations by state (count, oldest created_at), hosts, VMs by power state."""

    tasks: dict[str, tuple[int, float]]
    hosts: list[tuple[str, str, float]]         # (name, state, last_seen)
    vms: dict[str, int]


def read_fleet(sessions: sessionmaker[Session]) -> Fleet:
    with sessions() as s:
        tasks = s.execute(select(Task.state, func.count(), func.min(Task.created_at))
                          .where(Task.kind.in_(MIGRATION_KINDS), Task.state.in_(UNFINISHED_STATES))
                          .group_by(Task.state)).all()
        hosts = s.execute(select(Host.name, Host.state, Host.last_seen).order_by(Host.name)).all()
        vms = s.execute(select(VM.power_state, func.count()).group_by(VM.power_state)).all()
    return Fleet(tasks={state: (n, oldest) for state, n, oldest in tasks},
                 hosts=[(name, state, last_seen) for name, state, last_seen in hosts],
                 vms={state: n for state, n in vms})


class FleetCollector:
    """The prometheus_client collector of one controller: its session factory injected, a clock for the ages."""

    def __init__(self, sessions: sessionmaker[Session], clock: Callable[[], float] = time.time,
                 leading: Callable[[], bool] = lambda: True, drs: Callable[[], dict[str, Any]] = dict) -> None:
        self.sessions = sessions
        self.clock = clock
        self.leading = leading
        self.drs = drs                      # cluster → its last DRS status (models.drs.DrsStatus), in memory
        self.finished = FinishedMoves()

    def collect(self) -> Iterator[Metric]:
        self.finished.update(self.sessions)
        fleet = read_fleet(self.sessions)
        yield InfoMetricFamily("kvmotion_build", "The controller's version", value={"version": __version__})
        yield GaugeMetricFamily("kvmotion_controller_leader", "1 while this controller leads the controllers of its "
                                "database (schedules, monitors, reconciles), 0 while it follows",
                                value=1.0 if self.leading() else 0.0)
        with self.finished.lock:           # a snapshot: a scrape at the same time waits for it
            finished = list(self._finished_families()) if self.finished.complete else []
        yield from finished
        yield from self._queue_families(fleet)
        yield from self._inventory_families(fleet)
        yield from self._drs_families()

    def _drs_families(self) -> Iterable[Metric]:
        """Each cluster's DRS as its last round (or the last look at it) found it."""
        imbalance = GaugeMetricFamily("kvmotion_drs_imbalance", "Standard deviation of the in-service hosts' "
                                      "loads (CPU or memory, the larger, as a fraction of capacity)", labels=["cluster"])
        target = GaugeMetricFamily("kvmotion_drs_target_imbalance", "The imbalance DRS tolerates at the cluster's "
                                   "threshold (clusters at threshold 1, rules only, are left out)", labels=["cluster"])
        recs = GaugeMetricFamily("kvmotion_drs_recommendations", "Moves DRS recommends now", labels=["cluster"])
        faults = GaugeMetricFamily("kvmotion_drs_rule_faults", "Rules DRS cannot meet", labels=["cluster", "must"])
        for cluster, status in sorted(self.drs().items()):
            imbalance.add_metric([cluster], status.imbalance)
            if status.target is not None:
                target.add_metric([cluster], status.target)
            recs.add_metric([cluster], len(status.recommendations))
            for must in (True, False):
                faults.add_metric([cluster, str(must).lower()], sum(1 for f in status.faults if f.must == must))
        yield from (imbalance, target, recs, faults)

    def _finished_families(self) -> Iterable[Metric]:
        done = self.finished
        results = CounterMetricFamily("kvmotion_migrations", "Finished migrations by kind and result",
                                      labels=["kind", "result"])
        for kind in MIGRATION_KINDS:
            for state in TERMINAL_STATES:
                results.add_metric([kind, state], done.results[(kind, state)])
        yield results
        moved = CounterMetricFamily("kvmotion_migration_bytes", "Bytes finished migrations sent (also failed "
                                    "ones), by what: memory or disk", labels=["kind", "what"])
        for kind, what in sorted({*((k, "memory") for k in MEMORY_KINDS), *((k, "disk") for k in FILE_KINDS),
                                  *done.bytes}):
            moved.add_metric([kind, what], done.bytes[(kind, what)])
        yield moved
        for spec in HISTOGRAMS:
            family = HistogramMetricFamily(spec.name, spec.help, labels=["kind"])
            for kind in spec.kinds:
                h = done.histograms.get((spec.name, kind)) or Histogram(spec.buckets)
                family.add_metric([kind], h.buckets(), h.total)
            yield family

    def _queue_families(self, fleet: Fleet) -> Iterable[Metric]:
        tasks = GaugeMetricFamily("kvmotion_migration_tasks", "Unfinished migrations by state: queued (waiting "
                                  "for admission), running, unknown (a host did not answer)", labels=["state"])
        for state in UNFINISHED_STATES:
            tasks.add_metric([state], fleet.tasks.get(state, (0, 0.0))[0])
        yield tasks
        n, oldest = fleet.tasks.get("queued", (0, 0.0))
        yield GaugeMetricFamily("kvmotion_admission_queue_oldest_seconds", "How long the oldest queued migration "
                                "has waited for admission (0: none waits)",
                                value=max(0.0, self.clock() - oldest) if n else 0.0)

    def _inventory_families(self, fleet: Fleet) -> Iterable[Metric]:
        now = self.clock()
        by_state = Counter(state for _, state, _ in fleet.hosts)
        hosts = GaugeMetricFamily("kvmotion_hosts", "Hosts by agent state", labels=["state"])
        for state in sorted({*HOST_STATES, *by_state}):
            hosts.add_metric([state], by_state[state])
        yield hosts
        up = GaugeMetricFamily("kvmotion_host_up", "1 while the host's agent answers (state connected), else 0",
                               labels=["host"])
        age = GaugeMetricFamily("kvmotion_host_facts_age_seconds", "Seconds since the host's facts were last "
                                "stored, its last good contact (hosts never heard from are left out)",
                                labels=["host"])
        for name, state, last_seen in fleet.hosts:
            up.add_metric([name], 1.0 if state == "connected" else 0.0)
            if last_seen > 0:
                age.add_metric([name], max(0.0, now - last_seen))
        yield up
        yield age
        vms = GaugeMetricFamily("kvmotion_vms", "VMs by power state", labels=["power_state"])
        for state in sorted({"poweredOn", "poweredOff", *fleet.vms}):
            vms.add_metric([state], fleet.vms.get(state, 0))
        yield vms


class Exposition:
    """The metrics page of one controller: its collector in a registry of its own (never the global one)."""

    def __init__(self, sessions: sessionmaker[Session], clock: Callable[[], float] = time.time,
                 leading: Callable[[], bool] = lambda: True, drs: Callable[[], dict[str, Any]] = dict) -> None:
        self.collector = FleetCollector(sessions, clock, leading, drs)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def render(self) -> bytes:
        """The page in the text format 0.0.4; blocking (database reads): call it in a worker thread."""
        return generate_latest(self.registry)

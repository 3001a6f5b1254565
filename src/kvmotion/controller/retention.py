"""Task retention: the journal is bounded. A finished task (success or error) is deleted once it finished more than
``task_retention_days`` ago, and the oldest finished tasks beyond ``task_retention_max`` are deleted too, in batches
of at most ``batch`` rows (one short transaction each, oldest first: the tasks (finished_at, id) index, Alembic
0004), a few batches per pass, a pass at most every ``every_s`` from the controller's periodic work.

Never deleted: an unfinished task (queued, running, unknown, …), and any task of an unfinished maintenance task's
evacuation (a move it submitted, which its journal follows until the evacuation ends): its recorded children and
every move off its host since it began, finished or not.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, and_, delete, false, func, not_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.controller.db import Task
from kvmotion.controller.tasks import TERMINAL_STATES

log = logging.getLogger(__name__)

DEFAULT_DAYS = 30
DEFAULT_MAX = 100_000
BATCH = 500                  # rows per transaction
BATCHES_PER_PASS = 4         # a pass deletes at most 2,000 rows; the backlog of an old journal goes over passes
EVERY_S = 60.0
DAY_S = 86400.0


def child_ids(live_json: str, phases_json: str) -> set[str]:
    """The task ids a maintenance task's journal names: its live children and its plan's and results' moves."""
    ids: set[str] = set()
    live = json.loads(live_json or "{}")
    for child in (live.get("children") or {}).values() if isinstance(live, dict) else ():
        if isinstance(child, dict) and isinstance(child.get("task"), str):
            ids.add(child["task"])
    for phase in json.loads(phases_json or "[]"):
        detail = (phase.get("detail") or {}) if isinstance(phase, dict) else {}
        ids |= {t for t in (detail.get("migrations") or {}).values() if isinstance(t, str)}
        ids |= {r["task"] for r in (detail.get("results") or {}).values()
                if isinstance(r, dict) and isinstance(r.get("task"), str)}
    return ids


def doomed(rows: list[tuple[str, float]], over_cap: int, cutoff: float) -> list[str]:
    """Which of the oldest finished tasks (``rows``: id and finished_at, oldest first, none protected) go: the
    first ``over_cap`` (beyond the cap) and every one that finished before ``cutoff``. Pure: the decision."""
    return [tid for i, (tid, finished_at) in enumerate(rows) if i < over_cap or finished_at < cutoff]


def _kept(s: Session) -> ColumnElement[bool]:
    """What must stay whatever its age: the tasks of every unfinished maintenance task's evacuation."""
    rows = s.execute(select(Task.id, Task.source, Task.created_at, Task.progress_json, Task.phases_json)
                     .where(Task.kind == "maintenance", Task.state.not_in(TERMINAL_STATES))).all()
    keep: list[ColumnElement[bool]] = [and_(Task.source == r.source, Task.created_at >= r.created_at) for r in rows]
    ids = set().union(*(child_ids(r.progress_json, r.phases_json) for r in rows)) if rows else set()
    if ids:
        keep.append(Task.id.in_(sorted(ids)))
    return or_(*keep) if keep else false()


def prune_batch(sessions: sessionmaker[Session], now: float, days: float, max_finished: int,
                batch: int = BATCH) -> int:
    """One transaction: at most ``batch`` finished tasks deleted (too old, or beyond the cap); how many were."""
    finished = and_(Task.state.in_(TERMINAL_STATES), Task.finished_at > 0)
    with sessions.begin() as s:
        total = s.scalar(select(func.count()).select_from(Task).where(finished)) or 0
        candidates = s.execute(select(Task.id, Task.finished_at).where(finished, not_(_kept(s)))
                               .order_by(Task.finished_at, Task.id).limit(batch)).all()
        ids = doomed([(r.id, r.finished_at) for r in candidates], total - max_finished, now - days * DAY_S)
        if ids:
            s.execute(delete(Task).where(Task.id.in_(ids), Task.state.in_(TERMINAL_STATES)))
    return len(ids)


@dataclass
class TaskRetention:
    """The controller's pruning of its journal (``tick`` from its periodic work; settings from controller.toml)."""

    sessions: sessionmaker[Session]
    days: float = DEFAULT_DAYS
    max_finished: int = DEFAULT_MAX
    batch: int = BATCH
    every_s: float = EVERY_S
    last: float = field(default=float("-inf"))      # monotonic time of the last pass
    deleted: int = 0                                # since the controller started

    def prune(self, now: float | None = None) -> int:
        """One pass: batches until one comes short or ``BATCHES_PER_PASS`` ran; how many tasks were deleted."""
        gone = 0
        for _ in range(BATCHES_PER_PASS):
            n = prune_batch(self.sessions, time.time() if now is None else now, self.days, self.max_finished,
                            self.batch)
            gone += n
            if n < self.batch:
                break
        self.deleted += gone
        return gone

    async def tick(self) -> int:
        """A pass (in a thread) when ``every_s`` has passed since the last; never raises: pruning is housework."""
        if time.monotonic() - self.last < self.every_s:
            return 0
        self.last = time.monotonic()
        try:
            gone = await asyncio.to_thread(self.prune)
        except Exception:  # noqa: BLE001 - the monitor goes on; the next pass tries again
            log.exception("pruning finished tasks failed")
            return 0
        if gone:
            log.info("task retention: %d finished tasks deleted (older than %g days or beyond %d)", gone, self.days,
                     self.max_finished)
        return gone

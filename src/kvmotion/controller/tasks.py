"""Task journal: every phase is persisted, with its timestamp, before the step runs."""
from __future__ import annotations

import json
import time
import uuid as uuidlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common.errors import NotFoundError
from kvmotion.migration.predict import Achieved, achieved_from
from kvmotion.controller.db import Task
from kvmotion.controller.taskfeed import feed_for
from kvmotion.models.api import PhaseRecord, TaskOut
from kvmotion.models.moves import LIVE_KINDS, MoveKind

TERMINAL_STATES = ("success", "error")


def to_out(t: Task) -> TaskOut:
    return TaskOut(id=t.id, kind=t.kind, vm_uuid=t.vm_uuid, vm_name=t.vm_name, source=t.source,
                   destination=t.destination, state=t.state, phase=t.phase, progress=t.progress,
                   phases=[PhaseRecord.model_validate(p) for p in json.loads(t.phases_json)],
                   live=json.loads(t.progress_json), options=json.loads(t.options_json),
                   result=json.loads(t.result_json), error=json.loads(t.error_json) if t.error_json else None,
                   created_at=t.created_at, updated_at=t.updated_at, started_at=t.started_at,
                   finished_at=t.finished_at)


class TaskJournal:
    """Writes one task's record. Each method is one short transaction."""

    def __init__(self, sessions: sessionmaker[Session], task_id: str) -> None:
        self.sessions = sessions
        self.id = task_id

    @staticmethod
    def create(sessions: sessionmaker[Session], kind: str, vm_uuid: str, vm_name: str, source: str,
               destination: str, options: dict[str, Any], state: str = "running") -> "TaskJournal":
        now = time.time()
        task = Task(id=str(uuidlib.uuid4()), kind=kind, vm_uuid=vm_uuid, vm_name=vm_name, source=source,
                    destination=destination, state=state, phase="", options_json=json.dumps(options),
                    created_at=now, updated_at=now, started_at=now if state == "running" else 0.0)
        with sessions.begin() as s:
            s.add(task)
        feed_for(sessions).changed(task.id)
        return TaskJournal(sessions, task.id)

    def _edit(self, fn: Any) -> None:
        with self.sessions.begin() as s:
            task = s.get(Task, self.id)
            if task is None:
                raise NotFoundError(f"task {self.id} vanished", remedy="internal error")
            fn(task)
            task.updated_at = time.time()
        feed_for(self.sessions).changed(self.id)        # after the commit: a stream reads what was written

    def read(self) -> TaskOut:
        with self.sessions() as s:
            task = s.get(Task, self.id)
            if task is None:
                raise NotFoundError(f"task {self.id} not found", remedy="check `kvmotion task list`")
            return to_out(task)

    def begin_phase(self, name: str, progress: float, started_at: float | None = None,
                    detail: dict[str, Any] | None = None) -> None:
        def fn(task: Task) -> None:
            phases = json.loads(task.phases_json)
            phases.append(PhaseRecord(name=name, status="running", started_at=started_at or time.time(),
                                      detail=detail or {}).model_dump())
            task.phases_json = json.dumps(phases)
            task.phase = name
            task.progress = max(task.progress, progress)
        self._edit(fn)

    def end_phase(self, status: str = "ok", detail: dict[str, Any] | None = None,
                  ended_at: float | None = None) -> None:
        def fn(task: Task) -> None:
            phases = json.loads(task.phases_json)
            if phases and phases[-1]["status"] == "running":
                phases[-1]["status"] = status
                phases[-1]["ended_at"] = ended_at or time.time()
                phases[-1]["detail"].update(detail or {})
            task.phases_json = json.dumps(phases)
        self._edit(fn)

    def set_state(self, state: str) -> None:
        def fn(task: Task) -> None:
            task.state = state
            if state == "running" and not task.started_at:
                task.started_at = time.time()
        self._edit(fn)

    def mark_unknown(self, why: dict[str, Any]) -> None:
        """Reconciliation could not tell where the VM runs: nothing destructive until it can (or an operator
        decides). The task stays unfinished, so the VM cannot be moved meanwhile."""
        def fn(task: Task) -> None:
            before = (json.loads(task.progress_json or "{}") or {}).get("unknown") or {}
            task.state = "unknown"
            kept = {"error": before["error"]} if "error" in before and "error" not in why else {}
            task.progress_json = json.dumps({"unknown": why | kept})   # the engine's error survives re-checks
        self._edit(fn)

    def live(self, data: dict[str, Any], progress: float | None = None) -> None:
        def fn(task: Task) -> None:
            task.progress_json = json.dumps(data)
            if progress is not None:
                task.progress = max(task.progress, progress)
        self._edit(fn)

    def finish(self, state: str, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> None:
        def fn(task: Task) -> None:
            task.state = state
            task.finished_at = time.time()
            if state == "success":
                task.progress = 100.0
            task.result_json = json.dumps(result or {})
            task.error_json = json.dumps(error) if error else ""
        self._edit(fn)


def list_tasks(sessions: sessionmaker[Session], limit: int = 50) -> list[TaskOut]:
    with sessions() as s:
        rows = s.scalars(select(Task).order_by(Task.created_at.desc()).limit(limit)).all()
        return [to_out(t) for t in rows]


MIGRATION_KINDS = tuple(str(k) for k in MoveKind)


def achieved(sessions: sessionmaker[Session], hosts: tuple[str, str], encryption: str | None,
             limit: int = 200) -> list[Achieved]:
    """What recent successful live migrations between two hosts (either way) achieved, newest first."""
    with sessions() as s:
        rows = s.scalars(select(Task).where(Task.kind.in_([str(k) for k in LIVE_KINDS]), Task.state == "success",
                                            Task.source.in_(hosts), Task.destination.in_(hosts))
                         .order_by(Task.finished_at.desc()).limit(limit)).all()
        out = []
        for t in rows:
            r = json.loads(t.result_json or "{}")
            if encryption is not None and (r.get("encryption") or {}).get("mode") != encryption:
                continue
            a = achieved_from(r, t.vm_uuid)   # None: nothing to learn (no figures, or not kvmotion's own tuning)
            if a is not None:
                out.append(a)
        return out


def unfinished(sessions: sessionmaker[Session], state: str | None = None,
               kind: str | tuple[str, ...] | None = MIGRATION_KINDS) -> list[TaskOut]:
    """Unfinished tasks, oldest first; by default every kind of migration."""
    with sessions() as s:
        q = select(Task).where(Task.state.not_in(TERMINAL_STATES))
        if kind is not None:
            q = q.where(Task.kind.in_((kind,) if isinstance(kind, str) else kind))
        if state is not None:
            q = q.where(Task.state == state)
        return [to_out(t) for t in s.scalars(q.order_by(Task.created_at)).all()]


def get_task(sessions: sessionmaker[Session], task_id: str) -> TaskOut:
    with sessions() as s:
        task = s.get(Task, task_id)
        if task is None:
            # ids are lowercase UUIDs; LIKE ignores case on SQLite only, and '_' or '%' typed are no wildcards
            candidates = s.scalars(select(Task).where(Task.id.startswith(task_id.lower(), autoescape=True))).all()
            if len(candidates) == 1:
                return to_out(candidates[0])
            raise NotFoundError(f"task {task_id!r} not found", remedy="check `kvmotion task list` for task ids")
        return to_out(task)

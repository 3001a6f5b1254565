"""Events (``GET /events``): what happened, derived from the task journal — a task queued, started, each phase,
and how it ended (with its error's remedy). Pure: tasks in, events out, newest first."""
from __future__ import annotations

from kvmotion.models.api import EventOut, TaskOut
from kvmotion.models.moves import TaskKind

FAILED_PHASE = frozenset({"failed", "error"})


def subject_of(t: TaskOut) -> str:
    if t.kind == TaskKind.MAINTENANCE:
        return f"host:{t.source}"
    if t.kind == TaskKind.IMAGE_IMPORT:
        return f"image:{t.vm_name}"
    return f"vm:{t.vm_name}"


def _route(t: TaskOut) -> str:
    return f"{t.source} → {t.destination}" if t.destination and t.destination != t.source else t.source


def task_events(t: TaskOut) -> list[EventOut]:
    subject, what = subject_of(t), f"{t.kind} of {t.vm_name} ({_route(t)})"
    out = [EventOut(at=t.created_at, level="info", kind="task.queued", subject=subject, message=f"{what} queued",
                    task_id=t.id)]
    if t.started_at:
        out.append(EventOut(at=t.started_at, level="info", kind="task.started", subject=subject,
                            message=f"{what} started", task_id=t.id))
    for p in t.phases:
        level = "error" if p.status in FAILED_PHASE else "info"
        out.append(EventOut(at=p.started_at, level=level, kind="task.phase", subject=subject, task_id=t.id,
                            message=f"{what}: phase {p.name} {'started' if p.status == 'running' else p.status}"))
    if t.state == "unknown":
        out.append(EventOut(at=t.updated_at, level="warning", kind="task.unknown", subject=subject, task_id=t.id,
                            message=f"{what}: where the VM runs is unknown until its hosts answer",
                            remedy="reconciliation retries; `kvmotion task show` names what it waits for"))
    elif t.finished_at and t.state == "success":
        out.append(EventOut(at=t.finished_at, level="info", kind="task.succeeded", subject=subject, task_id=t.id,
                            message=f"{what} succeeded"))
    elif t.finished_at:
        err = t.error or {}
        out.append(EventOut(at=t.finished_at, level="error", kind="task.failed", subject=subject, task_id=t.id,
                            message=f"{what} failed: {err.get('message', t.state)}", remedy=err.get("remedy", "")))
    return out


def events_of(tasks: list[TaskOut], limit: int) -> list[EventOut]:
    events = [e for t in tasks for e in task_events(t)]
    order = sorted(range(len(events)), key=lambda i: (events[i].at, i), reverse=True)  # same time: later first
    return [events[i] for i in order[:limit]]

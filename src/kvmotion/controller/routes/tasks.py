"""Tasks: the journal of moves and evacuations; cancel and force-complete."""
from __future__ import annotations

from fastapi import APIRouter, Query

from kvmotion.controller import tasks as task_store
from kvmotion.controller.auth import Role
from kvmotion.controller.routes.deps import Ctl, role
from kvmotion.models.api import TaskOut

router = APIRouter()


@router.get("/tasks", dependencies=role(Role.VIEWER))
def task_list(ctl: Ctl, limit: int = Query(default=50, ge=1, le=500)) -> list[TaskOut]:
    """A plain function: FastAPI runs it, and checks its answer, in a thread (off the event loop)."""
    return task_store.list_tasks(ctl.sessions, limit)


@router.get("/tasks/{task_id}", dependencies=role(Role.VIEWER))
async def task_show(task_id: str, ctl: Ctl) -> TaskOut:
    return task_store.get_task(ctl.sessions, task_id)


@router.post("/tasks/{task_id}/cancel", dependencies=role(Role.OPERATOR))
async def task_cancel(task_id: str, ctl: Ctl) -> TaskOut:
    return await ctl.cancel_any(task_id)


@router.post("/tasks/{task_id}/force-complete", dependencies=role(Role.OPERATOR))
async def task_force_complete(task_id: str, ctl: Ctl) -> TaskOut:
    """Switch a live migration over now: its downtime limit is raised to cover what remains."""
    return ctl.scheduler.force_complete(task_id)

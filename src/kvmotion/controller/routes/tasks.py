"""Tasks: the journal of moves and evacuations, live as server-sent events; cancel and force-complete."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from kvmotion.controller import listing, taskstream, tasks as task_store
from kvmotion.controller.events import events_of
from kvmotion.controller.taskfeed import feed_for
from kvmotion.controller.auth import Role
from kvmotion.controller.routes.deps import Ctl, next_page_header, paged, role
from kvmotion.models.api import EventOut, TaskOut, TaskSummary

router = APIRouter()


@router.get("/tasks", dependencies=role(Role.VIEWER), response_class=Response,
            responses={200: {"model": list[TaskOut] | list[TaskSummary], "headers": next_page_header("tasks")}})
def task_list(ctl: Ctl, request: Request,
              limit: int = Query(default=listing.TASK_DEFAULT_LIMIT, ge=1, le=listing.TASK_MAX_LIMIT,
                                 description="tasks per page"),
              cursor: str | None = Query(default=None, max_length=listing.MAX_CURSOR_CHARS,
                                         description="the previous page's X-Next-Cursor; none: the newest tasks"),
              view: listing.View = Query(default="full", description="summary: without phases, live figures, "
                                         "options, result and error (GET /tasks/{id})")) -> Response:
    """Tasks newest first, a page at a time (``X-Next-Cursor``: the next, older, page's cursor). A plain function:
    FastAPI runs it in a thread (off the event loop)."""
    page = listing.task_page(ctl.sessions, limit, cursor, view)
    return paged(page, listing.TASKS_FULL if view == "full" else listing.TASKS_SUMMARY, request)


@router.get("/events", dependencies=role(Role.VIEWER))
def events(ctl: Ctl, limit: int = Query(default=200, ge=1, le=2000)) -> list[EventOut]:
    """What happened, newest first: each recent task queued, started, its phases, and how it ended."""
    return events_of(task_store.list_tasks(ctl.sessions, min(500, limit)), limit)


STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


@router.get("/tasks/stream", dependencies=role(Role.VIEWER), response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "event: task, per change"}})
async def task_stream_all(request: Request, ctl: Ctl) -> StreamingResponse:
    """Every task that changes from now on (``event: task``, the task as ``GET /tasks/{id}``)."""
    return StreamingResponse(taskstream.every(ctl.sessions, feed_for(ctl.sessions), request.is_disconnected),
                             media_type="text/event-stream", headers=STREAM_HEADERS)


@router.get("/tasks/{task_id}/stream", dependencies=role(Role.VIEWER), response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "event: task, then end"}})
async def task_stream(task_id: str, request: Request, ctl: Ctl) -> StreamingResponse:
    """One task now and after each change (``event: task``), then ``event: end`` once it has finished."""
    task = task_store.get_task(ctl.sessions, task_id)          # 404 before the stream starts
    return StreamingResponse(taskstream.one(ctl.sessions, feed_for(ctl.sessions), task.id, request.is_disconnected),
                             media_type="text/event-stream", headers=STREAM_HEADERS)


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

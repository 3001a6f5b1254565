"""Server-sent events of tasks (the web client's live pages): a task is sent when it changed, and only then.

``one``: the task now, then after each change, then ``event: end`` once it finished. ``every``: each task that
changes. Both also send a comment line every ``taskfeed.IDLE_S`` without news (keeps proxies from closing the
connection, and notices a browser that left), and stop after ``MAX_S`` (the browser's EventSource reconnects).
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.controller.db import Task
from kvmotion.controller.taskfeed import IDLE_S, TaskFeed
from kvmotion.controller.tasks import TERMINAL_STATES, get_task, to_out
from kvmotion.models.api import TaskOut

MAX_S = 3600.0
BATCH = 50          # tasks read in one round of ``every``
READ_DEADLINE_S = 10.0
Gone = Callable[[], Awaitable[bool]]      # the client went away


def sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


T = TypeVar("T")


async def _read(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), READ_DEADLINE_S)


def read_tasks(sessions: sessionmaker[Session], ids: list[str]) -> list[TaskOut]:
    with sessions() as s:
        return [to_out(t) for t in s.scalars(select(Task).where(Task.id.in_(ids[:BATCH]))).all()]


async def one(sessions: sessionmaker[Session], feed: TaskFeed, task_id: str, gone: Gone) -> AsyncIterator[bytes]:
    """The stream of one task (``task_id`` resolved already: its full id)."""
    seq, sent_at, until = feed.seq, -1.0, time.monotonic() + MAX_S
    while time.monotonic() < until:
        task = await _read(get_task, sessions, task_id)
        if task.updated_at != sent_at:
            sent_at = task.updated_at
            yield sse("task", task.model_dump_json())
        if task.state in TERMINAL_STATES:
            yield sse("end", json.dumps({"id": task.id, "state": task.state}))
            return
        while True:
            news = await feed.wait(seq, IDLE_S)
            if await gone():
                return
            seq, ids = feed.since(seq)
            if not news:
                yield b": idle\n\n"
                break
            if ids is None or task_id in ids:
                break


async def every(sessions: sessionmaker[Session], feed: TaskFeed, gone: Gone) -> AsyncIterator[bytes]:
    """Every task that changes, from now on."""
    seq, until = feed.seq, time.monotonic() + MAX_S
    yield b": streaming tasks\n\n"
    while time.monotonic() < until:
        news = await feed.wait(seq, IDLE_S)
        if await gone():
            return
        if not news:
            yield b": idle\n\n"
            continue
        seq, ids = feed.since(seq)
        if ids is None:
            yield sse("resync", "{}")          # fell behind the feed's history: the page reloads its list
            continue
        for task in await _read(read_tasks, sessions, ids[-BATCH:]):
            yield sse("task", task.model_dump_json())

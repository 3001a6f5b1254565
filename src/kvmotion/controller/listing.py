"""Paged lists of VMs, hosts and tasks: typed service functions shared by the API, CLI and tests.

Keyset paging, never OFFSET: a page is the rows after the last one given, in a stable order on an indexed key
(VMs by name, the unique index on vms.name; hosts by name, their primary key; tasks newest first by created_at, then
id). The cursor is that key, opaque to clients (URL-safe base64 of JSON, naming the list it belongs to); a row added
or removed between two pages moves no other row to another page. One row more than the limit is read to know
whether there is a next page, so the last page names no cursor.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import TypeAdapter
from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common.errors import InvalidInputError
from kvmotion.controller.db import VM, Host, Task
from kvmotion.controller.inventory import host_out, vm_out
from kvmotion.controller.tasks import to_out as task_out
from kvmotion.models.api import HostOut, HostSummary, TaskOut, TaskSummary, VMOut, VMSummary

DEFAULT_LIMIT = 500            # GET /vms and /hosts
MAX_LIMIT = 5000
TASK_DEFAULT_LIMIT = 50        # GET /tasks: a task's record (its phases, results) is bigger than a VM's summary
TASK_MAX_LIMIT = 500
MAX_CURSOR_CHARS = 512
View = Literal["full", "summary"]
PowerState = Literal["poweredOn", "poweredOff"]
HostState = Literal["connected", "disconnected"]

T = TypeVar("T")
# what a page's items are read into and answered with (one pass each, in pydantic-core)
VMS_FULL, VMS_SUMMARY = TypeAdapter(list[VMOut]), TypeAdapter(list[VMSummary])
HOSTS_FULL, HOSTS_SUMMARY = TypeAdapter(list[HostOut]), TypeAdapter(list[HostSummary])
TASKS_FULL, TASKS_SUMMARY = TypeAdapter(list[TaskOut]), TypeAdapter(list[TaskSummary])
VM_COLUMNS = (VM.uuid, VM.name, VM.host, VM.power_state)
HOST_COLUMNS = (Host.name, Host.address, Host.state, Host.maintenance, Host.cluster, Host.last_seen, Host.last_error)
TASK_COLUMNS = (Task.id, Task.kind, Task.vm_uuid, Task.vm_name, Task.source, Task.destination, Task.state, Task.phase,
                Task.progress, Task.created_at, Task.updated_at, Task.started_at, Task.finished_at)


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None        # None: this was the last page


def encode_cursor(kind: str, key: list[Any]) -> str:
    raw = json.dumps({"list": kind, "after": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str | None, shape: tuple[type, ...]) -> list[Any] | None:
    """The key a cursor of list ``kind`` names (None: no cursor, the first page). Anything else is refused:
    another list's cursor, a cursor edited by hand, one of an older shape."""
    if cursor is None:
        return None
    remedy = (f"leave out cursor to get the first page, or pass exactly the X-Next-Cursor header (or the Link "
              f"rel=next) of the previous page of GET /{kind}")
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cursor is not a cursor of GET /{kind}: it does not decode", remedy=remedy) from exc
    key = data.get("after") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("list") != kind or not isinstance(key, list) or len(key) != len(shape) \
            or not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(key, shape)):
        raise InvalidInputError(f"cursor is not a cursor of GET /{kind}", remedy=remedy)
    return key


def check_limit(limit: int, most: int) -> int:
    if not 1 <= limit <= most:
        raise InvalidInputError(f"limit {limit} is out of range", remedy=f"give a limit from 1 to {most}")
    return limit


def _rows(sessions: sessionmaker[Session], q: Select[Any], limit: int, full: bool) -> tuple[list[Any], bool]:
    """The page's rows and whether there are more (one row more than the limit is read): ORM objects for the full
    view; for the summary, each row as a dict of the selected columns (no ORM loading, read in one fetch)."""
    with sessions() as s:
        if full:
            rows: list[Any] = list(s.execute(q.limit(limit + 1)).scalars())
        else:
            result = s.connection().execute(q.limit(limit + 1))
            keys = list(result.keys())
            rows = [dict(zip(keys, r)) for r in result.all()]
    return rows[:limit], len(rows) > limit


def _named_page(sessions: sessionmaker[Session], kind: str, table: type[VM] | type[Host], limit: int,
                cursor: str | None, view: View, where: list[Any], full: Any, summary: TypeAdapter[Any],
                columns: tuple[Any, ...]) -> Page[Any]:
    """A page of a list ordered by its unique ``name``: ``full(row)`` of each ORM row, or the summary of ``columns``."""
    check_limit(limit, MAX_LIMIT)
    after = decode_cursor(kind, cursor, (str,))
    q = select(table) if view == "full" else select(*columns)
    for condition in where + ([table.name > after[0]] if after is not None else []):
        q = q.where(condition)
    rows, more = _rows(sessions, q.order_by(table.name), limit, view == "full")
    items = [full(r) for r in rows] if view == "full" else summary.validate_python(rows)
    return Page(items, encode_cursor(kind, [items[-1].name]) if more else None)


def vm_page(sessions: sessionmaker[Session], limit: int = DEFAULT_LIMIT, cursor: str | None = None,
            view: View = "full", host: str | None = None,
            power_state: PowerState | None = None) -> Page[VMOut] | Page[VMSummary]:
    """VMs by name, ``limit`` at most, after the cursor; ``summary``: only the VM's own columns (no spec read)."""
    where = ([VM.host == host] if host is not None else []) + \
        ([VM.power_state == power_state] if power_state is not None else [])
    return _named_page(sessions, "vms", VM, limit, cursor, view, where, vm_out, VMS_SUMMARY, VM_COLUMNS)


def host_page(sessions: sessionmaker[Session], limit: int = DEFAULT_LIMIT, cursor: str | None = None,
              view: View = "full", cluster: str | None = None,
              state: HostState | None = None) -> Page[HostOut] | Page[HostSummary]:
    """Hosts by name, ``limit`` at most, after the cursor; ``summary``: without their facts (not read)."""
    where = ([Host.cluster == cluster] if cluster is not None else []) + \
        ([Host.state == state] if state is not None else [])
    return _named_page(sessions, "hosts", Host, limit, cursor, view, where, host_out, HOSTS_SUMMARY, HOST_COLUMNS)


def task_page(sessions: sessionmaker[Session], limit: int = TASK_DEFAULT_LIMIT, cursor: str | None = None,
              view: View = "full") -> Page[TaskOut] | Page[TaskSummary]:
    """Tasks newest first (created_at, then id, both descending: the tasks (created_at, id) index), ``limit`` at
    most, after the cursor; ``summary``: without phases, live figures, options, result and error (not parsed)."""
    check_limit(limit, TASK_MAX_LIMIT)
    after = decode_cursor("tasks", cursor, (float, str))
    q = select(Task) if view == "full" else select(*TASK_COLUMNS)
    if after is not None:
        q = q.where(or_(Task.created_at < after[0], and_(Task.created_at == after[0], Task.id < after[1])))
    rows, more = _rows(sessions, q.order_by(Task.created_at.desc(), Task.id.desc()), limit, view == "full")
    items = [task_out(t) for t in rows] if view == "full" else TASKS_SUMMARY.validate_python(rows)
    return Page(items, encode_cursor("tasks", [items[-1].created_at, items[-1].id]) if more else None)

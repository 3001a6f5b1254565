"""Leadership among the controllers of one database: exactly one of them (the leader) schedules and runs the
engines, monitors the hosts and reconciles; the others (followers) serve reads from the database and forward
state-changing calls to the leader (``controller.forward``).

PostgreSQL: the leader holds a session-level advisory lock (``pg_try_advisory_lock(LOCK_CLASS,
hashtext(current_schema()))``: one lock per database and schema) on a connection of its own. Every
``KEEPALIVE_S`` it checks that connection (``SELECT 1``, answered within ``CHECK_DEADLINE_S``, on a thread of
its own); the first check
that fails or is late ends its leadership at once: every leader-only task is cancelled before anything else
happens, and the connection is dropped. Followers try the lock every ``RETRY_S``.
SQLite: one controller per database file, always the leader.

Takeover (docs/controllers.md): the server frees a session's lock when it sees the session end.
- The leader's process dies (crash, SIGKILL, OOM): its kernel closes the TCP connection, the server sees it at
  once; a follower leads within ``PROCESS_DEATH_TAKEOVER_S`` (2 s: the 1 s retry, then the lock and the leader
  row), then reconciles.
- The leader's machine or network vanishes: the server notices by TCP keepalives set on the lock session
  (``SERVER_KEEPALIVE``: 4 s idle, then 3 probes 1 s apart: 7 s) or by ``tcp_user_timeout`` (6 s after an
  unacknowledged answer); a follower leads within ``MACHINE_LOSS_TAKEOVER_S`` (9 s). The old leader, cut off,
  stopped acting after at most ``KEEPALIVE_S + CHECK_DEADLINE_S`` (4 s) without an answer: before the server freed
  the lock, so two leaders never act at once.

On becoming leader, ``on_elected`` runs first (the controller's ``reconcile``: the moves the previous leader left
in flight are finished by what the hosts really run), then every leader-only task starts.

Leader-only work: one call per background loop, before or after ``start``::

    leadership.run_while_leader("drs", lambda: drs.run_forever())

The factory is called each time this controller becomes leader; the coroutine it returns runs until leadership
ends (then it is cancelled) or it returns. One that raises is logged and started again after ``RETRY_S``.
Work a leader starts on request (an evacuation, an image import) is stopped by a callback registered with
``leadership.on_step_down(callback)``.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Coroutine

from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from kvmotion.controller import dbengine
from kvmotion.controller.db import ControllerLeader

log = logging.getLogger(__name__)

LOCK_CLASS = 0x6B766D          # "kvm": the advisory lock's first key; the second is the schema's hash
RETRY_S = 1.0                  # a follower tries the lock this often
KEEPALIVE_S = 1.0              # the leader checks its lock connection this often
CHECK_DEADLINE_S = 3.0         # ... and stops leading when a check takes longer
CONNECT_DEADLINE_S = 3         # connecting the lock session
CANCEL_AGAIN_S = 0.5           # a task that outlived its cancellation is cancelled again this often
STOP_DEADLINE_S = 10.0         # shutting down waits at most this for the leader-only tasks to end
ROW_DEADLINE_S = 10.0          # writing or reading the leader row
# the lock session's server side: a vanished client is dropped (and its lock freed) after 4 + 3 * 1 s of silence,
# or 6 s after an answer it did not acknowledge; the leader stopped acting 1 + 3 s after its last answer
SERVER_KEEPALIVE = ("SET tcp_keepalives_idle = 4", "SET tcp_keepalives_interval = 1", "SET tcp_keepalives_count = 3",
                    "SET tcp_user_timeout = 6000", "SET statement_timeout = 3000")
CLIENT_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1, "keepalives_count": 2,
                    "tcp_user_timeout": 3000, "connect_timeout": CONNECT_DEADLINE_S}
# stated bounds (docs/controllers.md), before reconciliation: the server's notice, the retry, then taking the
# lock and writing the leader row (well under 1 s on a healthy database)
PROCESS_DEATH_TAKEOVER_S = RETRY_S + 1.0
MACHINE_LOSS_TAKEOVER_S = 7.0 + RETRY_S + 1.0
Factory = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class LeaderInfo:
    name: str
    url: str
    term: int
    since: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LockSession:
    """The dedicated PostgreSQL connection that holds the advisory lock (blocking calls: run them in a thread)."""

    def __init__(self, url: str) -> None:
        parsed = dbengine.parse(url)
        args = dbengine.postgresql_connect_args(parsed) | {k: v for k, v in CLIENT_KEEPALIVE.items()
                                                            if k not in parsed.query}
        self.engine: Engine = create_engine(parsed, poolclass=NullPool, connect_args=args,
                                            isolation_level="AUTOCOMMIT")
        self.conn: Connection | None = None
        self.pid: int | None = None           # the server's process of the session (pg_stat_activity.pid)
        # a thread of its own: a check never waits behind the controller's other database calls
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leader-lock")

    async def call(self, fn: Callable[[], Any], deadline_s: float) -> Any:
        """``fn`` on the session's thread, within ``deadline_s`` (else ``TimeoutError``)."""
        return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self.pool, fn), deadline_s)

    def try_lock(self) -> bool:
        if self.conn is None:
            conn = self.engine.connect()
            for statement in SERVER_KEEPALIVE:
                conn.execute(text(statement))
            self.pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            self.conn = conn
        return bool(self.conn.execute(text("SELECT pg_try_advisory_lock(:c, hashtext(current_schema()))"),
                                      {"c": LOCK_CLASS}).scalar())

    def check(self) -> None:
        assert self.conn is not None
        self.conn.execute(text("SELECT 1")).scalar()

    def drop(self) -> None:
        """Close the session (the server frees the lock); from a thread of its own: a dead socket may block."""
        conn, self.conn = self.conn, None
        if conn is not None:
            threading.Thread(target=_close_quietly, args=(conn,), daemon=True, name="leader-lock-close").start()
            self.pool.shutdown(wait=False)         # a call stuck on the dead socket keeps the old thread only
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leader-lock")

    def dispose(self) -> None:
        self.drop()
        self.pool.shutdown(wait=False)
        self.engine.dispose()


async def cancel_all(tasks: list[asyncio.Task[None]], limit_s: float | None = None) -> None:
    """Cancel ``tasks`` and wait until they ended, cancelling again each ``CANCEL_AGAIN_S`` while one still runs:
    before Python 3.12, ``asyncio.wait_for`` may swallow a cancellation that meets its inner call's end.
    ``limit_s``: give up waiting after that long (shutting down: the process ends anyway)."""
    pending = {t for t in tasks if not t.done()}
    end = None if limit_s is None else time.monotonic() + limit_s
    while pending and (end is None or time.monotonic() < end):
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
        if pending:
            log.warning("still stopping: %s", ", ".join(t.get_name() for t in pending))


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - the session is gone either way
        log.debug("closing the leader lock session failed", exc_info=True)


class Leadership:
    """This controller's part in the election (see the module)."""

    def __init__(self, url: str, sessions: sessionmaker[Session], name: str, advertised_url: str,
                 on_elected: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.sessions = sessions
        self.name = name
        self.url = advertised_url
        self.on_elected = on_elected
        self.shared = not dbengine.is_sqlite(url)          # PostgreSQL: controllers may share it
        self.lock = LockSession(url) if self.shared else None
        self.is_leader = not self.shared                    # SQLite: the one controller, from the start
        self.term = 0
        self.known: LeaderInfo | None = None               # the leader, as the row said when last read
        self.changes: list[tuple[float, str]] = []         # (when, "leader" | "follower"): bounded
        self._factories: dict[str, Factory] = {}
        self._demoted: list[Callable[[], None]] = []
        self._work: dict[str, asyncio.Task[None]] = {}
        self._campaign: asyncio.Task[None] | None = None
        self._takeover: asyncio.Task[None] | None = None
        self._stopping = False

    # -- the API ------------------------------------------------------------------------------
    def run_while_leader(self, name: str, factory: Factory) -> None:
        """Run ``factory()`` whenever (and only while) this controller leads; started now if it leads already."""
        self._factories[name] = factory
        if self.is_leader and self._takeover is not None and self._takeover.done():
            self._start(name)

    def on_step_down(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when this controller stops leading (after its leader-only tasks were cancelled): to
        stop work a leader started on request (an evacuation, an image import)."""
        self._demoted.append(callback)

    async def start(self) -> None:
        """SQLite: lead now. PostgreSQL: try the lock once now (a lone controller leads before it serves), then
        keep trying (and, as leader, keep checking) in the background."""
        if not self.shared:
            await self._become_leader()
            await self._takeover_done()
            return
        try:
            if await self._try_lock():
                await self._become_leader()
                await self._takeover_done()
        except Exception as exc:  # noqa: BLE001 - the campaign tries again
            log.warning("leader election: %s", exc)
        self._campaign = asyncio.create_task(self._run(), name="leader-election")

    async def stop(self) -> None:
        self._stopping = True                       # the campaign ends at its next turn, cancelled or not
        if self._campaign is not None:
            await cancel_all([self._campaign], STOP_DEADLINE_S)
        await self._step_down("shutting down", STOP_DEADLINE_S)
        if self.lock is not None:
            self.lock.dispose()

    def leader(self) -> LeaderInfo | None:
        """The leader: this controller, or the one the row names while another holds the lock (None: none known)."""
        if self.is_leader:
            return LeaderInfo(self.name, self.url, self.term, self._since())
        return self.known

    def forward_to(self) -> LeaderInfo | None:
        """Where a follower hands a state-changing call on (None: nowhere; never this controller itself)."""
        found = None if self.is_leader else self.known
        return found if found is not None and found.name != self.name and found.url else None

    def status(self) -> dict[str, Any]:
        found = self.leader()
        return {"this": {"name": self.name, "url": self.url, "leader": self.is_leader},
                "leader": found.as_dict() if found else None,
                "backend": "postgresql" if self.shared else "sqlite",
                "takeover_s": {"process_death": PROCESS_DEATH_TAKEOVER_S, "machine_loss": MACHINE_LOSS_TAKEOVER_S}}

    # -- the election -------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            try:
                if self.is_leader:
                    await self._keep()
                elif await self._try_lock():
                    await self._become_leader()
                else:
                    self.known = await asyncio.wait_for(asyncio.to_thread(self._read_row), ROW_DEADLINE_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed try or check: follower until the next one
                await self._step_down(f"the lock session failed: {exc}")
            await asyncio.sleep(KEEPALIVE_S if self.is_leader else RETRY_S)

    async def _try_lock(self) -> bool:
        assert self.lock is not None
        try:
            got = await self.lock.call(self.lock.try_lock, CONNECT_DEADLINE_S + CHECK_DEADLINE_S)
        except BaseException:
            self.lock.drop()
            raise
        return got

    async def _keep(self) -> None:
        """One check of the lock session; a failed or late one raises (the caller steps down)."""
        assert self.lock is not None
        await self.lock.call(self.lock.check, CHECK_DEADLINE_S)

    async def _become_leader(self) -> None:
        self.term = await asyncio.wait_for(asyncio.to_thread(self._write_row), ROW_DEADLINE_S)
        self.is_leader = True
        self._note("leader")
        log.info("controller %s leads (term %d): reconciling, then scheduling", self.name, self.term)
        self._takeover = asyncio.create_task(self._take_over(), name="leader-takeover")

    async def _take_over(self) -> None:
        if self.on_elected is not None:
            try:
                await self.on_elected()
            except Exception:  # noqa: BLE001 - the periodic reconciliation tries again
                log.exception("reconciliation on taking over failed")
        for name in self._factories:
            self._start(name)

    async def _takeover_done(self) -> None:
        if self._takeover is not None:
            await asyncio.gather(self._takeover, return_exceptions=True)

    def _start(self, name: str) -> None:
        old = self._work.get(name)
        if old is None or old.done():
            self._work[name] = asyncio.create_task(self._guard(name), name=f"leader-{name}")

    async def _guard(self, name: str) -> None:
        while True:
            try:
                await self._factories[name]()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - leader-only work keeps running while this controller leads
                log.exception("leader-only task %s failed; starting it again", name)
            await asyncio.sleep(RETRY_S)

    async def _step_down(self, why: str, limit_s: float | None = None) -> None:
        """Stop every leader-only task first, then drop the lock session."""
        was = self.is_leader
        self.is_leader = False
        tasks = [t for t in (self._takeover, *self._work.values()) if t is not None]
        self._work.clear()
        self._takeover = None
        for t in tasks:
            t.cancel()                              # before anything else: no leader-only step from now on
        if self.lock is not None:
            self.lock.drop()
        for callback in self._demoted if was else ():
            try:
                callback()
            except Exception:  # noqa: BLE001 - the others still run
                log.exception("stepping down: %s failed", getattr(callback, "__name__", callback))
        if was:
            self._note("follower")
            log.warning("controller %s no longer leads: %s", self.name, why)
        await cancel_all(tasks, limit_s)

    def _note(self, what: str) -> None:
        self.changes = (self.changes + [(time.time(), what)])[-32:]

    # -- the row ------------------------------------------------------------------------------
    def _write_row(self) -> int:
        with self.sessions.begin() as s:
            row = s.get(ControllerLeader, 1)
            term = (row.term + 1) if row is not None else 1
            s.merge(ControllerLeader(id=1, name=self.name, url=self.url, term=term, since=time.time()))
        return term

    def _read_row(self) -> LeaderInfo | None:
        with self.sessions() as s:
            row = s.scalars(select(ControllerLeader).where(ControllerLeader.id == 1)).first()
            return LeaderInfo(row.name, row.url, row.term, row.since) if row is not None else None

    def _since(self) -> float:
        return next((t for t, what in reversed(self.changes) if what == "leader"), 0.0)

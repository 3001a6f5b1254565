"""Leadership among the controllers of one database (``controller.leader``) and a follower's forwarding of writes
(``controller.forward``). The election tests need PostgreSQL (``$KVMOTION_TEST_PG_URL``): two ``Leadership``
objects on one schema, as two controller processes would be; SQLite has one controller, always the leader."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from sqlalchemy import text

from dbtools import admin_engine, pg_base
from kvmotion.controller import dbengine
from kvmotion.controller.db import make_engine, make_sessionmaker
from kvmotion.controller.forward import FORWARDED_BY, LeaderForward
from kvmotion.controller.leader import MACHINE_LOSS_TAKEOVER_S, LeaderInfo, Leadership

DEADLINE_S = 30.0       # liveness bound of a wait (the takeover time is measured and printed, not asserted)


class Work:
    """Leader-only work that records when it ran and when it was stopped."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.reconciled = 0
        self.demoted = 0
        self.order: list[str] = []

    async def loop(self) -> None:
        self.started += 1
        self.order.append("work")
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled += 1

    async def reconcile(self) -> None:
        self.reconciled += 1
        self.order.append("reconcile")

    def step_down(self) -> None:
        self.demoted += 1


def leadership(url: str, name: str, work: Work) -> Leadership:
    lead = Leadership(url, make_sessionmaker(make_engine(url)), name, f"https://{name}.test:8760",
                      on_elected=work.reconcile)
    lead.run_while_leader("loop", work.loop)
    lead.on_step_down(work.step_down)
    return lead


async def until(check: Any, what: str) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < DEADLINE_S, f"{what}: not within {DEADLINE_S} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def started(url: str) -> tuple[tuple[Leadership, Work], tuple[Leadership, Work]]:
    """ctl-a started first (it leads), then ctl-b, each with its work."""
    wa, wb = Work(), Work()
    a, b = leadership(url, "ctl-a", wa), leadership(url, "ctl-b", wb)
    await a.start()
    await b.start()
    return (a, wa), (b, wb)


def need_pg(url: str) -> None:
    if dbengine.is_sqlite(url):
        pytest.skip("the election is a PostgreSQL case: SQLite has one controller, always the leader "
                    "(set KVMOTION_TEST_PG_URL, scripts/pg.sh)")


def test_on_sqlite_the_one_controller_leads_reconciles_first_then_runs_its_work(db_url: str) -> None:
    if not dbengine.is_sqlite(db_url):
        pytest.skip("the SQLite case")

    async def run() -> None:
        work = Work()
        lead = leadership(db_url, "solo", work)
        await lead.start()
        await until(lambda: work.started == 1, "the work starts")
        assert lead.is_leader and work.order == ["reconcile", "work"]
        assert lead.status()["leader"]["name"] == "solo" and lead.status()["backend"] == "sqlite"
        assert lead.forward_to() is None
        await lead.stop()
        assert work.cancelled == 1 and not lead.is_leader
    asyncio.run(run())


def test_two_controllers_on_one_postgresql_exactly_one_leads_and_the_other_knows_it(db_url: str) -> None:
    need_pg(db_url)

    async def run() -> None:
        (a, wa), (b, wb) = await started(db_url)
        try:
            await until(lambda: b.known is not None, "the follower reads the leader's row")
            assert a.is_leader and not b.is_leader
            assert wa.order == ["reconcile", "work"] and wb.started == 0 and wb.reconciled == 0
            assert b.forward_to() == LeaderInfo("ctl-a", "https://ctl-a.test:8760", a.term, b.known.since)
            assert b.status()["leader"]["name"] == "ctl-a" and b.status()["this"]["leader"] is False
            await asyncio.sleep(3.0)                  # several of b's tries: it stays a follower
            assert a.is_leader and not b.is_leader and wb.started == 0
        finally:
            await b.stop()
            await a.stop()
    asyncio.run(run())


def test_the_leaders_session_ends_it_stops_its_work_and_the_follower_takes_over(db_url: str) -> None:
    """The leader's lock session is ended by the server (as when its process dies): the leader notices at its next
    check and cancels its leader-only work; the follower leads, reconciles, and starts its own."""
    need_pg(db_url)

    async def run() -> None:
        (a, wa), (b, wb) = await started(db_url)
        try:
            await until(lambda: wa.started == 1, "the leader's work starts")
            term = a.term
            admin = admin_engine(pg_base() or "")
            with admin.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": a.lock.pid})
            admin.dispose()
            killed = time.monotonic()
            stepped_down = await until(lambda: not a.is_leader, "the old leader steps down")
            await until(lambda: wb.started == 1, "the follower takes over")
            took = time.monotonic() - killed
            print(f"\nleader session ended: old leader stopped after {stepped_down:.2f} s, new leader working "
                  f"after {took:.2f} s (stated bound {MACHINE_LOSS_TAKEOVER_S:.0f} s for a vanished machine)")
            assert wa.cancelled == 1 and wa.started == 1           # the old leader's work was stopped, not rerun
            assert wa.demoted == 1 and wb.demoted == 0
            assert b.is_leader and b.term == term + 1 and wb.order == ["reconcile", "work"]
            await asyncio.sleep(3.0)                  # a tries again and again: the lock is b's now
            assert not a.is_leader and wa.started == 1
            await until(lambda: a.known is not None and a.known.name == "ctl-b", "the old leader follows ctl-b")
        finally:
            await a.stop()
            await b.stop()
    asyncio.run(run())


def test_work_registered_while_leading_starts_at_once_and_a_failing_one_is_started_again(db_url: str) -> None:
    async def run() -> None:
        lead = leadership(db_url, "ctl-a", Work())
        await lead.start()
        runs: list[int] = []

        async def flaky() -> None:
            runs.append(1)
            if len(runs) == 1:
                raise RuntimeError("first run fails")
            await asyncio.Event().wait()
        try:
            lead.run_while_leader("flaky", flaky)
            await until(lambda: len(runs) == 2, "the failed work is started again")
            assert lead.is_leader
        finally:
            await lead.stop()
    asyncio.run(run())


# -- forwarding (a leader in the same process behind httpx's ASGI transport) ----------------------------------
class FakeLeadership:
    """What ``LeaderForward`` reads of a ``Leadership``: control-plane unit test only."""

    def __init__(self, leading: bool, leader: LeaderInfo | None) -> None:
        self.is_leader = leading
        self.shared = True
        self.name = "ctl-b"
        self.leader = leader

    def forward_to(self) -> LeaderInfo | None:
        return self.leader


def leader_app(seen: list[dict[str, Any]]) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        seen.append({"method": request.method, "path": request.url.path, "query": str(request.query_params),
                     "auth": request.headers.get("authorization"), "by": request.headers.get(FORWARDED_BY),
                     "cookie": request.headers.get("cookie"), "body": (await request.body()).decode()})
        return JSONResponse({"handled_by": "leader"}, status_code=201)
    return Starlette(routes=[Route("/api/v1/{rest:path}", echo, methods=["POST", "GET", "DELETE"])])


def follower(leading: bool, leader: LeaderInfo | None, seen: list[dict[str, Any]], tmp_path: Path) -> TestClient:
    async def local(request: Request) -> JSONResponse:
        return JSONResponse({"handled_by": "follower"})
    inner = Starlette(routes=[Route("/api/v1/{rest:path}", local, methods=["POST", "GET", "DELETE"])])

    async def with_token(scope: Any, receive: Any, send: Any) -> None:     # what ApiGate leaves in the scope
        scope.setdefault("state", {})["token"] = "tok-of-session"
        await forward(scope, receive, send)
    forward = LeaderForward(inner, FakeLeadership(leading, leader), tmp_path / "ca-cert.pem",   # type: ignore[arg-type]
                            transport=httpx.ASGITransport(app=leader_app(seen)))
    return TestClient(with_token)


LEADER = LeaderInfo("ctl-a", "https://ctl-a.test:8760", 3, 1.0)


def test_a_follower_forwards_writes_with_the_callers_token_and_serves_reads(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    client = follower(False, LEADER, seen, tmp_path)
    r = client.post("/api/v1/vms/vm1/migrate?dry=1", json={"host": "h2"}, headers={"Cookie": "kvs=abc"})
    assert r.status_code == 201 and r.json() == {"handled_by": "leader"}
    assert seen == [{"method": "POST", "path": "/api/v1/vms/vm1/migrate", "query": "dry=1",
                     "auth": "Bearer tok-of-session", "by": "ctl-b", "cookie": None, "body": '{"host":"h2"}'}]
    assert client.get("/api/v1/vms").json() == {"handled_by": "follower"} and len(seen) == 1
    assert client.delete("/api/v1/tokens/t1").json() == {"handled_by": "leader"}


def test_the_leader_serves_writes_itself(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    client = follower(True, None, seen, tmp_path)
    assert client.post("/api/v1/vms", json={}).json() == {"handled_by": "follower"} and seen == []


def test_no_leader_a_forwarded_call_or_a_peer_call_is_a_503_no_leader(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    r = follower(False, None, seen, tmp_path).post("/api/v1/vms", json={})
    assert r.status_code == 503 and r.json()["error"]["code"] == "NO_LEADER" and r.json()["error"]["remedy"]
    assert r.headers["retry-after"] == "2"
    client = follower(False, LEADER, seen, tmp_path)
    r = client.post("/api/v1/vms", json={}, headers={FORWARDED_BY: "ctl-c"})
    assert r.status_code == 503 and "ctl-c" in r.json()["error"]["message"]
    r = client.post("/api/v1/peer/moves", json={})
    assert r.status_code == 503 and r.json()["error"]["details"] == {"leader": "ctl-a", "url": LEADER.url}
    assert seen == []


def test_a_leader_that_does_not_answer_is_a_503_no_leader(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def local(request: Request) -> JSONResponse:
        return JSONResponse({})
    forward = LeaderForward(Starlette(routes=[Route("/api/v1/vms", local, methods=["POST"])]),
                            FakeLeadership(False, LEADER), tmp_path / "ca.pem",   # type: ignore[arg-type]
                            transport=httpx.MockTransport(refuse))
    r = TestClient(forward).post("/api/v1/vms", json={})
    assert r.status_code == 503 and r.json()["error"]["code"] == "NO_LEADER"
    assert r.json()["error"]["details"] == {"leader": "ctl-a", "url": LEADER.url}


def test_a_scheduler_that_stood_down_launches_nothing_until_it_runs_again(db_url: str, tmp_path: Path) -> None:
    """The scheduler's loop is leader-only work: once cancelled (this controller stopped leading), neither an
    engine's end nor a submission starts a queued task here."""
    from kvmotion.controller.service import Controller
    from kvmotion.controller.tasks import TaskJournal, get_task

    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path, admission_enabled=False)

    async def run() -> None:
        loop = asyncio.create_task(ctl.scheduler.run())
        await asyncio.sleep(0.1)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        assert ctl.scheduler.stood_down
        queued = TaskJournal.create(ctl.sessions, "vmotion", "no-such-uuid", "vm1", "h1", "h2", {}, state="queued")
        await ctl.scheduler.schedule()
        assert get_task(ctl.sessions, queued.id).state == "queued"       # not launched (nor failed) here
        loop = asyncio.create_task(ctl.scheduler.run())                  # leading again: it is taken (and
        await until(lambda: get_task(ctl.sessions, queued.id).state != "queued", "the queued task is taken")
        assert get_task(ctl.sessions, queued.id).error["code"] == "NOT_FOUND"   # ends: its VM does not exist)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    try:
        asyncio.run(run())
    finally:
        ctl.engine.dispose()

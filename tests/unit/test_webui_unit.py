"""The web client's server side without a browser: its page and headers, sign-in sessions, CSRF, the task streams
and the events (the real browser: tests/e2e/test_webui_e2e.py).

The controller runs in-process (real FastAPI app, real SQLite or PostgreSQL: the db_url fixture).
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from kvmotion.controller import auth
from kvmotion.controller.api import create_app
from kvmotion.controller.events import events_of
from kvmotion.controller.service import Controller
from kvmotion.controller.taskfeed import TaskFeed, feed_for
from kvmotion.controller.tasks import TaskJournal, get_task
from kvmotion.controller import taskstream
from kvmotion.controller.webui.sessions import COOKIE, UiSessions

BASE = "https://testserver"          # the cookie is Secure: the client sends it over https only


@pytest.fixture()
def web(tmp_path: Path, db_url: str) -> Iterator[tuple[TestClient, Controller, dict[str, str]]]:
    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    with TestClient(create_app(ctl), base_url=BASE) as client:
        admin = (tmp_path / auth.ADMIN_TOKEN_FILE).read_text().strip()
        tokens = {"admin": admin}
        for role in ("viewer", "operator"):
            r = client.post("/api/v1/tokens", json={"name": f"w-{role}", "role": role},
                            headers={"Authorization": f"Bearer {admin}"})
            tokens[role] = r.json()["token"]
        yield client, ctl, tokens


def sign_in(client: TestClient, token: str) -> dict:
    r = client.post("/ui/session", json={"token": token})
    assert r.status_code == 200, r.text
    return r.json()


def test_page_and_assets_carry_a_strict_policy(web) -> None:
    client, _, _ = web
    r = client.get("/ui", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "/ui/"
    for path, kind in (("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/api.js", "text/javascript"),
                       ("/ui/app.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), (path, r.status_code)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp and r.headers["x-content-type-options"] == "nosniff"
    page = client.get("/ui/").text
    assert "<script>" not in page and " on" not in page.replace("\n", " ").split("<body>")[1]   # no inline code
    for bad in ("/ui/nope.js", "/ui/..%2Fapi.py", "/ui/__init__.py", "/ui/static"):
        assert client.get(bad).status_code == 404, bad


def test_sign_in_sets_a_locked_cookie_and_never_returns_the_token(web) -> None:
    client, _, tokens = web
    r = client.post("/ui/session", json={"token": "kvm_0123456789ab_" + "A" * 43})
    assert r.status_code == 401 and r.json()["error"]["remedy"]
    assert COOKIE not in r.headers.get("set-cookie", "")
    r = client.post("/ui/session", json={"token": tokens["operator"]})
    cookie = r.headers["set-cookie"]
    for attr in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
        assert attr in cookie, cookie
    body = r.json()
    assert body["name"] == "w-operator" and body["role"] == "operator" and len(body["csrf"]) >= 32
    assert tokens["operator"] not in r.text and tokens["operator"] not in cookie
    assert client.get("/ui/session").json() == body
    assert client.get("/api/v1/vms").status_code == 200               # the cookie stands in for the token


def test_state_changing_calls_need_the_csrf_token_and_our_origin(web) -> None:
    client, _, tokens = web
    csrf = sign_in(client, tokens["admin"])["csrf"]
    r = client.post("/api/v1/tokens", json={"name": "x1", "role": "viewer"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "CSRF_REJECTED" and r.json()["error"]["remedy"]
    r = client.post("/api/v1/tokens", json={"name": "x1", "role": "viewer"}, headers={"X-CSRF-Token": "guess"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "CSRF_REJECTED"
    r = client.post("/api/v1/tokens", json={"name": "x1", "role": "viewer"},
                    headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "CSRF_REJECTED"
    r = client.post("/api/v1/tokens", json={"name": "x1", "role": "viewer"},
                    headers={"X-CSRF-Token": csrf, "Origin": BASE})
    assert r.status_code == 201, r.text
    assert client.post("/ui/session", json={"token": tokens["admin"]},
                       headers={"Origin": "https://evil.example"}).status_code == 403      # no login CSRF either


def test_roles_hold_for_a_session_and_sign_out_or_revocation_ends_it(web) -> None:
    client, _, tokens = web
    csrf = sign_in(client, tokens["viewer"])["csrf"]
    r = client.post("/api/v1/vms/vm1/migrate/plan", json={"host": "h2"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN"
    assert client.delete("/ui/session", headers={"X-CSRF-Token": csrf}).json() == {"signed_out": True}
    assert client.get("/api/v1/vms").status_code == 401 and client.get("/ui/session").status_code == 401
    sign_in(client, tokens["viewer"])
    client.delete("/api/v1/tokens/w-viewer", headers={"Authorization": f"Bearer {tokens['admin']}"})
    assert client.get("/api/v1/vms").status_code == 401                 # a revoked token ends its sessions


def test_sessions_are_bounded_and_expire_when_idle() -> None:
    sessions = UiSessions(idle_s=60, limit=3)
    opened = [sessions.open(f"t{i}") for i in range(5)]
    assert len(sessions) == 3 and sessions.find(opened[0].id) is None and sessions.find(opened[4].id)
    opened[4].used_at -= 61
    assert sessions.find(opened[4].id) is None and sessions.find(None) is None


def test_feed_wakes_a_waiter_from_another_thread_and_bounds_its_history() -> None:
    feed = TaskFeed(history=4)

    async def scenario() -> float:
        seq = feed.seq
        start = time.monotonic()
        threading.Timer(0.05, feed.changed, args=("t1",)).start()
        assert await feed.wait(seq, timeout=5)
        return time.monotonic() - start
    assert asyncio.run(scenario()) < 5
    assert feed.since(0) == (1, ["t1"])
    for i in range(6):
        feed.changed(f"t{i}")
    assert feed.since(0)[1] is None and feed.since(feed.seq - 2)[1] == ["t4", "t5"]


def _collect(gen, n: int, out: list[bytes]) -> None:
    async def run() -> None:
        async for chunk in gen:
            if not chunk.startswith(b":"):
                out.append(chunk)
            if len(out) >= n:
                return
    asyncio.run(asyncio.wait_for(run(), 20))


def _gone_never() -> "asyncio.Future[bool]":
    async def no() -> bool:
        return False
    return no()


def test_a_task_stream_sends_each_change_then_ends(web) -> None:
    _, ctl, _ = web
    journal = TaskJournal.create(ctl.sessions, "vmotion", "u1", "vm1", "h1", "h2", {})
    received: list[bytes] = []
    gen = taskstream.one(ctl.sessions, feed_for(ctl.sessions), journal.id, _gone_never)
    reader = threading.Thread(target=_collect, args=(gen, 4, received))
    reader.start()
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    journal.begin_phase("precheck", 5.0)
    time.sleep(0.2)
    journal.finish("success", {"downtime_ms": 12})
    reader.join(20)
    kinds = [c.split(b"\n")[0] for c in received]
    assert kinds == [b"event: task", b"event: task", b"event: task", b"event: end"], received
    assert b'"phase":"precheck"' in received[1] and b'"state":"success"' in received[2]


def test_the_all_tasks_stream_sends_what_changed(web) -> None:
    _, ctl, _ = web
    received: list[bytes] = []
    gen = taskstream.every(ctl.sessions, feed_for(ctl.sessions), _gone_never)
    reader = threading.Thread(target=_collect, args=(gen, 1, received))
    reader.start()
    time.sleep(0.3)
    journal = TaskJournal.create(ctl.sessions, "vmotion", "u2", "vm2", "h1", "h2", {})
    reader.join(20)
    assert received and journal.id.encode() in received[0] and received[0].startswith(b"event: task")


def test_events_follow_a_task_from_queued_to_its_failure_with_the_remedy(web) -> None:
    _, ctl, _ = web
    j = TaskJournal.create(ctl.sessions, "vmotion", "u3", "vm3", "h1", "h2", {})
    j.begin_phase("precheck", 1.0)
    j.end_phase("ok")
    j.begin_phase("precopy", 10.0)
    j.end_phase("failed")
    j.finish("error", error={"code": "MIGRATION_FAILED", "message": "link stalled", "remedy": "check the link"})
    events = events_of([get_task(ctl.sessions, j.id)], limit=10)
    kinds = [e.kind for e in reversed(events)]
    assert kinds == ["task.queued", "task.started", "task.phase", "task.phase", "task.failed"]
    assert events[0].level == "error" and events[0].remedy == "check the link" and events[0].subject == "vm:vm3"
    assert "h1 → h2" in events[0].message


def test_console_websocket_takes_the_session_only_from_our_origin(web) -> None:
    from starlette.testclient import WebSocketDenialResponse
    client, _, tokens = web
    sign_in(client, tokens["operator"])
    cookie = f"{COOKIE}={client.cookies.get(COOKIE)}"       # as the browser sends it with the handshake
    path = "/api/v1/vms/nosuchvm/console/serial"
    for origin, status in (("https://evil.example", 403), (BASE, 404), (None, 404)):   # 404: signed in, no VM
        with pytest.raises(WebSocketDenialResponse) as exc:
            with client.websocket_connect(path, headers={"Cookie": cookie} | ({"Origin": origin} if origin else {})):
                pass
        assert exc.value.status_code == status, (origin, exc.value.text)
    assert exc.value.json()["error"]["code"] == "NOT_FOUND"
    with pytest.raises(WebSocketDenialResponse) as exc:
        with client.websocket_connect(path, headers={"Cookie": f"{COOKIE}=forged", "Origin": BASE}):
            pass
    assert exc.value.status_code == 401


def test_no_api_answer_carries_a_wrapped_disk_key() -> None:
    from kvmotion.models.api import VMOut, wrapped_fingerprint
    spec = {"name": "v", "disks": [{"node": "d0", "encrypted": True, "key_wrapped": "c2VjcmV0LXdyYXBwZWQ="},
                                   {"node": "d1", "encrypted": False}]}
    vm = VMOut(uuid="u", name="v", host="h1", power_state="poweredOn", spec=spec)
    wire = vm.model_dump_json()
    assert "c2VjcmV0LXdyYXBwZWQ=" not in wire and wrapped_fingerprint("c2VjcmV0LXdyYXBwZWQ=") in wire
    assert vm.spec["disks"][0]["key_wrapped"] == "c2VjcmV0LXdyYXBwZWQ="     # the controller itself keeps it
    assert '"d1"' in wire and vm.model_dump()["spec"] == spec

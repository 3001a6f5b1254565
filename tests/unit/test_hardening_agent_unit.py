"""Security findings 2, 4, 9 and 10 of issue 19, on the agent's side, without the lab: signed answers (and the
controller refusing unsigned or forged ones), no body read before the signature header is checked, a replay
memory that refuses rather than forgets and survives a restart, 422s that echo nothing."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from kvmotion.agent import nonces as nonces_mod
from kvmotion.agent.api import create_app as agent_app
from kvmotion.agent.auth import SignedRequestsOnly
from kvmotion.agent.nonces import NONCE_FILE, NonceJournal
from kvmotion.common import hostauth
from kvmotion.common.errors import AgentError, ConflictError, UnauthorizedError
from kvmotion.controller.agents import AgentClient

SECRET, OTHER = "ab" * 32, "cd" * 32
MiB = 1 << 20


class FakeAgent:
    """Just enough of ``Agent`` for host routes: no QEMU."""

    cfg = SimpleNamespace(name="h1")
    accel = SimpleNamespace(accelerator="tcg")

    def tls_csrs(self) -> dict[str, str]:
        return {"server_csr": "CSR-OF-THE-HOST", "client_csr": "CSR-OF-THE-HOST"}

    def cpu_expand(self, model: str, mask: list[str]) -> list[str]:
        raise RuntimeError("a bug")


def signed(method: str, path: str, body: bytes = b"", secret: str = SECRET) -> dict[str, str]:
    return {hostauth.HEADER: hostauth.sign(secret, method, path, body), "content-type": "application/json"}


def answer_is_signed(r: httpx.Response) -> bool:
    return hostauth.response_auth(SECRET, r.request.headers.get(hostauth.HEADER), r.status_code, r.content,
                                  r.headers.get(hostauth.RESPONSE_HEADER)) is None


# -- finding 2: the agent signs its answers; the controller uses only signed ones -----------------------------
def test_agent_signs_every_answer_to_a_signed_request_errors_and_crashes_too() -> None:
    client = TestClient(agent_app(FakeAgent(), SECRET), raise_server_exceptions=False)   # type: ignore[arg-type]
    body = json.dumps({"model": "qemu64"}).encode()
    answers = [client.get("/v1/health", headers=signed("GET", "/v1/health")),
               client.get("/v1/nope", headers=signed("GET", "/v1/nope")),                       # 404
               client.post("/v1/cpu/expand", content=b"{}", headers=signed("POST", "/v1/cpu/expand", b"{}")),  # 422
               client.post("/v1/cpu/expand", content=body, headers=signed("POST", "/v1/cpu/expand", body))]   # 500
    assert [r.status_code for r in answers] == [200, 404, 422, 500]
    assert all(answer_is_signed(r) for r in answers)
    assert answers[3].json()["error"]["code"] == "INTERNAL"
    unsigned = client.get("/v1/health")                   # not validly signed: a refusal the agent cannot sign
    assert unsigned.status_code == 401 and hostauth.RESPONSE_HEADER not in unsigned.headers


def test_a_response_signature_is_bound_to_the_request_status_and_body() -> None:
    req = hostauth.sign(SECRET, "POST", "/v1/tls/csr", b"")
    sig = hostauth.sign_response(SECRET, req.split("nonce=")[1].split()[0], 200, b'{"csr": "A"}')
    assert hostauth.response_auth(SECRET, req, 200, b'{"csr": "A"}', sig) is None
    another = hostauth.sign(SECRET, "POST", "/v1/tls/csr", b"")           # a new request: a new nonce
    assert hostauth.response_auth(SECRET, another, 200, b'{"csr": "A"}', sig) == "forged"
    assert hostauth.response_auth(SECRET, req, 200, b'{"csr": "B"}', sig) == "forged"
    assert hostauth.response_auth(SECRET, req, 500, b'{"csr": "A"}', sig) == "forged"
    assert hostauth.response_auth(OTHER, req, 200, b'{"csr": "A"}', sig) == "forged"
    assert hostauth.response_auth(SECRET, req, 200, b'{"csr": "A"}', None) == "missing"
    assert hostauth.response_auth(SECRET, req, 200, b'{"csr": "A"}', "v1 sig=zz") == "forged"


class ManInTheMiddle(httpx.AsyncBaseTransport):
    """Between the controller and the real agent app: passes answers on, or strips, alters or replays them."""

    def __init__(self, app: Any, mode: str) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.mode = mode
        self.first: tuple[int, dict[str, str], bytes] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        r = await self.inner.handle_async_request(request)
        status, body = r.status_code, await r.aread()
        headers = {k: v for k, v in r.headers.items() if k != "content-length"}
        if self.mode == "replay" and self.first is not None:
            status, headers, body = self.first          # the agent's genuine, signed answer to an earlier call
        elif self.mode == "replay":
            self.first = (status, headers, body)
        if self.mode == "strip":
            headers.pop(hostauth.RESPONSE_HEADER)
        if self.mode == "swap":
            body = body.replace(b"CSR-OF-THE-HOST", b"CSR-OF-THE-ATTACKER")
        return httpx.Response(status, headers=headers, content=body)


@pytest.fixture()
def via(monkeypatch) -> Iterator[Any]:
    """``via(mode)``: an AgentClient whose calls reach the real agent app through a ``ManInTheMiddle``."""
    real = httpx.AsyncClient

    def make(mode: str) -> AgentClient:
        mitm = ManInTheMiddle(agent_app(FakeAgent(), SECRET), mode)     # type: ignore[arg-type]
        monkeypatch.setattr(httpx, "AsyncClient", functools.partial(real, transport=mitm))
        return AgentClient("h1", "http://198.51.100.7:8770", SECRET)
    yield make


def test_controller_uses_the_agents_signed_answer(via) -> None:
    assert asyncio.run(via("pass").tls_csr())["server_csr"] == "CSR-OF-THE-HOST"


@pytest.mark.parametrize("mode, state", [("strip", "missing"), ("swap", "forged"), ("replay", "forged")])
def test_controller_refuses_an_unsigned_altered_or_replayed_answer(via, mode: str, state: str) -> None:
    client = via(mode)

    async def twice() -> None:          # replay: the first answer is genuine, the second is the first again
        await client.tls_csr()
        await client.tls_csr()
    with pytest.raises(AgentError) as err:
        asyncio.run(twice() if mode == "replay" else client.tls_csr())
    assert err.value.details["response_auth"] == state and err.value.details["host"] == "h1"
    assert err.value.remedy and "h1" in err.value.remedy


def test_controller_reports_an_agents_refusal_as_before(via) -> None:
    client = AgentClient("h1", "http://198.51.100.7:8770", OTHER)      # a wrong secret: the agent says 401
    via("pass")
    with pytest.raises(AgentError) as err:
        asyncio.run(client.tls_csr())
    assert err.value.details.get("auth_refused") is True and "response_auth" not in err.value.details


# -- finding 4: nothing of the body is read before the header is checked; then linear, bounded ----------------
class Wire:
    """The ASGI connection: serves ``chunks`` of a body and counts what the middleware asked for."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.receives, self.sent = chunks, 0, []

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        i = self.receives - 1
        return {"type": "http.request", "body": self.chunks[i], "more_body": i + 1 < len(self.chunks)}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]


async def body_sha(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The API behind the middleware: answers the SHA-256 of the body it got."""
    h, more = hashlib.sha256(), True
    while more:
        msg = await receive()
        h.update(msg.get("body", b""))
        more = msg.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": h.hexdigest().encode()})


def http_scope(auth: str | None, length: int | None) -> dict[str, Any]:
    headers = [(b"content-length", str(length).encode())] if length is not None else []
    headers += [(hostauth.HEADER.encode(), auth.encode())] if auth else []
    return {"type": "http", "method": "POST", "path": "/v1/storage/home/put", "raw_path": b"/v1/storage/home/put",
            "query_string": b"", "headers": headers, "client": ("198.51.100.9", 4000)}


@pytest.mark.parametrize("auth", [None, "v1 ts=1 nonce=00000000000000000000 sig=" + "0" * 64, "garbage"])
def test_an_unsigned_or_stale_request_is_refused_before_its_body_is_read(auth: str | None) -> None:
    wire = Wire([b"x" * MiB] * 4)
    mw = SignedRequestsOnly(body_sha, SECRET)
    asyncio.run(mw(http_scope(auth, 64 << 30), wire.receive, wire.send))     # declares 64 GiB
    assert wire.status == 401 and wire.receives == 0


def test_a_replayed_nonce_is_refused_before_its_body_is_read() -> None:
    body = b"y" * 1000
    auth = hostauth.sign(SECRET, "POST", "/v1/storage/home/put", body)
    mw = SignedRequestsOnly(body_sha, SECRET)
    first, again = Wire([body]), Wire([body])
    asyncio.run(mw(http_scope(auth, len(body)), first.receive, first.send))
    asyncio.run(mw(http_scope(auth, len(body)), again.receive, again.send))
    assert (first.status, again.status, again.receives) == (200, 401, 0)


def test_a_body_over_the_limit_is_refused_early() -> None:
    mw = SignedRequestsOnly(body_sha, SECRET, max_body=4 * MiB)
    declared = Wire([b"z" * MiB] * 8)
    asyncio.run(mw(http_scope(hostauth.sign(SECRET, "POST", "/v1/storage/home/put", b""), 8 * MiB),
                   declared.receive, declared.send))
    assert declared.status == 413 and declared.receives == 0          # Content-Length said so: nothing read
    chunked = Wire([b"z" * MiB] * 8)
    asyncio.run(mw(http_scope(hostauth.sign(SECRET, "POST", "/v1/storage/home/put", b""), None),
                   chunked.receive, chunked.send))
    assert chunked.status == 413 and chunked.receives == 5             # stopped as soon as the limit was passed
    assert "4 MiB" in json.loads(chunked.sent[1]["body"])["error"]["remedy"]


def test_a_large_signed_body_is_read_once_and_handed_on_whole() -> None:
    body = os.urandom(MiB) * 64                                          # 64 MiB, as in the finding
    auth = hostauth.sign(SECRET, "POST", "/v1/storage/home/put", body)
    wire = Wire([body[i:i + MiB] for i in range(0, len(body), MiB)])
    asyncio.run(SignedRequestsOnly(body_sha, SECRET)(http_scope(auth, len(body)), wire.receive, wire.send))
    assert wire.status == 200 and wire.receives == 64
    assert wire.sent[1]["body"] == hashlib.sha256(body).hexdigest().encode()
    sig = dict(wire.sent[0]["headers"])[hostauth.RESPONSE_HEADER.encode()].decode()
    assert hostauth.response_auth(SECRET, auth, 200, wire.sent[1]["body"], sig) is None


# -- finding 9: the replay memory refuses when full, and survives a restart -----------------------------------
def test_a_full_nonce_cache_refuses_instead_of_forgetting() -> None:
    cache, now = hostauth.NonceCache(size=3), time.time()
    for n in ("n1", "n2", "n3"):
        assert cache.check_and_add(n, now, now)
    with pytest.raises(UnauthorizedError) as err:
        cache.check_and_add("n4", now, now)
    assert err.value.details == {"nonce_store": "full"} and err.value.remedy
    assert not cache.check_and_add("n1", now, now)                      # still remembered: a replay
    later = now + hostauth.SKEW_S + hostauth.KEEP_MARGIN_S + 1          # n1..n3 left the clock window
    assert cache.check_and_add("n4", later, later) and len(cache) == 1


def test_a_request_accepted_before_a_restart_is_refused_after_it(tmp_path: Path) -> None:
    headers = signed("GET", "/v1/health")
    before = TestClient(agent_app(FakeAgent(), SECRET, state_dir=tmp_path))     # type: ignore[arg-type]
    assert before.get("/v1/health", headers=headers).status_code == 200
    after = TestClient(agent_app(FakeAgent(), SECRET, state_dir=tmp_path))      # type: ignore[arg-type]
    r = after.get("/v1/health", headers=headers)
    assert r.status_code == 401 and "replay" in r.json()["error"]["message"]
    assert after.get("/v1/health", headers=signed("GET", "/v1/health")).status_code == 200
    assert (tmp_path / NONCE_FILE).stat().st_mode & 0o777 == 0o600


def test_after_a_reboot_requests_signed_before_the_start_are_refused(tmp_path: Path) -> None:
    now = time.time()
    NonceJournal(tmp_path / NONCE_FILE, boot="boot-a", now=now).close()
    journal = NonceJournal(tmp_path / NONCE_FILE, boot="boot-b", now=now)     # the host rebooted
    with pytest.raises(UnauthorizedError, match="rebooted"):
        journal.check_and_add("n-old", now - 1, now)
    assert journal.check_and_add("n-new", now + 1, now + 1)
    journal.close()
    same_boot = NonceJournal(tmp_path / NONCE_FILE, boot="boot-b", now=now + 2)
    assert same_boot.check_and_add("n-old", now - 1, now + 2) and not same_boot.check_and_add("n-new", now + 1)


def test_the_journal_stays_bounded_and_refuses_a_symlink(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(nonces_mod, "_MIN_REWRITE_LINES", 10)
    journal, start = NonceJournal(tmp_path / NONCE_FILE, boot="b"), time.time()
    for i in range(500):                              # one request a second: at most ~66 are live at a time
        t = start + i
        assert journal.check_and_add(f"n{i:04d}", t, t)
    journal.close()
    lines = (tmp_path / NONCE_FILE).read_text().splitlines()
    assert len(lines) <= 2 * 66 + 2 and lines[-1].endswith("n0499")
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConflictError) as err:
        NonceJournal(tmp_path / "link", boot="b")
    assert "symlink" in err.value.remedy


# -- finding 10: the agent's 422 does not echo the input -------------------------------------------------------
def test_an_agent_422_does_not_echo_a_secret_it_was_sent() -> None:
    client = TestClient(agent_app(FakeAgent(), SECRET))     # type: ignore[arg-type]
    passphrase = "s3cr3t-disk-passphrase-0123456789"
    body = json.dumps({"disk_keys": {"drive-vda": passphrase}, "spec": {"uuid": passphrase}}).encode()
    path = "/v1/vms/6b1f3c0e-9f5a-4d4e-8a55-0123456789ab/start"
    r = client.post(path, content=body, headers=signed("POST", path, body))
    assert r.status_code == 422 and passphrase not in r.text
    err = r.json()["error"]
    assert err["code"] == "INVALID_INPUT" and "spec" in err["message"] and err["remedy"]


def test_both_apps_use_the_one_shared_422_handler(tmp_path: Path) -> None:
    from kvmotion.controller.api import create_app
    from kvmotion.controller.service import Controller
    ctl = Controller(f"sqlite:///{tmp_path / 'c.db'}", pki_dir=tmp_path / "pki", token_dir=tmp_path)
    handlers = [create_app(ctl).exception_handlers[RequestValidationError],
                agent_app(FakeAgent(), SECRET).exception_handlers[RequestValidationError]]   # type: ignore[arg-type]
    assert {(h.__module__, h.__qualname__) for h in handlers} == {("kvmotion.common.apierrors",
                                                                  "invalid_input.<locals>.handler")}


def test_an_agent_secret_found_readable_by_others_is_made_private(tmp_path: Path) -> None:
    secret = hostauth.load_or_create_secret(tmp_path)
    os.chmod(tmp_path / hostauth.SECRET_FILE, 0o644)
    assert hostauth.load_or_create_secret(tmp_path) == secret
    assert (tmp_path / hostauth.SECRET_FILE).stat().st_mode & 0o777 == 0o600

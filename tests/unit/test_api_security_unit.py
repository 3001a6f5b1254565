"""Control-plane security without the lab: tokens and roles on every endpoint, the audit log, request signing.

The controller runs in-process (real FastAPI app, real SQLite or PostgreSQL: the db_url fixture); no agent is
reachable, which these tests do not need.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dbtools import all_text, query

from kvmotion.common import hostauth
from kvmotion.common.errors import UnauthorizedError
from kvmotion.controller import auth, taskstream
from kvmotion.controller.api import create_app
from kvmotion.controller.service import Controller

# The role each endpoint needs: the test's own table, so a new endpoint must be classified here to pass.
EXPECTED_ROLES: dict[tuple[str, str], str] = {
    ("GET", "/api/v1/health"): "viewer",
    ("GET", "/api/v1/hosts"): "viewer",
    ("POST", "/api/v1/hosts"): "admin",
    ("POST", "/api/v1/hosts/register"): "enrol",
    ("GET", "/api/v1/hosts/pending"): "admin",
    ("POST", "/api/v1/hosts/{name}/approve"): "admin",
    ("DELETE", "/api/v1/hosts/pending/{name}"): "admin",
    ("DELETE", "/api/v1/hosts/{name}"): "admin",
    ("POST", "/api/v1/hosts/{name}/cert/renew"): "admin",
    ("DELETE", "/api/v1/hosts/{name}/cert"): "admin",
    ("GET", "/api/v1/hosts/{name}"): "viewer",
    ("POST", "/api/v1/hosts/{name}/maintenance"): "admin",
    ("GET", "/api/v1/clusters"): "viewer",
    ("POST", "/api/v1/clusters"): "admin",
    ("GET", "/api/v1/clusters/{name}"): "viewer",
    ("POST", "/api/v1/clusters/{name}/hosts/{host}"): "admin",
    ("DELETE", "/api/v1/clusters/{name}/hosts/{host}"): "admin",
    ("GET", "/api/v1/clusters/{name}/evc-modes"): "viewer",
    ("PUT", "/api/v1/clusters/{name}/evc"): "admin",
    ("GET", "/api/v1/clusters/{name}/drs"): "viewer",
    ("PATCH", "/api/v1/clusters/{name}/drs"): "admin",
    ("POST", "/api/v1/clusters/{name}/drs/rules"): "admin",
    ("DELETE", "/api/v1/clusters/{name}/drs/rules/{rule}"): "admin",
    ("POST", "/api/v1/clusters/{name}/drs/apply"): "operator",
    ("GET", "/api/v1/datastores"): "viewer",
    ("GET", "/api/v1/networks"): "viewer",
    ("GET", "/api/v1/vms"): "viewer",
    ("POST", "/api/v1/vms"): "admin",
    ("GET", "/api/v1/vms/{ref}"): "viewer",
    ("POST", "/api/v1/vms/{ref}/start"): "operator",
    ("POST", "/api/v1/vms/{ref}/stop"): "operator",
    ("DELETE", "/api/v1/vms/{ref}"): "admin",
    ("PATCH", "/api/v1/vms/{ref}"): "admin",
    ("POST", "/api/v1/vms/{ref}/cdrom"): "operator",
    ("POST", "/api/v1/vms/{ref}/disks"): "admin",
    ("POST", "/api/v1/vms/{ref}/disks/{disk}/remove"): "admin",
    ("POST", "/api/v1/vms/{ref}/disks/{disk}/cache"): "admin",
    ("POST", "/api/v1/vms/{ref}/nics"): "admin",
    ("DELETE", "/api/v1/vms/{ref}/nics/{nic}"): "admin",
    ("POST", "/api/v1/vms/{ref}/migrate/validate"): "operator",
    ("POST", "/api/v1/vms/{ref}/migrate"): "operator",
    ("GET", "/api/v1/vms/{ref}/guest"): "viewer",
    ("POST", "/api/v1/vms/{ref}/shutdown"): "operator",
    ("POST", "/api/v1/vms/{ref}/reboot"): "operator",
    ("GET", "/api/v1/tasks"): "viewer",
    ("GET", "/api/v1/tasks/{task_id}"): "viewer",
    ("GET", "/api/v1/tasks/stream"): "viewer",
    ("GET", "/api/v1/tasks/{task_id}/stream"): "viewer",
    ("GET", "/api/v1/events"): "viewer",
    ("POST", "/api/v1/vms/{ref}/migrate/plan"): "operator",
    ("POST", "/api/v1/tasks/{task_id}/cancel"): "operator",
    ("POST", "/api/v1/tasks/{task_id}/force-complete"): "operator",
    ("PATCH", "/api/v1/clusters/{name}"): "admin",
    ("POST", "/api/v1/tokens"): "admin",
    ("GET", "/api/v1/tokens"): "admin",
    ("DELETE", "/api/v1/tokens/{name}"): "admin",
    ("GET", "/api/v1/audit"): "admin",
    ("GET", "/api/v1/images"): "viewer",
    ("POST", "/api/v1/images"): "admin",
    ("GET", "/api/v1/images/{name}"): "viewer",
    ("DELETE", "/api/v1/images/{name}"): "admin",
    ("POST", "/api/v1/vms/import-ovf"): "admin",
    ("GET", "/api/v1/domain"): "admin",
    ("POST", "/api/v1/domain"): "admin",
    ("POST", "/api/v1/domain/join"): "admin",
    ("POST", "/api/v1/domain/leave"): "admin",
    ("GET", "/api/v1/domain/members"): "admin",
    ("POST", "/api/v1/domain/members/{name}/approve"): "admin",
    ("POST", "/api/v1/domain/members/{name}/ping"): "admin",
    ("DELETE", "/api/v1/domain/members/{name}"): "admin",
    ("DELETE", "/api/v1/domain/pending/{name}"): "admin",
    ("GET", "/metrics"): "viewer",
    ("GET", "/api/v1/controllers"): "viewer",
}
# Calls between the controllers of a trust domain: a pinned client certificate, never a token (test_domain_unit),
# or open (the CA certificate, checked by the caller against a fingerprint; a join request, kept pending).
PEER_ENDPOINTS: dict[tuple[str, str], str] = {
    ("GET", "/api/v1/peer/ca"): "open",
    ("POST", "/api/v1/peer/join"): "open",
    ("POST", "/api/v1/peer/welcome"): "certificate",
    ("GET", "/api/v1/peer/hello"): "certificate",
    ("POST", "/api/v1/peer/leave"): "certificate",
    ("POST", "/api/v1/peer/moves/validate"): "certificate",        # cross-controller moves (controller.incoming)
    ("POST", "/api/v1/peer/moves"): "certificate",
    ("GET", "/api/v1/peer/moves/{move_id}/state"): "certificate",
    ("POST", "/api/v1/peer/moves/{move_id}/host"): "certificate",
    ("POST", "/api/v1/peer/moves/{move_id}/commit"): "certificate",
    ("POST", "/api/v1/peer/moves/{move_id}/abort"): "certificate",
    ("POST", "/api/v1/peer/moves/{move_id}/cancel"): "certificate",
    ("GET", "/api/v1/peer/moves/{move_id}/outgoing"): "certificate",
}
# The web client's sign-in (an API token in the body), who-am-I and sign-out (its session cookie): test_webui_unit.
UI_ENDPOINTS = {("POST", "/ui/session"), ("GET", "/ui/session"), ("DELETE", "/ui/session")}
RANK = {"viewer": 1, "operator": 2, "admin": 3}


@dataclass
class Api:
    client: TestClient
    app: FastAPI
    ctl: Controller
    root: Path
    tokens: dict[str, str]          # role -> token

    def call(self, method: str, path: str, role: str | None, **kw) -> int:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return self.client.request(method, path, headers=headers, **kw).status_code


@pytest.fixture()
def api(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    monkeypatch.setattr(taskstream, "MAX_S", 0.0)      # a task stream ends at once here (the role checks call it)
    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    app = create_app(ctl)
    with TestClient(app) as client:
        admin = (tmp_path / auth.ADMIN_TOKEN_FILE).read_text().strip()
        tokens = {"admin": admin}
        for role in ("viewer", "operator", "enrol"):
            r = client.post("/api/v1/tokens", json={"name": f"t-{role}", "role": role},
                            headers={"Authorization": f"Bearer {admin}"})
            assert r.status_code == 201, r.text
            tokens[role] = r.json()["token"]
        yield Api(client, app, ctl, tmp_path, tokens)


def routes(app: FastAPI) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


def test_every_endpoint_is_classified(api: Api) -> None:
    assert routes(api.app) == set(EXPECTED_ROLES) | set(PEER_ENDPOINTS) | UI_ENDPOINTS


def test_peer_endpoints_take_no_token_only_a_certificate(api: Api) -> None:
    for (method, path), needs in PEER_ENDPOINTS.items():
        path = path.replace("{move_id}", "0b5f7f9e-2c4a-4d7e-9a51-3f0c6c1d2e8a")
        for role in (None, "viewer", "operator", "admin", "enrol"):
            status = api.call(method, path, role, json={})
            if needs == "certificate":
                assert status == 401, (method, path, role, status)
            else:
                assert status not in (401, 403), (method, path, role, status)


def test_every_endpoint_refuses_a_missing_or_bad_token(api: Api) -> None:
    bad = {"malformed": "nonsense", "unknown": "kvm_0123456789ab_" + "A" * 43}
    for method, path in EXPECTED_ROLES:
        url = concrete(path)
        r = api.client.request(method, url)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"]["code"] == "UNAUTHORIZED" and "token" in r.json()["error"]["remedy"]
        for what, token in bad.items():
            r = api.client.request(method, url, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, (what, method, path)


def test_every_endpoint_refuses_a_role_too_low(api: Api) -> None:
    checked = 0
    for (method, path), needed in EXPECTED_ROLES.items():
        url = concrete(path)
        for role in ("viewer", "operator", "admin", "enrol"):
            allowed = (role in ("enrol", "admin")) if needed == "enrol" else \
                (role != "enrol" and RANK[role] >= RANK[needed])
            status = api.call(method, url, role, json={})
            if allowed:
                assert status not in (401, 403), (method, path, role, status)
            else:
                assert status == 403, (method, path, role, status)
                checked += 1
    assert checked > 40


def test_revoked_and_expired_tokens_are_refused(api: Api) -> None:
    assert api.call("GET", "/api/v1/vms", "viewer") == 200
    assert api.call("DELETE", "/api/v1/tokens/t-viewer", "admin") == 200
    r = api.client.get("/api/v1/vms", headers={"Authorization": f"Bearer {api.tokens['viewer']}"})
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    created = api.client.post("/api/v1/tokens", json={"name": "short", "role": "viewer", "ttl_s": 60},
                              headers={"Authorization": f"Bearer {api.tokens['admin']}"}).json()
    query(api.ctl.engine, "UPDATE api_tokens SET expires_at = :t WHERE name = 'short'", t=time.time() - 1)
    r = api.client.get("/api/v1/vms", headers={"Authorization": f"Bearer {created['token']}"})
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_tokens_are_stored_hashed_and_the_admin_token_is_private(api: Api) -> None:
    path = api.root / auth.ADMIN_TOKEN_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    raw = b"".join(f.read_bytes() for f in api.root.glob("c.db*"))          # a SQLite database and its WAL
    stored = all_text(api.ctl.engine)
    hashes = {h for (h,) in query(api.ctl.engine, "SELECT hash FROM api_tokens")}
    for token in api.tokens.values():
        assert token.encode() not in raw and token not in stored
        assert auth.hash_token(token) in hashes
    listed = api.client.get("/api/v1/tokens", headers={"Authorization": f"Bearer {api.tokens['admin']}"}).json()
    assert {t["name"] for t in listed} >= {"admin", "t-viewer"} and all("token" not in t for t in listed)
    assert api.ctl.tokens.bootstrap_admin(api.root) is None          # written once: never again once tokens exist
    assert path.read_text().strip() == api.tokens["admin"]


def test_duplicate_token_name_is_a_clear_conflict(api: Api) -> None:
    r = api.client.post("/api/v1/tokens", json={"name": "t-viewer", "role": "viewer"},
                        headers={"Authorization": f"Bearer {api.tokens['admin']}"})
    assert r.status_code == 409 and "revoke" in r.json()["error"]["remedy"]
    r = api.client.post("/api/v1/tokens", json={"name": "../x", "role": "root"},
                        headers={"Authorization": f"Bearer {api.tokens['admin']}"})
    assert r.status_code == 422


def test_audit_names_who_did_what(api: Api) -> None:
    api.call("POST", "/api/v1/clusters", "operator", json={"name": "c1"})          # refused: 403
    api.call("POST", "/api/v1/clusters", "admin", json={"name": "c1"})             # done: 201
    api.call("GET", "/api/v1/clusters", "viewer")                                  # reads are not audited
    api.call("POST", "/api/v1/vms/x/start", None)                                  # no token: 401
    rows = api.client.get("/api/v1/audit", params={"limit": 4},
                          headers={"Authorization": f"Bearer {api.tokens['admin']}"}).json()
    got = [(a["who"], a["method"], a["path"], a["status"]) for a in rows]
    assert got[:3] == [("-", "POST", "/api/v1/vms/x/start", 401), ("admin", "POST", "/api/v1/clusters", 201),
                       ("t-operator", "POST", "/api/v1/clusters", 403)]
    assert all(a["method"] != "GET" for a in rows)
    text = "\n".join(str(r) for r in query(api.ctl.engine, "SELECT * FROM audit"))
    assert text and not any(t in text for t in api.tokens.values())


def test_audit_is_bounded(api: Api, monkeypatch) -> None:
    monkeypatch.setattr(auth, "AUDIT_KEEP", 50)
    for _ in range(230):
        api.ctl.audit.record("x", "admin", "POST", "/api/v1/vms", 201, "198.18.0.1")
    [(n,)] = query(api.ctl.engine, "SELECT COUNT(*) FROM audit")
    assert 50 <= n <= 50 + 100


def test_host_enrolment_refuses_a_bad_secret_or_address(api: Api) -> None:
    for body in ({"address": "http://198.18.0.99:8770", "secret": "short"},
                 {"address": "not-a-url", "secret": "a" * 64}):
        r = api.client.post("/api/v1/hosts", json=body, headers={"Authorization": f"Bearer {api.tokens['admin']}"})
        assert r.status_code == 422, r.text


# -- request signing between controller and agents -----------------------------------------------------------
SECRET_A, SECRET_B = "a" * 64, "b" * 64


def test_signed_request_is_accepted_once() -> None:
    nonces = hostauth.NonceCache()
    header = hostauth.sign(SECRET_A, "POST", "/v1/vms/u/start", b'{"x":1}')
    hostauth.verify(SECRET_A, header, "POST", "/v1/vms/u/start", b'{"x":1}', nonces)
    with pytest.raises(UnauthorizedError, match="replay"):
        hostauth.verify(SECRET_A, header, "POST", "/v1/vms/u/start", b'{"x":1}', nonces)


@pytest.mark.parametrize("change", ["secret", "body", "path", "method", "clock", "missing"])
def test_a_request_not_signed_by_this_hosts_controller_is_refused(change: str) -> None:
    secret, body, path, method, now = SECRET_A, b"{}", "/v1/vms", "GET", None
    header: str | None = hostauth.sign(SECRET_B if change == "secret" else SECRET_A, method, path, body,
                                       now=time.time() - 300 if change == "clock" else None)
    if change == "missing":
        header = None
    body = b'{"evil":1}' if change == "body" else body
    path = "/v1/vms/u/stop" if change == "path" else path
    method = "POST" if change == "method" else method
    with pytest.raises(UnauthorizedError):
        hostauth.verify(secret, header, method, path, body, hostauth.NonceCache(), now=now)


def test_agent_secret_file_is_private_and_stable(tmp_path: Path) -> None:
    s1 = hostauth.load_or_create_secret(tmp_path)
    assert (tmp_path / hostauth.SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert hostauth.load_or_create_secret(tmp_path) == s1 and len(s1) == 64
    assert "secret" not in repr(hostauth.HostAuth(s1)).replace("<secret>", "") and s1 not in repr(hostauth.HostAuth(s1))

"""Security findings 7 and 11 of issue 19, on the controller, without the lab: the token is checked before the
body is read, bodies are bounded, the API docs need a token, and the controller's secret files are private."""
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

from kvmotion.controller import auth
from kvmotion.controller import main as controller_main
from kvmotion.controller.api import create_app
from kvmotion.controller.gate import MAX_BODY, ApiGate
from kvmotion.controller.service import Controller

MiB = 1 << 20


class Api:
    def __init__(self, root: Path, db_url: str | None = None, public_docs: bool = False) -> None:
        self.root = root
        self.ctl = Controller(db_url or f"sqlite:///{root / 'c.db'}", pki_dir=root / "pki", token_dir=root)
        self.client = TestClient(create_app(self.ctl, public_docs=public_docs))
        self.tokens: dict[str, str] = {}

    def start(self) -> "Api":
        self.client.__enter__()
        self.tokens["admin"] = (self.root / auth.ADMIN_TOKEN_FILE).read_text().strip()
        for role in ("viewer", "enrol"):
            r = self.client.post("/api/v1/tokens", json={"name": f"t-{role}", "role": role}, headers=self.auth("admin"))
            self.tokens[role] = r.json()["token"]
        return self

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def audit(self) -> list[tuple[str, str, int]]:
        rows = self.client.get("/api/v1/audit", params={"limit": 5}, headers=self.auth("admin")).json()
        return [(a["who"], a["path"], a["status"]) for a in rows]


@pytest.fixture()
def api(tmp_path: Path, db_url: str) -> Iterator[Api]:
    a = Api(tmp_path, db_url).start()
    yield a
    a.client.__exit__(None, None, None)


# -- finding 7: authentication before the body, and a bounded body -------------------------------------------
def test_a_call_without_a_token_is_refused_before_its_body_is_parsed(api: Api) -> None:
    r = api.client.post("/api/v1/clusters", content=b'{"name": "c1", not json',
                        headers={"content-type": "application/json"})
    assert r.status_code == 401                      # not the 422 of a body parsed for nobody
    err = r.json()["error"]
    assert err["code"] == "UNAUTHORIZED" and "token" in err["remedy"]
    assert api.audit()[0] == ("-", "/api/v1/clusters", 401)


def test_the_gate_reads_nothing_of_an_unauthenticated_body(api: Api) -> None:
    calls: list[str] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append("app")

    async def receive() -> dict[str, Any]:
        calls.append("receive")
        return {"type": "http.request", "body": b"x" * MiB, "more_body": True}
    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)
    scope = {"type": "http", "method": "POST", "path": "/api/v1/vms", "headers": [(b"content-length", b"99999999999"),
             (b"authorization", b"Bearer kvm_0123456789ab_" + b"A" * 43)]}
    asyncio.run(ApiGate(inner, api.ctl.tokens)(scope, receive, send))
    assert sent[0]["status"] == 401 and calls == []


def test_a_body_over_the_limit_is_a_413_and_audited(api: Api) -> None:
    big = json.dumps({"name": "c1", "pad": "x" * (MAX_BODY + 1)}).encode()
    r = api.client.post("/api/v1/clusters", content=big, headers={**api.auth("admin"),
                                                                   "content-type": "application/json"})
    assert r.status_code == 413 and "1 MiB" in r.json()["error"]["remedy"]
    assert api.audit()[0] == ("admin", "/api/v1/clusters", 413)

    def chunks() -> Iterator[bytes]:                 # no Content-Length: refused once the limit is passed
        for _ in range(64):
            yield b"y" * (256 << 10)
    r = api.client.post("/api/v1/clusters", content=chunks(), headers=api.auth("admin"))
    assert r.status_code == 413


def test_vm_creation_may_carry_cloud_init_files_larger_than_the_default_limit(api: Api) -> None:
    text = "\U0001F600" * (64 << 10)                 # 64 Ki characters, 12 bytes each once JSON-escaped
    files = {k: {"name": k, "text": text} for k in ("user_data", "ssh_key", "network_config", "meta_data")}
    body = json.dumps({"name": "v1", "cloud_init": files}).encode()
    assert len(body) > 3 * MiB
    r = api.client.post("/api/v1/vms", content=body, headers={**api.auth("admin"), "content-type": "application/json"})
    assert r.status_code not in (401, 413), r.text  # read and parsed (then refused for what it says, not its size)


def test_host_registration_still_takes_an_enrolment_token(api: Api) -> None:
    r = api.client.post("/api/v1/hosts/register", json={"address": "http://198.51.100.7:8770", "secret": "short"},
                        headers=api.auth("enrol"))
    assert r.status_code == 422                      # past the gate and the role check, refused for its secret


# -- finding 11: the docs need a token; the controller's secret files are private ----------------------------
@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc"])
def test_the_api_docs_need_a_viewer_token(api: Api, path: str) -> None:
    assert api.client.get(path).status_code == 401
    assert api.client.get(path, headers=api.auth("enrol")).status_code == 403
    assert api.client.get(path, headers=api.auth("viewer")).status_code == 200


def test_public_docs_is_a_switch_of_the_server(tmp_path: Path, db_url: str, monkeypatch) -> None:
    served: list[Any] = []
    monkeypatch.setattr(controller_main.uvicorn, "run", lambda app, **_: served.append(app))
    controller_main.main(["--db", db_url, "--pki-dir", str(tmp_path / "pki"), "--public-docs"])
    controller_main.main(["--db", db_url, "--pki-dir", str(tmp_path / "pki")])
    public, private = (TestClient(app) for app in served)
    assert public.get("/openapi.json").status_code == 200 and private.get("/openapi.json").status_code == 401
    assert public.get("/api/v1/vms").status_code == 401          # only the docs are public


def test_the_database_and_its_wal_are_private_even_with_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        a = Api(tmp_path).start()
        a.client.post("/api/v1/clusters", json={"name": "c1"}, headers=a.auth("admin"))
        files = sorted(tmp_path.glob("c.db*"))
        assert {f.name for f in files} >= {"c.db", "c.db-wal", "c.db-shm"}
        assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}
        a.client.__exit__(None, None, None)
    finally:
        os.umask(old)


def test_secret_files_found_readable_by_others_are_made_private(tmp_path: Path) -> None:
    a = Api(tmp_path).start()
    a.client.__exit__(None, None, None)
    secrets = [tmp_path / "c.db", tmp_path / auth.ADMIN_TOKEN_FILE, tmp_path / "pki" / "ca-key.pem",
               tmp_path / "pki" / "master.key"]
    for f in secrets:
        os.chmod(f, 0o644)
    with sqlite3.connect(tmp_path / "c.db") as db:            # a database written by an older controller
        db.execute("SELECT 1")
    with Api(tmp_path).client:                                 # the next start
        pass
    assert {f.name: f.stat().st_mode & 0o777 for f in secrets} == {f.name: 0o600 for f in secrets}


def test_the_key_directories_are_private(tmp_path: Path, db_url: str) -> None:
    """The controller's PKI directory (CA key, master key) is 0700, created so or tightened at start; a symlink in
    its place is refused."""
    import os
    from kvmotion.common.private import private_dir
    from kvmotion.controller.service import Controller
    pki = tmp_path / "pki"
    Controller(db_url, pki_dir=pki, token_dir=tmp_path)
    assert pki.stat().st_mode & 0o777 == 0o700
    os.chmod(pki, 0o755)
    Controller(db_url, pki_dir=pki, token_dir=tmp_path)
    assert pki.stat().st_mode & 0o777 == 0o700
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "state")
    with pytest.raises(NotADirectoryError):
        private_dir(tmp_path / "state")

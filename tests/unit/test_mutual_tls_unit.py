"""Issue 19, transport: the agent's API over real HTTPS on loopback, mutual with pinned identities both ways.

The real agent app and TLS context (``agent.apitls``) served by uvicorn; the controller's real ``AgentClient``,
CA and client certificate (``controller.agenttls``). A wrong certificate on either side fails the handshake, so
not a byte of the request (its signature, a wrapped key) reaches the far end."""
from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import httpx
import pytest
import uvicorn

from kvmotion.agent.api import create_app as agent_app
from kvmotion.agent.apitls import ApiIdentity
from kvmotion.common import pinning
from kvmotion.common.errors import AgentUnreachable, ConflictError, InvalidInputError
from kvmotion.controller import db
from kvmotion.controller.agents import AgentClient
from kvmotion.controller.agenttls import AgentTls, check_presented
from kvmotion.controller.pki import CertificateAuthority

SECRET = "ab" * 32


class FakeAgent:
    """Just enough of ``Agent`` for the host routes: no QEMU, the real API identity."""

    def __init__(self, state_dir: Path) -> None:
        self.cfg = SimpleNamespace(name="h1")
        self.accel = SimpleNamespace(accelerator="tcg")
        self.api = ApiIdentity(state_dir, "h1", ["127.0.0.1", "h1"])


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[FakeAgent, str]]:
    agent = FakeAgent(tmp_path / "agent")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(agent_app(agent, SECRET), host="127.0.0.1", port=port, log_level="error",  # type: ignore[arg-type]
                            lifespan="off")
    config.load()
    config.ssl = agent.api.server_context()
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not server.started and time.monotonic() < end:
        time.sleep(0.02)
    assert server.started
    yield agent, f"https://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture()
def controller(tmp_path: Path, db_url: str) -> tuple[AgentTls, CertificateAuthority]:
    ca = CertificateAuthority.load_or_create(tmp_path / "pki")
    sessions = db.make_sessionmaker(db.make_engine(db_url))
    return AgentTls(sessions, ca, tmp_path / "pki"), ca


def health(url: str, tls: pinning.ClientTls) -> dict:
    return asyncio.run(AgentClient("h1", url, SECRET, tls=tls)._call("GET", "/v1/health"))


def test_first_contact_reports_the_certificate_the_signed_facts_name(served, controller) -> None:
    agent, url = served
    tls, _ = controller
    client = AgentClient("h1", url, SECRET, tls=tls.first_contact())
    assert asyncio.run(client._call("GET", "/v1/health"))["ok"] is True
    assert client.peer_pem is not None and pinning.sha256_of(client.peer_pem) == agent.api.cert_sha256
    check_presented(url, SimpleNamespace(api_cert_sha256=agent.api.cert_sha256), client.peer_pem)  # type: ignore[arg-type]
    other = ApiIdentity(Path(agent.api.dir).parent.parent / "other", "h9", ["127.0.0.1"])
    with pytest.raises(InvalidInputError, match="intercepts"):     # a man in the middle's own certificate
        check_presented(url, SimpleNamespace(api_cert_sha256=agent.api.cert_sha256), other.cert_pem)  # type: ignore[arg-type]


def test_the_controller_talks_only_to_the_pinned_certificate(served, controller, tmp_path: Path) -> None:
    agent, url = served
    tls, ca = controller
    tls.pin("h1", agent.api.cert_pem, replace=True)
    assert health(url, tls.client("h1"))["ok"] is True
    impostor = ApiIdentity(tmp_path / "impostor", "h1", ["127.0.0.1", "h1"])     # same name, another key
    tls.pin("h1", impostor.cert_pem, replace=True)
    with pytest.raises(AgentUnreachable) as err:
        health(url, tls.client("h1"))
    assert isinstance(err.value.__cause__, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(err.value.__cause__)


def test_after_pinning_the_agent_refuses_every_other_client(served, controller, tmp_path: Path, new_db) -> None:
    agent, url = served
    tls, ca = controller
    tls.pin("h1", agent.api.cert_pem, replace=True)
    pinned = tls.client("h1")
    client = AgentClient("h1", url, SECRET, tls=pinned)
    assert asyncio.run(client.pin_controller(tls.cert_pem)) is True
    assert asyncio.run(client.pin_controller(tls.cert_pem)) is False            # idempotent
    assert health(url, pinned)["ok"] is True
    no_cert = pinning.ClientTls(None, None, pinned.pins)
    other_ctl = AgentTls(db.make_sessionmaker(db.make_engine(new_db("o"))), ca, tmp_path / "o")
    same_ca = pinning.ClientTls(other_ctl.cert_file, other_ctl.key_file, pinned.pins)   # issued by the same CA
    for who in (no_cert, same_ca):
        with pytest.raises(AgentUnreachable):
            health(url, who)
    with pytest.raises(ConflictError, match="another controller"):
        agent.api.pin_controller(other_ctl.cert_pem)
    restarted = ApiIdentity(Path(agent.api.dir).parent, "h1", ["127.0.0.1"])   # the pin survives a restart
    assert restarted.controller_pem == tls.cert_pem and restarted.cert_pem == agent.api.cert_pem


def test_the_ca_issued_api_certificate_is_served_at_once(served, controller) -> None:
    agent, url = served
    tls, ca = controller
    old = agent.api.cert_pem
    tls.pin("h1", old, replace=True)
    client = AgentClient("h1", url, SECRET, tls=tls.client("h1"))
    asyncio.run(client.pin_controller(tls.cert_pem))
    cert = tls.issue_api_cert("h1", url, asyncio.run(client.api_tls_csr()))
    tls.pin("h1", cert)
    assert asyncio.run(client.api_tls_install(cert, ca.cert_pem)) == pinning.sha256_of(cert)
    served_now = ssl.get_server_certificate(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    assert pinning.sha256_of(served_now) == pinning.sha256_of(cert) != pinning.sha256_of(old)
    assert health(url, pinning.ClientTls(tls.cert_file, tls.key_file, (cert,)))["ok"] is True
    with pytest.raises(AgentUnreachable):                                       # the old one is no longer served
        health(url, pinning.ClientTls(tls.cert_file, tls.key_file, (old,)))
    other_ca = CertificateAuthority.load_or_create(Path(agent.api.dir).parent / "other-ca")
    with pytest.raises(InvalidInputError, match="not one the given CA issued"):
        agent.api.install(cert, other_ca.cert_pem)
    foreign = other_ca.sign(pinning.csr_for(ApiIdentity(Path(agent.api.dir).parent / "x", "h2", []).key, "h2"),
                            "server", "h2-api", ["h2"])
    with pytest.raises(InvalidInputError, match="not for this host's API key"):
        agent.api.install(foreign, other_ca.cert_pem)

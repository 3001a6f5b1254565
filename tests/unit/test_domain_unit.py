"""Issue 20, first part: the trust domain of controllers.

Two real controllers (each its own database, PKI directory and CA), each served by uvicorn over real TLS on
loopback with the options kvmotion-server uses (``Domain.serving``), driven by the real CLI (typer) and its HTTP
client. Peer calls run over mutual TLS with both identities pinned."""
from __future__ import annotations

import socket
import ssl
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from kvmotion import __version__
from kvmotion.agent.registration import controller_tls
from kvmotion.cli.client import Client
from kvmotion.cli.main import build_app
from kvmotion.common import http, pinning
from kvmotion.common.errors import ConflictError, InvalidInputError, NotFoundError, UnauthorizedError
from kvmotion.controller import apicert, domain, peertls
from kvmotion.controller.agenttls import CERT_FILE as AGENT_CLIENT_CERT, KEY_FILE as AGENT_CLIENT_KEY
from kvmotion.controller.api import create_app
from kvmotion.controller.pki import CertificateAuthority
from kvmotion.controller.service import Controller
from kvmotion.models.domain import DomainCreate, JoinRequest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    ctl: Controller
    root: Path
    url: str
    token: str

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, timeout=30, token=token or self.token)

    def cli(self, *args: str) -> str:
        """Run `kvmotion ARGS --url URL` with this controller's admin token; returns its output (exit 0)."""
        result = self.cli_result(*args)
        assert result.exit_code == 0, result.output
        return result.output

    def cli_result(self, *args: str) -> Any:
        return CliRunner().invoke(build_app(), [*args, "--url", self.url], env={"KVMOTION_TOKEN": self.token},
                                  terminal_width=250)

    @property
    def fingerprint(self) -> str:
        return self.client().domain()["fingerprint"]

    def audited(self) -> set[tuple[str, str, str, str, int]]:
        return {(a["who"], a["role"], a["method"], a["path"], a["status"]) for a in self.client().audit(500)}

    def peer_get(self, cert: tuple[Path, Path] | None, path: str = "/api/v1/peer/hello",
                 token: str | None = None) -> httpx.Response:
        """A raw call trusting only this controller's CA, presenting ``cert`` (certificate, key) or none."""
        tls = pinning.ClientTls(cert[0] if cert else None, cert[1] if cert else None, (self.ctl.certs.ca.cert_pem,))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.url + path, verify=pinning.client_context(tls), headers=headers, timeout=10)


@contextmanager
def serve(root: Path, db_url: str, port: int | None = None) -> Iterator[Served]:
    root.mkdir(exist_ok=True)
    ctl = Controller(db_url, pki_dir=root / "pki", token_dir=root)
    port = port or free_port()
    cert = apicert.ensure(ctl.certs.ca, ctl.pki_dir, ["127.0.0.1"])
    server = uvicorn.Server(uvicorn.Config(create_app(ctl), host="127.0.0.1", port=port, log_level="error",
                                           **ctl.domain.serving(cert)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < end:
        time.sleep(0.02)
    assert server.started
    http.trust(root / "pki" / "ca-cert.pem")          # the CLI's clients trust both controllers' CAs
    try:
        yield Served(ctl, root, f"https://127.0.0.1:{port}", (root / "admin.token").read_text().strip())
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture()
def pair(tmp_path: Path, new_db: Callable[[str], str]) -> Iterator[tuple[Served, Served]]:
    with serve(tmp_path / "a", new_db("a")) as a, serve(tmp_path / "b", new_db("b")) as b:
        yield a, b


def peer_cert(s: Served) -> tuple[Path, Path]:
    return s.ctl.domain.cert_file, s.ctl.domain.key_file


def handshake(s: Served, cert: tuple[Path, Path]) -> bool:
    """Whether a TLS 1.2 handshake presenting ``cert`` completes (in 1.2 the server's verdict on a client
    certificate is part of the handshake; in 1.3 it comes after, as a closed connection)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode, ctx.maximum_version = False, ssl.CERT_NONE, ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(*cert)
    with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=10) as raw:
        try:
            ctx.wrap_socket(raw).close()
        except (ssl.SSLError, OSError):
            return False
    return True


def members(s: Served) -> dict[str, str]:
    return {m["name"]: m["state"] for m in s.client().domain_members()}


def join(a: Served, b: Served) -> None:
    a.cli("domain", "create", "lab", "--name", "a")
    b.cli("domain", "join", a.url, "--fingerprint", a.fingerprint, "--name", "b")
    a.cli("domain", "approve", "b", "--fingerprint", b.fingerprint)


def test_join_approve_then_hello_both_ways_over_mutual_tls(pair: tuple[Served, Served]) -> None:
    a, b = pair
    out = a.cli("domain", "create", "lab", "--name", "a")
    assert a.fingerprint in out and "lab" in out
    out = b.cli("domain", "join", a.url, "--fingerprint", a.fingerprint.lower(), "--name", "b")
    assert f"kvmotion domain approve b --fingerprint {b.fingerprint}" in out        # what to run on A
    assert members(a) == {"b": "pending"} and members(b) == {"a": "joining"}
    assert a.client().domain_members()[0]["fingerprint"] == b.fingerprint
    assert b.peer_get(peer_cert(a)).status_code == 403          # B pins A, but A is not yet a member there
    assert "member" in a.cli("domain", "approve", "b", "--fingerprint", b.fingerprint)
    assert members(a) == {"b": "member"} and members(b) == {"a": "member"}
    assert a.client().domain()["domain_id"] == b.client().domain()["domain_id"] is not None
    hello_b = a.client().ping_member("b")
    hello_a = b.client().ping_member("a")
    assert (hello_b["name"], hello_a["name"]) == ("b", "a")
    assert hello_a["domain_id"] == hello_b["domain_id"] == a.client().domain()["domain_id"]
    assert hello_a["version"] == hello_b["version"] == __version__
    assert "kvmotion" in a.cli("domain", "ping", "b") and all(m["last_contact"] > 0 for m in a.client().domain_members())
    assert b.peer_get(peer_cert(a)).json()["name"] == "b"          # A's pinned client certificate is A on B
    assert {("b", "join-request", "POST", "/api/v1/peer/join", 202), ("-", "anonymous", "GET", "/api/v1/peer/ca", 200),
            ("admin", "admin", "POST", "/api/v1/domain/members/b/approve", 200),
            ("b", "peer", "GET", "/api/v1/peer/hello", 200)} <= a.audited()
    assert {("admin", "admin", "POST", "/api/v1/domain/join", 202), ("a", "peer", "POST", "/api/v1/peer/welcome", 200),
            ("a", "peer", "GET", "/api/v1/peer/hello", 200),
            ("admin", "admin", "POST", "/api/v1/domain/members/a/ping", 200)} <= b.audited()


def test_the_pins_survive_a_restart(tmp_path: Path, new_db: Callable[[str], str]) -> None:
    db_a, db_b = new_db("a"), new_db("b")
    with serve(tmp_path / "a", db_a) as a:
        with serve(tmp_path / "b", db_b) as b:
            join(a, b)
        assert a.peer_get(peer_cert(b)).status_code == 200
        with serve(tmp_path / "b", db_b, int(b.url.rsplit(":", 1)[1])) as b:   # B again: its listener from what it pinned
            assert a.client().ping_member("b")["name"] == "b" and b.client().ping_member("a")["name"] == "a"
            assert b.peer_get(peer_cert(a)).status_code == 200


def test_a_wrong_fingerprint_is_refused_and_nothing_is_kept(pair: tuple[Served, Served], tmp_path: Path) -> None:
    a, b = pair
    a.cli("domain", "create", "lab", "--name", "a")
    wrong = pinning.fingerprint(CertificateAuthority.load_or_create(tmp_path / "other").cert_pem)
    result = b.cli_result("domain", "join", a.url, "--fingerprint", wrong, "--name", "b")
    assert result.exit_code == 2, result.output
    said = "".join(result.output.split())                   # as rich wrapped it
    assert f"hasfingerprint{a.fingerprint}" in said and "--fingerprint" in said
    assert members(a) == {} and members(b) == {} and b.client().domain()["domain_id"] is None
    b.cli("domain", "join", a.url, "--fingerprint", a.fingerprint, "--name", "b")
    with pytest.raises(ConflictError) as err:                   # A's admin compares B's fingerprint too
        a.client().approve_member("b", a.fingerprint)
    assert "kvmotion domain reject b" in err.value.remedy
    assert members(a) == {"b": "pending"} and members(b) == {"a": "joining"}
    with pytest.raises(ConflictError, match="already in domain"):
        a.client().create_domain("again", None, a.url)


def test_a_token_of_one_controller_gives_nothing_on_the_other(pair: tuple[Served, Served]) -> None:
    a, b = pair
    join(a, b)
    for call in (lambda c: c.domain(), lambda c: c.domain_members(), lambda c: c.leave_domain(),
                 lambda c: c.remove_member("a")):
        with pytest.raises(UnauthorizedError):
            call(b.client(token=a.token))
    for token in (a.token, b.token):                            # no token counts on the peer endpoints
        r = b.peer_get(None, token=token)
        assert r.status_code == 401 and "client certificate" in r.json()["error"]["message"]
    assert b.peer_get(peer_cert(a), token=b.token).status_code == 200       # the certificate alone decides
    assert members(b) == {"a": "member"}


def test_client_certificates_the_handshake_refuses_and_those_the_app_refuses(pair: tuple[Served, Served],
                                                                              tmp_path: Path) -> None:
    a, b = pair
    third = CertificateAuthority.load_or_create(tmp_path / "third")
    from kvmotion.controller.pki import ensure_client_cert
    stranger = ensure_client_cert(third, tmp_path / "third", "c.pem", "k.pem", "kvmotion controller (peer client)")
    r = a.peer_get(stranger)                              # no member yet: no client certificate is even asked for
    assert r.status_code == 401 and "none was presented" in r.json()["error"]["message"]
    join(a, b)
    with pytest.raises(httpx.HTTPError):                  # now asked for, and refused at the handshake
        a.peer_get(stranger)
    assert not handshake(a, stranger) and handshake(a, peer_cert(b))
    b_agent_client = (b.ctl.pki_dir / AGENT_CLIENT_CERT, b.ctl.pki_dir / AGENT_CLIENT_KEY)   # B's CA, not pinned
    assert handshake(a, b_agent_client) and a.peer_get(b_agent_client).status_code == 401
    assert a.peer_get(peer_cert(b)).status_code == 200
    assert ("b", "peer", "GET", "/api/v1/peer/hello", 200) in a.audited()
    # clients without a certificate are served as before: the CLI, and an agent registering (its TLS context)
    assert a.client().domain()["name"] == "a"
    agent_ctx = controller_tls(SimpleNamespace(controller_ca_file=a.ctl.pki_dir / "ca-cert.pem"))   # type: ignore[arg-type]
    r = httpx.get(a.url + "/api/v1/health", verify=agent_ctx, headers={"Authorization": f"Bearer {a.token}"})
    assert r.status_code == 200 and r.json()["ok"] is True


def test_leave_forgets_the_pins_on_both_sides(pair: tuple[Served, Served]) -> None:
    a, b = pair
    join(a, b)
    assert "forgot a" in b.cli("domain", "leave")
    assert members(a) == {} and members(b) == {} and b.client().domain()["domain_id"] is None
    assert a.peer_get(peer_cert(b)).status_code == 401          # B's old pin: refused (its CA is still loaded)
    assert b.peer_get(peer_cert(a)).status_code == 401
    with pytest.raises(NotFoundError):
        a.client().ping_member("b")
    assert ("b", "peer", "POST", "/api/v1/peer/leave", 200) in a.audited()
    assert ("admin", "admin", "POST", "/api/v1/domain/leave", 200) in b.audited()
    join_again = b.cli("domain", "join", a.url, "--fingerprint", a.fingerprint, "--name", "b")   # it may come back
    assert "state joining" in join_again and members(a) == {"b": "pending"}


def test_remove_and_reject_tell_the_other_side(pair: tuple[Served, Served]) -> None:
    a, b = pair
    join(a, b)
    assert "forgot b" in a.cli("domain", "remove", "b")
    assert members(a) == {} and members(b) == {}
    assert a.peer_get(peer_cert(b)).status_code == 401 and b.peer_get(peer_cert(a)).status_code == 401
    assert ("a", "peer", "POST", "/api/v1/peer/leave", 200) in b.audited()
    b.cli("domain", "join", a.url, "--fingerprint", a.fingerprint)
    assert members(a) == {"b": "pending"} and members(b) == {"a": "joining"}
    assert "forgot b" in a.cli("domain", "reject", "b")
    assert members(a) == {} and members(b) == {}
    assert "forgot nobody" in b.cli("domain", "leave")        # B keeps its domain id until it leaves


def _joiner(root: Path, name: str) -> JoinRequest:
    ca = CertificateAuthority.load_or_create(root / name)
    client = ca.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), "client", "peer", [])
    return JoinRequest(name=name, url=f"https://{name}.example:8760", ca_pem=ca.cert_pem, client_pem=client)


def test_join_requests_are_bounded_and_checked(pair: tuple[Served, Served], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = pair
    with pytest.raises(ConflictError, match="in no domain"):
        a.ctl.domain.receive_join(_joiner(tmp_path, "c1"))
    a.ctl.domain.create(DomainCreate(name="lab", controller_name="a", public_url=a.url), "admin")
    monkeypatch.setattr(domain, "MAX_JOIN_REQUESTS", 2)
    for name in ("c1", "c2", "c2"):                          # the same name again replaces its request
        a.ctl.domain.receive_join(_joiner(tmp_path, name))
    with pytest.raises(ConflictError, match="too many join requests"):
        a.ctl.domain.receive_join(_joiner(tmp_path, "c3"))
    assert members(a) == {"c1": "pending", "c2": "pending"}
    forged = _joiner(tmp_path, "c4").model_copy(update={"client_pem": _joiner(tmp_path, "c5").client_pem})
    with pytest.raises(InvalidInputError, match="not a controller's identity"):
        a.ctl.domain.receive_join(forged)
    with pytest.raises(ConflictError, match="named 'a'"):
        a.ctl.domain.receive_join(_joiner(tmp_path, "a"))


def test_only_a_controller_serving_its_own_cas_certificate_can_be_in_a_domain(tmp_path: Path, db_url: str) -> None:
    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    req = DomainCreate(name="lab", controller_name="a", public_url="https://a.example:8760")
    with pytest.raises(ConflictError, match="does not serve HTTPS"):
        ctl.domain.create(req, "admin")
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    own = apicert.ensure(other, tmp_path / "other", ["a.example"])                 # as with --tls-cert
    ctx = ctl.domain.server.attach(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), own[0], [])
    assert ctx.verify_mode == ssl.CERT_NONE               # no member: no client certificate asked for
    with pytest.raises(ConflictError, match="--tls-cert"):
        ctl.domain.create(req, "admin")
    assert ctl.domain.show().domain_id is None


def test_a_peer_is_only_believed_with_a_controllers_api_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "pki")
    api = apicert.ensure(ca, tmp_path / "pki", ["c.example"])[0].read_text()
    host = ca.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), "server", "h1-api", ["h1"])
    assert peertls.is_controller_api(api) and not peertls.is_controller_api(host)
    assert not peertls.is_controller_api(None)

"""Host onboarding without the lab: single-use enrolment tokens, pending hosts and approval by fingerprint, the
addresses a certificate may name, facts that cannot rewrite other hosts' records, host removal with a CRL, the
host address allow-list, and the agent's registration loop. Fake agents answer with the real agent TLS code."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from cryptography import x509

from kvmotion.agent import tls
from kvmotion.agent.apitls import ApiIdentity
from kvmotion.agent.config import AgentConfig
from kvmotion.agent.registration import STATE_FILE, register
from kvmotion.common import hostid
from kvmotion.common.errors import ConflictError, InvalidInputError, NotFoundError, UnauthorizedError
from kvmotion.controller import hostnet, inventory as inventory_mod
from kvmotion.controller.auth import Role, TokenCreate
from kvmotion.controller.db import VM
from kvmotion.controller.service import Controller
from kvmotion.models.agent import HostFacts, TlsFact
from kvmotion.models.api import HostAdd
from test_checks_unit import facts as checks_facts


def make_facts(name: str, **kw: Any) -> HostFacts:
    """A host's facts with datastore "shared" not marked shared: what these tests take h1's to be."""
    return checks_facts(name, shared=(), **kw)


SECRETS = {"h1": "a1" * 32, "h2": "b2" * 32, "h3": "c3" * 32}


class FakeAgent:
    """One host's agent: its facts, and real CSRs, installs and CRLs in its own TLS directory."""
    registry: dict[str, "FakeAgent"] = {}

    def __init__(self, name: str, tls_dir: Path, mig: str) -> None:
        self.name, self.tls_dir = name, tls_dir
        self.api = ApiIdentity(tls_dir.parent / f"state-{name}", name, [name])
        self.facts_ = make_facts(name, tls=False)
        self.facts_.migration_interfaces[0].address = mig
        self.crls = 0

    @classmethod
    def client(cls, host: str, address: str, secret: str, **_: Any) -> "FakeClient":
        return FakeClient(cls.registry[address], secret)


class FakeClient:
    def __init__(self, agent: FakeAgent, secret: str) -> None:
        self.a, self.secret = agent, secret
        self.peer_pem = agent.api.cert_pem       # what its HTTPS API presents

    async def facts(self) -> HostFacts:
        if self.secret != SECRETS[self.a.name]:
            from kvmotion.common.errors import AgentError
            raise AgentError("refused", details={"auth_refused": True})
        f = self.a.facts_.model_copy(deep=True)
        f.tls = tls.status(self.a.tls_dir)
        f.api_cert_sha256 = self.a.api.cert_sha256
        return f

    async def pin_controller(self, cert: str) -> bool:
        return self.a.api.pin_controller(cert)

    async def api_tls_csr(self) -> str:
        return self.a.api.csr()

    async def api_tls_install(self, cert: str, ca: str) -> str:
        return self.a.api.install(cert, ca)

    async def tls_csr(self) -> dict[str, str]:
        return tls.make_csrs(self.a.tls_dir, self.a.name)

    async def tls_install(self, ca: str, server: str, client: str) -> TlsFact:
        return tls.install(self.a.tls_dir, ca, server, client)

    async def tls_crl(self, crl: str) -> int:
        self.a.crls += 1
        return tls.install_crl(self.a.tls_dir, crl)

    async def tls_remove(self) -> TlsFact:
        tls.remove(self.a.tls_dir)
        return tls.status(self.a.tls_dir)


@pytest.fixture()
def ctl(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Controller]:
    monkeypatch.setattr(inventory_mod, "AgentClient", FakeAgent.client)
    FakeAgent.registry = {f"https://198.18.0.1{i}:8770": FakeAgent(f"h{i}", tmp_path / f"tls-h{i}", f"198.19.0.1{i}")
                          for i in (1, 2, 3)}
    yield Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path,
                     host_networks=["198.18.0.0/15"])


def token(ctl: Controller, name: str) -> str:
    ctl.tokens.create(TokenCreate(name=name, role=Role.ENROL, ttl_s=600))
    return name


def reg(ctl: Controller, host: str, tok: str, secret: str | None = None) -> Any:
    req = HostAdd(address=f"https://198.18.0.1{host[-1]}:8770", secret=secret or SECRETS[host], name=host)
    return asyncio.run(ctl.onboarding.register(req, tok))


def test_a_registered_host_waits_for_approval_and_its_token_is_used_up(ctl: Controller) -> None:
    out = reg(ctl, "h1", token(ctl, "t1"))
    assert out.state == "pending" and out.fingerprint == hostid.fingerprint(SECRETS["h1"])
    assert "kvmotion host approve h1 --fingerprint" in out.remedy
    assert ctl.inventory.list_hosts() == []                     # not placed on, evacuated to, or certified
    assert ctl.inventory.datastores() == []                     # its facts rewrite nothing
    assert [t.revoked for t in ctl.tokens.list() if t.name == "t1"] == [True]
    with pytest.raises(UnauthorizedError, match="already used"):
        reg(ctl, "h2", "t1")
    pend = ctl.onboarding.pending()
    assert [(p.name, p.fingerprint, p.migration_addresses) for p in pend] == \
        [("h1", out.fingerprint, ["198.19.0.11"])]


def test_approval_needs_the_fingerprint_and_certificates_name_only_approved_addresses(ctl: Controller) -> None:
    fp = reg(ctl, "h1", token(ctl, "t1")).fingerprint
    with pytest.raises(ConflictError, match="is not host h1's") as exc:
        asyncio.run(ctl.onboarding.approve("h1", hostid.fingerprint(SECRETS["h2"]), "admin"))
    assert "host reject h1" in exc.value.remedy
    FakeAgent.registry["https://198.18.0.11:8770"].facts_.migration_interfaces[0].address = "198.19.0.99"
    host = asyncio.run(ctl.onboarding.approve("h1", fp.lower().replace(":", ""), "admin"))
    assert host.name == "h1" and host.state == "connected" and ctl.onboarding.pending() == []
    cert = x509.load_pem_x509_certificate((FakeAgent.registry["https://198.18.0.11:8770"].tls_dir /
                                           "server-cert.pem").read_bytes())
    san = [str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
    assert san == ["h1"]          # 198.19.0.99 appeared after the registration: no admin approved it
    with pytest.raises(NotFoundError):
        asyncio.run(ctl.onboarding.approve("h1", fp, "admin"))


def test_an_address_of_another_host_is_refused_at_approval(ctl: Controller) -> None:
    asyncio.run(ctl.onboarding.approve("h1", reg(ctl, "h1", token(ctl, "t1")).fingerprint, "admin"))
    FakeAgent.registry["https://198.18.0.12:8770"].facts_.migration_interfaces[0].address = "198.19.0.11"
    fp = reg(ctl, "h2", token(ctl, "t2")).fingerprint
    with pytest.raises(ConflictError, match="belong to host h1"):
        asyncio.run(ctl.onboarding.approve("h2", fp, "admin"))
    assert [h.name for h in ctl.inventory.list_hosts()] == ["h1"]
    assert ctl.onboarding.reject("h2").name == "h2" and ctl.onboarding.pending() == []


def test_registration_cannot_take_over_an_enrolled_host(ctl: Controller) -> None:
    asyncio.run(ctl.onboarding.approve("h1", reg(ctl, "h1", token(ctl, "t1")).fingerprint, "admin"))
    assert reg(ctl, "h1", token(ctl, "t2")).state == "enrolled"
    with pytest.raises(InvalidInputError, match="refused the secret"):
        reg(ctl, "h1", token(ctl, "t3"), secret="ff" * 32)     # the agent itself refuses a wrong secret
    assert [t.revoked for t in ctl.tokens.list() if t.name in ("t2", "t3")] == [False, False]


def test_facts_never_rewrite_a_datastore_other_hosts_see(ctl: Controller) -> None:
    for h in ("h1", "h2"):
        asyncio.run(ctl.onboarding.approve(h, reg(ctl, h, token(ctl, f"t{h}")).fingerprint, "admin"))
    lying = make_facts("h2")
    lying.datastores[0].name, lying.datastores[0].shared = "mine", True
    ctl.inventory.store_facts("h2", lying)
    ds = ctl.inventory.datastores()
    assert [(d["name"], d["shared"], d["hosts"]) for d in ds] == [("shared", False, ["h1"])]
    assert "is 'shared' (local) on h1, not 'mine'" in ctl.inventory.get_host("h2").last_error
    ctl.inventory.store_facts("h2", make_facts("h1"))           # facts of another host: refused
    assert ctl.inventory.get_host("h2").state == "disconnected"


def test_removal_revokes_the_certificates_and_every_other_host_gets_the_crl(ctl: Controller) -> None:
    for h in ("h1", "h2"):
        asyncio.run(ctl.onboarding.approve(h, reg(ctl, h, token(ctl, f"t{h}")).fingerprint, "admin"))
    h2_dir = FakeAgent.registry["https://198.18.0.12:8770"].tls_dir
    serials = {format(x509.load_pem_x509_certificate((h2_dir / f"{u}-cert.pem").read_bytes()).serial_number, "x")
               for u in ("server", "client")}
    api_pem = FakeAgent.registry["https://198.18.0.12:8770"].api.cert_pem      # its API's, issued at approval
    serials.add(format(x509.load_pem_x509_certificate(api_pem.encode()).serial_number, "x"))
    with ctl.sessions.begin() as s:
        s.add(VM(uuid="u1", name="vm1", host="h2", spec_json="{}"))
    with pytest.raises(ConflictError, match="still has VM"):
        asyncio.run(ctl.onboarding.remove("h2"))
    with ctl.sessions.begin() as s:
        s.delete(s.get(VM, "u1"))
    out = asyncio.run(ctl.onboarding.remove("h2"))
    assert set(out.revoked_serials) == serials and out.crl_installed_on == ["h1"] and not out.crl_failed
    assert [h.name for h in ctl.inventory.list_hosts()] == ["h1"]
    crl = x509.load_pem_x509_crl((FakeAgent.registry["https://198.18.0.11:8770"].tls_dir / tls.CRL_FILE).read_bytes())
    assert {format(r.serial_number, "x") for r in crl} == serials
    assert not (h2_dir / "client-cert.pem").exists()            # best effort: it dropped its own certificates
    # a host approved later gets the CRL with its certificates
    asyncio.run(ctl.onboarding.approve("h3", reg(ctl, "h3", token(ctl, "t3")).fingerprint, "admin"))
    assert FakeAgent.registry["https://198.18.0.13:8770"].crls == 1


def test_a_crl_from_another_ca_is_refused(tmp_path: Path, ctl: Controller) -> None:
    from kvmotion.controller.pki import CertificateAuthority
    asyncio.run(ctl.onboarding.approve("h1", reg(ctl, "h1", token(ctl, "t1")).fingerprint, "admin"))
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    with pytest.raises(InvalidInputError, match="not signed by this host's CA"):
        tls.install_crl(FakeAgent.registry["https://198.18.0.11:8770"].tls_dir, other.crl_pem(["1f"]))


@pytest.mark.parametrize("url,nets,why", [
    ("http://127.0.0.1:8770", [], "loopback"), ("http://169.254.169.254:80", [], "link-local"),
    ("http://[::1]:8770", [], "loopback"), ("http://0.0.0.0:8770", [], "unspecified"),
    ("http://224.0.0.1:8770", [], "multicast"), ("http://10.1.2.3:8770", ["198.18.0.0/15"], "outside"),
    ("http://198.18.0.11:8770", ["198.18.0.0/15"], None), ("http://198.18.0.11:8770", [], None),
    ("http://127.0.0.1:8770", ["127.0.0.0/8"], None)])
def test_host_address_allow_list(url: str, nets: list[str], why: str | None) -> None:
    if why is None:
        hostnet.check_address(url, hostnet.networks(nets))
        return
    with pytest.raises(InvalidInputError, match=why) as exc:
        hostnet.check_address(url, hostnet.networks(nets))
    assert "--host-networks" in exc.value.remedy


# -- the agent's side --------------------------------------------------------------------------------
def agent_cfg(tmp_path: Path) -> AgentConfig:
    tok = tmp_path / "enrol.token"
    tok.write_text("kvm_0123456789ab_tok\n")
    return AgentConfig(name="h1", mgmt_address="198.18.0.11", state_dir=tmp_path / "state",
                       controller_url="http://198.18.0.1:8760", enrol_token_file=tok)


def test_the_agent_retries_until_the_controller_answers_and_not_again_after(tmp_path: Path) -> None:
    cfg = agent_cfg(tmp_path)
    cfg.state_dir.mkdir()
    answers: list[Any] = [httpx.ConnectError("refused"), 503, 503, 202]
    slept: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        assert request.headers["authorization"] == "Bearer kvm_0123456789ab_tok"
        if a == 503:
            return httpx.Response(503, json={"error": {"message": "starting"}})
        return httpx.Response(202, json={"name": "h1", "state": "pending", "fingerprint": "x"})

    async def sleep(s: float) -> None:
        slept.append(s)
    state = asyncio.run(register(cfg, "a1" * 32, httpx.MockTransport(handler), sleep))
    assert state == "pending" and slept == [1.0, 2.0, 5.0] and answers == []
    saved = json.loads((cfg.state_dir / STATE_FILE).read_text())
    assert saved["state"] == "pending" and (cfg.state_dir / STATE_FILE).stat().st_mode & 0o777 == 0o600
    calls: list[httpx.Request] = []
    again = asyncio.run(register(cfg, "a1" * 32, httpx.MockTransport(lambda r: calls.append(r) or  # type: ignore
                                                                       httpx.Response(500)), sleep))
    assert again == "pending" and calls == []                   # a restart does not use the token again


def test_the_agent_stops_on_a_refusal_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = agent_cfg(tmp_path)
    cfg.state_dir.mkdir()
    refused = httpx.MockTransport(lambda r: httpx.Response(401, json={"error": {
        "message": "enrolment token 'x' was already used", "remedy": "make a new one"}}))
    with caplog.at_level("INFO", logger="kvmotion.agent"):
        assert asyncio.run(register(cfg, "a1" * 32, refused)) == "refused"
    text = caplog.text
    assert "already used" in text and "fix: make a new one" in text
    assert hostid.fingerprint("a1" * 32) in text               # the fingerprint the admin compares
    assert not (cfg.state_dir / STATE_FILE).exists()

"""Cross-controller moves, the parts without a lab: the checks only such a move has (pure), the network mapping,
the peer CAs a host trusts for migration streams, and what the destination host's relay refuses."""
from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvmotion.agent import tls
from kvmotion.checks import CODES, cross, run_all
from kvmotion.checks.context import HostView, MigrationContext
from kvmotion.common.errors import ConflictError, InvalidInputError
from kvmotion.controller.peerhost import PeerHostClient
from kvmotion.models.agent import DiskSpec, NicSpec, PortGroupFact
from kvmotion.models.crossmove import PeerHostCall
from test_checks_unit import facts, spec

NONE = cross.Known(frozenset(), frozenset(), {}, frozenset())


def codes(found) -> dict[str, object]:
    return {f.code: f for f in found}


def test_a_clean_offer_has_no_finding() -> None:
    assert cross.run(spec(), "h1", {}, NONE, facts("h1"), facts("h3")) == []


def test_each_cross_code() -> None:
    vm = spec()
    known = cross.Known(frozenset({"u1"}), frozenset(), {"52:54:00:00:00:01": "twin"}, frozenset({"h1"}))
    found = codes(cross.run(vm, "h1", {"Nope": "VM Network"}, known, facts("h1"), facts("h3", tls=False)))
    assert set(found) == {"CROSS_VM_EXISTS", "CROSS_MAC_IN_USE", "CROSS_NETWORK_UNMAPPED", "CROSS_HOST_NAME_CLASH",
                          "CROSS_ENCRYPTION_REQUIRED"}
    assert "twin" in found["CROSS_MAC_IN_USE"].message and "Nope" in found["CROSS_NETWORK_UNMAPPED"].message
    assert "destination" in found["CROSS_ENCRYPTION_REQUIRED"].message
    enc = spec(disks=[DiskSpec(datastore="shared", path="vm1/vm1.qcow2", encrypted=True)])
    assert cross.run(enc, "h1", {}, NONE, facts("h1"), facts("h3")) == []               # a check: no key asked
    assert cross.run(enc, "h1", {}, NONE, facts("h1"), facts("h3"), keys={"d0"}) == []  # reserved with its key
    lacking = codes(cross.run(enc, "h1", {}, NONE, facts("h1"), facts("h3"), keys=set()))
    assert set(lacking) == {"CROSS_ENCRYPTED_DISK"} and "disk0" in lacking["CROSS_ENCRYPTED_DISK"].message
    by_name = cross.Known(frozenset(), frozenset({"vm1"}), {}, frozenset())
    assert "named vm1" in codes(cross.run(vm, "h1", {}, by_name, facts("h1"), facts("h3")))["CROSS_VM_EXISTS"].message
    every = {c for c in CODES if c.startswith("CROSS_")}
    assert every == set(found) | {"CROSS_ENCRYPTED_DISK"}, "every CROSS_ code has a case here"
    for f in found.values():
        assert f.severity == "error" and f.remedy


def test_network_mapping_reaches_the_port_group_and_vlan_checks() -> None:
    vm = spec(nics=[NicSpec(mac="52:54:00:00:00:01", portgroup="VLAN 100")])
    src = facts("h1", groups=("VM Network",))
    src.portgroups.append(PortGroupFact(name="VLAN 100", bridge="vmnet", vlan=100))
    dst = facts("h3", groups=("VM Network",))
    dst.portgroups.append(PortGroupFact(name="Prod", bridge="vmnet", vlan=100))
    mapped = {"VLAN 100": "Prod"}
    moved = cross.remap(vm, mapped)
    assert [n.portgroup for n in moved.nics] == ["Prod"] and moved.nics[0].mac == vm.nics[0].mac

    def ctx(v, s):
        return MigrationContext(spec=v, power_state="poweredOn", source=HostView("h1", "connected", False, s),
                                destination=HostView("h3", "connected", False, dst))
    assert "PORTGROUP_VLAN_MISSING" in codes(run_all(ctx(vm, src)))          # unmapped: no such group there
    assert not {"PORTGROUP_VLAN_MISSING", "PORTGROUP_VLAN_MISMATCH", "PORTGROUP_MISSING"} & set(
        codes(run_all(ctx(moved, cross.remap_facts(src, mapped)))))
    dst.portgroups[-1].vlan = 200                                             # the same name on another VLAN
    assert "PORTGROUP_VLAN_MISMATCH" in codes(run_all(ctx(moved, cross.remap_facts(src, mapped))))


def _ca(name: str, ca: bool = True) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_peer_cas_follow_the_own_ca_and_replace_each_other(tmp_path: Path) -> None:
    own, peer_b, peer_c = _ca("own"), _ca("b"), _ca("c")
    (tmp_path / "ca-cert.pem").write_text(own)        # installed before peer CAs existed
    assert tls.set_peer_cas(tmp_path, {"ctl-b": peer_b, "ctl-c": peer_c}) == ["ctl-b", "ctl-c"]
    bundle = x509.load_pem_x509_certificates((tmp_path / "ca-cert.pem").read_bytes())
    assert [c.subject.rfc4514_string() for c in bundle] == ["CN=own", "CN=b", "CN=c"]   # own first: the CRL's
    tls.set_peer_cas(tmp_path, {"ctl-c": peer_c})      # b left the domain: no longer trusted
    bundle = x509.load_pem_x509_certificates((tmp_path / "ca-cert.pem").read_bytes())
    assert [c.subject.rfc4514_string() for c in bundle] == ["CN=own", "CN=c"]
    tls.set_peer_cas(tmp_path, {})
    assert (tmp_path / "ca-cert.pem").read_text() == (tmp_path / tls.OWN_CA).read_text()


def test_peer_cas_refuse_what_is_not_one_ca(tmp_path: Path) -> None:
    (tmp_path / "ca-cert.pem").write_text(_ca("own"))
    before = (tmp_path / "ca-cert.pem").read_text()
    for bad in ("not a pem", _ca("leaf", ca=False), _ca("x") + _ca("y")):
        with pytest.raises(InvalidInputError):
            tls.set_peer_cas(tmp_path, {"ctl-b": bad})
    assert (tmp_path / "ca-cert.pem").read_text() == before          # nothing changed
    with pytest.raises(InvalidInputError) as none:
        tls.set_peer_cas(tmp_path / "empty", {})
    assert "renew" in none.value.remedy


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    async def call_json(self, method: str, path: str, body: PeerHostCall, deadline_s: float) -> object:
        self.calls.append((path, body.model_dump()))
        return True


def test_the_relay_sends_only_what_the_destination_does_not_decide_itself() -> None:
    rec = _Recorder()
    client = PeerHostClient(rec, "0b5f7f9e-2c4a-4d7e-9a51-3f0c6c1d2e8a", "h3")       # type: ignore[arg-type]
    asyncio.run(client.abort_incoming("u1"))
    path, body = rec.calls[-1]
    assert path.endswith("/0b5f7f9e-2c4a-4d7e-9a51-3f0c6c1d2e8a/host") and body == {"op": "abort_incoming", "args": {}}
    with pytest.raises(ConflictError):                                  # a call a move never makes there
        asyncio.run(client.start_outgoing("u1", None))
    with pytest.raises(ValueError):
        PeerHostCall(op="finalize_source")                              # not in the relay's list at all

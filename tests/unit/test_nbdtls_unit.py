"""Every NBD stream between hosts runs over TLS with an authorization (security finding 6). No QEMU, no root.

What QEMU would be told is checked here: the ``qemu-nbd`` and ``qemu-img`` command lines, the QMP arguments of the
shadow's NBD server and of the source's mirror targets, for x509 and for a move's PSK; the PSK's key file (0600 in
a fresh 0700 directory, gone when the stream ends); that no builder makes an NBD server or client without
credentials; and that a source walk finds no NBD server or client outside these builders. tests/e2e/
test_nbd_tls_e2e.py runs the same command lines against real QEMU.
"""
from __future__ import annotations

import ast
import asyncio
import json
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvmotion.agent import images, nbdtls
from kvmotion.agent.hv.qemu import incoming, mirror
from kvmotion.agent.service import Agent
from kvmotion.agent.storage import AgentStorage
from kvmotion.common.errors import ConflictError, InvalidInputError
from kvmotion.migration import kinds, registry
from kvmotion.migration.engine import MoveContext
from kvmotion.migration.relocate import plan
from kvmotion.models.agent import (DiskCopyRequest, DiskCopyStatus, DiskExport, DiskSpec, DiskTarget, IncomingReady,
                                   IncomingRequest, MigrationReport, MirrorReport)
from kvmotion.models.api import MigrateRequest
from kvmotion.models.moves import MoveKind
from kvmotion.models.nbd import NbdPsk

from test_checks_unit import facts
from test_devices_unit import FakeQMP, _qemu_vm
from test_engine_unit import CopyHost, FakeJournal, FakeView
from test_input_unit import spec
from test_relocate_unit import vm

SRC = Path(__file__).resolve().parents[2] / "src" / "kvmotion"
PSK = NbdPsk(username="kvmotion-move-0123456789abcdef", key="ab" * 32)
CLIENT_DN = "CN=kvmotion-host-h2"


def objects_of(argv: list[str]) -> list[dict[str, Any]]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "--object"]


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def assert_key_dir(path: Path) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    key = path / nbdtls.PSK_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text() == f"{PSK.username}:{PSK.key}\n"


# -- the credentials ---------------------------------------------------------------------------------------------
def test_a_psk_lives_in_a_fresh_private_directory_until_it_is_released(tmp_path: Path) -> None:
    a = nbdtls.server_creds(tmp_path, None, None, PSK)
    b = nbdtls.client_creds(tmp_path, None, None, PSK)
    assert a.psk is not None and b.psk is not None and a.psk.path != b.psk.path       # one directory per end
    for creds in (a, b):
        assert_key_dir(creds.psk.path)
        assert (creds.psk.path / "dh-params.pem").exists()          # no DH generation when QEMU makes the object
    assert a.objects() == [{"qom-type": "tls-creds-psk", "id": nbdtls.CREDS_ID, "dir": str(a.psk.path),
                            "endpoint": "server", "priority": nbdtls.PSK_PRIORITY}]
    assert b.objects()[0]["username"] == PSK.username and b.objects()[0]["endpoint"] == "client"
    a.release()
    assert not a.psk.path.exists() and b.psk.path.exists()
    b.release()
    assert list(tmp_path.iterdir()) == []
    assert "key" not in repr(PSK).replace("kvmotion-move", "") and PSK.key not in repr(PSK)   # never in a log line


def test_no_credentials_means_no_stream(tmp_path: Path) -> None:
    for make in (nbdtls.server_creds, nbdtls.client_creds):
        with pytest.raises(InvalidInputError) as exc:
            make(tmp_path, "/tls", None, None)                      # neither x509 peer nor PSK: refused
        assert "NBD never runs without TLS" in exc.value.remedy
        with pytest.raises(InvalidInputError):
            make(tmp_path, "/tls", "both", PSK)                     # both: ambiguous, refused
        with pytest.raises(ConflictError) as exc2:
            make(tmp_path, None, "x509 without certificates", None)
        assert "cert renew" in exc2.value.remedy
    assert list(tmp_path.iterdir()) == []                           # a refusal leaves no key behind


def test_a_leftover_key_directory_is_swept_at_agent_start(tmp_path: Path) -> None:
    left = nbdtls.server_creds(tmp_path / "keys", None, None, PSK)
    assert nbdtls.sweep(tmp_path / "keys") == [str(left.psk.path)] and not left.psk.path.exists()
    assert nbdtls.sweep(tmp_path / "absent") == []


# -- cold migration: qemu-nbd on the source, qemu-img on the destination ---------------------------------------
def test_qemu_nbd_x509_admits_only_the_destinations_client_certificate(tmp_path: Path) -> None:
    creds = nbdtls.server_creds(tmp_path, "/state/tls", CLIENT_DN, None)
    argv = images.NbdExport(tmp_path / "d.qcow2", "qcow2", "198.19.0.12", 49200, False, creds).argv()
    tls, authz = objects_of(argv)
    assert tls == {"qom-type": "tls-creds-x509", "id": option(argv, "--tls-creds"), "dir": "/state/tls",
                   "endpoint": "server", "verify-peer": True}
    assert authz == {"qom-type": "authz-simple", "id": option(argv, "--tls-authz"), "identity": CLIENT_DN}
    assert "--read-only" in argv and argv[-1] == str(tmp_path / "d.qcow2")


def test_qemu_nbd_psk_reads_the_moves_key_and_stop_removes_it(tmp_path: Path) -> None:
    creds = nbdtls.server_creds(tmp_path / "keys", None, None, PSK)
    exp = images.NbdExport(tmp_path / "d.qcow2", "qcow2", "198.19.0.12", 49200, False, creds)
    argv = exp.argv()
    [tls] = objects_of(argv)
    assert tls["qom-type"] == "tls-creds-psk" and tls["id"] == option(argv, "--tls-creds")
    assert "--tls-authz" not in argv       # QEMU 7.2 does not apply authz to PSK: the key is the authorization
    assert_key_dir(Path(tls["dir"]))
    exp.stop()
    assert not Path(tls["dir"]).exists()


def _copy_job(tmp_path: Path, creds: nbdtls.NbdCreds | None) -> images.CopyJob:
    req = DiskCopyRequest(source_uri="nbd://198.19.0.11:49200/abc", datastore="ds", path="vm1/vm1.qcow2")
    return images.CopyJob(req, tmp_path / "ds" / "vm1" / "vm1.qcow2", creds)


@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_qemu_img_reads_an_nbd_source_over_tls_only(tmp_path: Path, kind: str) -> None:
    creds = nbdtls.client_creds(tmp_path / "keys", "/state/tls", "198.19.0.11" if kind == "x509" else None,
                                PSK if kind == "psk" else None)
    convert, compare = _copy_job(tmp_path, creds).argvs()
    for argv in (convert, compare):
        [obj] = objects_of(argv)
        src = next(a for a in argv if a.startswith("json:"))
        nbd = json.loads(src.removeprefix("json:"))["file"]
        assert nbd["driver"] == "nbd" and nbd["tls-creds"] == obj["id"] and nbd["export"] == "abc"
        assert nbd["server"] == {"type": "inet", "host": "198.19.0.11", "port": "49200"}
        assert not any(a.startswith("nbd://") for a in argv)        # the plain URI form is never used
        if kind == "x509":
            assert obj["qom-type"] == "tls-creds-x509" and obj["endpoint"] == "client"
            assert nbd["tls-hostname"] == "198.19.0.11"             # the server's certificate must name it
        else:
            assert obj["qom-type"] == "tls-creds-psk" and obj["username"] == PSK.username
    with pytest.raises(InvalidInputError):
        _copy_job(tmp_path, None).argvs()


def test_a_copy_job_removes_its_key_when_it_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = nbdtls.client_creds(tmp_path / "keys", None, None, PSK)
    job = _copy_job(tmp_path, creds)

    async def refused(argv: list[str], progress: bool) -> tuple[int, str]:
        return 1, "TLS handshake failed"
    monkeypatch.setattr(job, "_run", refused)
    asyncio.run(job.run())
    assert job.status.state == "failed" and "TLS handshake failed" in (job.status.error or "")
    assert not creds.psk.path.exists()


class StorageAgent(AgentStorage):
    """The agent's storage half, with a state directory and no certificates."""

    def __init__(self, tmp_path: Path) -> None:
        from kvmotion.agent.context import HostContext
        from kvmotion.agent.hv.qemu.driver import QemuHypervisor
        (tmp_path / "ds" / "vm1").mkdir(parents=True)
        (tmp_path / "ds" / "vm1" / "vm1.qcow2").write_bytes(b"")
        self.cfg = SimpleNamespace(name="h1", state_dir=tmp_path / "state")  # type: ignore[assignment]
        self.hv = QemuHypervisor("h1", tmp_path / "state")
        self.copies, self.nbd_exports = {}, {}
        self._ctx = HostContext("h1", "tcg", {"ds": tmp_path / "ds"}, {})

    def context(self) -> Any:
        return self._ctx

    def _tls_dir_if_valid(self) -> str | None:
        return None


def test_the_agent_refuses_an_export_or_a_copy_without_credentials(tmp_path: Path) -> None:
    agent = StorageAgent(tmp_path)
    with pytest.raises(InvalidInputError):
        agent.disk_export(spec(), "disk0", "127.0.0.1", None, None)
    with pytest.raises(ConflictError):                  # x509 asked of a host without certificates
        agent.disk_export(spec(), "disk0", "127.0.0.1", CLIENT_DN, None)
    for extra in ({}, {"source_tls_hostname": "198.19.0.11", "source_psk": PSK}):
        with pytest.raises(InvalidInputError):
            agent.disk_copy(DiskCopyRequest(source_uri="nbd://198.19.0.11:49200/abc", datastore="ds",
                                            path="vm1/copy.qcow2", **extra))
    assert agent.nbd_exports == {} and agent.copies == {}
    assert not any(agent.nbd_key_root.glob("psk-*"))


def test_a_shadow_with_nbd_disks_is_refused_before_anything_is_made() -> None:
    fake = SimpleNamespace(hv=SimpleNamespace(uuids=lambda: set()), cfg=SimpleNamespace(name="h2"))
    req = IncomingRequest(spec=spec(), listen_address="198.19.0.12", new_disks=["disk0"])
    with pytest.raises(InvalidInputError) as exc:
        asyncio.run(Agent.prepare_incoming(fake, req))  # type: ignore[arg-type]
    assert "without TLS" in exc.value.message


# -- shared-nothing: the shadow's NBD server, the source's mirror targets ---------------------------------------
def _vm(tmp_path: Path, qmp: FakeQMP) -> Any:
    return _qemu_vm(tmp_path, qmp, [DiskSpec(datastore="ds", path="v/v.qcow2")])


def test_the_shadows_nbd_server_uses_the_migrations_x509_and_its_client_check(tmp_path: Path) -> None:
    qmp = FakeQMP()
    vm = _vm(tmp_path, qmp)
    tls = asyncio.run(incoming.nbd_server_tls(vm, "kvm-tls-server-abc", None, tmp_path / "keys"))
    asyncio.run(incoming._export_disks(vm, "127.0.0.1", ["disk0"], tls))
    start = dict(qmp.calls)["nbd-server-start"]
    assert start["tls-creds"] == "kvm-tls-server-abc" and start["tls-authz"] == "kvm-authz"
    assert vm.nbd_keys is None


def test_the_shadows_nbd_server_without_x509_uses_the_moves_psk(tmp_path: Path) -> None:
    qmp = FakeQMP()
    vm = _vm(tmp_path, qmp)
    tls = asyncio.run(incoming.nbd_server_tls(vm, None, PSK, tmp_path / "keys"))
    asyncio.run(incoming._export_disks(vm, "127.0.0.1", ["disk0"], tls))
    calls = dict(qmp.calls)
    made = calls["object-add"]
    assert made["qom-type"] == "tls-creds-psk" and made["endpoint"] == "server"
    assert calls["nbd-server-start"]["tls-creds"] == made["id"]
    assert_key_dir(Path(made["dir"]))              # kept while the server runs: GnuTLS reads it per handshake
    asyncio.run(incoming.stop_exports(vm))
    assert qmp.calls[-1] == ("object-del", {"id": made["id"]}) and not Path(made["dir"]).exists()


def test_a_shadow_that_dies_takes_its_key_with_it(tmp_path: Path) -> None:
    vm = _vm(tmp_path, FakeQMP())
    asyncio.run(incoming.nbd_server_tls(vm, None, PSK, tmp_path / "keys"))
    key_dir = vm.nbd_keys.psk.path
    vm.qmp = None                                   # its QEMU is gone
    asyncio.run(vm._cleanup())
    assert not key_dir.exists() and vm.nbd_keys is None


def test_the_shadow_never_starts_a_plain_nbd_server(tmp_path: Path) -> None:
    qmp = FakeQMP()
    vm = _vm(tmp_path, qmp)
    with pytest.raises(InvalidInputError):
        asyncio.run(incoming.nbd_server_tls(vm, None, None, tmp_path / "keys"))
    with pytest.raises(InvalidInputError):
        asyncio.run(incoming._export_disks(vm, "127.0.0.1", ["disk0"], {}))
    assert qmp.calls == []


def _target(**kw: Any) -> DiskTarget:
    return DiskTarget(disk_id="disk0", kind="nbd", nbd_host="198.19.0.12", nbd_port=49201, export="drive-disk0", **kw)


def test_a_mirror_reaches_an_nbd_target_with_the_moves_psk(tmp_path: Path) -> None:
    qmp = FakeQMP()
    vm = _vm(tmp_path, qmp)
    creds = asyncio.run(mirror.nbd_client_creds(vm, [_target(psk=PSK)], None, tmp_path / "keys"))
    made = dict(qmp.calls)["object-add"]
    assert made["qom-type"] == "tls-creds-psk" and made["username"] == PSK.username and made["id"] == creds
    assert not Path(made["dir"]).exists()          # QEMU's PSK client read its key when the object was made
    dev = mirror.target_blockdev(vm, vm.spec.disks[0], _target(psk=PSK), "d0-m1", creds)
    assert dev["driver"] == "nbd" and dev["tls-creds"] == creds and "tls-hostname" not in dev
    m = mirror.Mirror(vm, [_target(psk=PSK)], [])
    m.nbd_creds = creds
    vm.alive = lambda: True
    asyncio.run(mirror.cancel(m))                  # the move rolled back: the key object goes too
    assert ("object-del", {"id": creds}) in qmp.calls and creds not in vm.qemu_objects


def test_a_mirror_reaches_an_nbd_target_with_x509_checking_the_servers_name(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for f in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        (tls_dir / f).write_text(f)
    qmp = FakeQMP()
    vm = _vm(tmp_path, qmp)
    creds = asyncio.run(mirror.nbd_client_creds(vm, [_target(tls_hostname="198.19.0.12")], str(tls_dir),
                                                tmp_path / "keys"))
    made = dict(qmp.calls)["object-add"]
    assert made["qom-type"] == "tls-creds-x509" and made["endpoint"] == "client" and made["id"] == creds
    dev = mirror.target_blockdev(vm, vm.spec.disks[0], _target(tls_hostname="198.19.0.12"), "d0-m1", creds)
    assert dev["tls-creds"] == creds and dev["tls-hostname"] == "198.19.0.12"


def test_a_mirror_never_reaches_an_nbd_target_in_plain(tmp_path: Path) -> None:
    qmp = FakeQMP()
    vm = _vm(tmp_path, qmp)
    with pytest.raises(InvalidInputError):
        mirror.target_blockdev(vm, vm.spec.disks[0], _target(), "d0-m1", None)
    for targets in ([_target()], [_target(psk=PSK), _target(tls_hostname="198.19.0.12")]):
        with pytest.raises(InvalidInputError):
            asyncio.run(mirror.nbd_client_creds(vm, targets, None, tmp_path / "keys"))
    assert qmp.calls == [] and not any((tmp_path / "keys").glob("psk-*"))


# -- no NBD server or client outside the builders above ----------------------------------------------------------
NBD_BUILDERS = {
    ("agent/images.py", "argv"): "qemu-nbd: NbdExport.argv (x509 + tls-authz, or PSK)",
    ("agent/nbdtls.py", "qemu_img_source"): "qemu-img reading an export: CopyJob.argvs",
    ("agent/hv/qemu/incoming.py", "_export_disks"): "the shadow's nbd-server-start",
    ("agent/hv/qemu/mirror.py", "target_blockdev"): "the source's mirror target",
    # a CD-ROM's client media: the user's own NBD server (not a stream between kvmotion hosts)
    ("agent/hv/qemu/argv.py", "cdrom_node"): "client media",
}


def nbd_sites() -> set[tuple[str, str]]:
    """(file, function) of every string constant that starts an NBD server or names the NBD client driver."""
    found = set()
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Dict):
                    pairs = zip(node.keys, node.values)
                    if any(isinstance(k, ast.Constant) and k.value == "driver" and isinstance(v, ast.Constant)
                           and v.value == "nbd" for k, v in pairs):
                        found.add((str(path.relative_to(SRC)), fn.name))
                elif isinstance(node, ast.Constant) and node.value in ("qemu-nbd", "nbd-server-start"):
                    found.add((str(path.relative_to(SRC)), fn.name))
    return found


def test_every_nbd_server_and_client_is_built_in_one_of_the_checked_places() -> None:
    """A new NBD path fails here until it is added, with a test above that it carries TLS."""
    assert nbd_sites() == set(NBD_BUILDERS)


# -- the controller: one PSK per move, or x509, handed to both ends ----------------------------------------------
class TlsView(FakeView):
    def __init__(self, reloc: Any, tls: bool) -> None:
        super().__init__(reloc)
        self.facts = {h: facts(h, datastores=("shared", f"{h}-local"), tls=tls) for h in ("h1", "h2")}

    def host_facts(self, host: str) -> Any:
        return self.facts[host]

    def migration_address(self, host: str) -> str:
        return {"h1": "198.19.0.11", "h2": "198.19.0.12"}[host]

    def tls_identity(self, host: str) -> str:
        return f"CN=kvmotion-host-{host}"


class ExportHost(CopyHost):
    async def disk_export(self, spec: Any, disk_id: str, address: str, identity: str | None,
                          psk: NbdPsk | None) -> DiskExport:
        self._note("disk_export", disk_id, address, identity, psk)
        return DiskExport(uri=f"nbd://{address}:49200/e-{disk_id}", export_id=f"e-{disk_id}", pid=1,
                          tls="tls-psk" if psk else "tls-x509")

    async def disk_copy(self, req: DiskCopyRequest) -> DiskCopyStatus:
        self._note("disk_copy", req)
        return DiskCopyStatus(job="j", state="done", started_at=0.0, bytes_total=1)

    async def home_files(self, spec: Any) -> dict[str, str]:
        return {}

    async def put_home(self, spec: Any, files: dict[str, str]) -> str:
        return "folder"


@pytest.mark.parametrize("tls", [True, False])
def test_a_cold_move_secures_each_nbd_copy_with_x509_or_its_own_psk(tls: bool) -> None:
    reloc = plan(vm(), "poweredOff", "h1", "h2", "h2-local", {}, None, {"shared", "h2-local"})
    src, dst, journal, view = ExportHost("h1"), ExportHost("h2"), FakeJournal(), TlsView(reloc, tls)
    ctx = MoveContext(kind=kinds.kind(MoveKind.COLD), journal=journal, inventory=view,  # type: ignore[arg-type]
                      src=src, dst=dst, spec=reloc.before, source="h1", destination="h2",  # type: ignore[arg-type]
                      req=MigrateRequest(host="h2", datastore="h2-local"))
    asyncio.run(registry.engine(ctx).run())
    assert journal.state == "success", journal.error
    [(_, disk, address, identity, psk)] = [c for c in src.calls if c[0] == "disk_export"]  # h1-local only
    copies = {c[1].source_uri or c[1].source_path: c[1] for c in dst.calls if c[0] == "disk_copy"}
    nbd = copies[f"nbd://{address}:49200/e-{disk}"]
    assert disk == "disk0" and any(k.startswith("/ds/shared") for k in copies)     # shared: read directly
    if tls:
        assert identity == "CN=kvmotion-host-h2" and psk is None and nbd.source_tls_hostname == address
        assert journal.result["encryption"]["mode"] == "tls-x509"
    else:
        assert identity is None and psk is not None and nbd.source_psk == psk and nbd.source_tls_hostname is None
        assert journal.result["encryption"]["mode"] == "tls-psk"
        assert psk.key not in json.dumps([journal.phases, journal.lives, journal.result])    # never recorded


class LiveHost(ExportHost):
    async def prepare_incoming(self, spec: Any, address: str, identity: str | None = None, disk_keys: Any = None,
                               new_disks: Any = None, multifd_channels: int = 0, postcopy: bool = False,
                               nbd_psk: NbdPsk | None = None) -> IncomingReady:
        self._note("prepare_incoming", identity, nbd_psk)
        return IncomingReady(uri="tcp:198.19.0.12:49300", pid=1, nbd_port=49301,
                             exports={d: f"drive-{d}" for d in new_disks or []})

    async def mirror_start(self, uuid: str, req: Any) -> MirrorReport:
        self._note("mirror_start", req)
        return MirrorReport(state="mirroring")

    async def migration(self, uuid: str, wait_s: float = 0.0, since: str | None = None) -> MigrationReport:
        return MigrationReport(role="destination", status="active")


class LiveView(TlsView):
    async def predict(self, *args: Any) -> None:
        return None


@pytest.mark.parametrize("policy", ["opportunistic", "disabled"])
def test_a_shared_nothing_move_hands_its_psk_to_both_ends_when_it_does_not_use_x509(policy: str) -> None:
    from kvmotion.migration.live import LiveMove
    reloc = plan(vm(encrypted_vmotion=policy), "poweredOn", "h1", "h2", "h2-local", {}, None, {"shared", "h2-local"})
    src, dst, journal, view = LiveHost("h1"), LiveHost("h2"), FakeJournal(), LiveView(reloc, True)
    ctx = MoveContext(kind=kinds.kind(MoveKind.XVMOTION), journal=journal, inventory=view,  # type: ignore[arg-type]
                      src=src, dst=dst, spec=reloc.before, source="h1", destination="h2",  # type: ignore[arg-type]
                      req=MigrateRequest(host="h2", datastore="h2-local", downtime_ms=300), bandwidth_mbps=1000)
    move = LiveMove(ctx)

    async def through_disks() -> None:
        await move.on_precheck()
        await move.on_shadow()
        await move.on_disks()
    asyncio.run(through_disks())
    [(_, identity, psk)] = [c for c in dst.calls if c[0] == "prepare_incoming"]
    [(_, req)] = [c for c in src.calls if c[0] == "mirror_start"]
    if policy == "disabled":          # the memory stream is plain; the disk streams are TLS with the move's key
        assert move.encryption["mode"] == "plain" and move.encryption["disk_streams"] == "tls-psk"
        assert identity is None and psk is not None and all(t.psk == psk and not t.tls_hostname for t in req.targets)
    else:
        assert move.encryption["mode"] == "tls" and move.encryption["disk_streams"] == "tls-x509"
        assert identity == "CN=kvmotion-host-h1" and psk is None
        assert all(t.tls_hostname == "198.19.0.12" and t.psk is None for t in req.targets)
    assert {t.disk_id for t in req.targets} == set(reloc.moved_ids)

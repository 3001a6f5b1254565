"""End to end, in the lab: the hosts registered themselves and were approved by fingerprint (lab up does what an
admin does); an enrolment token works once; removing a host revokes its certificates, and QEMU on the other host
then refuses a TLS migration stream from the removed host's certificate, while it still takes its own (A/B)."""
from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from qemu.qmp import QMPClient
from qemu.qmp.protocol import ConnectError

from kvmotion.agent.apitls import API_DIR, CERT as API_CERT
from kvmotion.cli.client import Client
from kvmotion.common import hostid
from kvmotion.common.errors import KvmotionError
from kvmotion.common.hostauth import SECRET_FILE
from kvmotion.common.http import tls_context
from labtools import record_figure


def serials(host_dir: Path) -> set[str]:
    """The serials of what the CA issued to a host: its migration certificates (server, client) and its API's."""
    files = [host_dir / "tls" / f"{u}-cert.pem" for u in ("server", "client")] + [host_dir / API_DIR / API_CERT]
    return {format(x509.load_pem_x509_certificate(f.read_bytes()).serial_number, "x") for f in files}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _migrate(work: Path, server_dir: Path, client_dir: Path) -> str:
    """Two QEMUs without a machine: the destination's TLS credentials check the peer (chain and CRL); returns the
    destination's migration status."""
    port, procs = free_port(), []
    try:
        for side, d in (("dst", server_dir), ("src", client_dir)):
            endpoint = "server" if side == "dst" else "client"
            procs.append(subprocess.Popen(
                ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S",
                 "-object", f"tls-creds-x509,id=tls0,dir={d},endpoint={endpoint},verify-peer=on",
                 "-qmp", f"unix:{work / side}.sock,server=on,wait=off"]
                + (["-incoming", "defer"] if side == "dst" else []),
                stdout=subprocess.DEVNULL, stderr=open(work / f"{side}.err", "wb")))
        qmp = {}
        for side in ("dst", "src"):
            qmp[side] = QMPClient(side)
            for _ in range(200):
                assert all(p.poll() is None for p in procs), "a QEMU exited at start"
                try:
                    await qmp[side].connect(str(work / f"{side}.sock"))
                    break
                except ConnectError:
                    qmp[side] = QMPClient(side)
                    await asyncio.sleep(0.05)
        await qmp["dst"].execute("migrate-set-parameters", {"tls-creds": "tls0"})
        await qmp["dst"].execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        await qmp["src"].execute("migrate-set-parameters", {"tls-creds": "tls0", "tls-hostname": "h1"})
        await qmp["src"].execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        end = time.monotonic() + 10
        status = "none"
        while time.monotonic() < end:      # the destination's view: the source reports "completed" once it has
            status = (await qmp["dst"].execute("query-migrate")).get("status", "none")  # written everything
            if status in ("completed", "failed"):
                break
            await asyncio.sleep(0.1)
        for q in qmp.values():
            await q.disconnect()
        return status
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def migrate_tls(tmp: Path, name: str, server_files: dict[str, Path],
                client_files: dict[str, Path]) -> tuple[str, str]:
    """(the destination's migration status, what its QEMU printed)."""
    dirs = {}
    for side, files in (("server", server_files), ("client", client_files)):
        d = tmp / f"{name}-{side}"
        d.mkdir(mode=0o700)
        for target, src in files.items():
            shutil.copy(src, d / target)
        dirs[side] = d
    work = tmp / name
    work.mkdir()
    status = asyncio.run(_migrate(work, dirs["server"], dirs["client"]))
    return status, (work / "dst.err").read_text(errors="replace")


def test_registration_approval_token_reuse_and_removal_with_a_crl(lab, tmp_path: Path) -> None:
    client = Client(lab.controller_url)
    root = Path(lab.root)
    assert client.pending_hosts() == [] and {h["name"] for h in client.hosts()} == {"h1", "h2"}
    admin = [a for a in client.audit(200) if "/approve" in a["path"]]
    assert {a["path"] for a in admin} == {"/api/v1/hosts/h1/approve", "/api/v1/hosts/h2/approve"}, admin
    h1_tls, h2_tls = root / "hosts" / "h1" / "tls", root / "hosts" / "h2" / "tls"
    san = x509.load_pem_x509_certificate((h1_tls / "server-cert.pem").read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(n.value) for n in san) == sorted([lab.net.host("h1").mig_ip, "h1"])

    # the token h1 registered with is used up; the agent's fingerprint is the one that was approved
    used = (root / "hosts" / "h1" / "enrol.token").read_text().strip()
    secret = (root / "hosts" / "h1" / SECRET_FILE).read_text().strip()
    r = httpx.post(f"{lab.controller_url}/api/v1/hosts/register", headers={"Authorization": f"Bearer {used}"},
                   json={"address": client.host("h1")["address"], "secret": secret, "name": "h1"}, timeout=30,
                   verify=tls_context())
    assert r.status_code == 401, r.text
    log = (root / "logs" / "agent-h1.log").read_text()
    assert hostid.fingerprint(secret) in log and "kvmotion host approve h1 --fingerprint" in log

    # removing h2: refused while a VM is registered on it; then its certificates are revoked everywhere
    client.create_vm(name="on-h2", host="h2")
    with pytest.raises(KvmotionError) as exc:
        client.remove_host("h2")
    assert exc.value.code == "CONFLICT" and "on-h2" in exc.value.message
    client.delete_vm("on-h2")
    revoked_files = {"ca-cert.pem": h2_tls / "ca-cert.pem", "client-cert.pem": h2_tls / "client-cert.pem",
                     "client-key.pem": h2_tls / "client-key.pem"}
    keep = tmp_path / "h2-before-removal"
    keep.mkdir()
    for name, path in revoked_files.items():          # what a removed host (or a thief of its keys) still holds
        shutil.copy(path, keep / name)
    h2_serials = serials(root / "hosts" / "h2")
    out = client.remove_host("h2")
    assert set(out["revoked_serials"]) == h2_serials and out["crl_installed_on"] == ["h1"], out
    assert {h["name"] for h in client.hosts()} == {"h1"}
    crl = x509.load_pem_x509_crl((h1_tls / "ca-crl.pem").read_bytes())
    assert {format(c.serial_number, "x") for c in crl} == h2_serials

    # A/B with QEMU: h1's server credentials (with the CRL) refuse h2's client certificate, take h1's own
    server = {n: h1_tls / n for n in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "ca-crl.pem",
                                      "dh-params.pem")}
    revoked, said = migrate_tls(tmp_path, "revoked", server, {n: keep / n for n in revoked_files})
    valid, _ = migrate_tls(tmp_path, "valid", server, {n: h1_tls / n for n in revoked_files})
    record_figure("TLS migration with a revoked client certificate accepted (0 = refused)",
                  int(revoked == "completed"), "bool")
    print(f"revoked certificate: destination {revoked!r}, QEMU said {said.strip()[-200:]!r}; valid: {valid!r}")
    assert valid == "completed" and revoked != "completed", (revoked, said)
    assert "revoked" in said.lower(), said          # QEMU names the reason: the certificate is revoked

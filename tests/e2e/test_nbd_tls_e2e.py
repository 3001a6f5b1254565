"""A cold migration's NBD export against real QEMU (qemu-nbd and qemu-img 7.2): TLS, and only the right peer.

The export is started by the agent's own code (``NbdExport`` with ``nbdtls.server_creds``) and read by the
destination's (``CopyJob``: ``qemu-img convert`` then ``qemu-img compare``), with certificates from kvmotion's CA
code. A client without credentials, with a wrong key or with another host's valid certificate reads nothing.
No lab: the export listens on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmotion.agent import images, nbdtls, tls
from kvmotion.agent.ports import pick_port
from kvmotion.controller.pki import CertificateAuthority, client_cn, client_identity
from kvmotion.models.agent import DiskCopyRequest
from kvmotion.models.nbd import NbdPsk

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-nbd")

ADDRESS = "127.0.0.1"
MARKER = b"KVMOTION-NBD-TLS-MARKER-0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """TLS directories of hosts a (the source), b (the destination) and c (a third host of the same CA)."""
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.load_or_create(root / "ca")
    dirs = {}
    for host in ("a", "b", "c"):
        d = root / host
        d.mkdir()
        csrs = tls.make_csrs(d, host)
        tls.install(d, ca.cert_pem, ca.sign(csrs["server_csr"], "server", f"kvmotion-host-{host}", [ADDRESS]),
                    ca.sign(csrs["client_csr"], "client", client_cn(host), []))
        assert tls.status(d).supported
        dirs[host] = d
    return dirs


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(16 << 20)
        f.seek(4 << 20)
        f.write(MARKER * 16)
    out = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True, timeout=60)
    return out


def start(path: Path, creds: nbdtls.NbdCreds) -> images.NbdExport:
    exp = images.NbdExport(path, "qcow2", ADDRESS, pick_port(ADDRESS), False, creds)
    exp.start()
    exp.wait_listening()
    return exp


def plain_info(exp: images.NbdExport) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "info", f"nbd://{ADDRESS}:{exp.port}/{exp.export_id}"],
                          capture_output=True, text=True, timeout=30)


def copy(exp: images.NbdExport, creds: nbdtls.NbdCreds, target: Path) -> images.CopyJob:
    """The destination's copy job, as the agent runs it (raw target: the marker can be looked for)."""
    req = DiskCopyRequest(source_uri=f"nbd://{ADDRESS}:{exp.port}/{exp.export_id}", datastore="ds",
                          path="copy.raw", format="raw")
    job = images.CopyJob(req, target, creds)
    asyncio.run(asyncio.wait_for(job.run(), timeout=120))
    return job


def assert_copied(job: images.CopyJob) -> None:
    assert job.status.state == "done" and job.status.identical, job.status.error
    with open(job.target, "rb") as f:
        f.seek(4 << 20)
        assert f.read(len(MARKER)) == MARKER


def assert_refused(job: images.CopyJob, words: str) -> None:
    assert job.status.state == "failed" and not job.target.exists()
    assert words in (job.status.error or ""), job.status.error


def test_a_psk_export_serves_only_the_holder_of_the_moves_key(tmp_path: Path, disk: Path) -> None:
    psk = NbdPsk.new()
    keys = tmp_path / "keys"
    exp = start(disk, nbdtls.server_creds(keys, None, None, psk))
    try:
        plain = plain_info(exp)
        assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr      # no credentials: nothing
        wrong = NbdPsk(username=psk.username, key=NbdPsk.new().key)
        assert_refused(copy(exp, nbdtls.client_creds(keys, None, None, wrong), tmp_path / "wrong.raw"),
                       "TLS handshake failed")
        other = NbdPsk(username=NbdPsk.new().username, key=psk.key)             # the key under another name
        assert_refused(copy(exp, nbdtls.client_creds(keys, None, None, other), tmp_path / "other.raw"),
                       "TLS handshake failed")
        assert_copied(copy(exp, nbdtls.client_creds(keys, None, None, psk), tmp_path / "ok.raw"))
        assert [p.name for p in keys.iterdir()] == [exp.creds.psk.path.name]   # the clients' keys are gone
    finally:
        exp.stop()
    assert list(keys.iterdir()) == []                                           # and the server's with it


def test_an_x509_export_admits_only_the_destinations_certificate(tmp_path: Path, disk: Path,
                                                                 pki: dict[str, Path]) -> None:
    keys = tmp_path / "keys"
    exp = start(disk, nbdtls.server_creds(keys, str(pki["a"]), client_identity("b"), None))
    try:
        plain = plain_info(exp)
        assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr
        # host c: a valid certificate of the same CA, but not the identity this export admits
        assert_refused(copy(exp, nbdtls.client_creds(keys, str(pki["c"]), ADDRESS, None), tmp_path / "c.raw"),
                       "")
        assert exp.proc is not None and exp.proc.stderr is not None
        os.set_blocking(exp.proc.stderr.fileno(), False)
        err = (exp.proc.stderr.read() or b"").decode()
        assert "authz check for CN=kvmotion-host-c is denied" in err, err
        # the right certificate, but the server's does not name the address the client was told to expect
        assert_refused(copy(exp, nbdtls.client_creds(keys, str(pki["b"]), "198.51.100.9", None),
                            tmp_path / "name.raw"), "hostname")
        assert_copied(copy(exp, nbdtls.client_creds(keys, str(pki["b"]), ADDRESS, None), tmp_path / "b.raw"))
    finally:
        exp.stop()


def test_qemu_does_not_apply_tls_authz_to_psk_so_the_key_is_the_authorization(tmp_path: Path, disk: Path) -> None:
    """Why a PSK export carries no --tls-authz: QEMU 7.2 admits the key's holder even when the authz names nobody."""
    psk, keys = NbdPsk.new(), tmp_path / "keys"
    exp = images.NbdExport(disk, "qcow2", ADDRESS, pick_port(ADDRESS), False, nbdtls.server_creds(keys, None, None, psk))
    argv = exp.argv()
    nobody = {"qom-type": "authz-simple", "id": "nobody", "identity": "CN=nobody"}
    argv[-1:-1] = ["--object", json.dumps(nobody), "--tls-authz", "nobody"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    exp.proc = proc
    try:
        exp.wait_listening()
        assert_copied(copy(exp, nbdtls.client_creds(keys, None, None, psk), tmp_path / "ok.raw"))
    finally:
        exp.stop()

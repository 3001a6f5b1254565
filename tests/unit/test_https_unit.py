"""The controller serves HTTPS by default with a certificate from its own CA: a client that trusts that CA (the
CLI's ca_file or $KVMOTION_CA_FILE) gets in, one that does not is told how to fix it, plain HTTP gets nothing, and
an admin's own certificate is served as it is."""
from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from cryptography import x509

from kvmotion.controller import apicert, auth
from kvmotion.controller.pki import CertificateAuthority


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(root: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvmotion.controller.main", "--host", "127.0.0.1", "--port",
                             str(port), "--db", f"sqlite:///{root / 'c.db'}", "--log-level", "warning", *extra],
                            stdout=open(root / "log", "wb"), stderr=subprocess.STDOUT)
    end = time.monotonic() + 30
    while True:
        assert proc.poll() is None and time.monotonic() < end, (root / "log").read_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.1)


@pytest.fixture()
def controller(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    proc, port = start(tmp_path)
    try:
        yield tmp_path, port
    finally:
        proc.terminate()
        proc.wait(10)


def test_https_with_the_controllers_ca(controller: tuple[Path, int]) -> None:
    root, port = controller
    ca = root / "pki" / "ca-cert.pem"
    token = (root / auth.ADMIN_TOKEN_FILE).read_text().strip()
    trusted = ssl.create_default_context(cafile=str(ca))
    r = httpx.get(f"https://127.0.0.1:{port}/api/v1/health", headers={"Authorization": f"Bearer {token}"},
                  verify=trusted, timeout=10)
    assert r.status_code == 200 and r.json()["ok"]
    with pytest.raises(httpx.ConnectError):                     # the system's CAs do not know it
        httpx.get(f"https://127.0.0.1:{port}/api/v1/health", verify=ssl.create_default_context(), timeout=10)
    with pytest.raises(httpx.HTTPError):                        # no plain HTTP: the token would cross in clear
        httpx.get(f"http://127.0.0.1:{port}/api/v1/health", headers={"Authorization": f"Bearer {token}"},
                  timeout=10)
    cert = x509.load_pem_x509_certificate((root / "pki" / apicert.CERT_FILE).read_bytes())
    assert (root / "pki" / apicert.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert cert.issuer == x509.load_pem_x509_certificate(ca.read_bytes()).subject

    env = dict(os.environ, KVMOTION_URL=f"https://127.0.0.1:{port}", KVMOTION_TOKEN_FILE=str(root / "admin.token"))
    env.pop("KVMOTION_CA_FILE", None)
    env["KVMOTION_CONFIG"] = str(root / "no-cli.json")
    cli = [sys.executable, "-m", "kvmotion.cli.main", "host", "list"]
    refused = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode != 0 and "does not trust" in refused.stderr and "KVMOTION_CA_FILE" in refused.stderr
    ok = subprocess.run(cli, capture_output=True, text=True, env=dict(env, KVMOTION_CA_FILE=str(ca)), timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_the_auto_certificate_is_reissued_only_when_its_names_change(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    cert, _ = apicert.ensure(ca, tmp_path, ["198.18.0.2", "ctl.example"])
    first = cert.read_bytes()
    apicert.ensure(ca, tmp_path, ["198.18.0.2", "ctl.example"])
    assert cert.read_bytes() == first
    apicert.ensure(ca, tmp_path, ["198.18.0.2", "ctl.example", "vcenter.example"])
    san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in san} == {"198.18.0.2", "ctl.example", "vcenter.example"}
    assert "0.0.0.0" not in apicert.names_for("0.0.0.0", []) and "198.18.0.2" in apicert.names_for("198.18.0.2", [])


def test_an_admins_own_certificate_is_served_and_half_a_pair_is_refused(tmp_path: Path) -> None:
    own = CertificateAuthority.load_or_create(tmp_path / "own-ca")
    cert, key = apicert.ensure(own, tmp_path / "own-ca", ["127.0.0.1"])
    half = subprocess.run([sys.executable, "-m", "kvmotion.controller.main", "--db", f"sqlite:///{tmp_path / 'c.db'}",
                           "--tls-cert", str(cert)], capture_output=True, text=True, timeout=60)
    assert half.returncode == 2 and "go together" in half.stderr
    proc, port = start(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        trusted = ssl.create_default_context(cafile=str(tmp_path / "own-ca" / "ca-cert.pem"))
        end = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/api/v1/health", verify=trusted, timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < end
                time.sleep(0.2)
        assert r.status_code == 401                             # served with the admin's certificate; token needed
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_client_trusting_two_controllers_tells_their_cas_apart(tmp_path: Path) -> None:
    """Two controllers' CAs in one client (cross-controller moves, a test run with two labs): each CA has its own
    name and key identifier, so the issuer of a certificate is never taken for the other."""
    import http.server
    import threading
    first, second = (CertificateAuthority.load_or_create(tmp_path / n) for n in ("a", "b"))
    assert first.cert.subject != second.cert.subject
    cert, key = apicert.ensure(second, tmp_path / "b", ["127.0.0.1"])
    srv = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.handle_request, daemon=True).start()
    client = ssl.create_default_context()
    for ca in ("a", "b"):                       # the other controller's CA first: it must not shadow this one
        client.load_verify_locations(tmp_path / ca / "ca-cert.pem")
    assert httpx.get(f"https://127.0.0.1:{srv.server_address[1]}/", verify=client, timeout=10).status_code in (200, 404)
    srv.server_close()

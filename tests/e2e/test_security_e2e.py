"""Control-plane security in the lab: agents answer only their controller, paths stay in their datastore,
and no token or host secret shows up in logs, process listings or task records."""
from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest

from kvmotion.cli.client import Client
from kvmotion.common import hostauth
from kvmotion.common.http import tls_context
from kvmotion.common.errors import KvmotionError
from kvmotion_lab import scenario
from kvmotion_lab.netns import netns_exec_argv
from labtools import agent_url, assert_guest_survived, cli, http_beat, remove_vm, running_vm


@pytest.fixture(scope="module")
def client(lab) -> Client:
    return Client(lab.controller_url)


def raw_call(lab, from_host: str, url: str, *headers: str, cert: tuple[Path, Path] | None = None) -> tuple[int, str]:
    """curl from another host's namespace: what any other machine on the management network could send (0: no
    TLS session). ``cert``: a client certificate and key to present."""
    argv = ["curl", "-s", "-k", "-m", "5", "-o", "-", "-w", "\n%{http_code}", url]
    if cert is not None:
        argv += ["--cert", str(cert[0]), "--key", str(cert[1])]
    for h in headers:
        argv += ["-H", h]
    out = subprocess.run(netns_exec_argv(lab.host_netns(from_host), argv), capture_output=True, text=True,
                         timeout=20).stdout
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


def test_agent_answers_only_its_controller(lab) -> None:
    """Mutual TLS first: no client certificate, or another one from the same CA (h2's own), and there is no TLS
    session at all. Then request signing, for whoever holds the controller's client certificate: the host's
    own secret, once per request."""
    root = Path(lab.root)
    url = f"{agent_url(lab, 'h1')}/v1/vms"
    assert raw_call(lab, "h2", url)[0] == 0                     # no client certificate: no TLS session
    h2_cert = (root / "hosts" / "h2" / "tls" / "client-cert.pem", root / "hosts" / "h2" / "tls" / "client-key.pem")
    assert raw_call(lab, "h2", url, cert=h2_cert)[0] == 0        # a certificate of the same CA, not the pinned one
    ctl = (root / "pki" / "agent-client-cert.pem", root / "pki" / "agent-client-key.pem")
    code, body = raw_call(lab, "h2", url, cert=ctl)             # the controller's certificate, unsigned
    assert code == 401 and "not signed" in body
    h2_secret = (Path(lab.root) / "hosts" / "h2" / hostauth.SECRET_FILE).read_text().strip()
    code, body = raw_call(lab, "h2", url, f"{hostauth.HEADER}: {hostauth.sign(h2_secret, 'GET', '/v1/vms', b'')}",
                          cert=ctl)
    assert code == 401 and "does not match" in body             # an agent cannot call another agent
    h1_secret = (Path(lab.root) / "hosts" / "h1" / hostauth.SECRET_FILE).read_text().strip()
    header = f"{hostauth.HEADER}: {hostauth.sign(h1_secret, 'GET', '/v1/vms', b'')}"
    assert raw_call(lab, "h2", url, header, cert=ctl)[0] == 200  # signed with h1's secret: accepted once ...
    code, body = raw_call(lab, "h2", url, header, cert=ctl)
    assert code == 401 and "replay" in body                     # ... and a captured request cannot be replayed
    code, _ = raw_call(lab, "h2", f"{agent_url(lab, 'h1')}/v1/health", cert=ctl)
    assert code == 401                                          # no endpoint is open, not even health
    assert "refused GET /v1/vms" in (Path(lab.root) / "logs" / "agent-h1.log").read_text()


def test_host_enrolment_needs_the_agents_secret(lab, client) -> None:
    address = client.host("h1")["address"]
    with pytest.raises(KvmotionError) as exc:
        client.add_host(address, "0" * 64)
    assert exc.value.code == "INVALID_INPUT" and "refused the secret" in exc.value.message
    assert client.host("h1")["state"] == "connected"            # the enrolled secret is unchanged
    enrol = client.create_token("enrol-takeover", "enrol", 600)["token"]
    r = httpx.post(f"{lab.controller_url}/api/v1/hosts/register", timeout=30, verify=tls_context(),
                   headers={"Authorization": f"Bearer {enrol}"},
                   json={"address": address, "secret": "0" * 64, "name": "h1"})
    assert r.status_code == 422                                 # self-registration cannot take over a host
    r = httpx.get(f"{lab.controller_url}/api/v1/vms", headers={"Authorization": f"Bearer {enrol}"}, timeout=10,
                  verify=tls_context())
    assert r.status_code == 403                                 # an enrolment token does nothing else
    secret = (Path(lab.root) / "hosts" / "h1" / hostauth.SECRET_FILE).read_text().strip()
    assert client.add_host(address, secret)["name"] == "h1"     # the admin re-enrols with the right secret


def test_iso_paths_stay_inside_the_datastore(lab, client) -> None:
    vm = running_vm(client, lab, "path1")
    shared = Path(lab.root) / "ds" / "shared"
    outside = Path(lab.root) / "outside.iso"
    outside.write_bytes(b"secret outside the datastore")
    before = outside.stat().st_mtime_ns
    (shared / "escape.iso").symlink_to(outside)
    (shared / "dirlink").symlink_to(Path(lab.root))
    try:
        for path, where in (("../outside.iso", "schema"), ("/etc/passwd", "schema"), ("escape.iso", "agent"),
                            ("dirlink/outside.iso", "agent")):
            with pytest.raises(KvmotionError) as exc:
                client.cdrom("path1", "cd0", "local", path=path)
            assert exc.value.code == "INVALID_INPUT", (path, exc.value.to_dict())
            assert exc.value.remedy, path
        res = cli(lab, "vm", "cdrom", "connect", "path1", "--iso", "escape.iso")
        assert res.returncode == 2 and "datastore" in res.stderr
        assert outside.read_bytes() == b"secret outside the datastore" and outside.stat().st_mtime_ns == before
        assert client.vm("path1")["spec"]["cdroms"][0]["media"] == "none"
        assert scenario.guest_heartbeat(lab.net.client_netns, vm["spec"]["guest_ip"]) is not None
    finally:
        (shared / "escape.iso").unlink()
        (shared / "dirlink").unlink()
    remove_vm(client, "path1")


def test_tokens_and_secrets_never_leak(lab, client, tmp_path) -> None:
    operator = client.create_token("leak-op", "operator")["token"]
    env = dict(os.environ, KVMOTION_URL=lab.controller_url, KVMOTION_TOKEN=operator)
    env.pop("KVMOTION_TOKEN_FILE", None)
    running_vm(client, lab, "leak1")
    before = http_beat(lab, client, "leak1")
    proc = subprocess.Popen([os.sys.executable, "-m", "kvmotion.cli.main", "vm", "migrate", "leak1", "--host", "h2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cmdlines = []
    while proc.poll() is None:                                  # process listings while the CLI runs
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes())
                except OSError:
                    pass
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_guest_survived(lab, client, "leak1", before)
    task = client.call("GET", "/tasks", params={"limit": 5})
    secrets_ = [operator, lab.admin_token()] + [(Path(lab.root) / "hosts" / h / hostauth.SECRET_FILE).read_text()
                                                .strip() for h in ("h1", "h2")]
    logs = b"".join(p.read_bytes() for p in (Path(lab.root) / "logs").glob("*.log"))
    with sqlite3.connect(Path(lab.root) / "controller.db") as db:
        tables = "\n".join(str(row) for t in ("tasks", "audit", "vms", "hosts")
                           for row in db.execute(f"SELECT * FROM {t}"))   # noqa: S608 - fixed table names
    for s in secrets_:
        assert s.encode() not in logs, "a token or secret is in a log"
        assert not any(s.encode() in c for c in cmdlines), "a token or secret is in a process listing"
        assert s not in str(task) and s not in tables, "a token or secret is in a task or inventory record"
        assert s not in out + err
    audit = client.call("GET", "/audit", params={"limit": 20})
    assert any(a["who"] == "leak-op" and a["path"] == "/api/v1/vms/leak1/migrate" for a in audit)
    remove_vm(client, "leak1")

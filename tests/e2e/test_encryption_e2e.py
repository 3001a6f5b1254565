"""Encrypted vMotion, proven on the wire: what a capture of the migration network sees."""
from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from kvmotion.cli.client import Client
from kvmotion.models.api import wrapped_fingerprint
from kvmotion_lab import scenario
from kvmotion_lab.netns import netns_exec_argv
from labtools import agent_vms, assert_guest_survived, cli, codes, http_beat, remove_vm, running_lab, running_vm

MARKER = "KVMOTION-WIRE-MARKER-" + "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJK"[:43]   # 64 bytes
TLS_RECORDS = (b"\x16\x03\x01", b"\x16\x03\x03")    # TLS handshake record headers (ClientHello)


def stored_disks(lab_root: Path, vm: str) -> list[dict]:
    """A VM's disks as the lab controller's database holds them (wrapped keys too: the API shows fingerprints)."""
    db = sqlite3.connect(lab_root / "controller.db", timeout=10)
    try:
        (spec,) = db.execute("SELECT spec_json FROM vms WHERE name = ?", (vm,)).fetchone()
    finally:
        db.close()
    return json.loads(spec)["disks"]


@pytest.fixture(scope="module")
def lab(guest_image):
    with running_lab(guest_image, 3) as info:
        yield info


@pytest.fixture(scope="module")
def client(lab) -> Client:
    return Client(lab.controller_url)


class Capture:
    """tcpdump on the lab's migration switch, limited to kvmotion's migration ports."""

    def __init__(self, lab, path: Path) -> None:
        self.path = path
        self.log = path.with_suffix(".log")
        argv = netns_exec_argv(lab.net.switch_netns, ["tcpdump", "-i", "br-mig", "-s", "0", "-U", "-n",
                                                          "-w", str(path), "tcp portrange 49152-49407"])
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        end = time.monotonic() + 10
        while b"listening on" not in (self.log.read_bytes() if self.log.exists() else b""):
            assert time.monotonic() < end and self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)

    def stop(self) -> bytes:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        return self.path.read_bytes()


def capture_move(lab, client: Client, vm: str, host: str, tmp: Path, **opts) -> tuple[dict, bytes]:
    cap = Capture(lab, tmp / f"{vm}-{host}-{time.monotonic_ns()}.pcap")
    try:
        task = scenario.follow_task(client, client.migrate(vm, host, **opts)["id"], timeout_s=300)
    finally:
        data = cap.stop()
    return task, data


def test_every_host_has_certificates_and_the_ca_key_is_private(lab, client) -> None:
    for h in ("h1", "h2", "h3"):
        tls = client.host(h)["facts"]["tls"]
        assert tls["supported"] is True and tls["client_subject"] == f"CN=kvmotion-host-{h}"
    key = Path(lab.root) / "pki" / "ca-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600


def test_marker_crosses_in_clear_only_when_disabled(lab, client, tmp_path) -> None:
    running_vm(client, lab, "wire1", marker=MARKER, encrypted_vmotion="disabled")
    before = http_beat(lab, client, "wire1")
    plain_task, plain = capture_move(lab, client, "wire1", "h2", tmp_path)
    assert plain_task["state"] == "success", plain_task.get("error")
    before = assert_guest_survived(lab, client, "wire1", before)
    assert plain_task["result"]["encryption"]["mode"] == "plain"
    assert MARKER.encode() in plain, "the marker should be visible in an unencrypted migration"
    assert cli(lab, "vm", "set", "wire1", "--encrypted-vmotion", "required").returncode == 0
    tls_task, wire = capture_move(lab, client, "wire1", "h1", tmp_path)
    assert tls_task["state"] == "success", tls_task.get("error")
    assert tls_task["result"]["encryption"]["mode"] == "tls"
    assert len(wire) > 1_000_000                                   # the memory did cross the wire ...
    assert MARKER.encode() not in wire                              # ... but never readable
    assert any(rec in wire for rec in TLS_RECORDS)                  # a TLS handshake opened the stream
    assert_guest_survived(lab, client, "wire1", before)
    remove_vm(client, "wire1")


def test_opportunistic_falls_back_and_required_is_refused(lab, client) -> None:
    running_vm(client, lab, "opp1")
    client.create_vm(name="req1", host="h1", encrypted_vmotion="required")
    client.start_vm("req1")
    before = {n: http_beat(lab, client, n) for n in ("opp1", "req1")}
    assert cli(lab, "host", "cert", "remove", "h2").returncode == 0
    try:
        found = codes(client.validate("opp1", "h2"))
        assert found["ENCRYPTION_FALLBACK"]["severity"] == "info"
        found = codes(client.validate("req1", "h2"))
        assert found["ENCRYPTION_UNSUPPORTED"]["severity"] == "error"
        assert "host cert renew h2" in found["ENCRYPTION_UNSUPPORTED"]["remedy"]
        res = cli(lab, "vm", "migrate", "req1", "--host", "h2")
        assert res.returncode == 3 and "ENCRYPTION_UNSUPPORTED" in res.stderr
        task = scenario.follow_task(client, client.migrate("opp1", "h2")["id"])
        assert task["state"] == "success"
        enc = task["result"]["encryption"]
        assert enc["mode"] == "plain" and "h2" in enc["reason"]     # the report says which, and why
    finally:
        assert cli(lab, "host", "cert", "renew", "h2").returncode == 0
    task = scenario.follow_task(client, client.migrate("req1", "h2")["id"])
    assert task["state"] == "success" and task["result"]["encryption"]["mode"] == "tls"
    for n in ("opp1", "req1"):
        assert_guest_survived(lab, client, n, before[n])
    for n in ("opp1", "req1"):
        remove_vm(client, n)


def test_unexpected_client_identity_is_rejected(lab, client) -> None:
    vm = running_vm(client, lab, "ident1", encrypted_vmotion="required")
    before = http_beat(lab, client, "ident1")
    h1_tls, h3_tls = Path(lab.root) / "hosts" / "h1" / "tls", Path(lab.root) / "hosts" / "h3" / "tls"
    for name in ("client-cert.pem", "client-key.pem"):      # h1 now presents h3's (valid) identity
        shutil.copy(h3_tls / name, h1_tls / name)
    try:
        task = scenario.follow_task(client, client.migrate("ident1", "h2")["id"])
        assert task["state"] == "error" and task["error"]["rollback"]["source_running"] is True, task["error"]
        assert vm["uuid"] not in agent_vms(lab, "h2")
        assert client.vm("ident1")["host"] == "h1"
        before = assert_guest_survived(lab, client, "ident1", before)     # the refused move left it unharmed
    finally:
        assert cli(lab, "host", "cert", "renew", "h1").returncode == 0
    task = scenario.follow_task(client, client.migrate("ident1", "h2")["id"])
    assert task["state"] == "success", task.get("error")
    assert_guest_survived(lab, client, "ident1", before)
    remove_vm(client, "ident1")


def test_encrypted_vm_always_migrates_encrypted(lab, client, tmp_path) -> None:
    vm = running_vm(client, lab, "luks1", encrypted_disk=True)
    disk = vm["spec"]["disks"][0]
    assert disk["encrypted"] and disk["key_wrapped"] and vm["spec"]["encrypted_vmotion"] == "required"
    res = cli(lab, "vm", "set", "luks1", "--encrypted-vmotion", "disabled")
    assert res.returncode == 2 and "always migrates encrypted" in res.stderr
    # the guest reads its disk through QEMU's LUKS layer; the key reached QEMU encrypted, and its file is gone
    runtime = agent_vms(lab, "h1")[vm["uuid"]]
    cmdline = Path(f"/proc/{runtime['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "keyid=kvm-master" in cmdline and "encrypt" in cmdline
    assert not list((Path(lab.root) / "hosts" / "h1" / "vms" / vm["uuid"]).glob("master.key"))
    before = http_beat(lab, client, "luks1")
    task = scenario.follow_task(client, client.migrate("luks1", "h2")["id"])
    assert task["state"] == "success", task.get("error")
    assert task["result"]["encryption"]["mode"] == "tls"
    assert_guest_survived(lab, client, "luks1", before)
    # without the key the disk is unreadable
    path = Path(lab.root) / "ds" / "shared" / "luks1" / "luks1.qcow2"
    info = subprocess.run(["qemu-img", "info", "-U", str(path)], capture_output=True, text=True, timeout=30)
    assert "encrypted: yes" in info.stdout and "luks" in info.stdout
    out = subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(path), str(tmp_path / "x.raw")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and ("secret" in out.stderr or "key" in out.stderr), out.stderr
    remove_vm(client, "luks1")


DISK_MARKER = ("KVMOTION-DISK-MARKER-" + "9876543210ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsr")[:64].encode()


def plant_disk_marker(lab, vm: dict) -> None:
    """Write the marker into the powered-off VM's raw data disk: it then lives only on disk, never in guest RAM."""
    data = next(d for d in vm["spec"]["disks"] if d["id"] == "disk1")
    assert data["format"] == "raw"
    path = Path(lab.root) / "ds" / data["datastore"] / data["path"]
    with open(path, "r+b") as f:
        f.seek(4 << 20)
        f.write(DISK_MARKER * 1024)                     # 64 KiB of markers at 4 MiB


def assert_disk_arrived(lab, client: Client, name: str) -> None:
    data = next(d for d in client.vm(name)["spec"]["disks"] if d["id"] == "disk1")
    with open(Path(lab.root) / "ds" / data["datastore"] / data["path"], "rb") as f:
        f.seek(4 << 20)
        assert f.read(64) == DISK_MARKER


def assert_disk_stream_sealed(task: dict, wire: bytes, kind: str) -> None:
    """The marker crossed the wire (it arrives: assert_disk_arrived; a mirror also sends the zeros of the 16 MiB
    disk, a copy skips them), but never readable."""
    assert task["state"] == "success", task.get("error")
    assert task["kind"] == kind and len(wire) > (16 << 20 if kind == "xvmotion" else len(DISK_MARKER) * 1024)
    assert DISK_MARKER not in wire
    assert any(rec in wire for rec in TLS_RECORDS)


def test_disk_streams_are_never_readable_even_when_encryption_is_disabled(lab, client, tmp_path) -> None:
    """Shared-nothing and cold moves, policy disabled (a PSK made for the move) and required (x509)."""
    vm = client.create_vm(name="wire2", host="h1", datastore="h1-local", data_disk_mb=16, disk_format="raw",
                          encrypted_vmotion="disabled")
    plant_disk_marker(lab, vm)
    client.start_vm("wire2")
    before = scenario.wait_guest(lab.net.client_netns, vm["spec"]["guest_ip"])
    task, wire = capture_move(lab, client, "wire2", "h2", tmp_path, datastore="h2-local")
    assert_disk_stream_sealed(task, wire, "xvmotion")
    assert task["result"]["encryption"]["mode"] == "plain"            # the memory stream, as the policy says
    assert task["result"]["encryption"]["disk_streams"] == "tls-psk"  # the disks: TLS with the move's own key
    before = assert_guest_survived(lab, client, "wire2", before)
    assert_disk_arrived(lab, client, "wire2")
    client.stop_vm("wire2")
    task, wire = capture_move(lab, client, "wire2", "h1", tmp_path, datastore="h1-local")
    assert_disk_stream_sealed(task, wire, "cold")
    assert task["result"]["encryption"]["mode"] == "tls-psk"
    assert_disk_arrived(lab, client, "wire2")
    for h in ("h1", "h2"):          # every key directory went with its stream
        assert not list((Path(lab.root) / "hosts" / h).glob("nbd-keys/psk-*"))
    assert cli(lab, "vm", "set", "wire2", "--encrypted-vmotion", "required").returncode == 0
    task, wire = capture_move(lab, client, "wire2", "h2", tmp_path, datastore="h2-local")
    assert_disk_stream_sealed(task, wire, "cold")
    assert task["result"]["encryption"]["mode"] == "tls-x509"
    client.start_vm("wire2")
    before = scenario.wait_guest(lab.net.client_netns, vm["spec"]["guest_ip"])
    task, wire = capture_move(lab, client, "wire2", "h1", tmp_path, datastore="h1-local")
    assert_disk_stream_sealed(task, wire, "xvmotion")
    assert task["result"]["encryption"] | {"reason": ""} == {"mode": "tls", "disk_streams": "tls-x509",
                                                               "policy": "required", "reason": ""}
    disks = next(p for p in task["phases"] if p["name"] == "disks")["detail"]
    assert disks["bytes"] >= 16 << 20 and disks["encryption"] == "tls-x509"
    assert_guest_survived(lab, client, "wire2", before)
    assert_disk_arrived(lab, client, "wire2")
    remove_vm(client, "wire2")


def test_the_management_network_carries_no_token_secret_or_passphrase(lab, client, tmp_path) -> None:
    """A capture of everything the controller sends and receives (the CLI's calls and every agent call, in the
    controller's namespace) while an admin re-enrols a host with its secret and an encrypted-disk VM is created,
    started and moved: no bearer token, no host secret, no disk passphrase in it, and no HTTP in clear at all: both
    APIs speak TLS (the agent's mutual). The control that the capture saw the agent calls: their packets."""
    from kvmotion.common.hostauth import SECRET_FILE
    from kvmotion.controller.keys import KeyProvider
    root = Path(lab.root)
    pcap, log = tmp_path / "mgmt.pcap", tmp_path / "mgmt.log"
    proc = subprocess.Popen(["tcpdump", "-i", "any", "-s", "0", "-U", "-n", "-w", str(pcap),
                             "tcp port 8760 or tcp port 8770"], stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    end = time.monotonic() + 10
    while b"listening on" not in (log.read_bytes() if log.exists() else b""):
        assert time.monotonic() < end and proc.poll() is None, log.read_text()
        time.sleep(0.05)
    try:
        secret = (root / "hosts" / "h1" / SECRET_FILE).read_text().strip()
        assert client.add_host(client.host("h1")["address"], secret)["name"] == "h1"   # the secret, to the API
        vm = running_vm(client, lab, "wire1", encrypted_disk=True)
        task = scenario.follow_task(client, client.migrate("wire1", "h2")["id"])
        assert task["state"] == "success", task.get("error")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    wire = pcap.read_bytes()
    disk = stored_disks(root, "wire1")[0]          # the API gives only the wrapped key's fingerprint
    assert vm["spec"]["disks"][0]["key_wrapped"] == wrapped_fingerprint(disk["key_wrapped"])
    passphrase = KeyProvider.load_or_create(root / "pki").unwrap(disk["key_wrapped"], f"{vm['uuid']}/{disk['node']}")
    token = (root / "admin.token").read_text().strip()
    host_secrets = [(root / "hosts" / h / SECRET_FILE).read_text().strip() for h in ("h1", "h2", "h3")]
    agent_packets = subprocess.run(["tcpdump", "-r", str(pcap), "-n", "tcp port 8770"], capture_output=True,
                                   text=True, timeout=60).stdout.count("\n")
    assert len(wire) > 100_000 and agent_packets > 200, f"the capture saw {agent_packets} agent packets"
    for clear in (b"x-kvmotion-auth", b"/v1/vms/", b'"disk_keys"'):
        assert clear.lower() not in wire.lower(), f"{clear!r} crossed the management network in clear"
    http_line = re.search(rb"HTTP/1\.1\r\n|HTTP/1\.1 [1-5][0-9][0-9] ", wire)   # (ALPN's "http/1.1" is expected)
    assert http_line is None, f"an HTTP message crossed in clear: {wire[http_line.start() - 80:http_line.end()]!r}"
    for name, value in [("admin token", token), ("disk passphrase", passphrase)] + \
            [(f"host secret {i}", s) for i, s in enumerate(host_secrets)]:
        assert value.encode() not in wire, f"the {name} crossed the management network in clear"
    remove_vm(client, "wire1")

"""cloud-init (NoCloud) in the lab with the Debian 12 guest: `vm create --cloud-init` builds the seed ISO in the VM
folder on the shared datastore and connects it on cd0; the guest takes its hostname and its users' SSH keys from
it (read back through the QEMU guest agent: no SSH); the VM is vMotioned h1 -> h2 with the seed still connected
(media on a datastore both hosts see do not block a move) and survives; Storage vMotion and cold migration take
the seed along with the VM folder. Bad input is refused before anything is created, naming the file and the line.

The VM runs on the i440fx machine: the Debian cloud kernel (linux-image-cloud-amd64) has no AHCI driver, so on q35
(whose CD-ROM sits on the ICH9 AHCI controller) it would not see the seed; PIIX IDE (ata_piix) it has.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kvmotion.cli.client import Client
from kvmotion_lab import scenario
from labtools import agent_vms, assert_guest_survived, cli, codes, http_beat, record_figure

HOSTNAME = "ci-web1"
MACHINE = "pc-i440fx-7.2"
CLOUD_INIT_S = 240.0


def public_key(comment: str) -> str:
    """An ed25519 public key line (a well-formed blob: cloud-init copies it, nobody logs in with it)."""
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + os.urandom(32)
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


@pytest.fixture(scope="module")
def lab(guest_image, debian_image):
    from labtools import running_lab
    from kvmotion_lab.lab import stage_image
    with running_lab(guest_image, 2) as info:
        stage_image(Path(info.root), debian_image.disk)
        yield info


def qga(sock: Path, *commands: dict, timeout: float = 60.0) -> list[dict]:
    """Run QGA commands in order over the VM's guest agent socket (guest-sync first); their replies."""
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(sock))
                f = s.makefile("rwb")
                sync = int.from_bytes(os.urandom(3), "big")
                f.write(json.dumps({"execute": "guest-sync", "arguments": {"id": sync}}).encode() + b"\n")
                f.flush()
                while json.loads(f.readline()).get("return") != sync:
                    pass
                out = []
                for cmd in commands:
                    f.write(json.dumps(cmd).encode() + b"\n")
                    f.flush()
                    out.append(json.loads(f.readline()))
                return out
        except (OSError, ValueError) as exc:
            last = exc
            time.sleep(1)
    pytest.fail(f"the guest agent at {sock} did not answer within {timeout:.0f} s: {last}")


def guest_file(sock: Path, path: str) -> str | None:
    """A file's text read through the guest agent (guest-file-open/read/close); None when it does not exist."""
    opened = qga(sock, {"execute": "guest-file-open", "arguments": {"path": path, "mode": "r"}})[0]
    if "error" in opened:
        return None
    handle = opened["return"]
    read, _ = qga(sock, {"execute": "guest-file-read", "arguments": {"handle": handle, "count": 65536}},
                  {"execute": "guest-file-close", "arguments": {"handle": handle}})
    return base64.b64decode(read["return"]["buf-b64"]).decode()


def qga_sock(lab, client: Client, name: str) -> Path:
    vm = client.vm(name)
    return Path(lab.root) / "hosts" / vm["host"] / "vms" / vm["uuid"] / "qga.sock"


def wait_hostname(lab, client: Client, name: str) -> tuple[dict, float]:
    ip, start = client.vm(name)["spec"]["guest_ip"], time.monotonic()
    beat: dict | None = None
    while time.monotonic() - start < CLOUD_INIT_S:
        beat = scenario.guest_heartbeat(lab.net.client_netns, ip)
        if beat is not None and beat.get("hostname") == HOSTNAME and beat.get("cloud_init") != "running":
            return beat, time.monotonic() - start
        time.sleep(2)
    pytest.fail(f"the guest did not take hostname {HOSTNAME} from its seed within {CLOUD_INIT_S:.0f} s: {beat}")


def test_bad_user_data_is_refused_and_nothing_is_created(lab, tmp_path) -> None:
    client = Client(lab.controller_url, timeout=300)
    bad = tmp_path / "bad-user-data.yaml"
    bad.write_text("#cloud-config\nhostname: web1\nusers:\n  - name: bob\n   shell: /bin/sh\n")
    res = cli(lab, "vm", "create", "cibad", "--host", "h1", "--image", "shared:images/debian.qcow2",
              "--clone", "linked", "--cloud-init", str(bad))
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "bad-user-data.yaml" in out and "line 5" in out and "not valid YAML" in out and "fix:" in out, out
    key = tmp_path / "key.pub"
    key.write_text("ssh-ed25519 not-base64!\n")
    good = tmp_path / "user-data.yaml"
    good.write_text("#cloud-config\nhostname: web1\n")
    res = cli(lab, "vm", "create", "cibad", "--host", "h1", "--image", "shared:images/debian.qcow2",
              "--clone", "linked", "--cloud-init", str(good), "--ssh-key", str(key))
    assert res.returncode == 2 and "key.pub" in res.stderr and "line 1" in res.stderr, res.stdout + res.stderr
    assert "cibad" not in {v["name"] for v in client.vms()}
    for ds in ("shared", "h1-local", "h2-local"):
        assert not (Path(lab.root) / "ds" / ds / "cibad").exists()


def test_cloud_init_sets_hostname_and_keys_and_the_vm_moves_live_with_its_seed(lab, tmp_path) -> None:
    client = Client(lab.controller_url, timeout=300)
    alice_key, extra_key = public_key("alice@desk"), public_key("ops@bastion")
    user_data = tmp_path / "user-data.yaml"
    user_data.write_text("#cloud-config\n# kvmotion e2e\npreserve_hostname: false\n"
                         f"hostname: {HOSTNAME}\nusers:\n  - default\n  - name: alice\n    shell: /bin/sh\n"
                         f"    ssh_authorized_keys:\n      - {alice_key}\n")
    (tmp_path / "ops.pub").write_text(f"# the operators' key\n{extra_key}\n")
    res = cli(lab, "vm", "create", "ci1", "--host", "h1", "--image", "shared:images/debian.qcow2", "--clone",
              "linked", "--memory", "512", "--machine", MACHINE, "--cloud-init", str(user_data),
              "--ssh-key", str(tmp_path / "ops.pub"))
    assert res.returncode == 0 and "cloud-init seed ci1/cidata.iso" in res.stdout, res.stdout + res.stderr
    vm = client.vm("ci1")
    assert vm["spec"]["cdroms"][0] == {"id": "cd0", "media": "local", "path": "ci1/cidata.iso", "datastore": None,
                                       "nbd": None}
    seed = Path(lab.root) / "ds" / "shared" / "ci1" / "cidata.iso"
    assert seed.is_file()
    seed_bytes = seed.read_bytes()
    if shutil.which("isoinfo"):
        info = subprocess.run(["isoinfo", "-d", "-i", str(seed)], capture_output=True, text=True, timeout=30).stdout
        assert "Volume id: cidata" in info

    client.start_vm("ci1")
    boot_start = time.monotonic()
    http_beat(lab, client, "ci1", timeout=300)
    beat, _ = wait_hostname(lab, client, "ci1")
    record_figure("cloud_init_boot_to_hostname_s", time.monotonic() - boot_start, "s")
    sock = qga_sock(lab, client, "ci1")
    alice = guest_file(sock, "/home/alice/.ssh/authorized_keys")
    assert alice is not None and alice_key in alice, alice
    passwd = guest_file(sock, "/etc/passwd") or ""
    homes = [ln.split(":")[5] for ln in passwd.splitlines() if ln.count(":") == 6
             and ln.split(":")[5].startswith("/home/") and ln.split(":")[0] != "alice"]
    assert homes, f"no default user made by cloud-init: {passwd}"
    default_keys = guest_file(sock, f"{homes[0]}/.ssh/authorized_keys")
    assert default_keys is not None and extra_key in default_keys, (homes, default_keys)

    # the seed is on the shared datastore: no host-local media, the move goes ahead with it connected
    found = codes(client.validate("ci1", "h2"))
    assert "LOCAL_MEDIA_CONNECTED" not in found and not [c for c, f in found.items() if f["severity"] == "error"]
    before = http_beat(lab, client, "ci1")
    task = scenario.follow_task(client, client.migrate("ci1", "h2")["id"], timeout_s=600)
    assert task["state"] == "success", task.get("error")
    after = assert_guest_survived(lab, client, "ci1", before)
    assert after["hostname"] == HOSTNAME
    moved = client.vm("ci1")
    assert moved["host"] == "h2" and moved["spec"]["cdroms"][0]["path"] == "ci1/cidata.iso"
    pid = agent_vms(lab, "h2")[moved["uuid"]]["pid"]
    held = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir() if fd.is_symlink()}
    assert str(seed.resolve()) in held, "the destination's QEMU has the seed ISO open"
    again = guest_file(qga_sock(lab, client, "ci1"), "/home/alice/.ssh/authorized_keys")
    assert again == alice

    # Storage vMotion to h2-local: the seed goes with the VM folder and QEMU reads the new copy (no media change)
    before = http_beat(lab, client, "ci1")
    task = scenario.follow_task(client, client.migrate("ci1", datastore="h2-local")["id"], timeout_s=900)
    assert task["state"] == "success", task.get("error")
    assert_guest_survived(lab, client, "ci1", before)
    local_seed = Path(lab.root) / "ds" / "h2-local" / "ci1" / "cidata.iso"
    assert local_seed.read_bytes() == seed_bytes and not seed.exists()
    held = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir() if fd.is_symlink()}
    assert str(local_seed.resolve()) in held and not any("cidata.iso (deleted)" in h for h in held), held
    assert client.vm("ci1")["spec"]["cdroms"][0]["datastore"] is None

    # cold migration to h1-local (h1 does not see h2-local: the disk comes over NBD): the seed goes with the folder
    client.stop_vm("ci1")
    task = scenario.follow_task(client, client.migrate("ci1", "h1", datastore="h1-local")["id"], timeout_s=900)
    assert task["state"] == "success", task.get("error")
    h1_seed = Path(lab.root) / "ds" / "h1-local" / "ci1" / "cidata.iso"
    assert h1_seed.read_bytes() == seed_bytes and not local_seed.exists()
    client.start_vm("ci1")
    http_beat(lab, client, "ci1", timeout=300)
    assert guest_file(qga_sock(lab, client, "ci1"), "/home/alice/.ssh/authorized_keys") == alice
    client.stop_vm("ci1")
    client.delete_vm("ci1")
    assert not h1_seed.exists()

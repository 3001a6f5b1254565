"""VMs made from disk images, booting their own disk under BIOS and UEFI, in the lab with real QEMU.

Two parts:
- the product path, always: a blank qcow2 image (no OS) made into a full clone under BIOS and a linked clone under
  UEFI; both run (in their firmware), the UEFI VM is vMotioned and then Storage vMotioned (flattened, its NVRAM
  moved); bad images are refused with nothing left behind;
- the Debian 12 guest, when built on this machine (``kvmotion image build --debian``, found under
  /var/lib/kvmotion/image/ or named by $KVMOTION_DEBIAN_IMAGE): it boots from its disk, takes its address from the
  SMBIOS OEM strings, answers over HTTP, and keeps its boot through vMotion and Storage vMotion.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmotion.cli.client import Client
from kvmotion.common.errors import KvmotionError
from kvmotion_lab import scenario
from labtools import agent_vms, assert_guest_survived, cli, http_beat

def ds_path(lab, name: str) -> Path:
    return Path(lab.root) / "ds" / name


def follow(client: Client, task: dict) -> dict:
    return scenario.follow_task(client, task["id"], timeout_s=600)


def open_files(lab, host: str, uuid: str) -> set[str]:
    """The files the VM's QEMU process has open (deleted ones end in " (deleted)")."""
    fds = Path(f"/proc/{agent_vms(lab, host)[uuid]['pid']}/fd")
    out = set()
    for fd in fds.iterdir():
        try:
            out.add(os.readlink(fd))
        except OSError:
            continue
    return out


def image_info(path: Path) -> dict:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def lab(guest_image, debian_image):
    from labtools import running_lab
    from kvmotion_lab.lab import stage_image
    with running_lab(guest_image, 2) as info:
        images = ds_path(info, "shared") / "images"
        images.mkdir(parents=True, exist_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images / "blank.qcow2"), "64M"],
                       check=True, timeout=30)
        (images / "notes.txt").write_text("not a disk image\n")
        local = ds_path(info, "h1-local") / "images"
        local.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images / "blank.qcow2", local / "blank.qcow2")
        stage_image(Path(info.root), debian_image.disk)               # the shared datastore's own copy
        yield info


def test_bad_images_are_refused_and_leave_nothing(lab) -> None:
    client = Client(lab.controller_url, timeout=300)
    cases = {"images/notes.txt": "no disk image", "images/missing.qcow2": "does not exist",
             "../h1-local/x.qcow2": "..", "images/blank.qcow2": "linked clone"}
    for path, words in cases.items():
        extra = {"clone": "linked", "datastore": "h1-local"} if "linked" in words else {}
        with pytest.raises(KvmotionError) as err:
            client.create_vm(name="bad1", host="h1", image=f"shared:{path}", **extra)
        assert words in err.value.message, err.value.message
        assert err.value.remedy
        assert not (ds_path(lab, "shared") / "bad1").exists() and not (ds_path(lab, "h1-local") / "bad1").exists()
    assert "bad1" not in {v["name"] for v in client.vms()}
    res = cli(lab, "vm", "create", "bad2", "--host", "h1", "--image", "shared:images/notes.txt")
    assert res.returncode != 0 and "no disk image" in res.stdout + res.stderr, res.stdout + res.stderr
    res = cli(lab, "vm", "create", "cli1", "--host", "h1", "--image", "shared:images/blank.qcow2", "--firmware",
              "uefi", "--secure-boot", "--disk-size", "1", "--disk-format", "raw")
    assert res.returncode == 0 and "boot disk under uefi" in res.stdout, res.stdout + res.stderr
    spec = client.vm("cli1")["spec"]
    assert (spec["secure_boot"], spec["disks"][0]["format"], spec["disks"][0]["size_mb"]) == (True, "raw", 1024)
    client.delete_vm("cli1")


def test_full_and_linked_clones_boot_their_disk_and_move(lab, tmp_path) -> None:
    client = Client(lab.controller_url, timeout=300)
    shared = ds_path(lab, "shared")
    full = client.create_vm(name="fb1", host="h1", image="shared:images/blank.qcow2", disk_size_gb=1,
                            datastore="shared")
    assert full["spec"]["boot"] == "disk" and full["spec"]["firmware"] == "bios"
    assert image_info(shared / "fb1" / "fb1.qcow2")["virtual-size"] == 1 << 30, "grown to --disk-size"
    assert not (shared / "fb1" / "vmlinuz").exists()
    linked = client.create_vm(name="lu1", host="h1", image="shared:images/blank.qcow2", clone="linked",
                              firmware="uefi")
    disk = linked["spec"]["disks"][0]
    assert (disk["datastore"], disk["backing"], disk["backing_format"]) == ("shared", "images/blank.qcow2", "qcow2")
    assert image_info(shared / "lu1" / "lu1.qcow2")["backing-filename"] == "../images/blank.qcow2"
    nvram = (shared / "lu1" / "nvram.fd").read_bytes()
    assert nvram == Path("/usr/share/OVMF/OVMF_VARS_4M.fd").read_bytes()
    for name in ("fb1", "lu1"):
        client.start_vm(name)
        assert client.vm(name)["runtime"]["qemu_status"] == "running"

    # vMotion on shared storage: the same NVRAM file, opened by the destination when it takes over
    task = follow(client, client.migrate("lu1", "h2"))
    assert task["state"] == "success", task.get("error")
    assert task["result"]["flattened"] == []
    assert client.vm("lu1")["host"] == "h2" and (shared / "lu1" / "nvram.fd").exists()

    # Storage vMotion to h2-local: the overlay is flattened by the full mirror, the NVRAM goes with the folder
    task = follow(client, client.migrate("lu1", datastore="h2-local"))
    assert task["state"] == "success", task.get("error")
    assert task["result"]["flattened"] == ["disk0"]
    moved = client.vm("lu1")["spec"]
    assert moved["boot_datastore"] == "h2-local" and moved["disks"][0]["backing"] is None
    local = ds_path(lab, "h2-local") / "lu1"
    assert "backing-filename" not in image_info(local / "lu1.qcow2")
    assert (local / "nvram.fd").exists() and not (shared / "lu1").exists()
    nvrams = {p for p in open_files(lab, "h2", linked["uuid"]) if "nvram.fd" in p}
    assert nvrams == {str(local / "nvram.fd")}, f"QEMU writes the moved NVRAM, the old one is closed: {nvrams}"
    assert client.vm("lu1")["runtime"]["qemu_status"] == "running"
    assert (shared / "images" / "blank.qcow2").exists(), "the base image stays"

    task = follow(client, client.migrate("fb1", "h2"))
    assert task["state"] == "success", task.get("error")
    for name in ("fb1", "lu1"):
        client.stop_vm(name)
        client.delete_vm(name)


def test_a_linked_uefi_clone_through_shared_nothing_and_cold_migration(lab) -> None:
    client = Client(lab.controller_url, timeout=300)
    vm = client.create_vm(name="lx1", host="h1", image="h1-local:images/blank.qcow2", clone="linked",
                          firmware="uefi", secure_boot=True)
    assert vm["spec"]["boot_datastore"] == "h1-local", "a linked clone lives on its image's datastore"
    assert (ds_path(lab, "h1-local") / "lx1" / "nvram.fd").read_bytes() == \
        Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd").read_bytes()
    client.start_vm("lx1")
    task = follow(client, client.migrate("lx1", "h2", datastore="h2-local"))
    assert task["state"] == "success", task.get("error")
    assert task["kind"] == "xvmotion" and task["result"]["flattened"] == ["disk0"]
    there = ds_path(lab, "h2-local") / "lx1"
    assert (there / "nvram.fd").exists() and "backing-filename" not in image_info(there / "lx1.qcow2")
    assert not (ds_path(lab, "h1-local") / "lx1").exists()
    assert client.vm("lx1")["runtime"]["qemu_status"] == "running"
    client.stop_vm("lx1")
    task = follow(client, client.migrate("lx1", "h1", datastore="h1-local"))
    assert task["state"] == "success", task.get("error")
    assert task["kind"] == "cold" and task["result"]["flattened"] == []
    assert (ds_path(lab, "h1-local") / "lx1" / "nvram.fd").exists() and not there.exists()
    client.start_vm("lx1")                       # it starts on the copied files, with its own NVRAM
    assert client.vm("lx1")["runtime"]["qemu_status"] == "running"
    client.stop_vm("lx1")
    client.delete_vm("lx1")


def test_debian_boots_from_its_disk_under_bios_and_uefi_and_keeps_its_boot_through_moves(lab) -> None:
    image = "shared:images/debian.qcow2"
    client = Client(lab.controller_url, timeout=900)
    client.create_vm(name="deb-bios", host="h1", memory_mb=512, image=image, clone="full", disk_size_gb=4,
                     firmware="bios", datastore="shared")
    client.create_vm(name="deb-uefi", host="h1", memory_mb=512, image=image, clone="linked", firmware="uefi")
    beats = {}
    for name in ("deb-bios", "deb-uefi"):
        client.start_vm(name)
        beats[name] = http_beat(lab, client, name, timeout=300)

    for name in ("deb-bios", "deb-uefi"):
        task = follow(client, client.migrate(name, "h2"))
        assert task["state"] == "success", task.get("error")
        beats[name] = assert_guest_survived(lab, client, name, beats[name])

    task = follow(client, client.migrate("deb-uefi", datastore="h2-local"))
    assert task["state"] == "success", task.get("error")
    assert task["result"]["flattened"] == ["disk0"]
    assert (ds_path(lab, "h2-local") / "deb-uefi" / "nvram.fd").exists()
    assert not (ds_path(lab, "shared") / "deb-uefi").exists()
    assert_guest_survived(lab, client, "deb-uefi", beats["deb-uefi"])
    for name in ("deb-bios", "deb-uefi"):
        client.stop_vm(name)
        client.delete_vm(name)


def _identity(beat: dict) -> tuple:
    return beat["smbios_uuid"], beat["smbios_serial"], tuple(beat["macs"])


def _guest(lab, client: Client, name: str, path: str, method: str = "GET", body: str = "") -> dict:
    status, got = scenario.guest_http(lab.net.client_netns, client.vm(name)["spec"]["guest_ip"], path, method, body,
                                      timeout_s=30)
    assert status == 200, f"{method} {path} on {name}: HTTP {status}: {got}"
    return got


def test_debian_uefi_guest_keeps_its_nvram_identity_and_data_through_every_kind_of_move(lab) -> None:
    """One UEFI Debian VM (a linked clone, encrypted vMotion required) through encrypted vMotion, shared-nothing and
    cold migration, a client talking to its service throughout: its SMBIOS UUID, serial and MAC never change, its
    database keeps every committed transaction, and an EFI variable set before the moves is read back after a cold
    boot on the last host, from the NVRAM file that moved with it."""
    client = Client(lab.controller_url, timeout=900)
    name = "deb-kinds"
    client.create_vm(name=name, host="h1", memory_mb=512, image="shared:images/debian.qcow2", clone="linked",
                     firmware="uefi", encrypted_vmotion="required")
    client.start_vm(name)
    beat = http_beat(lab, client, name, timeout=300)
    identity = _identity(beat)
    assert identity[0] == client.vm(name)["uuid"].lower() and identity[2]
    marker = f"moved-{client.vm(name)['uuid'][:8]}"
    assert _guest(lab, client, name, "/efivar/KvmotionProbe", "PUT", marker)["value"] == marker
    for seq in range(1, 6):
        _guest(lab, client, name, f"/bank/tx?client=e2e&seq={seq}", "POST")

    task = follow(client, client.migrate(name, "h2"))                              # encrypted vMotion
    assert task["state"] == "success", task.get("error")
    assert task["result"]["encryption"]["mode"] == "tls"
    beat = assert_guest_survived(lab, client, name, beat)
    assert _identity(beat) == identity
    _guest(lab, client, name, "/bank/tx?client=e2e&seq=6", "POST")

    task = follow(client, client.migrate(name, "h1", datastore="h1-local"))        # shared-nothing, linked clone
    assert task["state"] == "success", task.get("error")
    assert task["kind"] == "xvmotion" and task["result"]["flattened"] == ["disk0"]
    beat = assert_guest_survived(lab, client, name, beat)
    assert _identity(beat) == identity
    assert _guest(lab, client, name, "/efivar/KvmotionProbe")["value"] == marker
    _guest(lab, client, name, "/bank/tx?client=e2e&seq=7", "POST")

    client.stop_vm(name)                                                           # cold, then a cold boot
    task = follow(client, client.migrate(name, "h2", datastore="h2-local"))
    assert task["state"] == "success", task.get("error")
    assert task["kind"] == "cold"
    assert (ds_path(lab, "h2-local") / name / "nvram.fd").exists()
    assert not (ds_path(lab, "h1-local") / name).exists()
    client.start_vm(name)
    after = http_beat(lab, client, name, timeout=300)
    assert after["boot_id"] != beat["boot_id"]                                     # it did boot again
    assert _identity(after) == identity
    assert _guest(lab, client, name, "/efivar/KvmotionProbe")["value"] == marker    # read by OVMF from nvram.fd
    bank = _guest(lab, client, name, "/bank/check?client=e2e")
    assert bank["seqs"] == list(range(1, 8)) and bank["total"] == bank["expected_total"]
    assert bank["quick_check"] == "ok"
    client.stop_vm(name)
    client.delete_vm(name)

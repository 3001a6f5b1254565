"""Storage vMotion, shared-nothing vMotion and cold migration in the lab, with real QEMU guests.

The guest writes checksummed, sequence-numbered records to its data disk during every live move; afterwards the
records are read back from the image on the host and every acknowledged one must be there, intact.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from kvmotion.agent.config import AgentConfig
from kvmotion.cli.client import Client
from kvmotion.common.errors import KvmotionError
from kvmotion_lab import records, scenario, services
from labtools import (agent_call, agent_vms, assert_guest_survived, cli, guest_diagnosis, host_settings,
                      http_beat, wait_for)


def ds_path(lab, name: str) -> Path:
    return Path(lab.root) / "ds" / name


def serial_lines(lab, uuid: str) -> list[str]:
    out: list[str] = []
    for h in ("h1", "h2"):
        log = Path(lab.root) / "hosts" / h / "vms" / uuid / "serial.log"
        if log.exists():
            out += log.read_text(errors="replace").splitlines()
    return out


def acked(lab, uuid: str) -> int:
    return max(records.parse_acks(serial_lines(lab, uuid)).values(), default=0)


def wait_acks(lab, uuid: str, n: int, timeout: float = 60.0) -> int:
    return wait_for(lambda: acked(lab, uuid) >= n and acked(lab, uuid), timeout, f"{n} record acks")


def files_vm(client: Client, lab, name: str, **opts) -> dict:
    vm = client.create_vm(name=name, host=opts.pop("host", "h1"), data_disk_mb=opts.pop("data_disk_mb", 32),
                          records_rate=opts.pop("records_rate", 20), **opts)
    client.start_vm(name)
    wait_acks(lab, vm["uuid"], 5)
    return client.vm(name)


def verify_records(lab, client: Client, name: str, minimum: int) -> records.RecordVerdict:
    """Stop the VM and read its data disk from the host: every acknowledged record present and intact."""
    vm = client.vm(name)
    if vm["power_state"] == "poweredOn":
        client.stop_vm(name)
    data = next(d for d in vm["spec"]["disks"] if d["id"] == "disk1")
    path = ds_path(lab, data["datastore"]) / data["path"]
    verdict = records.verify(path, data["format"], records.parse_acks(serial_lines(lab, vm["uuid"])), 4)
    assert verdict.ok, verdict.reason
    assert verdict.acked >= minimum
    return verdict


def follow(client: Client, task: dict) -> dict:
    return scenario.follow_task(client, task["id"], timeout_s=300)


def guest_sha(path: Path, fmt: str, tmp: Path) -> str:
    out = tmp / (path.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out)], check=True, timeout=120)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


def qemu_img_check(path: Path) -> None:
    res = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def lab(guest_image):
    from labtools import running_lab
    with running_lab(guest_image, 2) as info:
        yield info


def test_storage_vmotion_under_write_load_and_format_changes(lab) -> None:
    client = Client(lab.controller_url)
    vm = files_vm(client, lab, "sv1", datastore="shared")
    before = http_beat(lab, client, "sv1")
    n0 = wait_acks(lab, vm["uuid"], 10)

    # qcow2 on shared -> qcow2 on h1-local (the VM folder moves too)
    task = follow(client, client.migrate("sv1", datastore="h1-local"))
    assert task["state"] == "success", task.get("error")
    assert task["kind"] == "svmotion"
    assert [p["name"] for p in task["phases"]] == ["precheck", "mirror", "pivot", "verify", "cleanup"]
    r = task["result"]
    assert r["qemu_img_check"] == {"disk0": True, "disk1": True}
    assert r["write_stall_ms"] >= 0 and r["mirror"]["bytes"] > 0
    assert r["encryption"]["mode"] == "not applicable"
    assert not (ds_path(lab, "shared") / "sv1").exists(), "the old files are deleted after the pivot"
    assert (ds_path(lab, "h1-local") / "sv1" / "sv1-data.qcow2").exists()
    spec = client.vm("sv1")["spec"]
    assert spec["boot_datastore"] == "h1-local" and {d["datastore"] for d in spec["disks"]} == {"h1-local"}
    # the VM never stopped: same boot, the heartbeat went on, and so did the records
    after = assert_guest_survived(lab, client, "sv1", before)
    wait_acks(lab, vm["uuid"], n0 + 10)

    # qcow2 -> preallocated raw (back to shared), then raw -> qcow2 (per-disk placement)
    task = follow(client, client.migrate("sv1", datastore="shared", disk_format="raw"))
    assert task["state"] == "success", task.get("error")
    raw = ds_path(lab, "shared") / "sv1" / "sv1-data.raw"
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(raw)], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    assert '"format": "raw"' in info and raw.stat().st_blocks * 512 >= 32 << 20, "raw is preallocated"
    task = follow(client, client.migrate("sv1", disks={"0": "h1-local", "1": "h1-local"}, disk_format="qcow2"))
    assert task["state"] == "success", task.get("error")
    assert client.vm("sv1")["spec"]["boot_datastore"] == "shared"        # per-disk moves leave the folder
    assert not raw.exists()
    n1 = wait_acks(lab, vm["uuid"], acked(lab, vm["uuid"]) + 10)
    assert_guest_survived(lab, client, "sv1", after)

    verify_records(lab, client, "sv1", n1)
    for d in client.vm("sv1")["spec"]["disks"]:
        qemu_img_check(ds_path(lab, d["datastore"]) / d["path"])
    client.delete_vm("sv1")


def test_shared_nothing_under_write_load(lab) -> None:
    client = Client(lab.controller_url)
    vm = files_vm(client, lab, "xv1", datastore="h1-local")
    before = http_beat(lab, client, "xv1")
    n0 = wait_acks(lab, vm["uuid"], 10)
    task = follow(client, client.migrate("xv1", "h2", datastore="h2-local"))
    if task["state"] != "success":
        pytest.fail(f"shared-nothing move failed: {task.get('error')}\n" +
                    guest_diagnosis(lab, client, "xv1", f"the move ended {task['state']}"))
    assert task["kind"] == "xvmotion"
    names = [p["name"] for p in task["phases"]]
    assert names[:3] == ["precheck", "shadow", "disks"] and names[-1] == "release"
    disks = next(p for p in task["phases"] if p["name"] == "disks")["detail"]
    assert disks["bytes"] > 0 and disks["encryption"] == "tls-x509"      # the NBD streams: TLS, never plain
    release = task["phases"][-1]["detail"]
    assert release["lease_holder"] == "h2" and release["lock_released"] is True
    assert release["source_files_removed"], "the source disks are released and removed"
    assert not (ds_path(lab, "h1-local") / "xv1").exists()
    assert agent_vms(lab, "h2")[vm["uuid"]]["state"] == "running" and vm["uuid"] not in agent_vms(lab, "h1")
    moved = client.vm("xv1")
    assert moved["host"] == "h2" and moved["spec"]["boot_datastore"] == "h2-local"
    assert_guest_survived(lab, client, "xv1", before)
    n1 = wait_acks(lab, vm["uuid"], n0 + 10)
    verify_records(lab, client, "xv1", n1)
    client.delete_vm("xv1")


def test_cold_migration_across_hosts_and_datastores(lab, tmp_path) -> None:
    client = Client(lab.controller_url)
    vm = files_vm(client, lab, "cold1", datastore="h1-local", data_datastore="shared")
    wait_acks(lab, vm["uuid"], 10)
    client.stop_vm("cold1")
    sums = {d["id"]: guest_sha(ds_path(lab, d["datastore"]) / d["path"], d["format"], tmp_path)
            for d in vm["spec"]["disks"]}
    res = cli(lab, "vm", "migrate", "cold1", "--host", "h2", "--datastore", "h2-local")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cold" in res.stdout and "copy" in res.stdout
    moved = client.vm("cold1")
    assert moved["host"] == "h2" and moved["power_state"] == "poweredOff"
    assert {d["datastore"] for d in moved["spec"]["disks"]} == {"h2-local"}
    for d in moved["spec"]["disks"]:
        assert guest_sha(ds_path(lab, "h2-local") / d["path"], d["format"], tmp_path) == sums[d["id"]]
    assert not (ds_path(lab, "h1-local") / "cold1").exists() and not (ds_path(lab, "shared") / "cold1").exists()
    task = client.tasks()[0]
    assert task["kind"] == "cold" and task["result"]["copy"]["verified"].startswith("qemu-img compare")
    assert task["result"]["encryption"]["mode"] == "tls-x509"           # the NBD export admitted h2 only
    client.start_vm("cold1")                      # it boots on the new host from the copied files
    http_beat(lab, client, "cold1")
    client.stop_vm("cold1")
    client.delete_vm("cold1")


def test_destination_killed_during_the_disk_mirror(lab) -> None:
    client = Client(lab.controller_url)
    vm = files_vm(client, lab, "xf1", datastore="h1-local")
    before = http_beat(lab, client, "xf1")
    task = client.migrate("xf1", "h2", datastore="h2-local", disk_mbps=8)
    wait_for(lambda: client.task(task["id"])["phase"] == "disks" and
             (client.task(task["id"])["live"] or {}).get("disk_bytes_done"), 60, "the disk mirror")
    shadow = agent_vms(lab, "h2")[vm["uuid"]]
    os.kill(shadow["pid"], signal.SIGKILL)
    task = follow(client, task)
    assert task["state"] == "error"
    assert task["error"]["phase"] == "disks" and "destination" in task["error"]["message"]
    rollback = task["error"]["rollback"]
    assert rollback["source_running"] is True and rollback["mirror"] in ("cancelled", "failed")
    # the VM kept running on its original disks; nothing of it is left on h2
    assert client.vm("xf1")["host"] == "h1"
    assert_guest_survived(lab, client, "xf1", before)
    assert not (ds_path(lab, "h2-local") / "xf1").exists() or not any((ds_path(lab, "h2-local") / "xf1").iterdir())
    assert vm["uuid"] not in agent_vms(lab, "h2")
    n = acked(lab, vm["uuid"])
    verify_records(lab, client, "xf1", n)
    client.delete_vm("xf1")


def test_full_datastore_is_refused_or_rolled_back(lab) -> None:
    client = Client(lab.controller_url)
    tiny = ds_path(lab, "tiny")
    tiny.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "kvmotion-test-tiny", str(tiny)], check=True, timeout=10)
    try:
        services.make_datastore(tiny, "tiny", shared=False)
        cfg = AgentConfig.load(services.agent_config_path(Path(lab.root), "h1"))
        with host_settings(lab, "h1", datastores=[*cfg.datastores, tiny]):
            client.create_vm(name="full1", host="h1", datastore="shared", data_disk_mb=128, records_rate=0,
                             records_kb=1024)
            client.start_vm("full1")      # no wait for the guest: its writer fills the disk at full speed once up
            # predictable: 128 MiB of preallocated raw cannot fit in 40 MiB; refused before anything is copied
            res = cli(lab, "vm", "migrate", "full1", "--datastore", "tiny", "--disk-format", "raw", "--check")
            assert res.returncode == 3 and "DATASTORE_SPACE" in res.stdout, res.stdout
            with pytest.raises(KvmotionError) as exc:
                client.migrate("full1", datastore="tiny", disk_format="raw")
            assert "DATASTORE_SPACE" in {f["code"] for f in exc.value.details["findings"]}
            assert not any(tiny.glob("full1*/*.raw"))
            # not predictable: the guest writes faster than the thin target has room for -> ENOSPC mid-mirror
            task = follow(client, client.migrate("full1", disks={"1": "tiny"}, disk_mbps=40))
            assert task["state"] == "error"
            assert task["error"]["phase"] == "mirror" and "mirror failed" in task["error"]["message"]
            assert task["error"]["rollback"]["vm_running"] is True
            assert not (tiny / "full1" / "full1-data.qcow2").exists(), "the partial target is removed"
            assert client.vm("full1")["spec"]["disks"][1]["datastore"] == "shared"
            # the guest (booting while the mirror ran) answers a client, goes on, and booted exactly once
            assert_guest_survived(lab, client, "full1", http_beat(lab, client, "full1"))
            uuid = client.vm("full1")["uuid"]
            boots = [ln for ln in serial_lines(lab, uuid) if "KVMOTION-READY ip=" in ln]
            assert len(boots) == 1, guest_diagnosis(lab, client, "full1", f"{len(boots)} boots on the console")
            client.stop_vm("full1")
            client.delete_vm("full1")
    finally:
        subprocess.run(["umount", str(tiny)], timeout=30, check=False)


def test_a_second_host_cannot_start_a_leased_vm(lab) -> None:
    client = Client(lab.controller_url)
    vm = client.create_vm(name="lease1", host="h1", datastore="shared")
    client.start_vm("lease1")
    spec = client.vm("lease1")["spec"]
    r = agent_call(lab, "h2", "POST", f"/v1/vms/{vm['uuid']}/start", json={"spec": spec}, timeout=30)
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert "leased by host h1" in err["message"] and err["details"]["holder"] == "h1"
    assert vm["uuid"] not in agent_vms(lab, "h2")
    holders = agent_call(lab, "h1", "POST", "/v1/storage/leases", json=spec).json()
    assert set(holders.values()) == {"h1"} and len(holders) == 2      # the folder and the disk
    client.stop_vm("lease1")
    holders = agent_call(lab, "h1", "POST", "/v1/storage/leases", json=spec).json()
    assert set(holders.values()) == {""}
    client.delete_vm("lease1")

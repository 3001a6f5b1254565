"""The controller dies in the middle of every kind of move that copies disks, with real QEMU guests.

After the restart, reconciliation must leave the VM on exactly one complete set of disks, registered where it
runs, with nothing of the other set left on any datastore: a Storage vMotion mid-mirror (and after its pivot),
a cold migration mid-copy (and after it re-registered), and a shared-nothing move mid-mirror.
"""
from __future__ import annotations

import time

import pytest

from kvmotion.cli.client import Client
from kvmotion_lab import lab as lab_mod
from kvmotion.migration.engine import CRASH_AT_ENV
from labtools import agent_vms, assert_guest_survived, http_beat, record_fault, wait_for
from test_storage_e2e import acked, ds_path, files_vm, verify_records

DATASTORES = ("shared", "h1-local", "h2-local")
IMAGE_SUFFIXES = (".qcow2", ".raw")          # disk images (the folder also holds kernel and initrd.img)


@pytest.fixture(scope="module")
def lab(guest_image):
    from labtools import running_lab
    with running_lab(guest_image, 2) as info:
        yield info


def crash_move(lab, client: Client, name: str, at: str, **move) -> dict:
    """Start a move with a controller that dies at ``at`` (a phase, or ``<phase>.progress``: mid-phase);
    restart it one second later and return the task once reconciliation has ended it."""
    lab_mod.restart(lab.root, "controller", env={CRASH_AT_ENV: at})
    task = client.migrate(name, **move)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            client.task(task["id"])
        except Exception:  # noqa: BLE001 - the controller is gone: it died where it was told to
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the controller did not die at {at}")
    died = time.time()
    time.sleep(1.0)                      # what the agents and QEMU do by themselves meanwhile
    lab_mod.restart(lab.root, "controller")
    t = wait_for(lambda: (t := client.task(task["id"]))["state"] in ("success", "error") and t, 90,
                 f"reconciliation of the move that died at {at}")
    record_fault("controller killed (restarted 1 s later)", at, died, t)
    return t


def vm_files(lab, name: str) -> dict[str, set[str]]:
    """Every file of the VM's folders, per datastore (relative to the datastore)."""
    out: dict[str, set[str]] = {}
    for ds in DATASTORES:
        root = ds_path(lab, ds)
        found = {str(p.relative_to(root)) for folder in root.glob(f"{name}*") for p in
                 ([folder] if folder.is_file() else folder.rglob("*")) if p.is_file()}
        if found:
            out[ds] = found
    return out


def assert_one_set(lab, client: Client, name: str) -> dict:
    """The inventory's disks all exist, and no other image of the VM exists on any datastore; no VM folder on a
    datastore the VM does not use."""
    spec = client.vm(name)["spec"]
    disks = {(d["datastore"], d["path"]) for d in spec["disks"] if d.get("kind", "file") == "file"}
    for ds, path in disks:
        assert (ds_path(lab, ds) / path).is_file(), f"{ds}:{path} of the inventory is missing"
    used = {ds for ds, _ in disks} | {spec["boot_datastore"]}
    files = vm_files(lab, name)
    assert set(files) <= used, f"files of {name} left on datastores it does not use: " \
                               f"{ {ds: sorted(f) for ds, f in files.items() if ds not in used} }"
    images = {(ds, f) for ds, fs in files.items() for f in fs if f.endswith(IMAGE_SUFFIXES)}
    assert images <= disks, f"orphaned images of {name}: {sorted(images - disks)}"
    return spec


def only_on(lab, uuid: str, host: str) -> None:
    other = "h2" if host == "h1" else "h1"
    wait_for(lambda: agent_vms(lab, host).get(uuid, {}).get("state") == "running", 30, f"the VM running on {host}")
    assert uuid not in agent_vms(lab, other)


@pytest.mark.parametrize("at,outcome", [("mirror.progress", "error"), ("verify", "success")])
def test_controller_killed_during_storage_vmotion(lab, at: str, outcome: str) -> None:
    client = Client(lab.controller_url)
    name = f"svc-{at.split('.')[0]}"
    vm = files_vm(client, lab, name, datastore="shared", data_disk_mb=64)
    before = http_beat(lab, client, name)
    t = crash_move(lab, client, name, at, datastore="h1-local", disk_mbps=8)
    assert t["state"] == outcome, t
    rec = t["result"]["reconciled"] if outcome == "success" else t["error"]["rollback"]
    assert rec["vm_runs_on_files"] == ("new" if outcome == "success" else "original"), rec
    spec = assert_one_set(lab, client, name)
    want = "h1-local" if outcome == "success" else "shared"
    assert {d["datastore"] for d in spec["disks"]} == {want} and spec["boot_datastore"] == want, spec
    only_on(lab, vm["uuid"], "h1")
    assert_guest_survived(lab, client, name, before)
    verify_records(lab, client, name, acked(lab, vm["uuid"]))
    client.delete_vm(name)


@pytest.mark.parametrize("at,outcome", [("copy.progress", "error"), ("cleanup", "success")])
def test_controller_killed_during_cold_migration(lab, at: str, outcome: str) -> None:
    client = Client(lab.controller_url)
    name = f"coc-{at.split('.')[0]}"
    vm = client.create_vm(name=name, host="h1", datastore="h1-local", data_disk_mb=64, records_rate=0)
    t = crash_move(lab, client, name, at, host="h2", datastore="h2-local")
    assert t["state"] == outcome, t
    where, ds = ("h2", "h2-local") if outcome == "success" else ("h1", "h1-local")
    moved = client.vm(name)
    assert moved["host"] == where and moved["power_state"] != "poweredOn", moved
    spec = assert_one_set(lab, client, name)
    assert {d["datastore"] for d in spec["disks"]} == {ds} and spec["boot_datastore"] == ds, spec
    client.start_vm(name)                 # the set it is registered on boots
    only_on(lab, vm["uuid"], where)
    http_beat(lab, client, name)
    client.stop_vm(name)
    client.delete_vm(name)


def test_controller_killed_during_the_shared_nothing_disk_mirror(lab) -> None:
    client = Client(lab.controller_url)
    name = "xvc"
    vm = files_vm(client, lab, name, datastore="h1-local", data_disk_mb=64)
    before = http_beat(lab, client, name)
    t = crash_move(lab, client, name, "disks.progress", host="h2", datastore="h2-local", disk_mbps=8)
    assert t["state"] == "error" and t["error"]["code"] == "CONTROLLER_RESTARTED", t
    rb = t["error"]["rollback"]
    assert rb["resolution"] == "rollback" and rb["vm_runs_on"] == "h1", rb
    assert client.vm(name)["host"] == "h1"
    spec = assert_one_set(lab, client, name)
    assert {d["datastore"] for d in spec["disks"]} == {"h1-local"}
    assert not vm_files(lab, name).get("h2-local"), vm_files(lab, name)
    only_on(lab, vm["uuid"], "h1")
    assert_guest_survived(lab, client, name, before)
    verify_records(lab, client, name, acked(lab, vm["uuid"]))
    client.delete_vm(name)

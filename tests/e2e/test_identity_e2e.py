"""A VM keeps its identity through every kind of move, as the guest itself sees it.

The guest reads its SMBIOS system UUID and serial (``/sys/class/dmi/id``) and its NICs' MAC addresses once at
boot and serves them in its HTTP heartbeat (``smbios_uuid``, ``smbios_serial``, ``macs``; see
:mod:`kvmotion_lab.image.guest_init`). For vMotion, Storage vMotion, shared-nothing vMotion and cold migration the
identity is read from the client namespace before and after the move: it must be the same, and the inventory's
(QEMU gets ``-smbios type=1,serial=UUID,uuid=UUID`` and the NIC's MAC from the VM's spec). Live moves must also
keep the guest running (same boot_id, heartbeat seq went up); a guest that breaks fails the test.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from kvmotion.cli.client import Client
from kvmotion_lab import scenario
from labtools import assert_guest_survived, guest_diagnosis, remove_vm, running_vm, wait_for

BEAT_SEQ = re.compile(r"^KVMOTION-HEARTBEAT seq=(\d+) ")


def inventory_identity(vm: dict[str, Any]) -> dict[str, Any]:
    """What the guest must see, from the inventory: SMBIOS UUID and serial are the VM's UUID; the NICs' MACs."""
    uuid = vm["uuid"].lower()
    return {"smbios_uuid": uuid, "smbios_serial": uuid, "macs": [n["mac"].lower() for n in vm["spec"]["nics"]]}


def guest_identity(hb: dict[str, Any] | None) -> dict[str, Any]:
    assert hb is not None, "the guest's HTTP heartbeat did not answer"
    missing = {"smbios_uuid", "smbios_serial", "macs"} - set(hb)
    assert not missing, f"the heartbeat has no {sorted(missing)} (a guest image older than the identity fields?): {hb}"
    return {"smbios_uuid": hb["smbios_uuid"], "smbios_serial": hb["smbios_serial"], "macs": hb["macs"]}


def read_identity(lab: Any, client: Client, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The guest's heartbeat (over HTTP from the client namespace) and the identity in it, which must be the
    inventory's."""
    vm = client.vm(name)
    hb = scenario.wait_guest(lab.net.client_netns, vm["spec"]["guest_ip"])
    ident = guest_identity(hb)
    assert ident == inventory_identity(vm), f"guest identity {ident} != inventory {inventory_identity(vm)}"
    return hb, ident


def move(lab: Any, client: Client, name: str, host: str | None = None, **opts: Any) -> dict[str, Any]:
    task = scenario.follow_task(client, client.migrate(name, host, **opts)["id"], timeout_s=300)
    if task["state"] != "success":
        raise AssertionError(f"{task['kind']} of {name} ended {task['state']}: {task.get('error')}\n"
                             + guest_diagnosis(lab, client, name, "the move did not succeed"))
    return task


def live_move_keeps_identity(lab: Any, client: Client, name: str, kind: str, host: str | None = None,
                             **opts: Any) -> dict[str, Any]:
    """One live move: the same guest (boot_id), still running (seq up), the same identity. Returns the heartbeat
    read after the move."""
    inventory_before = inventory_identity(client.vm(name))
    before, ident_before = read_identity(lab, client, name)
    task = move(lab, client, name, host, **opts)
    assert task["kind"] == kind, task["kind"]
    after = assert_guest_survived(lab, client, name, before)     # same boot_id, higher seq, or a diagnosis
    assert after["boot_id"] == before["boot_id"] and int(after["seq"]) > int(before["seq"])
    assert guest_identity(after) == ident_before
    assert inventory_identity(client.vm(name)) == inventory_before, "the inventory changed the VM's identity"
    read_identity(lab, client, name)
    return after


def serial_lines(lab: Any, host: str, uuid: str) -> list[str]:
    """The whole serial log of the VM on a lab host (the agent's run directory; the /serial endpoint gives only
    the last 1000 lines)."""
    log = Path(lab.root) / "hosts" / host / "vms" / uuid / "serial.log"
    try:
        return log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def vm_removed_after(client: Client, name: str):
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            remove_vm(client, name)


def test_vmotion_keeps_identity_and_the_console_log_starts_afresh(lab) -> None:
    """vMotion h1 -> h2 -> h1. Back on h1, where the VM ran before, the serial log holds only what the guest
    printed since it arrived again: no boot lines, no heartbeat older than the move."""
    client = Client(lab.controller_url)
    with vm_removed_after(client, "idv1"):
        vm = running_vm(client, lab, "idv1", host="h1", memory_mb=256, datastore="shared")
        wait_for(lambda: any(ln.startswith("KVMOTION-READY") for ln in serial_lines(lab, "h1", vm["uuid"])), 30,
                 "KVMOTION-READY on h1's serial log")
        live_move_keeps_identity(lab, client, "idv1", "vmotion", "h2")
        assert client.vm("idv1")["host"] == "h2"
        before_back = scenario.guest_heartbeat(lab.net.client_netns, vm["spec"]["guest_ip"])
        assert before_back is not None
        live_move_keeps_identity(lab, client, "idv1", "vmotion", "h1")
        assert client.vm("idv1")["host"] == "h1"
        again = serial_lines(lab, "h1", vm["uuid"])
        assert not any(ln.startswith(("KVMOTION-READY", "KVMOTION-IDENTITY")) for ln in again), (
            "h1's serial log still holds the guest's boot from its first stay there:\n" + "\n".join(again[:20]))
        seqs = [int(m.group(1)) for ln in again if (m := BEAT_SEQ.match(ln))]
        assert all(s >= int(before_back["seq"]) for s in seqs), (
            f"h1's serial log has heartbeats from before the move back (seq < {before_back['seq']}): {seqs[:10]}")


def test_storage_vmotion_keeps_identity(lab) -> None:
    client = Client(lab.controller_url)
    with vm_removed_after(client, "ids1"):
        running_vm(client, lab, "ids1", host="h1", memory_mb=256, datastore="shared")
        live_move_keeps_identity(lab, client, "ids1", "svmotion", datastore="h1-local")
        vm = client.vm("ids1")
        assert vm["host"] == "h1" and vm["spec"]["boot_datastore"] == "h1-local"
        assert {d["datastore"] for d in vm["spec"]["disks"]} == {"h1-local"}


def test_shared_nothing_vmotion_keeps_identity(lab) -> None:
    client = Client(lab.controller_url)
    with vm_removed_after(client, "idx1"):
        running_vm(client, lab, "idx1", host="h1", memory_mb=256, datastore="h1-local")
        live_move_keeps_identity(lab, client, "idx1", "xvmotion", "h2", datastore="h2-local")
        vm = client.vm("idx1")
        assert vm["host"] == "h2" and vm["spec"]["boot_datastore"] == "h2-local"
        assert {d["datastore"] for d in vm["spec"]["disks"]} == {"h2-local"}


def test_cold_migration_keeps_identity(lab) -> None:
    """A powered-off VM moves to another host and datastore; started there, the guest (a new boot) sees the same
    identity as before."""
    client = Client(lab.controller_url)
    with vm_removed_after(client, "idc1"):
        vm = running_vm(client, lab, "idc1", host="h1", memory_mb=256, datastore="h1-local")
        before, ident_before = read_identity(lab, client, "idc1")
        client.stop_vm("idc1")
        task = move(lab, client, "idc1", "h2", datastore="h2-local")
        assert task["kind"] == "cold", task["kind"]
        moved = client.vm("idc1")
        assert moved["host"] == "h2" and moved["power_state"] == "poweredOff"
        assert {d["datastore"] for d in moved["spec"]["disks"]} == {"h2-local"}
        assert inventory_identity(moved) == inventory_identity(vm), "the inventory changed the VM's identity"
        client.start_vm("idc1")
        after, ident_after = read_identity(lab, client, "idc1")
        assert after["boot_id"] != before["boot_id"], "a cold migration boots the guest again"
        assert ident_after == ident_before

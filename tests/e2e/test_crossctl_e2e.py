"""Cross-controller vMotion (issue 20), end to end in a lab of two controllers (A: h1, h2; B: h3, h4) that form one
trust domain, with real QEMU guests: a live move from A to B (shared datastore, memory only), the same VM moved
again inside B for comparison, a shared-nothing move across, and what is refused (outside the domain, a MAC in
use, a network mapping that is missing). Nothing refused leaves anything held on B."""
from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest

from kvmotion.cli.client import Client
from kvmotion.common.errors import ErrorCode, KvmotionError
from kvmotion.migration.engine import CRASH_AT_ENV
from kvmotion_lab import lab as lab_mod, scenario
from labtools import (agent_vms, assert_guest_survived, cli, codes, controller_client, http_beat, record_fault,
                      record_figure, running_lab, running_vm, wait_for)

PHASES = ["precheck", "shadow", "precopy", "switchover", "resume", "announce", "release"]
XV_PHASES = ["precheck", "shadow", "disks", "precopy", "switchover", "resume", "announce", "release"]


@pytest.fixture(scope="module")
def lab2(guest_image):
    with running_lab(guest_image, 2, controllers=2) as info:
        yield info


def identity(hb: dict) -> tuple:
    return hb["boot_id"], hb.get("smbios_uuid"), tuple(hb.get("macs") or ())


def figures(label: str, move: scenario.MoveResult) -> None:
    r = move.task["result"]
    record_figure(f"{label} total", r["total_time_s"], "s")
    record_figure(f"{label} downtime", r["downtime_ms"] or 0, "ms")
    record_figure(f"{label} client gap", move.probe.max_gap_ms, "ms")


def assert_live_move(move: scenario.MoveResult, phases: list[str]) -> dict:
    task = move.task
    assert task["state"] == "success", task.get("error")
    assert [p["name"] for p in task["phases"]] == phases
    assert all(p["status"] == "ok" for p in task["phases"]), task["phases"]
    assert move.probe.complete and move.probe.received > 0 and math.isfinite(move.probe.max_gap_ms)
    assert task["result"]["encryption"]["mode"] == "tls"          # always, between controllers
    return task


def incoming_task(b: Client, task_id: str) -> dict:
    return next(t for t in b.tasks(200) if t["id"] == task_id)


def test_live_move_to_another_controller_and_back_inside_it(lab2, tmp_path) -> None:
    a, b = controller_client(lab2, "a"), controller_client(lab2, "b")
    vm = running_vm(a, lab2, "xc1")
    ip = vm["spec"]["guest_ip"]
    before = http_beat(lab2, a, "xc1")
    found = a.validate("xc1", "h3", controller="ctl-b")
    assert not [f for f in found if f["severity"] == "error"], found
    assert {f.get("side") for f in found} <= {"source", "destination"} and found
    move = scenario.migrate_with_probe(a, lab2.net, "xc1", ip, "h3", tmp_path / "x1.jsonl", controller="ctl-b")
    task = assert_live_move(move, PHASES)
    assert task["destination"] == "h3@ctl-b" and task["result"]["cross_controller"]["controller"] == "ctl-b"
    after = assert_guest_survived(lab2, b, "xc1", before)
    assert identity(after) == identity(before)             # the same guest: boot, SMBIOS UUID, MACs
    # the handoff: B owns it (same UUID, same MAC), A forgot it; h3 runs it, h1 does not
    there = b.vm("xc1")
    assert there["uuid"] == vm["uuid"] and there["host"] == "h3" and there["power_state"] == "poweredOn"
    assert [n["mac"] for n in there["spec"]["nics"]] == [n["mac"] for n in vm["spec"]["nics"]]
    with pytest.raises(KvmotionError) as gone:
        a.vm("xc1")
    assert gone.value.code == ErrorCode.NOT_FOUND
    assert agent_vms(lab2, "h3")[vm["uuid"]]["state"] == "running" and vm["uuid"] not in agent_vms(lab2, "h1")
    # the task on both sides: outgoing on A, incoming on B with the same id and its own phases
    inc = incoming_task(b, task["id"])
    assert inc["kind"] == "incoming" and inc["state"] == "success" and inc["source"] == "ctl-a:h1"
    assert [p["name"] for p in inc["phases"]] == ["reserved", "shadow", "resume", "commit"]
    # the audit of both sides: A's admin asked for the move; B records each call of controller ctl-a for it
    assert any(e["path"] == "/api/v1/vms/xc1/migrate" and e["status"] == 202 for e in a.audit(500)), a.audit(20)
    theirs = [e for e in b.audit(500) if e["who"] == "ctl-a" and e["path"].startswith("/api/v1/peer/moves")]
    assert {e["path"].rsplit("/", 1)[-1] for e in theirs} >= {"moves", "host", "commit"}, theirs
    figures("cross-controller vMotion h1@a->h3@b", move)
    # the same VM moved again, inside B: the figures to compare with
    again = scenario.migrate_with_probe(b, lab2.net, "xc1", ip, "h4", tmp_path / "x2.jsonl")
    assert_live_move(again, PHASES)
    assert identity(assert_guest_survived(lab2, b, "xc1", after)) == identity(before)
    figures("same-controller vMotion h3->h4 (same VM)", again)
    b.stop_vm("xc1")
    b.delete_vm("xc1")


def test_shared_nothing_to_another_controller(lab2, tmp_path) -> None:
    a, b = controller_client(lab2, "a"), controller_client(lab2, "b")
    vm = running_vm(a, lab2, "xc2", datastore="h1-local")
    before = http_beat(lab2, a, "xc2")
    move = scenario.migrate_with_probe(a, lab2.net, "xc2", vm["spec"]["guest_ip"], "h3", tmp_path / "x3.jsonl",
                                       controller="ctl-b", datastore="h3-local")
    task = assert_live_move(move, XV_PHASES)
    assert task["kind"] == "xvmotion" and task["result"]["disks"]["bytes"] > 0
    assert identity(assert_guest_survived(lab2, b, "xc2", before)) == identity(before)
    there = b.vm("xc2")
    assert there["host"] == "h3" and there["spec"]["boot_datastore"] == "h3-local"
    assert {d["datastore"] for d in there["spec"]["disks"]} == {"h3-local"}
    figures("cross-controller shared-nothing h1@a->h3@b", move)
    b.stop_vm("xc2")
    b.delete_vm("xc2")


def test_encrypted_disk_vm_to_another_controller(lab2, tmp_path) -> None:
    """A LUKS VM: its disk key goes to B over the controllers' mutual-TLS channel and is wrapped there with B's own
    master key; B then runs it, and starts it again after a power cycle, with that key alone."""
    a, b = controller_client(lab2, "a"), controller_client(lab2, "b")
    vm = running_vm(a, lab2, "xc-luks", encrypted_disk=True)
    disk = vm["spec"]["disks"][0]
    assert disk["encrypted"] and disk["key_wrapped"]
    before = http_beat(lab2, a, "xc-luks")
    move = scenario.migrate_with_probe(a, lab2.net, "xc-luks", vm["spec"]["guest_ip"], "h3", tmp_path / "x4.jsonl",
                                       controller="ctl-b")
    assert_live_move(move, PHASES)
    assert identity(assert_guest_survived(lab2, b, "xc-luks", before)) == identity(before)
    there = b.vm("xc-luks")["spec"]["disks"][0]
    assert there["encrypted"] and there["key_wrapped"] and there["key_wrapped"] != disk["key_wrapped"]
    b.stop_vm("xc-luks")
    b.start_vm("xc-luks")                       # QEMU opens the LUKS disk with the key B unwrapped itself
    again = http_beat(lab2, b, "xc-luks")
    assert again["boot_id"] != before["boot_id"] and again["smbios_uuid"] == before["smbios_uuid"]
    b.stop_vm("xc-luks")
    b.delete_vm("xc-luks")


def test_refusals_leave_nothing_held(lab2) -> None:
    a, b = controller_client(lab2, "a"), controller_client(lab2, "b")
    vm = running_vm(a, lab2, "xc3")
    # outside the domain: refused before anything is asked of anyone
    with pytest.raises(KvmotionError) as outside:
        a.migrate("xc3", "h3", controller="ctl-nobody")
    assert outside.value.code == ErrorCode.NOT_FOUND and "domain" in outside.value.remedy
    # a network mapping that names a port group the VM does not use, and one to a port group B's host lacks
    unmapped = codes(a.validate("xc3", "h3", controller="ctl-b", networks={"Nope": "VM Network"}))
    assert unmapped["CROSS_NETWORK_UNMAPPED"]["side"] == "destination"
    missing = codes(a.validate("xc3", "h3", controller="ctl-b", networks={"VM Network": "Prod"}))
    assert missing["PORTGROUP_MISSING"]["side"] == "destination" and "Prod" in missing["PORTGROUP_MISSING"]["message"]
    with pytest.raises(KvmotionError) as refused:
        a.migrate("xc3", "h3", controller="ctl-b", networks={"VM Network": "Prod"})
    assert refused.value.code == ErrorCode.PRECHECK_FAILED
    # a MAC already used on B
    mac = vm["spec"]["nics"][0]["mac"]
    b.create_vm(name="xc3-twin", host="h4", mac=mac)
    clash = codes(a.validate("xc3", "h3", controller="ctl-b"))
    assert clash["CROSS_MAC_IN_USE"]["side"] == "destination" and "xc3-twin" in clash["CROSS_MAC_IN_USE"]["message"]
    res = cli(lab2, "vm", "migrate", "xc3", "--host", "h3", "--controller", "ctl-b")
    assert res.returncode != 0 and "CROSS_MAC_IN_USE" in res.stdout + res.stderr
    # nothing was held on B, and the VM still runs on A's h1
    assert not [t for t in b.tasks(200) if t["kind"] == "incoming" and t["vm_name"] == "xc3"]
    assert "xc3" not in {v["name"] for v in b.vms()}
    assert a.vm("xc3")["host"] == "h1" and agent_vms(lab2, "h1")[vm["uuid"]]["state"] == "running"
    b.delete_vm("xc3-twin")
    a.stop_vm("xc3")
    a.delete_vm("xc3")


# -- faults: exactly one owner and one running copy, whatever dies and whenever -----------------------------------

def one_owner(lab2, name: str, uuid: str) -> str:
    """The VM is in exactly one inventory (none holds it as incoming any more), runs on exactly one host, and
    its owner says that host. Returns the owner ("a" or "b")."""
    a, b = controller_client(lab2, "a"), controller_client(lab2, "b")
    on = {c: {v["name"]: v for v in client.vms()} for c, client in (("a", a), ("b", b))}
    assert not [v for v in on["b"].values() if v["power_state"] == "incoming"], on["b"]
    owners = [c for c in ("a", "b") if name in on[c]]
    assert len(owners) == 1, owners
    running = [h for h in ("h1", "h2", "h3", "h4") if agent_vms(lab2, h).get(uuid, {}).get("state") == "running"]
    assert len(running) == 1, running
    assert on[owners[0]][name]["host"] == running[0] and lab2.host_controllers[running[0]] == owners[0]
    return owners[0]


def move_dying(lab2, name: str, at: str) -> dict:
    """A move from A to B with controller A dying at ``at`` (restarted 1 s later): the task once reconciled."""
    a = controller_client(lab2, "a")
    lab_mod.restart(lab2.root, "controller", env={CRASH_AT_ENV: at})
    task = a.migrate(name, "h3", controller="ctl-b", max_bandwidth_mbps=200)
    wait_for(lambda: not _answers(a, task["id"]), 120, f"controller A dying at {at}")
    died = time.time()
    time.sleep(1.0)
    lab_mod.restart(lab2.root, "controller")
    t = wait_for(lambda: (t := a.task(task["id"]))["state"] in ("success", "error") and t, 90,
                 f"reconciliation of the cross-controller move that died at {at}")
    record_fault("source controller killed (restarted 1 s later)", at, died, t)
    return t


def _answers(client: Client, task_id: str) -> bool:
    try:
        client.task(task_id)
        return True
    except KvmotionError:
        return False


@pytest.mark.parametrize("at, owner", [("precopy.progress", "a"), ("resume", "b"), ("release", "b")])
def test_source_controller_killed_at_each_handoff_phase(lab2, at: str, owner: str) -> None:
    name = "xk-" + at.split(".")[0]
    vm = running_vm(controller_client(lab2, "a"), lab2, name)
    before = http_beat(lab2, controller_client(lab2, "a"), name)
    t = move_dying(lab2, name, at)
    assert t["state"] == ("success" if owner == "b" else "error"), t.get("error")
    assert one_owner(lab2, name, vm["uuid"]) == owner
    survived = assert_guest_survived(lab2, controller_client(lab2, owner), name, before)
    assert identity(survived) == identity(before)
    inc = incoming_task(controller_client(lab2, "b"), t["id"])
    assert inc["state"] == ("success" if owner == "b" else "error")
    client = controller_client(lab2, owner)
    client.stop_vm(name)
    client.delete_vm(name)


@pytest.mark.parametrize("at, owner", [("incoming.reserved", "a"), ("incoming.commit", "b")])
def test_destination_controller_killed_at_its_handoff_phases(lab2, at: str, owner: str) -> None:
    """B dies right after it held the place (A never hears so: A rolls back and cannot release it; B's own
    reconciliation asks A later and releases it), or while committing (the VM runs on h3 and is nobody's yet:
    A's reconciliation commits it once B is back)."""
    a = controller_client(lab2, "a")
    name = "xkb-" + at.split(".")[1]
    vm = running_vm(a, lab2, name)
    before = http_beat(lab2, a, name)
    lab_mod.restart(lab2.root, "controller-b", env={CRASH_AT_ENV: at})
    pid = json.loads((lab2.root / "lab.json").read_text())["pids"]["controller-b"]
    task = a.migrate(name, "h3", controller="ctl-b")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), 120, f"controller B dying at {at}")
    died = time.time()
    time.sleep(1.0)
    lab_mod.restart(lab2.root, "controller-b")
    t = wait_for(lambda: (t := a.task(task["id"]))["state"] in ("success", "error") and t, 120, "the move's end")
    b = controller_client(lab2, "b")
    wait_for(lambda: incoming_task(b, task["id"])["state"] in ("success", "error"), 120,
             "B's reservation to end (its reconciliation asks A after 60 s untouched)")
    record_fault("destination controller killed (restarted 1 s later)", at, died, t)
    assert t["state"] == ("success" if owner == "b" else "error"), t.get("error")
    ends_with_one_owner(lab2, vm, before, t)


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def slow_move_in_precopy(lab2, name: str) -> tuple[dict, dict, dict]:
    """A VM on A's h1 moving to B's h3 slowly (capped, dirtying): (vm, its heartbeat before, the task in pre-copy)."""
    a = controller_client(lab2, "a")
    vm = running_vm(a, lab2, name, dirty_mb_s=2)
    before = http_beat(lab2, a, name)
    task = a.migrate(name, "h3", controller="ctl-b", max_bandwidth_mbps=60)
    wait_for(lambda: a.task(task["id"])["phase"] == "precopy", 120, "pre-copy")
    return vm, before, task


def ends_with_one_owner(lab2, vm: dict, before: dict, t: dict) -> None:
    """Success means B owns it, an error that A still does; either way the same guest runs, once."""
    owner = one_owner(lab2, vm["name"], vm["uuid"])
    assert (owner == "b") == (t["state"] == "success"), t.get("error")
    client = controller_client(lab2, owner)
    assert identity(assert_guest_survived(lab2, client, vm["name"], before)) == identity(before)
    client.stop_vm(vm["name"])
    client.delete_vm(vm["name"])


def test_destination_controller_killed_mid_move(lab2) -> None:
    a = controller_client(lab2, "a")
    vm, before, task = slow_move_in_precopy(lab2, "xk-dst")
    died = time.time()
    lab_mod.restart(lab2.root, "controller-b", crash=True)        # SIGKILL, started again at once
    t = wait_for(lambda: (t := a.task(task["id"]))["state"] in ("success", "error") and t, 240, "the move's end")
    record_fault("destination controller killed (restarted at once)", "precopy", died, t)
    ends_with_one_owner(lab2, vm, before, t)


def test_link_between_controllers_cut_mid_move(lab2) -> None:
    """Controller B stops answering (frozen: its connections hang, as behind a dead link) from pre-copy until well
    after the switchover's calls to it timed out, then answers again: reconciliation ends with one owner."""
    a = controller_client(lab2, "a")
    vm, before, task = slow_move_in_precopy(lab2, "xk-link")
    pid = json.loads((lab2.root / "lab.json").read_text())["pids"]["controller-b"]
    os.kill(pid, signal.SIGSTOP)
    cut = time.time()
    try:
        wait_for(lambda: a.task(task["id"])["state"] != "running", 120, "the move to notice the dead link")
        time.sleep(5)
    finally:
        os.kill(pid, signal.SIGCONT)
    t = wait_for(lambda: (t := a.task(task["id"]))["state"] in ("success", "error") and t, 180,
                 "reconciliation once the link is back")
    record_fault("controller-to-controller link cut (peer frozen)", "precopy", cut, t)
    ends_with_one_owner(lab2, vm, before, t)


@pytest.mark.parametrize("side", ["a", "b"])
def test_cancel_before_switchover_from_either_side(lab2, side: str) -> None:
    """From A (its outgoing task) or from B (its incoming task, which asks A): rolled back, the VM stays on A."""
    a, b = controller_client(lab2, "a"), controller_client(lab2, "b")
    name = f"xcancel-{side}"
    vm = running_vm(a, lab2, name, dirty_mb_s=4)
    before = http_beat(lab2, a, name)
    task = a.migrate(name, "h3", controller="ctl-b", max_bandwidth_mbps=30, auto_converge=False)
    wait_for(lambda: a.task(task["id"])["phase"] == "precopy", 120, "pre-copy")
    (a if side == "a" else b).cancel_task(task["id"])
    t = wait_for(lambda: (t := a.task(task["id"]))["state"] in ("success", "error") and t, 120, "the rollback")
    assert t["state"] == "error" and "cancelled" in t["error"]["message"], t.get("error")
    assert one_owner(lab2, name, vm["uuid"]) == "a"
    assert incoming_task(b, task["id"])["state"] == "error"          # the reservation there was released
    assert identity(assert_guest_survived(lab2, a, name, before)) == identity(before)
    a.stop_vm(name)
    a.delete_vm(name)

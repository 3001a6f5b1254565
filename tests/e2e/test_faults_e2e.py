"""Faults in the lab, with real QEMU guests: the controller dies at a phase, a host does not answer.

Each case checks that the VM runs on exactly one host, that its guest kept its boot (where it never
stopped), that no QEMU is left behind, who holds the disk lease, and that the task names the cause.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from kvmotion.cli.client import Client
from kvmotion.migration.engine import CRASH_AT_ENV
from kvmotion_lab import lab as lab_mod
from kvmotion_lab import scenario
from labtools import (agent_vms, assert_guest_survived, cli, excuse, http_beat, record_fault, record_figure,
                      running_vm, wait_for)


def runs_on(lab, uuid: str) -> list[str]:
    return [h for h in ("h1", "h2") if agent_vms(lab, h).get(uuid, {}).get("state") == "running"]


def same_guest(lab, client: Client, vm: dict, before: dict) -> None:
    """The guest answers a client over the network with the boot it had before and a newer heartbeat."""
    assert_guest_survived(lab, client, vm["name"], before)
    client.stop_vm(vm["name"])
    client.delete_vm(vm["name"])


def crash_during(lab, client: Client, name: str, phase: str, dest: str = "h2") -> dict:
    """Migrate with a controller that dies right after persisting ``phase``; restart it; return the task."""
    lab_mod.restart(lab.root, "controller", env={CRASH_AT_ENV: phase})
    task = client.migrate(name, dest)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            client.task(task["id"])
        except Exception:  # noqa: BLE001 - the controller is gone: it died at the phase
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the controller did not die at {phase}")
    died = time.time()
    time.sleep(1.0)                       # what QEMU does by itself meanwhile (it may complete)
    lab_mod.restart(lab.root, "controller")
    t = wait_for(lambda: (t := client.task(task["id"]))["state"] not in ("queued", "running") and t,
                 60, f"reconciliation of the task that died at {phase}")
    record_fault("controller killed (restarted 1 s later)", phase, died, t)
    return t


@pytest.mark.parametrize("phase,outcome", [("shadow", "error"), ("switchover", "success"), ("resume", "success"),
                                           ("release", "success")])
def test_controller_killed_at_a_phase_is_reconciled(lab, phase: str, outcome: str) -> None:
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, f"cr-{phase}", dirty_mb_s=5)
    before = http_beat(lab, client, vm["name"])
    t = crash_during(lab, client, vm["name"], phase)
    assert t["state"] == outcome, t
    where = "h2" if outcome == "success" else "h1"
    if outcome == "success":
        rec = t["result"]["reconciled"]
        assert rec["vm_runs_on"] == "h2" and rec["resolution"] in ("complete", "resume-destination"), rec
        assert rec["lease_holder"] == "h2"
    else:
        assert t["error"]["code"] == "CONTROLLER_RESTARTED" and t["error"]["phase"] == phase
        assert t["error"]["rollback"]["vm_runs_on"] == "h1"
    # exactly one copy, where the inventory says; no QEMU left on the other host
    wait_for(lambda: runs_on(lab, vm["uuid"]) == [where], 20, f"the VM running only on {where}")
    other = "h1" if where == "h2" else "h2"
    assert vm["uuid"] not in agent_vms(lab, other)
    assert client.vm(vm["name"])["host"] == where
    same_guest(lab, client, vm, before)


def test_unreachable_destination_leaves_the_task_unknown_until_it_answers(lab) -> None:
    """The controller dies at the switchover and the destination's agent is down when it comes back: the task
    is `unknown` and nothing is touched. When the agent answers again the move is completed."""
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "unk1", dirty_mb_s=5)
    before = http_beat(lab, client, vm["name"])
    lab_mod.restart(lab.root, "controller", env={CRASH_AT_ENV: "switchover"})
    task = client.migrate("unk1", "h2")
    wait_for(lambda: _down(client, task["id"]), 60, "the controller to die at the switchover")
    died = time.time()
    agent_pid = _stop_agent(lab, "h2")
    try:
        lab_mod.restart(lab.root, "controller")
        t = wait_for(lambda: (x := client.task(task["id"]))["state"] == "unknown" and x, 30, "an unknown task")
        seen = t["live"]["unknown"]
        assert seen["destination_seen"] == "unreachable" and "destination" in seen["reason"]
        assert client.vm("unk1")["host"] == "h1"            # nothing decided yet
        refused = {f["code"] for f in client.validate("unk1", "h2")}
        assert "VM_ALREADY_MIGRATING" in refused            # no new move while it is unknown
    finally:
        lab_mod.restart(lab.root, "agent-h2")
    assert agent_pid
    t = wait_for(lambda: (x := client.task(task["id"]))["state"] == "success" and x, 60,
                 "the periodic reconciliation to complete the move")
    record_fault("controller killed, destination agent down until it returns (unknown meanwhile)", "switchover",
                 died, t)
    assert t["result"]["reconciled"]["vm_runs_on"] == "h2"
    assert runs_on(lab, vm["uuid"]) == ["h2"] and client.vm("unk1")["host"] == "h2"
    same_guest(lab, client, vm, before)


def _down(client: Client, task_id: str) -> bool:
    try:
        client.task(task_id)
        return False
    except Exception:  # noqa: BLE001 - connection refused: it died
        return True


def _stop_agent(lab, host: str) -> int:
    """Stop a host's agent by its PID (its VMs keep running): the host does not answer."""
    import json
    import os
    import signal
    state = json.loads(lab_mod.state_path(lab.root).read_text())
    pid = int(state["pids"][f"agent-{host}"])
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
             open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z", 15, "the agent to stop")
    return pid


def _still_on_source(lab, client: Client, vm: dict, before: dict) -> None:
    assert runs_on(lab, vm["uuid"]) == ["h1"] and vm["uuid"] not in agent_vms(lab, "h2")
    assert client.vm(vm["name"])["host"] == "h1"
    same_guest(lab, client, vm, before)


def test_no_escalation_allowed_cancels_with_the_precise_reason(lab) -> None:
    """20 MB/s of dirtying over a 5 MB/s budget, no auto-converge, no xbzrle (the cluster's policy), a 50 ms
    ceiling and an 8 s progress timeout (the VM's own policy): plain pre-copy cannot finish; the migration
    ends at its progress timeout, says why in numbers, and the task keeps the policy it ran under."""
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "ladder0", dirty_mb_s=20)
    before = http_beat(lab, client, vm["name"])
    assert cli(lab, "cluster", "create", "strict").returncode == 0
    assert cli(lab, "cluster", "add-host", "strict", "h1").returncode == 0
    try:
        res = cli(lab, "cluster", "set-policy", "strict", "--no-auto-converge", "--no-xbzrle", "--downtime-ms", "300")
        assert res.returncode == 0 and "auto_converge" in res.stdout, res.stdout + res.stderr
        res = cli(lab, "vm", "set", "ladder0", "--downtime-ms", "50", "--progress-timeout-s", "8")
        assert res.returncode == 0, res.stdout + res.stderr
        t = scenario.follow_task(client, client.migrate("ladder0", "h2", max_bandwidth_mbps=40)["id"], timeout_s=120)
    finally:
        client.call("DELETE", "/clusters/strict/hosts/h1")
    used = t["options"]["policy"]
    assert used["auto_converge"] == {"value": False, "from": "cluster"} and used["xbzrle"]["from"] == "cluster"
    assert used["downtime_ms"] == {"value": 50, "from": "vm"} and used["progress_timeout_s"]["from"] == "vm"
    assert used["completion_timeout_s_per_gib"] == {"value": 150.0, "from": "default"}
    assert t["result"]["stream"]["auto_converge"] is False
    assert t["state"] == "error", t
    msg = t["error"]["message"]
    # Either the guest outruns the link, or what it rewrites between passes never fits the target;
    # under TCG the dirtier slows down while its pages are tracked, so it is usually the second.
    assert msg.startswith("did not converge: "), msg
    link = re.search(r"(?:bandwidth|at) ([0-9.]+) MB/s", msg)
    # QEMU's measured throughput, not a canned text: the capped link carried data (how fast is a figure)
    assert link and float(link.group(1)) > 0, msg
    record_figure("precopy rate over a 40 Mbit/s (5 MB/s) cap", float(link.group(1)), "MB/s")
    assert re.search(r"dirty rate [0-9.]+ MB/s", msg) and "downtime target 50 ms" in msg, msg
    assert t["error"]["rollback"]["source_running"] is True
    record_fault("guest set to dirty 20 MB/s over a 5 MB/s link; policy forbids escalation", "precopy",
                 t["started_at"], t)
    _still_on_source(lab, client, vm, before)


def test_force_complete_switches_over_a_migration_that_cannot_converge(lab) -> None:
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "force1", dirty_mb_s=20, dirty_region_mb=8)
    before = http_beat(lab, client, vm["name"])
    # a 10 ms ceiling at 10 MB/s fits 100 KB: a guest that keeps writing never gets there by itself
    task = client.migrate("force1", "h2", max_bandwidth_mbps=80, auto_converge=False, xbzrle=False,
                          downtime_ms=10, progress_timeout_s=300, completion_timeout_s_per_gib=2000)
    wait_for(lambda: (t := client.task(task["id"]))["state"] != "running" or (t["live"] or {}).get("pass", 0) >= 2,
             150, "pre-copy passes")
    time.sleep(3)
    now = client.task(task["id"])
    assert now["state"] == "running", now.get("error")                  # not converging by itself
    forced_at = time.time()
    res = cli(lab, "vm", "migrate", "force1", "--force-complete")
    assert res.returncode == 0, res.stdout + res.stderr
    t = scenario.follow_task(client, task["id"], timeout_s=60)
    assert t["state"] == "success", t.get("error")
    record_fault("cannot converge; the operator forces completion (downtime)", "precopy", forced_at, t)
    forced = [s for s in t["result"]["downtime_steps"] if s["why"] == "forced by the operator"]
    assert len(forced) == 1 and forced[0]["downtime_ms"] > 50
    assert runs_on(lab, vm["uuid"]) == ["h2"] and client.vm("force1")["host"] == "h2"
    same_guest(lab, client, vm, before)


def _in_precopy(client: Client, task_id: str) -> dict:
    return wait_for(lambda: (t := client.task(task_id))["phase"] == "precopy"
                    and (t["live"] or {}).get("transferred", 0) > 0 and t, 60, "pre-copy under way")


@pytest.mark.parametrize("host", ["h1", "h2"])
def test_an_agent_restarted_mid_precopy_re_adopts_the_migration(lab, host: str) -> None:
    """The source's (h1) or the destination's (h2) agent dies during pre-copy and comes back: it re-adopts its
    QEMU and the migration in flight, and the move completes; the guest never stopped."""
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, f"ag-{host}", dirty_mb_s=5)
    before = http_beat(lab, client, vm["name"])
    task = client.migrate(vm["name"], "h2", max_bandwidth_mbps=80)       # ~10 s of pre-copy
    _in_precopy(client, task["id"])
    killed = time.time()
    lab_mod.restart(lab.root, f"agent-{host}", crash=True)
    t = scenario.follow_task(client, task["id"], timeout_s=120)
    assert t["state"] == "success", t.get("error")
    record_fault(f"{'source' if host == 'h1' else 'destination'} agent killed and restarted", "precopy", killed, t)
    assert runs_on(lab, vm["uuid"]) == ["h2"] and client.vm(vm["name"])["host"] == "h2"
    assert t["phases"][-1]["detail"]["lease_holder"] == "h2"
    same_guest(lab, client, vm, before)


def test_destination_qemu_killed_while_parked_at_pre_switchover(lab) -> None:
    import os
    import signal
    from kvmotion.agent.hv.qemu.migration import PARK_ENV
    client = Client(lab.controller_url)
    lab_mod.restart(lab.root, "agent-h1", env={PARK_ENV: "4"})
    try:
        wait_for(lambda: client.host("h1")["state"] == "connected", 60, "the controller to see h1's new agent")
        vm = running_vm(client, lab, "park1", dirty_mb_s=5)
        before = http_beat(lab, client, vm["name"])
        task = client.migrate("park1", "h2")
        wait_for(lambda: client.task(task["id"])["phase"] == "switchover", 60, "the switchover")
        killed = time.time()
        os.kill(agent_vms(lab, "h2")[vm["uuid"]]["pid"], signal.SIGKILL)
        t = scenario.follow_task(client, task["id"], timeout_s=60)
        assert t["state"] == "error", t
        record_fault("destination QEMU killed", "pre-switchover (parked)", killed, t)
        assert t["error"]["rollback"]["source_running"] is True, t["error"]
        _still_on_source(lab, client, vm, before)
    finally:
        lab_mod.restart(lab.root, "agent-h1")
        wait_for(lambda: client.host("h1")["state"] == "connected", 60, "h1's agent back for the next test")


def _link(lab, host: str, up: bool) -> None:
    import subprocess
    from kvmotion_lab.netns import netns_exec_argv
    subprocess.run(netns_exec_argv(lab.net.host(host).netns, ["ip", "link", "set", "mig0", "up" if up else "down"]),
                   check=True, capture_output=True, timeout=10)


QEMU_72_POSTCOPY_FOOTER = (
    "QEMU 7.2 recovers post-copy only from some breaks of its stream: one that lands on a section footer "
    "(check_section_footer … loadvm failed: -22), or one before the destination ran (CMD_PACKAGED: Buffer receive "
    "fail), fails the destination instead of pausing it. kvmotion then keeps the source paused (never resumed) and "
    "the task unknown for an operator")


def _xfail_if_qemu_lost_postcopy(lab, t: dict, uuid: str) -> None:
    """Excuse exactly the proven QEMU 7.2 signature: the task is `unknown` and the destination QEMU's own log shows
    it failed on a section footer or a CMD_PACKAGED receive; the source is kept and nothing runs the guest."""
    log = Path(lab.root) / "hosts" / "h2" / "vms" / uuid / "qemu.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    if t["state"] == "unknown" and ("check_section_footer" in text or "CMD_PACKAGED" in text):
        assert uuid in agent_vms(lab, "h1"), "the source must be kept"
        assert runs_on(lab, uuid) == [], "nothing may run the guest"
        signature = "qemu-7.2-postcopy-section-footer" if "check_section_footer" in text else \
            "qemu-7.2-postcopy-cmd-packaged"
        seen = [ln.strip() for ln in text.splitlines() if "check_section_footer" in ln or "CMD_PACKAGED" in ln]
        excuse(signature, f"{QEMU_72_POSTCOPY_FOOTER}. Seen: task {t['id']} unknown; {log}: " + " | ".join(seen[:3]))


def test_migration_link_down_for_two_seconds_recovers(lab) -> None:
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "link1", dirty_mb_s=5)
    before = http_beat(lab, client, vm["name"])
    task = client.migrate("link1", "h2", max_bandwidth_mbps=80)
    _in_precopy(client, task["id"])
    cut = time.time()
    _link(lab, "h2", False)
    time.sleep(2.0)
    _link(lab, "h2", True)
    t = scenario.follow_task(client, task["id"], timeout_s=120)
    assert t["state"] == "success", t.get("error")
    record_fault("migration link down 2 s", "precopy", cut, t)
    assert runs_on(lab, vm["uuid"]) == ["h2"]
    same_guest(lab, client, vm, before)


def test_migration_link_down_for_good_ends_by_the_progress_timeout(lab) -> None:
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "link2", dirty_mb_s=5)
    before = http_beat(lab, client, vm["name"])
    task = client.migrate("link2", "h2", max_bandwidth_mbps=80, progress_timeout_s=8)
    _in_precopy(client, task["id"])
    cut = time.time()
    _link(lab, "h2", False)
    try:
        t = scenario.follow_task(client, task["id"], timeout_s=90)
    finally:
        _link(lab, "h2", True)
    assert t["state"] == "error", t
    record_fault("migration link down for good (progress timeout 8 s)", "precopy", cut, t)
    assert t["error"]["message"].startswith("the migration link stalls: no memory moved for "), t["error"]
    assert "migration network" in t["error"]["remedy"]
    assert t["error"]["rollback"]["source_running"] is True
    _still_on_source(lab, client, vm, before)


def test_the_ladder_ends_in_postcopy_when_the_policy_allows_it(lab) -> None:
    """20 MB/s of dirtying over a 5 MB/s link, no throttling, no xbzrle, a 50 ms ceiling: pre-copy cannot finish
    (the same guest as the no-escalation case). With post-copy allowed (the VM's policy) the ladder's last step
    switches to post-copy once pre-copy stalls at the ceiling, and the move completes; the guest keeps its boot."""
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "ladder4", dirty_mb_s=20)
    before = http_beat(lab, client, vm["name"])
    res = cli(lab, "vm", "set", "ladder4", "--allow-postcopy", "--downtime-ms", "50", "--no-auto-converge",
              "--no-xbzrle")
    assert res.returncode == 0, res.stdout + res.stderr
    t = scenario.follow_task(client, client.migrate("ladder4", "h2", max_bandwidth_mbps=40)["id"], timeout_s=150)
    assert t["options"]["policy"]["allow_postcopy"] == {"value": True, "from": "vm"}
    assert t["state"] == "success", t.get("error")
    assert t["result"]["stream"]["postcopy"] is True
    step = [s for s in t["result"]["downtime_steps"] if s.get("postcopy")]
    assert len(step) == 1 and "does not converge at the downtime ceiling of 50 ms" in step[0]["why"], step
    pc = t["result"]["postcopy"]
    assert pc["bytes"] > 0 and pc["pauses"] == 0, pc
    record_fault("guest set to dirty 20 MB/s over a 5 MB/s link; post-copy allowed", "precopy",
                 t["started_at"], t)
    assert [p["name"] for p in t["phases"]][-5:] == ["switchover", "postcopy", "resume", "announce", "release"]
    assert runs_on(lab, vm["uuid"]) == ["h2"] and client.vm("ladder4")["host"] == "h2"
    assert t["phases"][-1]["detail"]["lease_holder"] == "h2"
    same_guest(lab, client, vm, before)


def test_postcopy_link_cut_is_paused_recovered_and_completes(lab) -> None:
    """The operator forces post-copy (the VM's policy allows it); the migration link goes down for 6 s while the
    destination runs the guest and still pulls its memory: kvmotion pauses both sides, reconnects them when the
    link is back, and the move completes. Meanwhile a cancel is refused (it would lose the VM)."""
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "pc1", dirty_mb_s=5)
    before = http_beat(lab, client, vm["name"])
    t = _postcopy_link_cut(lab, client, vm)
    record_fault("migration link down 6 s during post-copy", "postcopy", t["_cut"], t)
    pc = t["result"]["postcopy"]
    assert pc["why"] == "forced by the operator" and pc["pauses"] >= 1 and pc["recoveries"] >= 1, pc
    steps = [e["step"] for e in pc["recovery_log"]]
    assert "pause" in steps and any(e["step"] == "recover" and "uri" in e for e in pc["recovery_log"]), pc
    assert any("does not answer" in e.get("error", "") for e in pc["recovery_log"]), pc   # tried while down
    assert runs_on(lab, vm["uuid"]) == ["h2"] and client.vm("pc1")["host"] == "h2"
    assert vm["uuid"] not in agent_vms(lab, "h1")
    assert t["phases"][-1]["detail"]["lease_holder"] == "h2"
    same_guest(lab, client, vm, before)


def _postcopy_link_cut(lab, client: Client, vm: dict) -> dict:
    task = client.migrate("pc1", "h2", max_bandwidth_mbps=80, allow_postcopy=True, postcopy_bandwidth_mbps=40)
    _in_precopy(client, task["id"])
    res = cli(lab, "vm", "migrate", "pc1", "--force-complete", "--no-wait")
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(lambda: client.task(task["id"])["phase"] == "postcopy", 30, "post-copy")
    refused = cli(lab, "task", "cancel", task["id"])
    assert refused.returncode != 0 and "post-copy" in refused.stdout + refused.stderr, refused.stdout
    cut = time.time()
    _link(lab, "h2", False)
    try:
        paused = wait_for(lambda: ((client.task(task["id"])["live"] or {}).get("postcopy") or {}).get("pauses"),
                          20, "the stalled post-copy to be paused")
        assert paused >= 1
        time.sleep(3)                             # recovery attempts fail while the link is down
        during = client.task(task["id"])
    finally:
        _link(lab, "h2", True)
    if during["state"] == "unknown":              # only QEMU's proven post-copy signature is excused
        _xfail_if_qemu_lost_postcopy(lab, during, vm["uuid"])
    assert during["state"] == "running", (during["state"], (during.get("live") or {}).get("unknown"))
    t = wait_for(lambda: (x := client.task(task["id"]))["state"] not in ("running", "queued") and x, 120,
                 "the end of the post-copy")
    _xfail_if_qemu_lost_postcopy(lab, t, vm["uuid"])
    assert t["state"] == "success", (t["state"], t.get("error"), (t.get("live") or {}).get("unknown"))
    return t | {"_cut": cut}


def test_controller_killed_during_postcopy_waits_for_it_and_completes(lab) -> None:
    """The controller dies right after persisting the post-copy phase. Reconciliation finds the guest running on
    the destination with part of its memory still on the source: it stops neither QEMU and resumes nothing;
    the task stays `unknown` until post-copy completes by itself, then the move is completed."""
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "pc2", dirty_mb_s=5)
    before = http_beat(lab, client, vm["name"])
    lab_mod.restart(lab.root, "controller", env={CRASH_AT_ENV: "postcopy"})
    task = client.migrate("pc2", "h2", max_bandwidth_mbps=80, allow_postcopy=True, postcopy_bandwidth_mbps=40)
    _in_precopy(client, task["id"])
    client.force_complete(task["id"])
    wait_for(lambda: _down(client, task["id"]), 60, "the controller to die in post-copy")
    died = time.time()
    lab_mod.restart(lab.root, "controller")
    t = wait_for(lambda: (x := client.task(task["id"]))["state"] == "unknown" and x, 30, "an unknown task")
    seen = t["live"]["unknown"]
    assert seen["resolution"] == "postcopy-wait" and "both QEMUs are kept" in seen["reason"], seen
    assert vm["uuid"] in agent_vms(lab, "h1") and client.vm("pc2")["host"] == "h1"   # nothing decided yet
    t = wait_for(lambda: (x := client.task(task["id"]))["state"] == "success" and x, 90,
                 "post-copy to complete and reconciliation to complete the move")
    record_fault("controller killed (restarted at once)", "postcopy", died, t)
    assert t["result"]["reconciled"]["vm_runs_on"] == "h2"
    assert runs_on(lab, vm["uuid"]) == ["h2"] and client.vm("pc2")["host"] == "h2"
    wait_for(lambda: vm["uuid"] not in agent_vms(lab, "h1"), 20, "the source to be released")
    same_guest(lab, client, vm, before)


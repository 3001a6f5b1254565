"""End to end, in the lab, with real QEMU guests: vMotion h1 -> h2 -> h1, a failure, bad input."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest

from kvmotion.cli.client import Client
from kvmotion_lab import scenario
from labtools import (agent_vms, assert_guest_survived, cli, http_beat, record_fault, record_figure, running_vm,
                      wait_for)

PHASES = ["precheck", "shadow", "precopy", "switchover", "resume", "announce", "release"]


def pid_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def assert_moved(move: scenario.MoveResult, client: Client, lab, vm: dict, src: str, dst: str,
                 probe_file: Path, before: dict) -> dict:
    """``before``: the guest's HTTP heartbeat fetched (waiting for it) before the move."""
    task = move.task
    assert task["state"] == "success", task.get("error")
    # every phase, in order, each with timestamps
    assert [p["name"] for p in task["phases"]] == PHASES
    last = task["created_at"]
    for p in task["phases"]:
        assert p["status"] == "ok", p
        assert p["started_at"] >= last - 0.05 and p["ended_at"] >= p["started_at"]
        last = p["started_at"]
    # the guest kept running: same boot, the counter continued, HTTP answers from the destination
    after = assert_guest_survived(lab, client, vm["name"], before)
    assert after["uptime"] > before["uptime"]
    assert move.probe.boot_ids() == {before["boot_id"]}, move.probe.boot_ids()
    assert move.probe.seq_monotonic()
    # what the client saw: pings were measured, answered, and answered again after the move (the gap is a figure)
    assert move.probe.complete and move.probe.sent == move.probe.received + move.probe.lost
    assert move.probe.received > 0 and math.isfinite(move.probe.max_gap_ms), move.probe.outages
    assert pings_answered_after(probe_file, task["finished_at"]) > 0, ("no ping answered after the move",
                                                                        move.probe.outages)
    record_figure(f"client ping gap {src}->{dst}", move.probe.max_gap_ms, "ms")
    record_figure(f"pings lost {src}->{dst}", move.probe.lost, "pings")
    record_figure(f"downtime {src}->{dst}", task["result"]["downtime_ms"] or 0, "ms")
    # the source QEMU is gone, the destination runs it, and the inventory says so
    release = task["phases"][-1]["detail"]
    assert release["source_exited"] is True and not pid_exists(release["source_pid"])
    assert vm["uuid"] not in agent_vms(lab, src)
    assert agent_vms(lab, dst)[vm["uuid"]]["state"] == "running"
    assert client.vm(vm["name"])["host"] == dst
    assert release["lease_holder"] == dst
    assert release["destination_image_locks"] > 0      # the destination QEMU holds the image locks now
    r = task["result"]
    assert r["downtime_ms"] is not None and r["bytes_sent"] > 0 and r["passes"] >= 1
    return after


def pings_answered_after(probe_file: Path, t: float) -> int:
    """How many of the client's pings sent after ``t`` (wall clock) were answered."""
    n = 0
    for line in probe_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue                               # a torn last line
        if rec.get("k") == "ping" and rec.get("rtt_ms") is not None and float(rec["t"]) > t:
            n += 1
    return n


def test_vmotion_round_trip(lab, tmp_path) -> None:
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "rt1")
    ip = vm["spec"]["guest_ip"]
    first = http_beat(lab, client, "rt1")
    there = scenario.migrate_with_probe(client, lab.net, "rt1", ip, "h2", tmp_path / "p1.jsonl")
    mid = assert_moved(there, client, lab, vm, "h1", "h2", tmp_path / "p1.jsonl", first)
    back = scenario.migrate_with_probe(client, lab.net, "rt1", ip, "h1", tmp_path / "p2.jsonl")
    after = assert_moved(back, client, lab, vm, "h2", "h1", tmp_path / "p2.jsonl", mid)
    assert after["boot_id"] == first["boot_id"]
    tasks = [t for t in client.tasks() if t["vm_name"] == "rt1"]
    assert [t["destination"] for t in tasks] == ["h1", "h2"] and all(t["state"] == "success" for t in tasks)
    client.stop_vm("rt1")
    client.delete_vm("rt1")


def test_prediction_before_the_move_and_against_the_actual(lab) -> None:
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "pred1", memory_mb=512, dirty_mb_s=20)
    def predicted() -> dict[str, dict] | None:     # validate samples at most 10 s old: wait for the dirtier's rate
        found = {f["code"]: f for f in client.validate("pred1", "h2")}
        f = found.get("CONVERGENCE_PREDICTED")
        rate = re.search(r"dirty ([0-9.]+) MB/s", f["message"]) if f else None
        return found if rate and float(rate.group(1)) >= 10 else None

    found = wait_for(predicted, 60, "a convergence prediction that has seen the dirtier")
    msg = found["CONVERGENCE_PREDICTED"]["message"]
    assert found["CONVERGENCE_PREDICTED"]["severity"] == "info" and "passes" in msg and "MB/s" in msg
    slow = {f["code"]: f for f in client.validate("pred1", "h2", max_bandwidth_mbps=40)}   # 5 MB/s vs 20 MB/s
    assert slow["CONVERGENCE_UNLIKELY"]["severity"] == "warning"
    assert "does not converge" in slow["CONVERGENCE_UNLIKELY"]["message"]
    before = http_beat(lab, client, vm["name"])
    task = scenario.follow_task(client, client.migrate("pred1", "h2")["id"])
    assert task["state"] == "success", task.get("error")
    assert_guest_survived(lab, client, "pred1", before)
    r = task["result"]
    assert r["prediction"]["converges"] is True and r["prediction"]["dirty_mb_s"] > 5
    pva = r["predicted_vs_actual"]
    assert pva["total_s"][1] == r["total_time_s"] and pva["passes"][1] == r["passes"]
    assert pva["total_s"][0] > 0 and "total_error_pct" in pva
    res = cli(lab, "task", "show", task["id"])
    assert "predicted → actual" in res.stdout
    client.stop_vm("pred1")
    client.delete_vm("pred1")


def test_stream_tuning_multifd_xbzrle_and_the_qemu_defaults_baseline(lab) -> None:
    """Each stream choice really reaches QEMU on both sides, and the guest survives every one of them."""
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "tune1", memory_mb=256, dirty_mb_s=10)
    before = http_beat(lab, client, vm["name"])
    runs = [("h2", {"multifd_channels": 3}), ("h1", {"multifd_channels": 0, "xbzrle": True}),
            ("h2", {"tuning": "qemu-defaults"})]
    results = []
    for host, opts in runs:
        task = scenario.follow_task(client, client.migrate("tune1", host, **opts)["id"])
        assert task["state"] == "success", (opts, task.get("error"))
        before = assert_guest_survived(lab, client, "tune1", before)      # after each stream choice
        results.append(task["result"])
    multifd, xbzrle, plain = results
    assert multifd["stream"]["multifd_channels"] == 3 and multifd["multifd_bytes"] > 1_000_000
    assert multifd["stream"]["xbzrle_cache_bytes"] == 0
    # the VM arrived over multifd: leaving on one stream, its QEMU must have dropped the capability
    assert xbzrle["stream"]["multifd_channels"] == 0 and xbzrle["multifd_bytes"] == 0
    assert xbzrle["stream"]["xbzrle_cache_bytes"] >= 64 * 1024 * 1024 and xbzrle["xbzrle"] is not None
    assert plain["stream"]["profile"] == "qemu-defaults" and plain["stream"]["downtime_steps"] == [300]
    assert plain["stream"]["max_bandwidth_bytes"] == 128 * 1024 * 1024 and plain["downtime_steps"] == []
    client.stop_vm("tune1")
    client.delete_vm("tune1")


def test_destination_killed_mid_precopy_keeps_vm_on_source(lab, tmp_path) -> None:
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "fail1", dirty_mb_s=20)
    before = http_beat(lab, client, vm["name"])
    # 40 Mbit/s against 20 MB/s of dirtying: pre-copy cannot finish, so there is time to strike.
    task = client.migrate("fail1", "h2", max_bandwidth_mbps=40)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        t = client.task(task["id"])
        if t["phase"] == "precopy" and (t["live"] or {}).get("transferred", 0) > 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"migration never reached pre-copy: {client.task(task['id'])}")
    shadow = agent_vms(lab, "h2")[vm["uuid"]]
    killed = time.time()
    os.kill(shadow["pid"], signal.SIGKILL)
    t = scenario.follow_task(client, task["id"], timeout_s=60)
    assert t["state"] == "error"
    record_fault("destination QEMU killed", "precopy", killed, t)
    assert t["error"]["phase"] == "precopy"
    assert "destination" in t["error"]["message"], t["error"]
    assert t["error"]["rollback"]["source_running"] is True
    assert [p["name"] for p in t["phases"]][-1] == "rollback"
    # the VM still runs on the source, same boot, heartbeat unbroken; no shadow left on h2
    assert vm["uuid"] not in agent_vms(lab, "h2")
    assert agent_vms(lab, "h1")[vm["uuid"]]["state"] == "running"
    assert client.vm("fail1")["host"] == "h1"
    assert_guest_survived(lab, client, "fail1", before)
    client.stop_vm("fail1")
    client.delete_vm("fail1")


def test_bad_input_is_refused_clearly_and_nothing_is_started(lab) -> None:
    client = Client(lab.controller_url)
    client.create_vm(name="off1", host="h1")                               # powered off
    client.create_vm(name="local1", host="h1", datastore="h1-local")
    client.start_vm("local1")
    tasks_before = len(client.tasks())
    cases = [
        (("vm", "migrate", "nosuchvm", "--host", "h2"), "not in the inventory"),
        (("vm", "migrate", "off1", "--host", "nosuchhost"), "host 'nosuchhost' is not in the inventory"),
        (("vm", "migrate", "local1", "--host", "h1"), "SAME_HOST"),
        (("vm", "migrate", "local1", "--host", "h2"), "DATASTORE_NOT_ACCESSIBLE"),
    ]
    for args, expected in cases:
        res = cli(lab, *args)
        out = res.stdout + res.stderr
        assert res.returncode != 0, (args, out)
        assert expected in out, (args, out)
        assert "fix:" in out, (args, out)
    # validate lists the findings without starting anything
    res = cli(lab, "vm", "validate", "local1", "--host", "h2")
    assert res.returncode == 3 and "DATASTORE_NOT_ACCESSIBLE" in res.stdout
    assert len(client.tasks()) == tasks_before                              # nothing half done
    local = client.vm("local1")
    assert local["host"] == "h1" and local["runtime"]["qemu_status"] == "running"
    assert local["uuid"] not in agent_vms(lab, "h2")
    # a powered-off VM is not refused: it moves cold (shared storage: re-registered, nothing copied)
    res = cli(lab, "vm", "migrate", "off1", "--host", "h2")
    assert res.returncode == 0 and "cold off1: h1 → h2 success" in res.stdout, res.stdout + res.stderr
    assert client.vm("off1")["host"] == "h2" and client.vm("off1")["power_state"] == "poweredOff"
    client.stop_vm("local1")
    for name in ("local1", "off1"):
        client.delete_vm(name)


def test_agent_restart_re_adopts_running_vms(lab, tmp_path) -> None:
    from kvmotion_lab import lab as lab_mod

    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "adopt1")
    ip = vm["spec"]["guest_ip"]
    pid = agent_vms(lab, "h1")[vm["uuid"]]["pid"]
    before = http_beat(lab, client, vm["name"])
    new_agent = lab_mod.restart(lab.root, "agent-h1")
    assert new_agent != lab.pids["agent-h1"]
    adopted = agent_vms(lab, "h1")[vm["uuid"]]
    assert adopted["pid"] == pid and adopted["state"] == "running"       # same QEMU, re-adopted
    assert client.vm("adopt1")["runtime"]["qemu_status"] == "running"   # QMP works again
    # the adopted VM still migrates
    move = scenario.migrate_with_probe(client, lab.net, "adopt1", ip, "h2", tmp_path / "p.jsonl")
    assert move.ok, move.task.get("error")
    assert_guest_survived(lab, client, "adopt1", before)
    client.stop_vm("adopt1")
    client.delete_vm("adopt1")


def test_controller_crash_mid_precopy_is_reconciled(lab) -> None:
    """The journal says precopy; the restarted controller finds the VM on the source and rolls back."""
    from kvmotion_lab import lab as lab_mod

    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "crash1", dirty_mb_s=20)
    before = http_beat(lab, client, vm["name"])
    task = client.migrate("crash1", "h2", max_bandwidth_mbps=40)    # cannot converge: stays in pre-copy
    deadline = time.monotonic() + 30
    while client.task(task["id"])["phase"] != "precopy" and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = time.time()
    lab_mod.restart(lab.root, "controller", crash=True)
    t = scenario.follow_task(client, task["id"], timeout_s=30)
    assert t["state"] == "error" and t["error"]["code"] == "CONTROLLER_RESTARTED", t
    record_fault("controller killed and restarted", "precopy", killed, t)
    assert t["error"]["phase"] == "precopy"
    assert vm["uuid"] not in agent_vms(lab, "h2")                         # shadow removed
    deadline = time.monotonic() + 10
    while agent_vms(lab, "h1")[vm["uuid"]]["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert agent_vms(lab, "h1")[vm["uuid"]]["state"] == "running"
    assert client.vm("crash1")["host"] == "h1"
    assert_guest_survived(lab, client, "crash1", before)
    client.stop_vm("crash1")
    client.delete_vm("crash1")

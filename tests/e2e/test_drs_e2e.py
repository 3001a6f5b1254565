"""DRS in a three-host lab with real QEMU guests: loaded VMs are spread by their measured CPU, rules are kept, a
must rule that cannot be met is reported and never broken, manual mode moves nothing until applied, maintenance
mode leaves a pinned VM, and a balanced cluster under steady load is left alone (no ping-pong)."""
from __future__ import annotations

import json
import time

import pytest

from kvmotion.cli.client import Client
from labtools import assert_guest_survived, cli, http_beat, record_figure, remove_vm, running_lab, wait_for

CLUSTER = "c1"
BUSY = {"memory_mb": 128, "dirty_mb_s": 1000.0, "dirty_region_mb": 8}   # the dirtier never catches up: a busy vCPU


@pytest.fixture(scope="module")
def lab(guest_image):
    with running_lab(guest_image, 3) as info:
        yield info


@pytest.fixture(scope="module")
def client(lab) -> Client:
    c = Client(lab.controller_url)
    c.create_cluster(CLUSTER)
    for h in ("h1", "h2", "h3"):
        c.cluster_add_host(CLUSTER, h)
    return c


def drs(client: Client, **change) -> dict:
    if change:
        client.call("PATCH", f"/clusters/{CLUSTER}/drs", change)
    return client.call("GET", f"/clusters/{CLUSTER}/drs")


def boot(client: Client, lab, names: list[str], host: str, **opts) -> dict[str, dict]:
    for n in names:
        client.create_vm(name=n, host=host, **({"memory_mb": 128} | opts))
        client.start_vm(n)
    return {n: http_beat(lab, client, n) for n in names}


def hosts_of(client: Client, names: list[str]) -> dict[str, str]:
    return {n: client.vm(n)["host"] for n in names}


def drs_tasks(client: Client) -> list[dict]:
    return [t for t in client.tasks(limit=200) if (t.get("options") or {}).get("drs")]


def test_three_loaded_vms_on_one_host_are_spread_and_then_nothing_ping_pongs(lab, client: Client) -> None:
    names = ["busy1", "busy2", "busy3"]
    before = boot(client, lab, names, "h1", **BUSY)
    loaded = wait_for(lambda: (s := drs(client)) and next(h for h in s["hosts"] if h["host"] == "h1")["load"] > 0.5
                      and s, timeout=120, what="h1's measured load above 0.5 (three busy guests)")
    h1 = next(h for h in loaded["hosts"] if h["host"] == "h1")
    assert sorted(h1["vms"]) == names and loaded["imbalance"] > 0.2, loaded
    assert loaded["recommendations"] == []                       # DRS is off: nothing recommended, nothing moved
    t0 = time.monotonic()
    drs(client, automation="fully", threshold=3, interval_s=5, cooldown_s=0)
    spread = wait_for(lambda: len(set(hosts_of(client, names).values())) == 3 and not [
        t for t in drs_tasks(client) if t["state"] in ("queued", "running")], timeout=240,
        what="the three busy VMs on three hosts, DRS's moves finished")
    assert spread
    moves = drs_tasks(client)
    record_figure("drs_spread_s", time.monotonic() - t0, "s")
    assert len(moves) == 2 and all(t["state"] == "success" and t["options"]["drs"]["reason"] == "balance"
                                   for t in moves), [(t["vm_name"], t["state"], t.get("error")) for t in moves]
    for n in names:
        assert_guest_survived(lab, client, n, before[n])
    settled = wait_for(lambda: (s := drs(client)) and all(h["load"] > 0.1 for h in s["hosts"]) and s, timeout=120,
                       what="every host's measured load up (one busy guest each)")
    record_figure("drs_imbalance_spread", settled["imbalance"], "stdev")
    placed = hosts_of(client, names)
    time.sleep(60.0)                                             # 12 rounds of a fully automated DRS, no cooldown
    assert len(drs_tasks(client)) == 2, "DRS moved a VM of a balanced cluster (ping-pong)"
    assert hosts_of(client, names) == placed
    record_figure("drs_moves_in_steady_60s", len(drs_tasks(client)) - 2, "moves")
    drs(client, automation="off")
    for n in names:
        remove_vm(client, n)


def test_manual_mode_moves_nothing_until_applied_and_keeps_an_anti_affinity_rule(lab, client: Client) -> None:
    before = boot(client, lab, ["a1", "a2"], "h1")
    drs(client, automation="manual", threshold=1, interval_s=5, cooldown_s=600)
    out = cli(lab, "cluster", "drs", "rule-add", CLUSTER, "apart", "--kind", "anti-affinity", "--vms", "a1,a2",
              "--must")
    assert out.returncode == 0, out.stderr
    recs = json.loads(cli(lab, "cluster", "drs", "recommendations", CLUSTER, "--json").stdout)["recommendations"]
    assert [(r["reason"], r["rule"], r["priority"], r["source"]) for r in recs] == [("rule", "apart", 1, "h1")]
    time.sleep(15)                                               # three rounds of a manual DRS
    assert hosts_of(client, ["a1", "a2"]) == {"a1": "h1", "a2": "h1"}
    assert [t for t in drs_tasks(client) if t["vm_name"] in ("a1", "a2")] == []
    out = cli(lab, "cluster", "drs", "apply", CLUSTER, recs[0]["id"], "--wait")
    assert out.returncode == 0, out.stderr + out.stdout
    placed = hosts_of(client, ["a1", "a2"])
    assert placed[recs[0]["vm"]] == recs[0]["destination"] and len(set(placed.values())) == 2
    for n in ("a1", "a2"):
        assert_guest_survived(lab, client, n, before[n])
    # a must rule that cannot be met: a2 must run where a1 runs, a1 and a2 must run apart
    other = placed["a1"]
    client.call("POST", f"/clusters/{CLUSTER}/drs/rules", {"name": "pin-a2", "kind": "vm-host", "vms": ["a2"],
                                                           "hosts": [other], "must": True})
    status = drs(client)
    assert {f["rule"] for f in status["faults"]} & {"pin-a2", "apart"} and all(f["remedy"] for f in status["faults"])
    assert all(r["destination"] != other or r["vm"] != "a2" for r in status["recommendations"])
    applied = client.call("POST", f"/clusters/{CLUSTER}/drs/apply", {})
    for task_id in applied["tasks"]:
        wait_for(lambda tid=task_id: client.task(tid)["state"] not in ("queued", "running"), timeout=120,
                 what="DRS's move finished")
    now = hosts_of(client, ["a1", "a2"])
    assert now["a1"] != now["a2"], "a must anti-affinity rule was broken"
    client.call("DELETE", f"/clusters/{CLUSTER}/drs/rules/pin-a2")
    client.call("DELETE", f"/clusters/{CLUSTER}/drs/rules/apart")
    drs(client, automation="off")
    for n in ("a1", "a2"):
        remove_vm(client, n)


def test_maintenance_mode_leaves_a_vm_pinned_by_a_must_rule(lab, client: Client) -> None:
    before = boot(client, lab, ["p1", "free1"], "h2")
    client.call("POST", f"/clusters/{CLUSTER}/drs/rules", {"name": "pin-p1", "kind": "vm-host", "vms": ["p1"],
                                                           "hosts": ["h2"], "must": True})
    task = client.maintenance("h2", True)
    done = wait_for(lambda: (t := client.task(task["id"]))["state"] not in ("queued", "running") and t, timeout=180,
                    what="the maintenance task finished")
    assert done["state"] == "error" and done["error"]["code"] == "EVACUATION_INCOMPLETE", done
    assert [f["code"] for f in done["error"]["blocked"]["p1"]] and all(
        f["code"] == "DRS_RULE" for f in done["error"]["blocked"]["p1"]), done["error"]["blocked"]
    assert "free1" not in done["error"]["blocked"] and client.vm("free1")["host"] != "h2"
    assert client.vm("p1")["host"] == "h2" and client.vm("p1")["power_state"] == "poweredOn"
    assert client.call("GET", "/hosts/h2")["maintenance"] == 0
    assert_guest_survived(lab, client, "p1", before["p1"])
    assert_guest_survived(lab, client, "free1", before["free1"])
    client.call("DELETE", f"/clusters/{CLUSTER}/drs/rules/pin-p1")
    for n in ("p1", "free1"):
        remove_vm(client, n)

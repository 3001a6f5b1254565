"""Admission control, priority and maintenance mode, in a lab whose migration links are shaped to 1 GbE."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvmotion.cli.client import Client
from kvmotion_lab import scenario
from labtools import agent_vms, assert_guest_survived, cli, codes, record_figure, remove_vm, running_lab

LINK_MBPS = 1000
HOST_SLOTS = 4                 # concurrent migrations per host on a link below 10 GbE


@pytest.fixture(scope="module")
def lab(guest_image):
    with running_lab(guest_image, 2, link="1g") as info:
        yield info


@pytest.fixture(scope="module")
def client(lab) -> Client:
    return Client(lab.controller_url)


def submit_all(client: Client, names: list[str], host: str) -> list[str]:
    """Request all the migrations at once (in parallel), as a burst of admins would; returns the task ids."""
    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda n: client.migrate(n, host)["id"], names))


def boot(client: Client, lab, names: list[str], host: str = "h1", **opts) -> dict[str, dict]:
    for n in names:
        client.create_vm(name=n, host=host, memory_mb=128, **opts)
        client.start_vm(n)
    return {n: scenario.wait_guest(lab.net.client_netns, client.vm(n)["spec"]["guest_ip"]) for n in names}


def beats_now(client: Client, lab, names: list[str]) -> dict[str, dict]:
    """Each guest's HTTP heartbeat, as a client fetches it, before a move."""
    return {n: scenario.wait_guest(lab.net.client_netns, client.vm(n)["spec"]["guest_ip"], 20) for n in names}


def all_survived(lab, client: Client, before: dict[str, dict]) -> None:
    """Every guest answers a client over the network after the moves: same boot, a newer heartbeat (a guest alive
    but unreachable after a vMotion is an outage)."""
    for n in before:
        assert_guest_survived(lab, client, n, before[n])


def max_concurrent(tasks: list[dict]) -> int:
    """The controller's own record of how many of ``tasks`` ran at once: overlaps of [started_at, finished_at)."""
    edges = sorted([(t["started_at"], 1) for t in tasks] + [(t["finished_at"], -1) for t in tasks],
                   key=lambda e: (e[0], e[1]))             # an end before a start at the same instant
    most = n = 0
    for _, d in edges:
        n += d
        most = max(most, n)
    return most


def max_bandwidth_in_use(tasks: list[dict]) -> int:
    """The largest sum of max-bandwidth settings in force at one moment, from each task's bandwidth log."""
    spans = []
    for t in tasks:
        pre = next(p for p in t["phases"] if p["name"] == "precopy")
        log = t["result"]["bandwidth_log"]
        for i, entry in enumerate(log):
            start = max(entry["t"], pre["started_at"])
            end = min(log[i + 1]["t"] if i + 1 < len(log) else pre["ended_at"], pre["ended_at"])
            if end > start:
                spans.append((start, end, entry["mbps"]))
    return max(sum(m for a, b, m in spans if a <= t < b) for t, _, _ in spans)


def test_six_migrations_share_one_gbe_link(lab, client) -> None:
    names = [f"q{i}" for i in range(6)]
    before = boot(client, lab, names)
    tasks = submit_all(client, names, "h2")
    # Whatever this machine's speed, what is seen while they run must respect the limit; how many were seen
    # running or queued at once depends on timing and is recorded as a figure.
    max_running, saw_queued, limit_findings = 0, set(), []
    while True:
        snapshot = {t["id"]: t for t in client.tasks(limit=50)}              # one consistent read
        now = [snapshot[t] for t in tasks]
        running = len([t for t in now if t["state"] == "running"])
        assert running <= HOST_SLOTS, [(t["vm_name"], t["state"]) for t in now]
        max_running = max(max_running, running)
        saw_queued |= {t["id"] for t in now if t["state"] == "queued"}
        for t in now:
            if t["state"] == "queued":       # a queued task says where it stands and what it waits for
                assert t["live"].get("queue_position", 0) >= 1 and "slot" in t["live"].get("waiting_for", ""), t
                if not limit_findings:       # the checker's view while one waits (a slot may free meanwhile)
                    found = codes(client.validate(t["vm_name"], "h2")).get("HOST_CONCURRENCY_LIMIT")
                    limit_findings.append(found)
        if all(t["state"] in ("success", "error") for t in now):
            break
        time.sleep(0.1)
    assert all(t["state"] == "success" for t in now), [t["error"] for t in now]   # every one completed
    # the controller's own record: never more than 4 at once (4 slots on a link below 10 GbE)
    at_once = max_concurrent(now)
    assert 1 <= at_once <= HOST_SLOTS, [(t["vm_name"], t["started_at"], t["finished_at"]) for t in now]
    for found in filter(None, limit_findings):     # when the checker saw the limit reached: a warning, it queues
        assert found["severity"] == "warning"
        assert f"limit {HOST_SLOTS}" in found["message"] and "queue" in found["message"], found
    record_figure("migrations at once (controller's record)", at_once, "migrations")
    record_figure("migrations seen running at once (0.1 s poll)", max_running, "migrations")
    record_figure("migrations seen queued", len(saw_queued), "migrations")
    record_figure("six 128 MiB moves over 1 GbE, makespan",
                  max(t["finished_at"] for t in now) - min(t["created_at"] for t in now), "s")
    assert 0 < max_bandwidth_in_use(now) <= LINK_MBPS   # the running ones' max-bandwidth never exceeds the link
    for t in now:
        assert min(b["mbps"] for b in t["result"]["bandwidth_log"]) >= 250
        assert t["result"]["bandwidth_log"][0]["mbps"] <= LINK_MBPS
    all_survived(lab, client, before)


def test_high_priority_starts_first(lab, client) -> None:
    names = [f"q{i}" for i in range(6)]                       # on h2 now; send them back
    before = beats_now(client, lab, names) | boot(client, lab, ["qh"], host="h2")
    normal = submit_all(client, names, "h1")
    high = client.migrate("qh", "h1", priority="high")["id"]
    queued_then = [t for t in normal if client.task(t)["state"] == "queued"]
    for t in normal + [high]:
        assert scenario.follow_task(client, t)["state"] == "success"
    assert queued_then, "some normal requests were still queued when the high one came"
    high_start = client.task(high)["started_at"]                  # when admission let it run
    assert all(high_start <= client.task(t)["started_at"] for t in queued_then)
    all_survived(lab, client, before)
    for n in names + ["qh"]:
        remove_vm(client, n)


def test_maintenance_evacuates_a_host(lab, client) -> None:
    names = ["m1", "m2", "m3"]
    before = boot(client, lab, names)
    client.create_vm(name="moff", host="h1", memory_mb=128)                     # powered off
    res = cli(lab, "host", "maintenance", "enter", "h1", "--wait")
    try:
        _evacuated(lab, client, res, names, before)
    finally:
        cli(lab, "host", "maintenance", "exit", "h1")
    assert client.host("h1")["maintenance"] == 0
    for n in names + ["moff"]:
        remove_vm(client, n)


def _evacuated(lab, client, res, names, before) -> None:
    assert res.returncode == 0, res.stdout + res.stderr
    h1 = client.host("h1")
    assert h1["maintenance"] == 1
    assert [v["name"] for v in client.vms() if v["host"] == "h1"] == []        # empty
    assert agent_vms(lab, "h1") == {}
    assert client.vm("moff")["host"] == "h2" and client.vm("moff")["power_state"] == "poweredOff"
    all_survived(lab, client, before)
    res = cli(lab, "vm", "migrate", "m1", "--host", "h1")                       # nothing goes to h1 now
    assert res.returncode == 3 and "HOST_IN_MAINTENANCE" in res.stderr


def test_maintenance_names_a_vm_that_cannot_move(lab, client) -> None:
    before = boot(client, lab, ["iso1", "free1"])
    # an ISO path is relative to a datastore (default: the VM's); this one is on h1's local datastore: host-local
    iso = lab.root / "ds" / "h1-local" / "iso1" / "local.iso"
    iso.parent.mkdir(parents=True, exist_ok=True)
    iso.write_bytes(b"\0" * 65536)
    client.cdrom("iso1", "cd0", "local", path="iso1/local.iso", datastore="h1-local")
    start = time.monotonic()
    res = cli(lab, "host", "maintenance", "enter", "h1", "--wait")   # a hang would end in cli()'s own timeout
    record_figure("maintenance enter refused by one VM, time to the answer", time.monotonic() - start, "s")
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "iso1" in out and "LOCAL_MEDIA_CONNECTED" in out, out
    assert client.host("h1")["maintenance"] == 0                                # back in service, not half
    assert client.vm("iso1")["host"] == "h1" and client.vm("free1")["host"] == "h2"
    assert agent_vms(lab, "h1")[client.vm("iso1")["uuid"]]["state"] == "running"
    all_survived(lab, client, before)                   # the one that moved and the one that stayed
    for n in ("iso1", "free1"):
        remove_vm(client, n)


def test_queued_tasks_survive_a_controller_crash(lab, client) -> None:
    from kvmotion_lab import lab as lab_mod

    names = [f"r{i}" for i in range(6)]
    before = boot(client, lab, names)
    tasks = submit_all(client, names, "h2")
    queued = [t for t in tasks if client.task(t)["state"] == "queued"]
    assert queued, "with 4 slots, some of 6 requests queue"
    crash_at = time.time()
    lab_mod.restart(lab.root, "controller", crash=True)
    final = {t: scenario.follow_task(client, t) for t in tasks}
    # queued work was not lost: what had not started at the crash ran after the restart
    after = [t for t in tasks if final[t]["started_at"] >= crash_at]
    assert after, "some requests were still queued at the crash"
    for t in after:
        assert final[t]["state"] == "success", final[t].get("error")
    for t, task in final.items():                   # running ones ended cleanly, one way or the other
        assert task["state"] in ("success", "error")
        vm = client.vm(task["vm_name"])
        assert agent_vms(lab, vm["host"])[vm["uuid"]]["state"] == "running"
    all_survived(lab, client, before)
    for n in names:
        remove_vm(client, n)

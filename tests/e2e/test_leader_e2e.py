"""Two controller processes on one PostgreSQL database (issue 22, docs/controllers.md), with real QEMU guests: one
leads (schedules, runs the engines, monitors), the other serves reads and forwards writes. The leader is killed
(SIGKILL) in the middle of a live migration's pre-copy: the follower takes over, reconciles the move to an end
(never stuck), exactly one host runs the VM, the inventory names that host, and the guest kept running.

Needs PostgreSQL (``$KVMOTION_TEST_PG_URL``, scripts/pg.sh prints one): each run gets a schema of its own."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from kvmotion.cli.client import Client
from kvmotion_lab import lab as lab_mod
from kvmotion_lab import scenario
from kvmotion_lab.procs import pid_is_ours, read_state
from labtools import (agent_vms, assert_guest_survived, http_beat, record_figure, remove_vm, running_lab, running_vm,
                      wait_for)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from dbtools import PG_ENV, pg_schema  # noqa: E402 - tests/unit's helper for a schema of the test's own

E2E_PG_ENV = "KVMOTION_E2E_PG_URL"      # scripts/test.sh sets it for the full run (the unit tests stay on SQLite)
PG_URL = os.environ.get(E2E_PG_ENV) or os.environ.get(PG_ENV)
pytestmark = pytest.mark.skipif(not PG_URL, reason=f"two controllers need a shared PostgreSQL: set {E2E_PG_ENV} "
                                                   "(scripts/pg.sh starts one and prints its URL)")


@pytest.fixture(scope="module")
def pair(guest_image):
    """Controller A (ctl-a, the lab's own) and a second process of it (ctl-a2) on one PostgreSQL schema."""
    assert PG_URL is not None
    with pg_schema(PG_URL) as url, running_lab(guest_image, 2, database_url=url) as lab:
        yield lab, lab_mod.start_standby(lab.root)


def controllers(site) -> dict:
    r = site.call("GET", "/api/v1/controllers", 5)
    r.raise_for_status()
    return r.json()


def leader_gauge(site) -> str:
    r = site.call("GET", "/metrics", 5)
    return next(ln for ln in r.text.splitlines() if ln.startswith("kvmotion_controller_leader "))


def test_the_follower_serves_reads_and_forwards_writes_to_the_leader(pair) -> None:
    lab, standby = pair
    a = lab.controllers["a"]
    follower = Client(standby.url, token=a.admin_token())
    leader = Client(lab.controller_url)
    wait_for(lambda: controllers(standby)["leader"] is not None, 30, "the follower reads who leads")
    assert controllers(a)["this"] == {"name": "ctl-a", "url": a.url, "leader": True}
    seen = controllers(standby)
    assert seen["this"] == {"name": "ctl-a2", "url": standby.url, "leader": False}
    assert (seen["leader"]["name"], seen["leader"]["url"], seen["backend"]) == ("ctl-a", a.url, "postgresql")
    assert leader_gauge(a) == "kvmotion_controller_leader 1.0" and leader_gauge(standby).endswith(" 0.0")
    assert {h["name"]: h["state"] for h in follower.hosts()} == {"h1": "connected", "h2": "connected"}   # a read
    vm = running_vm(follower, lab, "fwd1", host="h1")          # create and start: two writes, handed on
    assert leader.vm("fwd1")["power_state"] == "poweredOn" and vm["host"] == "h1"
    assert agent_vms(lab, "h1")[vm["uuid"]]["state"] == "running"
    remove_vm(follower, "fwd1")
    assert "fwd1" not in {v["name"] for v in leader.vms()}


def test_the_leader_killed_mid_precopy_the_follower_takes_over_and_ends_the_move(pair) -> None:
    lab, standby = pair
    a = lab.controllers["a"]
    follower = Client(standby.url, token=a.admin_token())
    vm = running_vm(Client(lab.controller_url), lab, "lead1", dirty_mb_s=20)
    before = http_beat(lab, follower, "lead1")
    task = follower.migrate("lead1", "h2", max_bandwidth_mbps=40)   # 5 MB/s against 20 MB/s: stays in pre-copy
    wait_for(lambda: (t := follower.task(task["id"]))["phase"] == "precopy"
             and (t["live"] or {}).get("transferred", 0) > 0, 60, "the move in pre-copy")
    pid = int(read_state(lab.root)["pids"][a.process])
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: controllers(standby)["this"]["leader"], 60, "the follower to lead")
    took = time.monotonic() - killed
    record_figure("controller_takeover_s", took, "s")
    t = scenario.follow_task(follower, task["id"], timeout_s=120)
    record_figure("controller_takeover_move_ended_s", time.monotonic() - killed, "s")
    print(f"\nleader killed mid-precopy: ctl-a2 led after {took:.2f} s; the move ended {t['state']} after "
          f"{time.monotonic() - killed:.2f} s")
    assert not pid_is_ours(pid)
    assert t["state"] in ("success", "error"), t
    owner = t["destination"] if t["state"] == "success" else t["source"]
    other = "h1" if owner == "h2" else "h2"
    if t["state"] == "error":
        assert t["error"]["code"] == "CONTROLLER_RESTARTED" and t["error"]["phase"] == "precopy", t["error"]
    wait_for(lambda: agent_vms(lab, owner).get(vm["uuid"], {}).get("state") == "running", 30,
             f"the VM running on {owner}")
    assert vm["uuid"] not in agent_vms(lab, other)                       # one owner: no shadow, no second copy
    assert follower.vm("lead1")["host"] == owner
    assert_guest_survived(lab, follower, "lead1", before)
    now = controllers(standby)
    assert now["leader"]["name"] == "ctl-a2" and now["this"]["leader"] is True
    assert leader_gauge(standby) == "kvmotion_controller_leader 1.0"
    again = follower.migrate("lead1", other)                             # the new leader schedules
    done = scenario.follow_task(follower, again["id"], timeout_s=120)
    assert done["state"] == "success", done.get("error")
    assert follower.vm("lead1")["host"] == other and vm["uuid"] not in agent_vms(lab, owner)
    remove_vm(follower, "lead1")

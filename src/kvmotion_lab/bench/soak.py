"""`kvmotion bench soak`: N back-and-forth live migrations of one guest that keeps dirtying memory.

Pass/fail (exit code) on correctness only: every migration succeeds and the guest's heartbeat never breaks
(same boot, its counter only goes up), read over HTTP from the client namespace after each move, as a user would.
A guest that breaks fails the soak, whatever the accelerator; the soak goes on with a fresh guest so the run still
counts every move, and prints the tally of every guest it used.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvmotion_lab.bench.report import percentile
from kvmotion.cli.client import Client
from kvmotion_lab.image.build import build_image
from kvmotion_lab import lab, scenario

ROOT = Path("/tmp/kvmotion-soak")


@dataclass
class Tally:
    migrations: int = 0
    failures: list[str] = field(default_factory=list)
    heartbeat_breaks: list[str] = field(default_factory=list)
    guests: list[dict[str, Any]] = field(default_factory=list)   # every guest used: boot, moves survived, its end
    downtime_ms: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    first_seq: int | None = None
    last_seq: int | None = None
    boot_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.migrations > 0 and not self.failures and not self.heartbeat_breaks and len(self.guests) <= 1

    def as_dict(self) -> dict[str, Any]:
        return {"migrations": self.migrations, "failures": len(self.failures), "failure_reasons": self.failures,
                "heartbeat_breaks": self.heartbeat_breaks, "guests": self.guests,
                "boot_id": self.boot_id,
                "heartbeat_seq": [self.first_seq, self.last_seq],
                "downtime_ms_p50": statistics.median(self.downtime_ms) if self.downtime_ms else None,
                "downtime_ms_p99": percentile(list(self.downtime_ms), 99),
                "downtime_ms_max": max(self.downtime_ms, default=None),
                "total_s_p50": round(statistics.median(self.total_s), 3) if self.total_s else None, "ok": self.ok}


def http_beat(client_netns: str, ip: str, newer_than: int = -1, wait_s: float = 15.0) -> dict[str, Any] | None:
    """The guest's heartbeat over HTTP from the client namespace, once the move is over (no traffic reaches
    the guest during a migration), waiting for one newer than ``newer_than``."""
    end = time.monotonic() + wait_s
    last = None
    while time.monotonic() < end:
        hb = scenario.guest_heartbeat(client_netns, ip)
        if hb is not None:
            last = {"seq": int(hb["seq"]), "boot_id": str(hb["boot_id"])}
            if last["seq"] > newer_than:
                return last
        time.sleep(0.3)
    return last


def check_beat(tally: Tally, beat: dict[str, Any] | None, where: str) -> bool:
    """Record a break of the heartbeat (it fails the soak). Returns True when the guest must be replaced."""
    problem = None
    if beat is None:
        problem = f"{where}: the guest does not answer"
    elif tally.boot_id is not None and beat["boot_id"] != tally.boot_id:
        problem = f"{where}: the guest rebooted ({tally.boot_id} → {beat['boot_id']})"
    elif tally.last_seq is not None and beat["seq"] < tally.last_seq:
        problem = f"{where}: heartbeat went back from {tally.last_seq} to {beat['seq']}"
    elif tally.last_seq is not None and beat["seq"] == tally.last_seq:
        problem = f"{where}: heartbeat stopped at {beat['seq']} (its web server answers, its counter does not move)"
    if problem is None:
        assert beat is not None
        if tally.boot_id is None:
            tally.boot_id, tally.first_seq = beat["boot_id"], beat["seq"]
        tally.last_seq = beat["seq"]
        return False
    tally.heartbeat_breaks.append(problem)
    if tally.guests:
        tally.guests[-1]["ended"] = problem
    return True


def run(migrations: int = 50, dirty_mb_s: float = 20.0, memory_mb: int = 256,
        log: Callable[[str], None] = print) -> Tally:
    image = build_image(log=lambda m: None)
    info = lab.up(2, ROOT, prefix="kvsk", image_dir=image.kernel.parent.parent, log=lambda m: None)
    tally = Tally()
    try:
        client = Client(info.controller_url, token=info.admin_token(), timeout=60)
        def fresh_guest() -> dict[str, Any]:
            vm = client.create_vm(name="soak1", host="h1", memory_mb=memory_mb, dirty_mb_s=dirty_mb_s)
            client.start_vm("soak1")
            scenario.wait_guest(info.net.client_netns, vm["spec"]["guest_ip"])
            tally.boot_id, tally.last_seq = None, None
            check_beat(tally, http_beat(info.net.client_netns, vm["spec"]["guest_ip"]), "start")
            tally.guests.append({"guest": len(tally.guests) + 1, "boot_id": tally.boot_id, "moves_survived": 0,
                                 "ended": "still running"})
            return vm

        vm = fresh_guest()
        host, ip = "h1", vm["spec"]["guest_ip"]
        for i in range(migrations):
            dest = "h2" if host == "h1" else "h1"
            t = scenario.follow_task(client, client.migrate("soak1", dest)["id"], timeout_s=300)
            tally.migrations += 1
            if t["state"] != "success":
                tally.failures.append(f"#{i + 1} {host}→{dest}: {(t.get('error') or {}).get('message')}")
            else:
                host = dest
                r = t["result"]
                tally.downtime_ms.append(float(r.get("downtime_ms") or 0))
                tally.total_s.append(float(r.get("total_time_s") or 0))
            beat = http_beat(info.net.client_netns, ip, newer_than=tally.last_seq or -1)
            replace = check_beat(tally, beat, f"after #{i + 1}")
            if not replace and t["state"] == "success":
                tally.guests[-1]["moves_survived"] += 1
            log(f"#{i + 1:>3} → {host}: {t['state']}, downtime {tally.downtime_ms[-1] if t['state'] == 'success' else '–'} ms, "
                f"heartbeat {tally.last_seq}" + ("  (guest broke: replaced)" if replace else ""))
            if replace:
                client.stop_vm("soak1")
                client.delete_vm("soak1")
                vm = fresh_guest()
                host, ip = "h1", vm["spec"]["guest_ip"]
        client.stop_vm("soak1")
        client.delete_vm("soak1")
    finally:
        lab.down(ROOT)
    return tally

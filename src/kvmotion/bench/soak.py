"""`kvmotion bench soak`: N back-and-forth live migrations of one guest that keeps dirtying memory.

Pass/fail (exit code) on correctness only: every migration succeeds and the guest's heartbeat never breaks
(same boot, its counter only goes up). The heartbeat is read from the guest's serial console through its
host's agent, not over the guest network: under TCG, QEMU 7.2 sometimes corrupts a guest that receives
packets during migration (README, "Known issue"), which a soak of pings would turn into noise.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kvmotion.bench.report import percentile
from kvmotion.cli.client import Client
from kvmotion.image.build import build_image
from kvmotion.lab import lab, scenario

ROOT = Path("/tmp/kvmotion-soak")


@dataclass
class Tally:
    migrations: int = 0
    failures: list[str] = field(default_factory=list)
    heartbeat_breaks: list[str] = field(default_factory=list)
    downtime_ms: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    first_seq: int | None = None
    last_seq: int | None = None
    boot_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.migrations > 0 and not self.failures and not self.heartbeat_breaks

    def as_dict(self) -> dict[str, Any]:
        return {"migrations": self.migrations, "failures": len(self.failures), "failure_reasons": self.failures,
                "heartbeat_breaks": self.heartbeat_breaks, "boot_id": self.boot_id,
                "heartbeat_seq": [self.first_seq, self.last_seq],
                "downtime_ms_p50": statistics.median(self.downtime_ms) if self.downtime_ms else None,
                "downtime_ms_p99": percentile(list(self.downtime_ms), 99),
                "downtime_ms_max": max(self.downtime_ms, default=None),
                "total_s_p50": statistics.median(self.total_s) if self.total_s else None, "ok": self.ok}


def serial_beat(root: Path, host: str, uuid: str) -> dict[str, Any] | None:
    """The guest's newest KVMOTION-HEARTBEAT line from its serial console, via its host's agent."""
    with lab.agent_http(root, host) as c:
        r = c.get(f"/v1/vms/{uuid}/serial", params={"lines": 200})
    if r.status_code != 200:
        return None
    for line in reversed(r.json()):
        if line.startswith("KVMOTION-HEARTBEAT"):
            kv = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
            return {"seq": int(kv["seq"]), "boot_id": kv["boot_id"]}
    return None


def check_beat(tally: Tally, beat: dict[str, Any] | None, where: str) -> None:
    if beat is None:
        tally.heartbeat_breaks.append(f"{where}: no heartbeat on the serial console")
        return
    if tally.boot_id is None:
        tally.boot_id, tally.first_seq = beat["boot_id"], beat["seq"]
    elif beat["boot_id"] != tally.boot_id:
        tally.heartbeat_breaks.append(f"{where}: the guest rebooted ({tally.boot_id} → {beat['boot_id']})")
    elif tally.last_seq is not None and beat["seq"] < tally.last_seq:
        tally.heartbeat_breaks.append(f"{where}: heartbeat went back from {tally.last_seq} to {beat['seq']}")
    tally.last_seq = beat["seq"]


def run(migrations: int = 50, dirty_mb_s: float = 20.0, memory_mb: int = 256,
        log: Callable[[str], None] = print) -> Tally:
    image = build_image(log=lambda m: None)
    info = lab.up(2, ROOT, prefix="kvsk", image_dir=image.kernel.parent.parent, log=lambda m: None)
    tally = Tally()
    try:
        client = Client(info.controller_url, token=info.admin_token(), timeout=60)
        vm = client.create_vm(name="soak1", host="h1", memory_mb=memory_mb, dirty_mb_s=dirty_mb_s)
        client.start_vm("soak1")
        scenario.wait_guest(info.net.client_netns, vm["spec"]["guest_ip"])
        host = "h1"
        check_beat(tally, serial_beat(ROOT, host, vm["uuid"]), "start")
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
            time.sleep(1.2)               # one heartbeat a second: the next must be newer
            check_beat(tally, serial_beat(ROOT, host, vm["uuid"]), f"after #{i + 1}")
            log(f"#{i + 1:>3} → {host}: {t['state']}, downtime {tally.downtime_ms[-1] if t['state'] == 'success' else '–'} ms, "
                f"heartbeat {tally.last_seq}")
        client.stop_vm("soak1")
        client.delete_vm("soak1")
    finally:
        lab.down(ROOT)
    return tally

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
from kvmotion_lab.image.debian import build_debian_image
from kvmotion_lab import lab, scenario

ROOT = Path("/tmp/kvmotion-soak")
GUEST_BOOT_S = {"tiny": scenario.GUEST_BOOT_DEADLINE_S, "debian": 300.0}


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
    downtime_unknown: int = 0          # successful moves whose QEMU downtime was not reported
    ledger: dict[str, Any] = field(default_factory=dict)    # the Debian guest: transactions committed, intact

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
                "downtime_ms_max": max(self.downtime_ms, default=None), "downtime_unknown": self.downtime_unknown,
                "total_s_p50": round(statistics.median(self.total_s), 3) if self.total_s else None, "ledger": self.ledger,
                "ok": self.ok}


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


class Soak:
    """One lab, one guest moved back and forth; a broken guest is counted and replaced."""

    def __init__(self, info: lab.LabInfo, guest: str, memory_mb: int, dirty_mb_s: float) -> None:
        self.info, self.guest, self.memory_mb, self.dirty = info, guest, memory_mb, dirty_mb_s
        self.client = Client(info.controller_url, token=info.admin_token(), timeout=120)
        self.tally = Tally()
        self.host, self.ip, self.tx = "h1", "", 0
        if guest == "debian":
            lab.stage_image(Path(info.root), build_debian_image(log=lambda m: None).disk)

    def fresh_guest(self) -> None:
        extra = {"image": lab.SHARED_IMAGE, "clone": "linked", "firmware": "uefi"} \
            if self.guest == "debian" else {}
        vm = self.client.create_vm(name="soak1", host="h1", memory_mb=self.memory_mb, dirty_mb_s=self.dirty, **extra)
        self.client.start_vm("soak1")
        self.host, self.ip, self.tx = "h1", vm["spec"]["guest_ip"], 0
        scenario.wait_guest(self.info.net.client_netns, self.ip, GUEST_BOOT_S[self.guest])
        t = self.tally
        t.boot_id, t.last_seq = None, None
        check_beat(t, http_beat(self.info.net.client_netns, self.ip), "start")
        t.guests.append({"guest": len(t.guests) + 1, "boot_id": t.boot_id, "moves_survived": 0,
                         "ended": "still running"})

    def remove(self) -> None:
        self.client.stop_vm("soak1")
        self.client.delete_vm("soak1")

    def commit_tx(self, where: str) -> None:
        """The Debian guest: one committed transaction per move; at the end every one must be in its ledger."""
        if self.guest != "debian":
            return
        status, got = scenario.guest_http(self.info.net.client_netns, self.ip,
                                          f"/bank/tx?client=soak&seq={self.tx + 1}", "POST", timeout_s=20)
        if status == 200:
            self.tx += 1
        else:
            self.tally.failures.append(f"{where}: the guest's database did not commit: HTTP {status}: {got}")

    def check_ledger(self) -> None:
        if self.guest != "debian":
            return
        status, got = scenario.guest_http(self.info.net.client_netns, self.ip, "/bank/check?client=soak",
                                          timeout_s=20)
        ok = status == 200 and got.get("seqs") == list(range(1, self.tx + 1)) and got.get("quick_check") == "ok" \
            and got.get("total") == got.get("expected_total")
        self.tally.ledger = {"committed": self.tx, "intact": ok}
        if not ok:
            self.tally.failures.append(f"the guest's database lost data: HTTP {status}: {str(got)[:300]}")

    def move(self, i: int, log: Callable[[str], None]) -> None:
        t = self.tally
        dest = "h2" if self.host == "h1" else "h1"
        task = scenario.follow_task(self.client, self.client.migrate("soak1", dest)["id"], timeout_s=300)
        t.migrations += 1
        if task["state"] != "success":
            t.failures.append(f"#{i + 1} {self.host}→{dest}: {(task.get('error') or {}).get('message')}")
        else:
            self.host = dest
            r = task["result"]
            if r.get("downtime_ms") is None:        # not reported: counted as unknown, never as 0 ms
                t.downtime_unknown += 1
            else:
                t.downtime_ms.append(float(r["downtime_ms"]))
            t.total_s.append(float(r.get("total_time_s") or 0))
        replace = check_beat(t, http_beat(self.info.net.client_netns, self.ip, newer_than=t.last_seq or -1),
                             f"after #{i + 1}")
        if not replace and task["state"] == "success":
            t.guests[-1]["moves_survived"] += 1
            self.commit_tx(f"after #{i + 1}")
        dt = task["result"].get("downtime_ms") if task["state"] == "success" else None
        log(f"#{i + 1:>3} → {self.host}: {task['state']}, downtime {'–' if dt is None else dt} ms, "
            f"heartbeat {t.last_seq}"
            + ("  (guest broke: replaced)" if replace else ""))
        if replace:
            self.check_ledger()
            self.remove()
            self.fresh_guest()


def run(migrations: int = 50, dirty_mb_s: float = 20.0, memory_mb: int = 256,
        log: Callable[[str], None] = print, guest: str = "tiny") -> Tally:
    """``guest``: ``tiny`` (the kernel + initramfs guest) or ``debian`` (the Debian 12 disk image, a linked clone
    booting under UEFI, committing one database transaction after every move)."""
    if guest not in GUEST_BOOT_S:
        raise ValueError(f"unknown guest {guest!r}: use tiny or debian")
    image = build_image(log=lambda m: None)
    info = lab.up(2, ROOT, prefix="kvsk", image_dir=image.kernel.parent.parent, log=lambda m: None)
    try:
        soak = Soak(info, guest, max(memory_mb, 512) if guest == "debian" else memory_mb, dirty_mb_s)
        soak.fresh_guest()
        for i in range(migrations):
            soak.move(i, log)
        soak.check_ledger()
        soak.remove()
    finally:
        lab.down(ROOT)
    return soak.tally

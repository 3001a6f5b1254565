"""A migration scenario as users see it: a guest, a client pinging it, one or more moves.

Shared by the demo, the end-to-end tests and the benchmarks.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmotion.cli.client import Client
from kvmotion_lab import net
from kvmotion_lab.netns import netns_exec_argv
from kvmotion_lab.probe import ClientProbe, ProbeReport

GUEST_BOOT_DEADLINE_S = 90.0
# A guest kernel that crashed (the guest reboots at once: panic=-1) or hung, as its serial console shows it.
CRASH_MARKERS = ("Kernel panic", "BUG:", "Oops:", "general protection fault")
_FETCH = "import json,sys,urllib.request as u;print(u.build_opener(u.ProxyHandler({})).open(sys.argv[1],timeout=2).read().decode())"


def heartbeat_url(ip: str) -> str:
    return f"http://{ip.split('/')[0]}/cgi-bin/heartbeat"


def guest_heartbeat(client_netns: str, ip: str) -> dict[str, Any] | None:
    """One HTTP heartbeat from the guest, fetched from the client namespace (None if no answer)."""
    try:
        res = subprocess.run(netns_exec_argv(client_netns, [sys.executable, "-c", _FETCH, heartbeat_url(ip)]),
                             capture_output=True, text=True, timeout=5, check=False)
        return json.loads(res.stdout) if res.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError):
        return None


_REQUEST = ("import json,sys,urllib.request as u,urllib.error as e\n"
            "r=u.Request(sys.argv[1],data=sys.argv[3].encode() if sys.argv[3] else None,method=sys.argv[2])\n"
            "try:\n c=u.build_opener(u.ProxyHandler({})).open(r,timeout=float(sys.argv[4]));print(c.status);"
            "print(c.read().decode())\n"
            "except e.HTTPError as x:\n print(x.code);print(x.read().decode())")


def guest_http(client_netns: str, ip: str, path: str, method: str = "GET", body: str = "",
               timeout_s: float = 10.0) -> tuple[int, Any]:
    """One HTTP request to the guest from the client namespace: (status, JSON body or text); (0, error) when
    nothing answered."""
    url = f"http://{ip.split('/')[0]}{path}"
    try:
        res = subprocess.run(netns_exec_argv(client_netns, [sys.executable, "-c", _REQUEST, url, method, body,
                                                            str(timeout_s)]),
                             capture_output=True, text=True, timeout=timeout_s + 10, check=False)
    except subprocess.TimeoutExpired:
        return 0, "timed out"
    if res.returncode != 0:
        return 0, res.stderr.strip().splitlines()[-1:] or "no answer"
    status, _, text = res.stdout.partition("\n")
    try:
        return int(status), json.loads(text)
    except ValueError:
        return int(status), text


def wait_guest(client_netns: str, ip: str, deadline_s: float = GUEST_BOOT_DEADLINE_S) -> dict[str, Any]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        hb = guest_heartbeat(client_netns, ip)
        if hb is not None:
            return hb
        time.sleep(0.5)
    raise TimeoutError(f"guest {ip} did not answer HTTP within {deadline_s:.0f}s")


@dataclass
class MoveResult:
    task: dict[str, Any]
    probe: ProbeReport
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.task["state"] == "success"


def follow_task(client: Client, task_id: str, timeout_s: float = 600) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    task = client.task(task_id)
    while task["state"] in ("queued", "running") and time.monotonic() < end:
        time.sleep(0.2)
        task = client.task(task_id)
    return task


def migrate_with_probe(client: Client, lab_net: net.LabNet, vm: str, ip: str, host: str, out: Path,
                       settle_s: float = 1.0, **opts: Any) -> MoveResult:
    """Ping + poll the guest from the client namespace while the VM moves to ``host``."""
    probe = ClientProbe(lab_net.client_netns, ip.split("/")[0], heartbeat_url(ip), interval_ms=10, out=out)
    probe.start()
    try:
        time.sleep(settle_s)
        before = guest_heartbeat(lab_net.client_netns, ip)
        task = client.migrate(vm, host, **opts)
        task = follow_task(client, task["id"])
        time.sleep(settle_s)
        try:
            after: dict[str, Any] | None = wait_guest(lab_net.client_netns, ip, 15.0)
        except TimeoutError:
            after = None
    finally:
        report = probe.stop()
    return MoveResult(task=task, probe=report, before=before, after=after)

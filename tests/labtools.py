"""Helpers shared by the end-to-end tests (real lab, real QEMU)."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from kvmotion.agent.config import AgentConfig
from kvmotion.cli.client import Client
from kvmotion.lab import lab as lab_mod
from kvmotion.lab import scenario


def agent_url(lab: Any, host: str) -> str:
    h = lab.net.host(host)
    return f"http://{h.mgmt_ip}:8770" if h.mgmt_ip else f"http://[{h.mgmt_ip6}]:8770"


def agent_call(lab: Any, host: str, method: str, path: str, **kw: Any) -> httpx.Response:
    """Call a lab agent directly, signed with its host secret (as the controller does)."""
    with lab_mod.agent_http(Path(lab.root), host, timeout=kw.pop("timeout", 10)) as c:
        return c.request(method, path, **kw)


def agent_vms(lab: Any, host: str) -> dict[str, dict]:
    return {v["uuid"]: v for v in agent_call(lab, host, "GET", "/v1/vms").json()}


def running_vm(client: Client, lab: Any, name: str, host: str = "h1", **opts: Any) -> dict:
    vm = client.create_vm(name=name, host=host, **opts)
    client.start_vm(name)
    scenario.wait_guest(lab.net.client_netns, vm["spec"]["guest_ip"])
    return client.vm(name)


def remove_vm(client: Client, name: str) -> None:
    if client.vm(name)["power_state"] == "poweredOn":
        client.stop_vm(name)
    client.delete_vm(name)


def cli(lab: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KVMOTION_URL=lab.controller_url, COLUMNS="250")
    return subprocess.run([sys.executable, "-m", "kvmotion.cli.main", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def codes(findings: list[dict]) -> dict[str, dict]:
    return {f["code"]: f for f in findings}


@contextlib.contextmanager
def host_settings(lab: Any, host: str, **changes: Any) -> Iterator[AgentConfig]:
    """Change a host's agent configuration (a lab setting) for the duration of a block, then restore it."""
    cfg_file = Path(lab.root) / "hosts" / host / "agent.json"
    original = AgentConfig.load(cfg_file)
    try:
        yield lab_mod.configure_host(lab.root, host, **changes)
    finally:
        lab_mod.configure_host(lab.root, host, **original.model_dump())


def record_fault(fault: str, phase: str, fault_at: float, task: dict) -> None:
    """One row of the fault table (closing notes, docs): appended to ``$KVMOTION_FAULT_TABLE`` when set."""
    out = os.environ.get("KVMOTION_FAULT_TABLE")
    if not out:
        return
    import json
    ok = task["state"] == "success"
    end = task.get("finished_at") or task.get("updated_at") or time.time()
    cause = (task.get("error") or {}).get("message") or ((task.get("result") or {}).get("reconciled") or {}).get(
        "reason", "")
    row = {"fault": fault, "phase": phase, "outcome": task["state"], "vm_on": task["destination" if ok else "source"],
           "seconds_to_clean_end": round(end - fault_at, 2), "cause": cause}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def wait_for(pred: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


CRASH_MARKERS = scenario.CRASH_MARKERS
KNOWN_TCG_BUG = ("QEMU 7.2 under TCG corrupted the guest's memory during live migration while it received "
                 "network traffic (a QEMU bug, reproduced with plain QMP by benchmarks/tcg_rx_migration_repro.py); "
                 "real hosts use KVM")


def _serial(lab: Any, client: Client, name: str) -> list[str]:
    vm = client.vm(name)
    try:
        return agent_call(lab, vm["host"], "GET", f"/v1/vms/{vm['uuid']}/serial", params={"lines": 1000}).json()
    except (httpx.HTTPError, ValueError):
        return []


def guest_crashed(lab: Any, client: Client, name: str) -> bool:
    """Did the guest's kernel crash or hang? An oops or panic on its serial console (on the host it runs on), or
    5 s in which neither the console nor HTTP shows a new heartbeat (the console alone can stall under TCG)."""
    first = _serial(lab, client, name)
    if any(m in line for line in first for m in CRASH_MARKERS):
        return True
    ip = client.vm(name)["spec"]["guest_ip"]
    http_first = scenario.guest_heartbeat(lab.net.client_netns, ip)
    time.sleep(5)
    http_later = scenario.guest_heartbeat(lab.net.client_netns, ip)
    if http_first and http_later and int(http_later["seq"]) > int(http_first["seq"]):
        return False
    beats = lambda lines: [ln for ln in lines if "KVMOTION-HEARTBEAT" in ln]  # noqa: E731
    return beats(_serial(lab, client, name))[-1:] == beats(first)[-1:]


def xfail_if_tcg_guest_crash(lab: Any, client: Client, name: str) -> None:
    """Turn a guest kernel crash under TCG into an explicit expected failure naming the QEMU bug."""
    import pytest

    vm = client.vm(name)
    accel = client.host(vm["host"])["facts"].get("accelerator")
    qemu_running = (vm.get("runtime") or {}).get("qemu_status") == "running"   # paused would be our bug
    if accel == "tcg" and qemu_running and guest_crashed(lab, client, name):
        pytest.xfail(KNOWN_TCG_BUG)


FULL_BEAT = re.compile(r"^KVMOTION-HEARTBEAT seq=\d+ uptime=[0-9.]+ boot_id=[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$")


def guest_beat(lab: Any, client: Client, name: str, newer_than: int = -1, timeout: float = 20.0) -> dict:
    """The guest's latest heartbeat: seq, uptime, boot_id. Read from its serial console first (no guest network
    involved); under TCG the console of a migrated guest sometimes stops printing while the guest runs on, so
    after 3 s without a new console line the same counter is also read over HTTP from the client namespace."""
    start = time.monotonic()
    end = start + timeout
    ip = client.vm(name)["spec"]["guest_ip"]
    while True:
        for line in reversed(_serial(lab, client, name)):
            if line.startswith("KVMOTION-HEARTBEAT") and FULL_BEAT.match(line):   # not a line still being written
                hb = dict(kv.split("=", 1) for kv in line.split()[1:])
                beat = {"seq": int(hb["seq"]), "uptime": float(hb["uptime"]), "boot_id": hb["boot_id"]}
                if beat["seq"] > newer_than:
                    return beat
                break
        if time.monotonic() - start > 3:
            http = scenario.guest_heartbeat(lab.net.client_netns, ip)
            if http is not None and int(http["seq"]) > newer_than:
                return {"seq": int(http["seq"]), "uptime": float(http["uptime"]), "boot_id": http["boot_id"]}
        if time.monotonic() > end:
            raise TimeoutError(f"no new heartbeat from {name} within {timeout:.0f}s (serial console or HTTP)")
        time.sleep(0.5)

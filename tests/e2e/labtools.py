"""Helpers shared by the end-to-end tests (real lab, real QEMU)."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from kvmotion.agent.config import AgentConfig
from kvmotion.cli.client import Client
from kvmotion_lab import lab as lab_mod
from kvmotion_lab import scenario, services


def agent_url(lab: Any, host: str) -> str:
    h = lab.net.host(host)
    return f"https://{h.mgmt_ip}:8770" if h.mgmt_ip else f"https://[{h.mgmt_ip6}]:8770"


def unsigned_agent_call(lab: Any, host: str, method: str, path: str, **kw: Any) -> httpx.Response:
    """A call over the controller's own mutual-TLS session to a lab agent, but not signed: what a holder of
    the controller's client certificate without the host's secret could send."""
    verify = lab_mod.client_context(lab_mod.agent_tls(Path(lab.root), host))
    return httpx.request(method, f"{agent_url(lab, host)}{path}", verify=verify, timeout=kw.pop("timeout", 10), **kw)


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


def cli(lab: Any, *args: str, controller: str | None = None) -> subprocess.CompletedProcess[str]:
    """`kvmotion ARGS` against the lab's controller A, or as the admin of ``controller`` ("a", "b")."""
    env = dict(os.environ, KVMOTION_URL=lab.controller_url, COLUMNS="250")
    if controller is not None:
        site = lab.controllers[controller]
        env.update(KVMOTION_URL=site.url, KVMOTION_TOKEN_FILE=str(site.admin_token_path),
                   KVMOTION_CA_FILE=str(site.ca_path))
    return subprocess.run([sys.executable, "-m", "kvmotion.cli.main", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def controller_client(lab: Any, controller: str) -> Client:
    """The product's client as the admin of one lab controller ("a", "b"); ``load`` made its CA trusted."""
    site = lab.controllers[controller]
    return Client(site.url, token=site.admin_token())


def controller_http(lab: Any, controller: str, token: str | None = None) -> httpx.Client:
    """A raw HTTPS client for one lab controller ("a", "b") that trusts only its CA, as its admin (or with
    ``token``): ``controller_http(lab, "a", token=lab.controllers["b"].admin_token())`` is B's admin calling A."""
    site = lab.controllers[controller]
    return httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {token or site.admin_token()}"},
                        verify=ssl.create_default_context(cafile=str(site.ca_path)), timeout=30)


def codes(findings: list[dict]) -> dict[str, dict]:
    return {f["code"]: f for f in findings}


@contextlib.contextmanager
def host_settings(lab: Any, host: str, **changes: Any) -> Iterator[AgentConfig]:
    """Change a host's agent configuration (a lab setting) for the duration of a block, then restore it."""
    original = AgentConfig.load(services.agent_config_path(Path(lab.root), host))
    try:
        yield lab_mod.configure_host(lab.root, host, **changes)
    finally:
        lab_mod.configure_host(lab.root, host, **original.model_dump())


def record_fault(fault: str, phase: str, fault_at: float, task: dict) -> None:
    """One row of the fault table (closing notes, docs): appended to ``$KVMOTION_FAULT_TABLE`` when set."""
    out = os.environ.get("KVMOTION_FAULT_TABLE")
    if not out:
        return
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
SURVIVAL_TIMEOUT_S = 20.0


def record_figure(name: str, value: float, unit: str) -> None:
    """A measured number that depends on the machine (a time, a rate, a count of lost packets): never asserted
    against a bound, only recorded. Appended as one JSON line to ``$KVMOTION_FIGURES`` when set (CI prints them)."""
    out = os.environ.get("KVMOTION_FIGURES")
    if not out:
        return
    row = {"name": name, "value": float(value), "unit": unit, "test": os.environ.get("PYTEST_CURRENT_TEST")}
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def excuse(signature_name: str, evidence: str) -> None:
    """The only allowed excuse: an exact, proven QEMU failure signature, named, with the evidence seen in this run.
    An expected failure whose reason starts with ``EXCUSED[``; conftest counts them and CI fails on more than one."""
    import pytest

    pytest.xfail(f"EXCUSED[{signature_name}]: {evidence}")


def console_tail(lab: Any, client: Client, name: str, lines: int = 40) -> list[str]:
    """The last lines of the guest's serial console, from the agent's ``/v1/vms/{uuid}/serial`` endpoint on the
    host the inventory names (every other lab host is asked too when that one has nothing)."""
    try:
        vm = client.vm(name)
    except Exception:  # noqa: BLE001 - a diagnosis must not raise
        return []
    hosts = [vm["host"]] + [h.name for h in lab.net.hosts if h.name != vm["host"]]
    for host in hosts:
        try:
            r = agent_call(lab, host, "GET", f"/v1/vms/{vm['uuid']}/serial", params={"lines": 1000})
            out = r.json() if r.status_code == 200 else []
        except (httpx.HTTPError, ValueError, OSError):
            out = []
        if out:
            return [f"[{host}] {ln}" for ln in out[-lines:]] if host != vm["host"] else out[-lines:]
    return []


def http_beat(lab: Any, client: Client, name: str, timeout: float = scenario.GUEST_BOOT_DEADLINE_S) -> dict:
    """The guest's HTTP heartbeat as a client fetches it from the client namespace (waits for the first answer):
    the ``before`` of :func:`assert_guest_survived`."""
    return scenario.wait_guest(lab.net.client_netns, client.vm(name)["spec"]["guest_ip"], timeout)


def _crash_lines(lab: Any, client: Client, name: str) -> tuple[list[str], list[str]]:
    full = console_tail(lab, client, name, lines=1000)
    return [ln for ln in full if any(m in ln for m in CRASH_MARKERS)], full[-40:]


def guest_diagnosis(lab: Any, client: Client, name: str, what: str, headline: str = "broke") -> str:
    """``what`` broke, with where the VM is, what its QEMU says, crash markers and the console tail."""
    try:
        vm = client.vm(name)
        where = f"inventory host {vm['host']}, QEMU status {(vm.get('runtime') or {}).get('qemu_status')!r}"
        accel = (client.host(vm["host"]).get("facts") or {}).get("accelerator")
        where += f", accelerator {accel}"
    except Exception as exc:  # noqa: BLE001
        where = f"inventory unreadable ({exc})"
    markers, tail = _crash_lines(lab, client, name)
    parts = [f"guest {name} {headline}: {what}", f"  ({where})"]
    if markers:
        parts.append("  crash marker on the console: " + " | ".join(markers[:5]))
    parts.append("  console tail (agent /v1/vms/{uuid}/serial):")
    parts += [f"    {ln}" for ln in tail] or ["    (empty)"]
    return "\n".join(parts)


def assert_guest_survived(lab: Any, client: Client, name: str, before: dict | None,
                          timeout: float = SURVIVAL_TIMEOUT_S) -> dict:
    """The guest kept running through a move, as a client sees it: within ``timeout`` its HTTP heartbeat, fetched
    from the client namespace, answers with the same boot_id and a higher seq than ``before`` (also an HTTP
    heartbeat). Otherwise the test fails saying what broke: rebooted (a new boot_id), heartbeat went backwards or
    stood still, no answer over the network; with crash markers and the console tail. Returns the new heartbeat."""
    import pytest

    if not before:
        pytest.fail(guest_diagnosis(lab, client, name, "no HTTP heartbeat from before the move to compare with "
                                    "(fetch it with http_beat, which waits for an answer)", headline="not checked"))
    ip = client.vm(name)["spec"]["guest_ip"]
    b_seq, b_boot = int(before["seq"]), before["boot_id"]
    start = time.monotonic()
    last: dict | None = None
    while True:
        hb = scenario.guest_heartbeat(lab.net.client_netns, ip)
        if hb is not None:
            last = hb
            if hb.get("boot_id") != b_boot:
                pytest.fail(guest_diagnosis(lab, client, name, (
                    f"rebooted: new boot_id {hb.get('boot_id')} (before {b_boot}), uptime {hb.get('uptime')} s, "
                    f"seq {hb.get('seq')}")))
            if int(hb["seq"]) < b_seq:
                pytest.fail(guest_diagnosis(lab, client, name, (
                    f"heartbeat went backwards: seq {hb['seq']} after {b_seq} (same boot_id {b_boot})")))
            if int(hb["seq"]) > b_seq:
                return {**hb, "seq": int(hb["seq"])}
        if time.monotonic() - start > timeout:
            break
        time.sleep(0.5)
    if last is None:
        what = (f"no answer over the network: no HTTP heartbeat from {ip} to the client namespace within "
                f"{timeout:.0f} s (last seen seq {b_seq})")
    else:
        what = (f"heartbeat stood still: seq {last['seq']} for {timeout:.0f} s (before the move {b_seq}), "
                f"boot_id {b_boot}")
    pytest.fail(guest_diagnosis(lab, client, name, what))


LAB_ROOT_BASE = Path("/tmp/kvmotion-tests")


def leftovers(prefix: str, root: Path) -> dict[str, list[str]]:
    """Namespaces and QEMU processes that belong to the lab (prefix, root) and still exist."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.split()
    ours_ns = [n for n in ns if n.startswith(prefix + "-")]
    qemus = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"qemu-system") and str(root).encode() in cmd:
            qemus.append(pid)
    return {"namespaces": ours_ns, "qemu_pids": qemus}


@contextlib.contextmanager
def running_lab(image, hosts: int, controllers: int = 1, ipv6_hosts: frozenset[str] = frozenset(),
                link: str | None = None, database_url: str | None = None) -> Iterator:
    """A lab for one test module (``hosts`` per controller). Torn down at the end, also when a test fails; nothing
    may be left. The environment's token and CA (the Client's and the CLI's) are controller A's."""
    prefix = "kt" + secrets.token_hex(2)
    root = LAB_ROOT_BASE / prefix
    info = lab_mod.up(hosts, root, prefix=prefix, image_dir=image.kernel.parent.parent, ipv6_hosts=set(ipv6_hosts),
                      log=lambda m: None, link=link, controllers=controllers, database_url=database_url)
    saved = {k: os.environ.get(k) for k in ("KVMOTION_TOKEN_FILE", "KVMOTION_CA_FILE")}
    os.environ["KVMOTION_TOKEN_FILE"] = str(lab_mod.admin_token_path(root))   # the Client and the CLI use it
    os.environ["KVMOTION_CA_FILE"] = str(lab_mod.sites.ca_path(root))              # the CLI trusts the lab's CA
    try:
        yield info
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        lab_mod.down(root)
        left = leftovers(prefix, root)
        assert left == {"namespaces": [], "qemu_pids": []}, f"the lab left things behind: {left}"

"""Guest integration through qemu-guest-agent, in the lab with real QEMU guests.

- The Debian 12 guest (qemu-guest-agent started at boot by its udev rule): its facts in `vm show` before and after
  a vMotion (same hostname and OS, its address); its clock set 30 s wrong through the guest agent, then a vMotion
  sets it right again (the task's ``guest_clock``) and the CLI's summary shows it; `vm reboot` gives a new boot
  (a new boot_id from its HTTP heartbeat) and it stays powered on; `vm shutdown` ends powered off without --force;
  a guest that powers itself off is followed by the inventory.
- The tiny guest (no guest agent): a guest-agent call gives the clear GUEST_AGENT_SILENT error naming the fix,
  `vm show` says "not answering" without waiting long, a vMotion records ``set: false, why: "guest agent not
  answering"``, `vm reboot` resets it and says so, `vm shutdown` falls back to ACPI (which this guest ignores): the
  timeout, then --force; a QEMU that ends by itself is followed by the inventory.

Measured (labtools.record_figure): the clock offsets before and after the move, and how long a graceful shutdown
and a reboot took.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from kvmotion.agent.hv.qemu.guestagent import GuestAgent
from kvmotion.cli.client import Client
from kvmotion.common.errors import KvmotionError
from kvmotion.models.guest import CLOCK_STEP_MS
from kvmotion_lab import scenario
from labtools import agent_vms, cli, http_beat, record_figure, running_vm, wait_for

DEB = "ga-deb"
TINY = "ga-tiny"


@pytest.fixture(scope="module")
def lab(guest_image, debian_image):
    from labtools import running_lab
    from kvmotion_lab.lab import stage_image
    with running_lab(guest_image, 2) as info:
        stage_image(Path(info.root), debian_image.disk)
        yield info


@pytest.fixture(scope="module")
def client(lab) -> Client:
    return Client(lab.controller_url, timeout=300)


def qga(lab, client: Client, name: str, command: str, args: dict[str, Any] | None = None,
        reply: bool = True) -> Any:
    """A guest-agent command straight on the VM's channel (the agent holds it only while it asks)."""
    vm = client.vm(name)
    sock = Path(lab.root) / "hosts" / vm["host"] / "vms" / vm["uuid"] / "qga.sock"
    return asyncio.run(GuestAgent(name, str(sock)).execute(command, args, deadline_s=10, reply=reply))


def guest_offset_ms(lab, client: Client, name: str) -> float:
    t0 = time.time_ns()
    guest = qga(lab, client, name, "guest-get-time")
    return (guest - (t0 + time.time_ns()) / 2) / 1e6


def wait_agent(client: Client, name: str, timeout: float = 240) -> dict:
    """The guest's facts, once its guest agent answers (it starts with the guest's udev)."""
    def ask() -> dict | None:
        try:
            return client.guest(name)
        except KvmotionError:
            return None
    return wait_for(ask, timeout, f"the guest agent of {name}")


def follow(client: Client, task: dict) -> dict:
    t = scenario.follow_task(client, task["id"], timeout_s=600)
    assert t["state"] == "success", t.get("error")
    return t


@pytest.fixture(scope="module")
def deb(lab, client) -> str:
    client.create_vm(name=DEB, host="h1", memory_mb=512, image="shared:images/debian.qcow2", clone="linked",
                     datastore="shared")
    client.start_vm(DEB)
    http_beat(lab, client, DEB, timeout=300)
    return DEB


def test_debian_guest_facts_and_its_clock_through_a_vmotion(lab, client, deb) -> None:
    t0 = time.monotonic()
    facts = wait_agent(client, deb)
    record_figure("guest_agent_answering_after_http_s", time.monotonic() - t0, "s")
    ip = client.vm(deb)["spec"]["guest_ip"]
    assert facts["guest_agent"] == "answering" and facts["agent_version"]
    assert facts["os"]["id"] == "debian" and facts["os"]["version_id"] == "12"
    assert facts["hostname"] == "kvmotion-debian"
    assert ip in facts["ip_addresses"], facts["ip_addresses"]
    assert any(fs["mountpoint"] == "/" for fs in facts["filesystems"])

    shown = client.vm(deb, refresh_guest=True)["runtime"]["guest"]       # vm show carries them
    assert shown["guest_agent"] == "answering" and shown["hostname"] == "kvmotion-debian" and not shown["cached"]
    again = client.vm(deb)["runtime"]["guest"]
    assert again["cached"] and again["collected_at"] == shown["collected_at"]

    # the guest clock 30 s behind its host, through the guest agent; the vMotion sets it right
    qga(lab, client, deb, "guest-set-time", {"time": time.time_ns() - 30_000_000_000})
    wrong = guest_offset_ms(lab, client, deb)
    assert -31_000 < wrong < -29_000, wrong
    task = follow(client, client.migrate(deb, "h2"))
    clock = task["result"]["guest_clock"]
    assert clock["offset_before_ms"] is not None and clock["offset_after_ms"] is not None, clock
    record_figure("guest_clock_offset_before_ms", clock["offset_before_ms"], "ms")
    record_figure("guest_clock_offset_after_ms", clock["offset_after_ms"], "ms")
    record_figure("guest_clock_sync_s", clock["seconds"], "s")
    assert clock["set"] is True and clock["host"] == "h2", clock
    assert -31_500 < clock["offset_before_ms"] < -29_000, clock
    assert abs(clock["offset_after_ms"]) < 500, clock
    assert abs(guest_offset_ms(lab, client, deb)) < 1000                 # and it stays right

    after = client.vm(deb, refresh_guest=True)
    g = after["runtime"]["guest"]
    assert after["host"] == "h2" and g["guest_agent"] == "answering"
    assert (g["hostname"], g["os"]["pretty_name"]) == (facts["hostname"], facts["os"]["pretty_name"])
    assert ip in g["ip_addresses"]

    res = cli(lab, "vm", "migrate", deb, "--host", "h1")                # the CLI's summary shows the clock
    assert res.returncode == 0, res.stdout + res.stderr
    # the move's own pause puts the guest clock behind by about the downtime (TCG's clock stops while paused):
    # set when that passes the step (128 ms), else left alone; the summary says which, consistently
    row = re.search(r"guest clock \(guest − host\)\W+([+-][0-9.]+) ms → ([+-]?[0-9.]+) ms, (set|left alone)", res.stdout)
    assert row, res.stdout
    verdict = "set" if abs(float(row.group(1))) > CLOCK_STEP_MS else "left alone"
    assert row.group(3) == verdict, res.stdout
    if verdict == "set":
        assert abs(float(row.group(2))) < 500, res.stdout
    res = cli(lab, "vm", "guest", deb)
    assert res.returncode == 0 and "kvmotion-debian" in res.stdout and "Debian GNU/Linux 12" in res.stdout, \
        res.stdout + res.stderr


def test_debian_reboot_is_a_new_boot_and_it_stays_powered_on(lab, client, deb) -> None:
    before = http_beat(lab, client, deb)
    wait_agent(client, deb)
    t0 = time.monotonic()
    res = cli(lab, "vm", "reboot", deb, "--timeout", "180")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rebooted" in res.stdout and "through its guest agent" in res.stdout, res.stdout
    took = re.search(r"after ([0-9.]+)s", res.stdout)
    assert took, res.stdout
    record_figure("guest_reboot_until_reset_s", float(took.group(1)), "s")     # request → the guest's RESET
    beat = wait_for(lambda: (b := scenario.guest_heartbeat(lab.net.client_netns, client.vm(deb)["spec"]["guest_ip"]))
                    and b["boot_id"] != before["boot_id"] and b, 300, "the guest back after its reboot")
    record_figure("guest_reboot_until_http_s", time.monotonic() - t0, "s")
    assert beat["boot_id"] != before["boot_id"]
    vm = client.vm(deb)
    assert vm["power_state"] == "poweredOn" and vm["runtime"]["qemu_status"] == "running"


def test_debian_shutdown_powers_off_and_a_guest_power_off_is_followed(lab, client, deb) -> None:
    wait_agent(client, deb)
    out = client.shutdown_vm(deb, timeout_s=180)
    r = out["result"]
    record_figure("guest_shutdown_graceful_s", r["seconds"], "s")
    assert (r["method"], r["outcome"], r["forced"]) == ("guest-agent", "poweredOff", False), r
    assert out["vm"]["power_state"] == "poweredOff"
    uuid = out["vm"]["uuid"]
    assert uuid not in agent_vms(lab, client.vm(deb)["host"])

    # the guest powers itself off (its agent asked straight on the channel: the controller did not ask)
    client.start_vm(deb)
    http_beat(lab, client, deb, timeout=300)
    wait_agent(client, deb)
    asked = time.monotonic()
    qga(lab, client, deb, "guest-shutdown", {"mode": "powerdown"}, reply=False)
    wait_for(lambda: client.vm(deb)["power_state"] == "poweredOff", 120, "the inventory to follow the power-off")
    record_figure("guest_power_off_seen_by_inventory_s", time.monotonic() - asked, "s")
    assert uuid not in agent_vms(lab, client.vm(deb)["host"])
    client.start_vm(deb)                                   # its disk leases were released: it starts again
    assert client.vm(deb)["power_state"] == "poweredOn"
    client.stop_vm(deb)
    client.delete_vm(deb)


def test_tiny_guest_without_an_agent(lab, client) -> None:
    vm = running_vm(client, lab, TINY)
    t0 = time.monotonic()
    with pytest.raises(KvmotionError) as err:
        client.guest(TINY)
    assert time.monotonic() - t0 < 10
    e = err.value
    assert e.code == "GUEST_AGENT_SILENT" and "did not answer" in e.message and "qemu-guest-agent" in e.remedy, e
    res = cli(lab, "vm", "guest", TINY)
    assert res.returncode != 0 and "install and start qemu-guest-agent" in res.stderr, res.stdout + res.stderr

    t0 = time.monotonic()
    shown = client.vm(TINY)["runtime"]["guest"]
    record_figure("vm_show_silent_guest_agent_s", time.monotonic() - t0, "s")
    assert shown["guest_agent"] == "not answering" and "qemu-guest-agent" in shown["remedy"]
    assert time.monotonic() - t0 < 6
    t0 = time.monotonic()
    shown = client.vm(TINY, refresh_guest=True)["runtime"]["guest"]     # asked now: the short deadline, no more
    record_figure("vm_show_refresh_silent_guest_agent_s", time.monotonic() - t0, "s")
    assert shown["guest_agent"] == "not answering" and time.monotonic() - t0 < 6

    task = follow(client, client.migrate(TINY, "h2"))                    # the clock is not checked, the move is fine
    assert task["result"]["guest_clock"]["set"] is False
    assert task["result"]["guest_clock"]["why"] == "guest agent not answering"

    before = http_beat(lab, client, TINY)
    res = cli(lab, "vm", "reboot", TINY)
    assert res.returncode == 0 and "was reset" in res.stdout and "no ACPI reboot" in res.stdout, res.stdout
    after = wait_for(lambda: (b := scenario.guest_heartbeat(lab.net.client_netns, vm["spec"]["guest_ip"]))
                     and b["boot_id"] != before["boot_id"] and b, 120, "the tiny guest back after its reset")
    assert after["boot_id"] != before["boot_id"] and client.vm(TINY)["power_state"] == "poweredOn"

    res = cli(lab, "vm", "shutdown", TINY, "--timeout", "5")          # ACPI, which this guest ignores
    out = res.stdout + res.stderr
    record_figure("tiny_guest_honours_acpi", float(res.returncode == 0), "bool")
    if res.returncode == 0:                                           # (a guest that honours it powers off)
        assert "by the ACPI power button" in out and client.vm(TINY)["power_state"] == "poweredOff", out
        client.start_vm(TINY)
    else:
        assert "did not power off within 5s" in out and "ACPI power button" in out and "--force" in out, out
        assert client.vm(TINY)["power_state"] == "poweredOn"
        res = cli(lab, "vm", "shutdown", TINY, "--timeout", "3", "--force")
        assert res.returncode == 0 and "hard-stopped (--force)" in res.stdout, res.stdout + res.stderr
        assert client.vm(TINY)["power_state"] == "poweredOff"
        client.start_vm(TINY)

    # a QEMU that ends by itself (SIGTERM: QEMU shuts down and exits) is followed by the inventory
    host = client.vm(TINY)["host"]
    os.kill(agent_vms(lab, host)[vm["uuid"]]["pid"], signal.SIGTERM)
    wait_for(lambda: client.vm(TINY)["power_state"] == "poweredOff", 60, "the inventory to follow the exit")
    assert vm["uuid"] not in agent_vms(lab, host)
    client.delete_vm(TINY)

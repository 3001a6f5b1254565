"""More devices (issue 17), end to end with real QEMU in the lab: the tiny guest with three disks on three buses and
two NICs (one on a VLAN port group) is vMotioned, gets a virtio-scsi disk hot-plugged, goes back and is
Storage-vMotioned, every disk moving, the guest answering over HTTP from the client namespace after each move.
Then the refusals: a duplicate MAC, a disk on a bus that cannot be hot-plugged, a VLAN port group missing on the
destination."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from kvmotion.agent.config import VlanPortGroup
from kvmotion.agent.hv.qemu.argv import tap_name
from kvmotion.cli.client import Client
from kvmotion.common.errors import KvmotionError
from kvmotion_lab import lab as lab_mod
from kvmotion_lab import scenario
from labtools import agent_vms, assert_guest_survived, cli, codes, http_beat, record_figure, remove_vm, wait_for

VLAN100 = VlanPortGroup(name="VLAN 100", bridge="vmnet", vlan=100, uplinks=["uplink0"])
VLAN200 = VlanPortGroup(name="VLAN 200", bridge="vmnet", vlan=200, uplinks=["uplink0"])


@pytest.fixture(scope="module")
def vlan_lab(lab):
    """h1 has VLAN 100 and VLAN 200, h2 only VLAN 100 (the agents restart; the controller sees the new facts)."""
    client = Client(lab.controller_url)
    for host, groups in (("h1", [VLAN100, VLAN200]), ("h2", [VLAN100])):
        lab_mod.configure_host(lab.root, host, vlan_portgroups=groups)
        wait_for(lambda: {g.name for g in groups} <= {p["name"] for p in client.host(host)["facts"]["portgroups"]},
                 30, f"the VLAN port groups of {host}")
    return lab


def kernel_has_vlan_filtering(lab, host: str = "h1") -> bool:
    """This machine's kernel may lack bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING): then no VLAN tap."""
    return subprocess.run(["ip", "netns", "exec", lab.host_netns(host), "test", "-e",
                           "/sys/class/net/vmnet/bridge/vlan_filtering"], timeout=10).returncode == 0


def follow(client: Client, task: dict) -> dict:
    done = scenario.follow_task(client, task["id"], timeout_s=300)
    assert done["state"] == "success", done.get("error")
    return done


def qemu_cmdline(lab, host: str, uuid: str) -> str:
    pid = agent_vms(lab, host)[uuid]["pid"]
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode()


def devices_of(cmdline: str) -> list[str]:
    """The -device arguments of a QEMU command line, in order."""
    parts = cmdline.split(" ")
    return [parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "-device"]


def tap_vlans(lab, host: str, tap: str) -> list[dict]:
    out = subprocess.run(["ip", "netns", "exec", lab.host_netns(host), "bridge", "-j", "vlan", "show", "dev", tap],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    data = json.loads(out or "[]")
    return data[0]["vlans"] if data else []


def _create_and_vmotion(lab, client: Client) -> tuple[dict, dict]:
    """dv1 on h1: 3 disks on 3 buses, 2 NICs (the second on VLAN 100 where the kernel can), vMotioned to h2."""
    vlan = kernel_has_vlan_filtering(lab)     # without it the second NIC is untagged (see the VLAN test below)
    second = "VLAN 100" if vlan else "VM Network"
    out = cli(lab, "vm", "create", "dv1", "--host", "h1", "--datastore", "shared", "--cpus", "2", "--sockets", "1",
              "--cores", "2", "--threads", "1", "--machine", "pc-q35-7.2",
              "--disk", "size=1,bus=virtio-scsi", "--disk", "size=1,bus=sata,format=raw",
              "--nic", "VM Network", "--nic", f"{second},model=virtio")
    assert out.returncode == 0, out.stderr
    client.start_vm("dv1")
    vm = client.vm("dv1")
    assert [(d["id"], d["bus"], d["unit"]) for d in vm["spec"]["disks"]] == [
        ("disk0", "virtio-blk", None), ("disk1", "virtio-scsi", 0), ("disk2", "sata", 0)]
    assert [n["portgroup"] for n in vm["spec"]["nics"]] == ["VM Network", second]
    before = http_beat(lab, client, "dv1")
    if vlan:
        vlans = tap_vlans(lab, "h1", tap_name(vm["uuid"], 1))
        assert [(v["vlan"], sorted(v.get("flags", []))) for v in vlans] == [(100, ["Egress Untagged", "PVID"])]
    source_devices = devices_of(qemu_cmdline(lab, "h1", vm["uuid"]))
    follow(client, client.migrate("dv1", "h2"))           # the destination runs the same devices (ids, addresses)
    before = assert_guest_survived(lab, client, "dv1", before)
    assert devices_of(qemu_cmdline(lab, "h2", vm["uuid"])) == source_devices
    if vlan:
        assert tap_vlans(lab, "h2", tap_name(vm["uuid"], 1))[0]["vlan"] == 100
    return vm, before


def _hot_plug_and_back(lab, client: Client, vm: dict, before: dict) -> dict:
    """A SATA disk is refused while it runs; a virtio-scsi disk is hot-plugged on h2 and moves with it to h1."""
    with pytest.raises(KvmotionError) as exc:
        client.call("POST", "/vms/dv1/disks", {"size_gb": 1, "bus": "sata"})
    assert exc.value.code == "CONFLICT" and exc.value.details["bus"] == "sata" and "virtio-scsi" in exc.value.remedy
    assert len(client.vm("dv1")["spec"]["disks"]) == 3
    out = cli(lab, "vm", "disk", "add", "dv1", "size=1,bus=virtio-scsi")
    assert out.returncode == 0, out.stderr
    disks = client.vm("dv1")["spec"]["disks"]
    assert (disks[-1]["id"], disks[-1]["bus"], disks[-1]["unit"]) == ("disk3", "virtio-scsi", 1)
    assert "disk3" in {d["id"] for d in agent_vms(lab, "h2")[vm["uuid"]]["spec"]["disks"]}
    follow(client, client.migrate("dv1", "h1"))
    before = assert_guest_survived(lab, client, "dv1", before)
    back = devices_of(qemu_cmdline(lab, "h1", vm["uuid"]))
    assert any(d.startswith("scsi-hd,drive=d3,id=disk3,bus=scsi0.0,channel=0,scsi-id=1") for d in back), back
    return before


def _every_disk_moves(lab, client: Client, vm: dict, before: dict) -> None:
    """Storage vMotion, hot-unplug, shared-nothing vMotion, cold migration: every disk moves each time."""
    follow(client, client.migrate("dv1", datastore="h1-local"))
    before = assert_guest_survived(lab, client, "dv1", before)
    moved = client.vm("dv1")["spec"]
    assert [d["datastore"] for d in moved["disks"]] == ["h1-local"] * 4 and moved["boot_datastore"] == "h1-local"
    assert {d["datastore"] for d in agent_vms(lab, "h1")[vm["uuid"]]["spec"]["disks"]} == {"h1-local"}
    out = cli(lab, "vm", "disk", "remove", "dv1", "disk3")        # the hot-plugged disk comes out while it runs
    assert out.returncode == 0, out.stderr
    assert [d["id"] for d in client.vm("dv1")["spec"]["disks"]] == ["disk0", "disk1", "disk2"]
    follow(client, client.migrate("dv1", "h2", datastore="h2-local"))
    assert_guest_survived(lab, client, "dv1", before)
    assert [d["datastore"] for d in client.vm("dv1")["spec"]["disks"]] == ["h2-local"] * 3
    client.stop_vm("dv1")
    follow(client, client.migrate("dv1", "h1", datastore="shared"))
    assert [d["datastore"] for d in client.vm("dv1")["spec"]["disks"]] == ["shared"] * 3
    client.start_vm("dv1")
    http_beat(lab, client, "dv1")


def test_three_disks_two_nics_move_hot_plug_and_every_kind_of_move(vlan_lab) -> None:
    lab, client = vlan_lab, Client(vlan_lab.controller_url)
    t0 = time.monotonic()
    vm, before = _create_and_vmotion(lab, client)
    before = _hot_plug_and_back(lab, client, vm, before)
    _every_disk_moves(lab, client, vm, before)
    record_figure("devices e2e (create, 2 vMotions, hot-plug, Storage vMotion, xvMotion, cold)",
                  time.monotonic() - t0, "s")
    remove_vm(client, "dv1")


def test_a_duplicate_mac_is_refused_and_nothing_is_made(vlan_lab) -> None:
    lab, client = vlan_lab, Client(vlan_lab.controller_url)
    first = client.create_vm(name="mac1", host="h1", nics=[{"portgroup": "VM Network", "mac": "52:54:00:12:34:56"}])
    out = cli(lab, "vm", "create", "mac2", "--host", "h1", "--nic", "VM Network,mac=52:54:00:12:34:56")
    assert out.returncode == 2 and "52:54:00:12:34:56" in out.stderr and "mac1" in out.stderr, out.stderr
    assert "mac2" not in {v["name"] for v in client.vms()}
    with pytest.raises(KvmotionError) as exc:
        client.call("POST", "/vms/mac1/nics", {"portgroup": "VLAN 100", "mac": "52:54:00:12:34:56"})
    assert exc.value.details == {"mac": "52:54:00:12:34:56", "vm": "mac1", "nic": "nic0"}
    second = client.create_vm(name="mac3", host="h1", nics=[{"portgroup": "VM Network"}, {"portgroup": "VLAN 100"}])
    macs = [n["mac"] for v in (first, second) for n in v["spec"]["nics"]]
    assert len(set(macs)) == 3 and all(m.startswith("52:54:00:") for m in macs)
    for name in ("mac1", "mac3"):
        remove_vm(client, name)


def test_a_vlan_port_group_missing_on_the_destination_is_a_finding(vlan_lab) -> None:
    client = Client(vlan_lab.controller_url)
    client.create_vm(name="vl2", host="h1", nics=[{"portgroup": "VM Network"}, {"portgroup": "VLAN 200"}])
    found = codes(client.validate("vl2", "h2"))
    assert found["PORTGROUP_VLAN_MISSING"]["severity"] == "error", found
    message = found["PORTGROUP_VLAN_MISSING"]["message"]
    assert "VLAN 200" in message and "not on h2" in message and "h2" in found["PORTGROUP_VLAN_MISSING"]["remedy"]
    on_h1 = codes(client.validate("vl2", "h1")).get("PORTGROUP_VLAN_MISSING")
    if kernel_has_vlan_filtering(vlan_lab):
        assert on_h1 is None, on_h1
    else:
        assert "cannot be used on h1" in on_h1["message"] and "VLAN filtering" in on_h1["message"], on_h1
        # this kernel cannot put a tap on a VLAN: the start is refused saying so, and nothing runs
        with pytest.raises(KvmotionError) as exc:
            client.start_vm("vl2")
        assert "VLAN filtering" in exc.value.message and exc.value.details["portgroup"] == "VLAN 200", exc.value
        assert client.vm("vl2")["power_state"] == "poweredOff" and not agent_vms(vlan_lab, "h1")
        found = [f for f in client.host("h1")["facts"]["portgroups"] if f["name"] == "VLAN 200"]
        assert found[0]["problem"] and found[0]["vlan"] == 200
    remove_vm(client, "vl2")

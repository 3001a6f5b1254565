"""More devices (issue 17): disk and NIC requests, MAC uniqueness, vCPU topology, hot-plug rules, VLAN taps."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kvmotion.agent.hv.qemu.argv import device_props, disk_device
from kvmotion.agent.hv.qemu.hotplug import check_hotplug_bus
from kvmotion.agent.hv.qemu.process import vlan_commands
from kvmotion.cli.devices import parse_disk, parse_nic
from kvmotion.common.errors import DuplicateMac, HotplugUnsupported, InvalidInputError, WrongState
from kvmotion.controller import devices
from kvmotion.controller.db import VM, Host
from kvmotion.controller.service import Controller
from kvmotion.models.agent import DatastoreFact, DiskSpec, HostFacts, NicSpec, PortGroupFact, VMSpec
from kvmotion.models.api import VMCreate
from kvmotion.models.devices import DiskRemoveRequest, DiskRequest, NicRequest
from kvmotion.models.hardware import MAC_PREFIX, mac_problem, topology_problem

pytestmark = pytest.mark.unit


def _facts() -> HostFacts:
    return HostFacts(name="h1", agent_version="0", qemu_version="7.2", accelerator="tcg", cpu_model="x",
                     cpu_features=[], cpu_count=2, mem_total_mb=4096, mem_free_mb=4096, mgmt_address="198.18.0.11",
                     mgmt_family="ipv4", migration_interfaces=[],
                     datastores=[DatastoreFact(uuid="u", name="shared", path="/ds", readable=True)],
                     portgroups=[PortGroupFact(name="VM Network", bridge="vmnet"),
                                 PortGroupFact(name="VLAN 100", bridge="vmnet", vlan=100)],
                     machine_types=["pc-i440fx-7.2", "pc-q35-7.2"])


def _spec(uuid: str, name: str, macs: list[str], **kw: Any) -> VMSpec:
    return VMSpec(uuid=uuid, name=name, boot_datastore="shared", folder=name,
                  disks=[DiskSpec(datastore="shared", path=f"{name}/{name}.qcow2")],
                  nics=[NicSpec(id=f"nic{i}", mac=m) for i, m in enumerate(macs)], **kw)


@pytest.fixture()
def ctl(tmp_path: Path, db_url: str) -> Controller:
    c = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    with c.sessions.begin() as s:
        s.add(Host(name="h1", address="http://127.0.0.1:9", facts_json=_facts().model_dump_json()))
        s.add(VM(uuid="u-1", name="vm1", host="h1", power_state="poweredOff",
                 spec_json=_spec("u-1", "vm1", ["52:54:00:aa:bb:01"]).model_dump_json()))
        s.add(VM(uuid="u-2", name="vm2", host="h1", power_state="poweredOn",
                 spec_json=_spec("u-2", "vm2", ["52:54:00:aa:bb:02"]).model_dump_json()))
    return c


# -- requests and rules ----------------------------------------------------------------------------------------------
def test_topology_must_multiply_to_the_vcpus() -> None:
    assert topology_problem(4, None, None, None) is None
    assert topology_problem(4, 2, 2, 1) is None
    assert "2 x 2 x 2 = 8" in (topology_problem(4, 2, 2, 2) or "")
    assert "together" in (topology_problem(4, 2, None, None) or "")
    with pytest.raises(ValidationError, match="sockets x cores x threads"):
        VMCreate(name="v", host="h1", vcpus=4, sockets=3, cores=1, threads=1)
    with pytest.raises(ValidationError, match="sockets x cores x threads"):
        _spec("u", "v", [], vcpus=2, sockets=1, cores=1, threads=1)
    assert _spec("u", "v", [], vcpus=2, sockets=1, cores=2, threads=1).cores == 2


def test_disk_and_nic_requests_are_checked() -> None:
    assert DiskRequest(size_gb=2, bus="virtio-scsi").format == "qcow2"
    for bad in ({"size_gb": 0}, {"size_gb": 1, "bus": "ide"}, {"size_gb": 1, "format": "vmdk"},
                {"size_gb": 1, "datastore": "../x"}, {"size_gb": 1, "color": "red"}):
        with pytest.raises(ValidationError):
            DiskRequest.model_validate(bad)
    assert NicRequest(portgroup="VLAN 100", mac="52:54:00:AA:BB:0C").mac == "52:54:00:aa:bb:0c"
    with pytest.raises(ValidationError, match="multicast"):
        NicRequest(portgroup="VM Network", mac="01:00:5e:00:00:01")
    with pytest.raises(ValidationError, match="model"):
        NicRequest(portgroup="VM Network", model="rtl8139")
    with pytest.raises(ValidationError, match="same MAC"):
        VMCreate(name="v", host="h1", nics=[NicRequest(portgroup="a", mac="52:54:00:00:00:01"),
                                            NicRequest(portgroup="b", mac="52:54:00:00:00:01")])
    assert mac_problem("ff:ff:ff:ff:ff:ff") and mac_problem("52:54:00:00:00") and not mac_problem("52:54:00:0a:0b:0c")


def test_cli_parses_disk_and_nic_options() -> None:
    assert parse_disk("size=2,bus=virtio-scsi,datastore=ds2,format=raw") == {
        "size_gb": 2, "bus": "virtio-scsi", "datastore": "ds2", "format": "raw"}
    assert parse_nic("VLAN 100,mac=52:54:00:00:00:01,model=e1000e") == {
        "portgroup": "VLAN 100", "mac": "52:54:00:00:00:01", "model": "e1000e"}
    assert parse_nic("VM Network") == {"portgroup": "VM Network"}
    for bad in ("bus=sata", "size=two", "size=1,colour=red"):
        with pytest.raises(InvalidInputError):
            parse_disk(bad)
    with pytest.raises(InvalidInputError):
        parse_nic("mac=52:54:00:00:00:01")


def test_an_old_spec_loads_with_the_old_devices() -> None:
    old = {"uuid": "u", "name": "v", "boot_datastore": "ds", "folder": "v",
           "disks": [{"id": "disk0", "node": "d0", "datastore": "ds", "path": "v/v.qcow2"}],
           "nics": [{"id": "nic0", "mac": "52:54:00:00:00:01", "portgroup": "VM Network"}]}
    spec = VMSpec.model_validate(old)
    assert (spec.disks[0].bus, spec.disks[0].unit, spec.nics[0].model) == ("virtio-blk", None, "virtio")
    assert (spec.sockets, spec.scsi_controller) == (None, False)


# -- disks -----------------------------------------------------------------------------------------------------------
def test_new_disks_get_the_next_ids_and_fixed_units_per_bus() -> None:
    disks = [DiskSpec(datastore="shared", path="v/v.qcow2")]
    for bus in ("virtio-scsi", "sata", "virtio-scsi", "virtio-blk"):
        disks.append(devices.make_disk(DiskRequest(size_gb=1, bus=bus), "v", "shared", ["shared"], "h1", disks))
    assert [(d.id, d.node, d.bus, d.unit) for d in disks[1:]] == [
        ("disk1", "d1", "virtio-scsi", 0), ("disk2", "d2", "sata", 0), ("disk3", "d3", "virtio-scsi", 1),
        ("disk4", "d4", "virtio-blk", None)]
    assert disks[2].path == "v/v-disk2.qcow2" and disks[1].size_mb == 1024
    with pytest.raises(InvalidInputError, match="not accessible"):
        devices.make_disk(DiskRequest(size_gb=1, datastore="other"), "v", "shared", ["shared"], "h1", disks)


def test_hot_plug_adds_exactly_the_device_a_restart_would_have() -> None:
    disk = DiskSpec(id="disk3", node="d3", datastore="ds", path="v/x.qcow2", bus="virtio-scsi", unit=2)
    assert device_props(disk_device(disk)) == {"driver": "scsi-hd", "drive": "d3", "id": "disk3", "bus": "scsi0.0",
                                               "channel": 0, "scsi-id": 2, "lun": 0, "write-cache": "on"}
    check_hotplug_bus(disk, "v", "running")
    with pytest.raises(HotplugUnsupported) as exc:
        check_hotplug_bus(disk.model_copy(update={"bus": "sata"}), "v", "running")
    assert exc.value.details["bus"] == "sata" and "virtio-scsi" in exc.value.remedy and "power" in exc.value.remedy


def test_a_running_vm_takes_no_disk_but_virtio_scsi(ctl: Controller) -> None:
    for bus in ("virtio-blk", "sata"):
        with pytest.raises(HotplugUnsupported) as exc:
            asyncio.run(devices.Devices(ctl.inventory).add_disk("vm2", DiskRequest(size_gb=1, bus=bus)))
        assert exc.value.details["bus"] == bus and "stop vm2" in exc.value.remedy
    assert len(ctl.inventory.spec("vm2").disks) == 1      # nothing half done


def test_the_boot_disk_of_a_disk_booted_vm_stays(ctl: Controller) -> None:
    spec = _spec("u-3", "vm3", ["52:54:00:aa:bb:03"], boot="disk")
    with ctl.sessions.begin() as s:
        s.add(VM(uuid="u-3", name="vm3", host="h1", power_state="poweredOff", spec_json=spec.model_dump_json()))
    with pytest.raises(Exception, match="boot disk"):
        asyncio.run(devices.Devices(ctl.inventory).remove_disk("vm3", "0", DiskRemoveRequest()))


# -- NICs and MACs ---------------------------------------------------------------------------------------------------
def test_a_duplicate_mac_is_refused_with_its_owner(ctl: Controller) -> None:
    with pytest.raises(DuplicateMac) as exc:
        asyncio.run(devices.Devices(ctl.inventory).add_nic("vm1", NicRequest(portgroup="VLAN 100",
                                                                             mac="52:54:00:AA:BB:02")))
    assert exc.value.details == {"mac": "52:54:00:aa:bb:02", "vm": "vm2", "nic": "nic0"}
    assert "vm2" in exc.value.message and "mac=" in exc.value.remedy
    assert len(ctl.inventory.spec("vm1").nics) == 1


def test_generated_macs_have_the_prefix_and_are_unique(ctl: Controller) -> None:
    out = asyncio.run(devices.Devices(ctl.inventory).add_nic("vm1", NicRequest(portgroup="VLAN 100", model="e1000e")))
    nic = out.spec["nics"][-1]
    assert nic["id"] == "nic1" and nic["model"] == "e1000e" and nic["mac"].startswith(MAC_PREFIX + ":")
    assert nic["mac"] not in {"52:54:00:aa:bb:01", "52:54:00:aa:bb:02"}
    taken = {f"{MAC_PREFIX}:00:00:{i:02x}": "x/nic0" for i in range(256)}
    made = {devices.new_mac(taken) for _ in range(50)}
    assert not made & set(taken) and all(int(m[:2], 16) & 2 for m in made)     # locally administered


def test_nics_change_only_while_off_and_must_exist(ctl: Controller) -> None:
    with pytest.raises(WrongState, match="powered off"):
        asyncio.run(devices.Devices(ctl.inventory).add_nic("vm2", NicRequest(portgroup="VM Network")))
    with pytest.raises(InvalidInputError, match="does not exist on h1"):
        asyncio.run(devices.Devices(ctl.inventory).add_nic("vm1", NicRequest(portgroup="VLAN 200")))
    out = asyncio.run(devices.Devices(ctl.inventory).remove_nic("vm1", "nic0"))
    assert out.spec["nics"] == []


def test_create_hardware_is_checked_against_the_host() -> None:
    req = VMCreate(name="v", host="h1", vcpus=4, sockets=2, cores=2, threads=1, machine="pc-i440fx-7.2",
                   disks=[DiskRequest(size_gb=1, bus="virtio-scsi")])
    assert devices.hardware(req, _facts()) == {"machine": "pc-i440fx-7.2", "sockets": 2, "cores": 2, "threads": 1,
                                               "scsi_controller": True}
    with pytest.raises(InvalidInputError, match="machine type"):
        devices.hardware(VMCreate(name="v", host="h1", machine="pc-q35-2.0"), _facts())


# -- VLAN taps -------------------------------------------------------------------------------------------------------
def test_a_vlan_tap_is_untagged_in_its_vlan_and_the_uplink_carries_it_tagged() -> None:
    assert vlan_commands("vmnet", "kvx0", 100, ["uplink0"]) == [
        ["ip", "link", "set", "vmnet", "type", "bridge", "vlan_filtering", "1"],
        ["bridge", "vlan", "del", "dev", "kvx0", "vid", "1"],
        ["bridge", "vlan", "add", "dev", "kvx0", "vid", "100", "pvid", "untagged"],
        ["bridge", "vlan", "add", "dev", "uplink0", "vid", "100"]]


# -- hot-plug over QMP (a fake QEMU monitor) -------------------------------------------------------------------------
class FakeQMP:
    def __init__(self, fail: str | None = None, events: list[dict] | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail
        self.events = events or []

    async def execute(self, cmd: str, args: dict | None = None, timeout: float = 10.0) -> dict:
        self.calls.append((cmd, args or {}))
        if cmd == self.fail:
            from kvmotion.common.errors import QMPCommandError
            raise QMPCommandError(f"{cmd} failed", remedy="see QEMU")
        return {}

    def listener(self, names: tuple[str, ...]):
        import contextlib

        queue: asyncio.Queue = asyncio.Queue()
        for e in self.events:
            queue.put_nowait(e)

        @contextlib.contextmanager
        def cm():
            yield queue
        return cm()


def _qemu_vm(tmp_path: Path, qmp: FakeQMP, disks: list[DiskSpec]):
    from kvmotion.agent.context import HostContext
    from kvmotion.agent.hv.qemu.process import QemuVM
    from kvmotion.models.agent import VMRunState

    (tmp_path / "ds" / "v").mkdir(parents=True)
    ctx = HostContext("h1", "tcg", {"ds": tmp_path / "ds"}, {})
    vm = QemuVM(VMSpec(uuid="u", name="v", boot_datastore="ds", folder="v", disks=disks, scsi_controller=True),
                ctx, tmp_path / "run")
    (tmp_path / "run").mkdir()
    vm.qmp, vm.state = qmp, VMRunState.RUNNING
    return vm


SCSI = DiskSpec(id="disk1", node="d1", datastore="ds", path="v/v-disk1.qcow2", bus="virtio-scsi", unit=0)


def test_plugging_adds_the_node_then_the_device_and_records_the_disk(tmp_path: Path) -> None:
    qmp = FakeQMP()
    vm = _qemu_vm(tmp_path, qmp, [DiskSpec(datastore="ds", path="v/v.qcow2")])
    asyncio.run(vm.plug_disk(SCSI))
    assert [c for c, _ in qmp.calls] == ["blockdev-add", "device_add"]
    assert qmp.calls[1][1] == {"driver": "scsi-hd", "drive": "d1", "id": "disk1", "bus": "scsi0.0", "channel": 0,
                               "scsi-id": 0, "lun": 0, "write-cache": "on"}
    assert [d.id for d in vm.spec.disks] == ["disk0", "disk1"] and vm.nodes["disk1"] == "d1"


def test_a_failed_device_add_takes_the_node_away_again(tmp_path: Path) -> None:
    qmp = FakeQMP(fail="device_add")
    vm = _qemu_vm(tmp_path, qmp, [DiskSpec(datastore="ds", path="v/v.qcow2")])
    with pytest.raises(Exception, match="device_add failed"):
        asyncio.run(vm.plug_disk(SCSI))
    assert [c for c, _ in qmp.calls] == ["blockdev-add", "device_add", "blockdev-del"]
    assert [d.id for d in vm.spec.disks] == ["disk0"]


def test_unplugging_waits_for_the_guest_then_deletes_the_node(tmp_path: Path) -> None:
    qmp = FakeQMP(events=[{"event": "DEVICE_DELETED", "data": {"device": "other"}},
                          {"event": "DEVICE_DELETED", "data": {"device": "disk1"}}])
    vm = _qemu_vm(tmp_path, qmp, [DiskSpec(datastore="ds", path="v/v.qcow2"), SCSI])
    assert asyncio.run(vm.unplug_disk("disk1")).id == "disk1"
    assert [c for c, _ in qmp.calls] == ["device_del", "blockdev-del"]
    assert [d.id for d in vm.spec.disks] == ["disk0"] and "disk1" not in vm.nodes


def test_an_unplug_the_guest_never_acknowledges_has_a_deadline(tmp_path: Path, monkeypatch) -> None:
    from kvmotion.agent.hv.qemu import hotplug
    from kvmotion.common.errors import DeadlineExceeded

    monkeypatch.setattr(hotplug, "UNPLUG_DEADLINE_S", 0.2)
    qmp = FakeQMP()
    vm = _qemu_vm(tmp_path, qmp, [DiskSpec(datastore="ds", path="v/v.qcow2"), SCSI])
    with pytest.raises(DeadlineExceeded):
        asyncio.run(vm.unplug_disk("disk1"))
    assert [c for c, _ in qmp.calls] == ["device_del"] and len(vm.spec.disks) == 2


def test_a_stopped_vm_or_a_blk_disk_is_not_hot_plugged(tmp_path: Path) -> None:
    from kvmotion.models.agent import VMRunState

    vm = _qemu_vm(tmp_path, FakeQMP(), [DiskSpec(datastore="ds", path="v/v.qcow2")])
    with pytest.raises(HotplugUnsupported):
        asyncio.run(vm.unplug_disk("disk0"))
    vm.state = VMRunState.MIGRATING_OUT
    with pytest.raises(WrongState, match="migrating-out"):
        asyncio.run(vm.plug_disk(SCSI))


def test_a_generated_mac_never_takes_one_given_later_in_the_same_request() -> None:
    uuid = "12345678-0000-0000-0000-000000000000"
    reqs = [NicRequest(portgroup="VM Network"), NicRequest(portgroup="VLAN 100", mac=devices.uuid_mac(uuid))]
    nics = devices.make_nics(reqs, uuid, _facts(), "h1", {})
    assert nics[1].mac == "52:54:00:12:34:56" and nics[0].mac != nics[1].mac

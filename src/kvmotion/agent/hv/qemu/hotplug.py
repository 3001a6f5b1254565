"""Disks plugged into and out of a running VM (virtio-scsi only), each QMP step with a deadline.

The device gets exactly the properties a restart with the new spec would give it (``argv.disk_device``), so a
migration destination started from that spec has the same device at the same SCSI address.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kvmotion.agent.hv.qemu.argv import device_props, disk_device, disk_node
from kvmotion.agent.hv.qemu.qmp import next_event
from kvmotion.common.errors import ConflictError, DeadlineExceeded, HotplugUnsupported, KvmotionError, NotFoundError
from kvmotion.models.agent import DiskSpec
from kvmotion.models.hardware import HOTPLUG_BUSES, SCSI_CONTROLLER

if TYPE_CHECKING:
    from kvmotion.agent.hv.qemu.process import QemuVM

QMP_STEP_S = 10.0          # blockdev-add, device_add, device_del, blockdev-del
UNPLUG_DEADLINE_S = 20.0   # the guest acknowledges the removal (DEVICE_DELETED)


def check_hotplug_bus(disk: DiskSpec, vm_name: str, state: str) -> None:
    if disk.bus not in HOTPLUG_BUSES:
        raise HotplugUnsupported(
            f"disk {disk.id} of VM {vm_name} is on {disk.bus}, which cannot be plugged or unplugged while it runs",
            remedy=f"power the VM off first (kvmotion vm stop {vm_name}), or use --disk ...,bus=virtio-scsi",
            details={"device": disk.id, "bus": disk.bus, "state": state})


async def plug_disk(vm: QemuVM, disk: DiskSpec) -> None:
    """blockdev-add, then device_add; on a failed device_add the node is deleted again (nothing half plugged)."""
    check_hotplug_bus(disk, vm.name, str(vm.state))
    if vm.qmp is None:
        raise ConflictError(f"VM {vm.name} has no QMP connection", remedy="the QEMU process is gone")
    if any(d.id == disk.id or d.node == disk.node for d in vm.spec.disks):
        raise ConflictError(f"VM {vm.name} already has a disk {disk.id}", remedy="name the new disk differently")
    if not (vm.spec.scsi_controller or any(d.bus == "virtio-scsi" for d in vm.spec.disks)):
        raise HotplugUnsupported(
            f"VM {vm.name} was started without a virtio-scsi controller ({SCSI_CONTROLLER}), so it takes no "
            "hot-plugged disk", remedy=f"power it off and add the disk then (kvmotion vm stop {vm.name}); the "
            "controller stays for later hot-plugs", details={"device": disk.id, "bus": disk.bus})
    await vm.qmp.execute("blockdev-add", disk_node(disk, vm.ctx), timeout=QMP_STEP_S)
    try:
        await vm.qmp.execute("device_add", device_props(disk_device(disk)), timeout=QMP_STEP_S)
    except KvmotionError:
        await vm.qmp.execute("blockdev-del", {"node-name": disk.node}, timeout=QMP_STEP_S)
        raise
    vm.spec = vm.spec.model_copy(update={"disks": [*vm.spec.disks, disk], "scsi_controller": True})
    vm.nodes[disk.id] = disk.node
    vm.save_record()


async def unplug_disk(vm: QemuVM, disk_id: str) -> DiskSpec:
    """device_del, wait for the guest to let go (DEVICE_DELETED), then blockdev-del; returns the disk removed."""
    disk = next((d for d in vm.spec.disks if d.id == disk_id), None)
    if disk is None:
        raise NotFoundError(f"VM {vm.name} has no disk {disk_id}",
                            remedy="name one of: " + ", ".join(d.id for d in vm.spec.disks))
    check_hotplug_bus(disk, vm.name, str(vm.state))
    if vm.qmp is None:
        raise ConflictError(f"VM {vm.name} has no QMP connection", remedy="the QEMU process is gone")
    with vm.qmp.listener(("DEVICE_DELETED",)) as listener:
        await vm.qmp.execute("device_del", {"id": disk.id}, timeout=QMP_STEP_S)
        end = time.monotonic() + UNPLUG_DEADLINE_S
        while True:
            left = end - time.monotonic()
            event = await next_event(listener, left) if left > 0 else None
            if event is None:
                raise DeadlineExceeded(f"the guest of VM {vm.name} did not release disk {disk.id} within "
                                       f"{UNPLUG_DEADLINE_S:.0f}s", remedy="retry, or power the VM off and remove it "
                                       "then", details={"device": disk.id})
            if (event.get("data") or {}).get("device") == disk.id:
                break
    await vm.qmp.execute("blockdev-del", {"node-name": vm.nodes.get(disk.id, disk.node)}, timeout=QMP_STEP_S)
    vm.spec = vm.spec.model_copy(update={"disks": [d for d in vm.spec.disks if d.id != disk.id]})
    vm.nodes.pop(disk.id, None)
    vm.save_record()
    return disk

"""A VM's disks, NICs and guest-visible hardware: made at create time, added and removed later.

Disks: several per VM, each on a bus (virtio-blk, virtio-scsi, SATA) at a fixed unit, so every host runs the same
devices. A powered-off VM takes any change; a running one takes virtio-scsi disks only (hot-plug), and its spec in
the inventory is updated before anything else can move it. NICs: a MAC is unique in the inventory.
"""
from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING

from kvmotion.common.errors import (ConflictError, DuplicateMac, HotplugUnsupported, InvalidInputError, NotFoundError,
                                    WrongState)
from kvmotion.controller import tasks as task_store
from kvmotion.models.agent import DiskSpec, HostFacts, NicSpec, VMSpec
from kvmotion.models.api import VMCreate, VMOut
from kvmotion.models.devices import DiskCacheRequest, DiskRemoveRequest, DiskRequest, NicRequest
from kvmotion.models.hardware import HOTPLUG_BUSES, MAC_PREFIX, cache_choice, free_unit, normal_mac

if TYPE_CHECKING:
    from kvmotion.controller.inventory import Inventory

MAC_TRIES = 64
CHANGES = asyncio.Lock()      # one device change at a time: ids, units and MACs are picked, then recorded


# -- MACs ------------------------------------------------------------------------------------------------------------
def macs_in_use(inv: "Inventory", skip_vm: str | None = None) -> dict[str, str]:
    """Every NIC's MAC in the inventory (canonical spelling) -> "VM/nic"."""
    out = {}
    for vm in inv.list_vms():
        if vm.uuid == skip_vm:
            continue
        for nic in VMSpec.model_validate(vm.spec).nics:
            out[normal_mac(nic.mac)] = f"{vm.name}/{nic.id}"
    return out


def refuse_duplicate(mac: str, taken: dict[str, str]) -> None:
    owner = taken.get(normal_mac(mac))
    if owner is not None:
        vm, _, nic = owner.partition("/")
        raise DuplicateMac(f"MAC {mac} is already used by {nic} of VM {vm}",
                           remedy="leave mac= out (a unique one is generated), or give another address",
                           details={"mac": normal_mac(mac), "vm": vm, "nic": nic})


def new_mac(taken: dict[str, str], preferred: str | None = None) -> str:
    """A MAC with the fixed locally administered prefix, unique in ``taken`` (``preferred`` when it is free)."""
    for i in range(MAC_TRIES):
        mac = preferred if i == 0 and preferred else \
            MAC_PREFIX + "".join(f":{b:02x}" for b in secrets.token_bytes(3))
        if normal_mac(mac) not in taken:
            return normal_mac(mac)
    raise ConflictError("no free MAC address found", remedy="give one with mac=")


def uuid_mac(uuid: str) -> str:
    """The first NIC's MAC as kvmotion always made it: the prefix and the UUID's first three bytes."""
    return MAC_PREFIX + "".join(f":{uuid.replace('-', '')[i:i + 2]}" for i in (0, 2, 4))


def make_nics(reqs: list[NicRequest], uuid: str, facts: HostFacts, host: str, taken: dict[str, str],
              first: int = 0) -> list[NicSpec]:
    """NICs nic{first}.. on port groups of ``host``; MACs checked against ``taken`` (which gets them too)."""
    groups = {p.name for p in facts.portgroups}
    for i, req in enumerate(reqs, start=first):
        if req.portgroup not in groups:
            raise InvalidInputError(f"port group {req.portgroup!r} does not exist on {host} "
                                    f"(there: {', '.join(sorted(groups)) or 'none'})",
                                    remedy="name an existing port group in --nic")
        if req.mac is not None:
            refuse_duplicate(req.mac, taken)
    for i, req in enumerate(reqs, start=first):     # the given MACs first: a generated one never takes theirs
        if req.mac is not None:
            taken[req.mac] = f"(new)/nic{i}"
    nics = []
    for i, req in enumerate(reqs, start=first):
        mac = req.mac or new_mac(taken, uuid_mac(uuid) if i == 0 else None)
        taken[mac] = f"(new)/nic{i}"
        nics.append(NicSpec(id=f"nic{i}", mac=mac, portgroup=req.portgroup, model=req.model))
    return nics


# -- disks -----------------------------------------------------------------------------------------------------------
def _next_index(spec_disks: list[DiskSpec]) -> int:
    used = {d.id for d in spec_disks} | {d.node for d in spec_disks}
    return next(n for n in range(1000) if f"disk{n}" not in used and f"d{n}" not in used)


def make_disk(req: DiskRequest, name: str, home_ds: str, readable: list[str], host: str,
              disks: list[DiskSpec]) -> DiskSpec:
    """The next disk of a VM that has ``disks``: its id, node, file and unit on its bus."""
    ds = req.datastore or home_ds
    if ds not in readable:
        raise InvalidInputError(f"datastore {ds!r} is not accessible on {host} (accessible: "
                                f"{', '.join(readable) or 'none'})", remedy="pass datastore= with one of those")
    n = _next_index(disks)
    unit = None
    if req.bus != "virtio-blk":
        unit = free_unit(req.bus, {d.unit for d in disks if d.bus == req.bus and d.unit is not None})
        if unit is None:
            raise ConflictError(f"the VM's {req.bus} bus has no free unit left",
                                remedy="put the disk on another bus, or remove one from this bus")
    return DiskSpec(id=f"disk{n}", node=f"d{n}", datastore=ds, path=f"{name}/{name}-disk{n}.{req.format}",
                    format=req.format, size_mb=req.size_gb * 1024, bus=req.bus, unit=unit,
                    cache=cache_choice(req.cache))


def extra_disks(req: VMCreate, name: str, home_ds: str, readable: list[str],
                disks: list[DiskSpec]) -> list[DiskSpec]:
    """A new VM's ``--disk`` disks, after its boot (and data, LUN) disks."""
    out = list(disks)
    for d in req.disks:
        out.append(make_disk(d, name, home_ds, readable, req.host, out))
    return out


def hardware(req: VMCreate, facts: HostFacts) -> dict[str, object]:
    """The VM spec's machine type and vCPU topology from a create request (checked against the host's QEMU)."""
    out: dict[str, object] = {}
    if req.machine is not None:
        if facts.machine_types and req.machine not in facts.machine_types:
            raise InvalidInputError(f"machine type {req.machine!r} is not offered by the QEMU of {req.host}",
                                    remedy="pick a versioned one it has, like pc-q35-7.2 or pc-i440fx-7.2")
        out["machine"] = req.machine
    if req.sockets is not None:
        out |= {"sockets": req.sockets, "cores": req.cores, "threads": req.threads}
    if any(d.bus == "virtio-scsi" for d in req.disks):
        out["scsi_controller"] = True
    return out


# -- changes to an existing VM ---------------------------------------------------------------------------------------
class Devices:
    """Adds and removes a VM's disks and NICs; the inventory's spec is written once the host has done its part."""

    def __init__(self, inv: "Inventory") -> None:
        self.inv = inv

    def _vm(self, ref: str) -> tuple[VMOut, VMSpec]:
        vm = self.inv.owned_vm(ref)
        if any(t.vm_uuid == vm.uuid for t in task_store.unfinished(self.inv.sessions)):
            raise ConflictError(f"VM {vm.name} is being migrated", remedy="wait for its task to end (kvmotion task "
                                "list), then change its devices", details={"vm": vm.name})
        return vm, self.inv.spec(vm.uuid)

    def _facts(self, host: str) -> HostFacts:
        facts = self.inv.host_facts(host)
        if facts is None:
            raise ConflictError(f"host {host} has reported no facts yet", remedy="reconnect its agent first")
        return facts

    async def add_disk(self, ref: str, req: DiskRequest) -> VMOut:
        async with CHANGES:
            return await self._add_disk(ref, req)

    async def _add_disk(self, ref: str, req: DiskRequest) -> VMOut:
        vm, spec = self._vm(ref)
        running = vm.power_state == "poweredOn"
        if running and req.bus not in HOTPLUG_BUSES:
            raise HotplugUnsupported(
                f"VM {vm.name} is powered on: a {req.bus} disk cannot be plugged into it while it runs",
                remedy=f"power it off first (kvmotion vm stop {vm.name}), or add the disk with bus=virtio-scsi",
                details={"device": "new disk", "bus": req.bus, "state": vm.power_state})
        readable = [d.name for d in self._facts(vm.host).datastores if d.readable]
        disk = make_disk(req, spec.name, spec.boot_datastore, readable, vm.host, spec.disks)
        agent = self.inv.agent(vm.host)
        if running:
            await agent.disk_plug(spec, disk)
        else:
            await agent.disk_create(spec, disk)
        controller = spec.scsi_controller or disk.bus == "virtio-scsi"
        spec = spec.model_copy(update={"disks": [*spec.disks, disk], "scsi_controller": controller})
        self.inv.set_vm(vm.uuid, spec_json=spec.model_dump_json())
        return self.inv.get_vm(vm.uuid)

    @staticmethod
    def _find_disk(vm: VMOut, spec: VMSpec, disk_ref: str) -> DiskSpec:
        by_index = {str(i): d for i, d in enumerate(spec.disks)}
        disk = next((d for d in spec.disks if d.id == disk_ref), None) or by_index.get(disk_ref)
        if disk is None:
            raise NotFoundError(f"VM {vm.name} has no disk {disk_ref!r} (disks: "
                                f"{', '.join(f'{i}={d.id}' for i, d in enumerate(spec.disks)) or 'none'})",
                                remedy="name a disk by its id or index")
        return disk

    def _disk(self, vm: VMOut, spec: VMSpec, disk_ref: str) -> DiskSpec:
        disk = self._find_disk(vm, spec, disk_ref)
        if spec.boot == "disk" and disk.id == spec.disks[0].id:
            raise ConflictError(f"{disk.id} is the boot disk of VM {vm.name}", remedy="remove another disk")
        return disk

    async def remove_disk(self, ref: str, disk_ref: str, req: DiskRemoveRequest) -> VMOut:
        async with CHANGES:
            return await self._remove_disk(ref, disk_ref, req)

    async def _remove_disk(self, ref: str, disk_ref: str, req: DiskRemoveRequest) -> VMOut:
        vm, spec = self._vm(ref)
        disk = self._disk(vm, spec, disk_ref)
        agent = self.inv.agent(vm.host)
        if vm.power_state == "poweredOn":
            if disk.bus not in HOTPLUG_BUSES:
                raise HotplugUnsupported(
                    f"VM {vm.name} is powered on: its {disk.bus} disk {disk.id} cannot be unplugged while it runs",
                    remedy=f"power it off first (kvmotion vm stop {vm.name}); only virtio-scsi disks come out live",
                    details={"device": disk.id, "bus": disk.bus, "state": vm.power_state})
            await agent.disk_unplug(spec, disk.id, delete_file=not req.keep_file)
        elif not req.keep_file and disk.kind == "file":
            await agent.disk_remove_file(spec, disk.id)
        spec = spec.model_copy(update={"disks": [d for d in spec.disks if d.id != disk.id]})
        self.inv.set_vm(vm.uuid, spec_json=spec.model_dump_json())
        return self.inv.get_vm(vm.uuid)

    async def set_disk_cache(self, ref: str, disk_ref: str, req: DiskCacheRequest) -> VMOut:
        """A disk's cache mode, recorded for the VM's next power-on: only while it is off, so the running QEMU, a
        migration's destination and the prechecks all see the mode the disk is really open with."""
        async with CHANGES:
            vm, spec = self._vm(ref)
            disk = self._find_disk(vm, spec, disk_ref)
            self._powered_off(vm, "changing a disk's cache mode")
            new = disk.model_copy(update={"cache": cache_choice(req.cache)})
            spec = spec.model_copy(update={"disks": [new if d.id == disk.id else d for d in spec.disks]})
            self.inv.set_vm(vm.uuid, spec_json=spec.model_dump_json())
            return self.inv.get_vm(vm.uuid)

    def _powered_off(self, vm: VMOut, doing: str) -> None:
        if vm.power_state == "poweredOn":
            raise WrongState(f"VM {vm.name} is powered on; {doing} needs it powered off",
                             remedy=f"power it off first: kvmotion vm stop {vm.name}",
                             details={"state": vm.power_state, "allowed": ["poweredOff"]})

    async def add_nic(self, ref: str, req: NicRequest) -> VMOut:
        async with CHANGES:
            return await self._add_nic(ref, req)

    async def _add_nic(self, ref: str, req: NicRequest) -> VMOut:
        vm, spec = self._vm(ref)
        self._powered_off(vm, "adding a NIC")
        used = {n.id for n in spec.nics}
        first = next(i for i in range(len(spec.nics) + 1) if f"nic{i}" not in used)
        nic = make_nics([req], spec.uuid, self._facts(vm.host), vm.host, macs_in_use(self.inv), first)[0]
        if len(spec.nics) >= 8:
            raise ConflictError(f"VM {vm.name} already has 8 NICs", remedy="remove one first")
        spec = spec.model_copy(update={"nics": [*spec.nics, nic]})
        self.inv.set_vm(vm.uuid, spec_json=spec.model_dump_json())
        return self.inv.get_vm(vm.uuid)

    async def remove_nic(self, ref: str, nic_id: str) -> VMOut:
        async with CHANGES:
            return await self._remove_nic(ref, nic_id)

    async def _remove_nic(self, ref: str, nic_id: str) -> VMOut:
        vm, spec = self._vm(ref)
        self._powered_off(vm, "removing a NIC")
        if nic_id not in {n.id for n in spec.nics}:
            raise NotFoundError(f"VM {vm.name} has no NIC {nic_id!r} (NICs: "
                                f"{', '.join(n.id for n in spec.nics) or 'none'})", remedy="name a NIC by its id")
        spec = spec.model_copy(update={"nics": [n for n in spec.nics if n.id != nic_id]})
        self.inv.set_vm(vm.uuid, spec_json=spec.model_dump_json())
        return self.inv.get_vm(vm.uuid)


async def claim_macs(inv: "Inventory", spec: VMSpec, host: str) -> None:
    """Right before a new VM is recorded (no await after it): its MACs are still unique, else its files go again."""
    taken = macs_in_use(inv, skip_vm=spec.uuid)
    clash = next((n for n in spec.nics if normal_mac(n.mac) in taken), None)
    if clash is not None:
        await inv.agent(host).destroy_files(spec)
        refuse_duplicate(clash.mac, taken)

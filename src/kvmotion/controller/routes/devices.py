"""A VM's disks and NICs: added and removed, a disk's cache mode set (admin). A running VM takes virtio-scsi disks
only (hot-plug), and no cache change."""
from __future__ import annotations

from fastapi import APIRouter

from kvmotion.controller.auth import Role
from kvmotion.controller.devices import Devices
from kvmotion.controller.routes.deps import Ctl, role
from kvmotion.models.agent import DeviceId, DiskRef
from kvmotion.models.api import VMOut
from kvmotion.models.devices import DiskCacheRequest, DiskRemoveRequest, DiskRequest, NicRequest

router = APIRouter()


@router.post("/vms/{ref}/disks", status_code=201, dependencies=role(Role.ADMIN))
async def vm_disk_add(ref: str, req: DiskRequest, ctl: Ctl) -> VMOut:
    return await Devices(ctl.inventory).add_disk(ref, req)


@router.post("/vms/{ref}/disks/{disk}/remove", dependencies=role(Role.ADMIN))
async def vm_disk_remove(ref: str, disk: DiskRef, req: DiskRemoveRequest, ctl: Ctl) -> VMOut:
    return await Devices(ctl.inventory).remove_disk(ref, disk, req)


@router.post("/vms/{ref}/disks/{disk}/cache", dependencies=role(Role.ADMIN))
async def vm_disk_cache(ref: str, disk: DiskRef, req: DiskCacheRequest, ctl: Ctl) -> VMOut:
    return await Devices(ctl.inventory).set_disk_cache(ref, disk, req)


@router.post("/vms/{ref}/nics", status_code=201, dependencies=role(Role.ADMIN))
async def vm_nic_add(ref: str, req: NicRequest, ctl: Ctl) -> VMOut:
    return await Devices(ctl.inventory).add_nic(ref, req)


@router.delete("/vms/{ref}/nics/{nic}", dependencies=role(Role.ADMIN))
async def vm_nic_remove(ref: str, nic: DeviceId, ctl: Ctl) -> VMOut:
    return await Devices(ctl.inventory).remove_nic(ref, nic)

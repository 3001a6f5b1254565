"""Disk changes of a VM on this host: new images, hot-plug and hot-unplug (virtio-scsi), removed images."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter

from kvmotion.agent import devices
from kvmotion.agent.routes.deps import AgentDep
from kvmotion.common.errors import InvalidInputError
from kvmotion.models.agent import DiskSpec, VMSpec
from kvmotion.models.devices import DiskChange, DiskRemoval

router = APIRouter(prefix="/v1/vms")


def _same(uuid: str, spec: VMSpec) -> None:
    if uuid != spec.uuid:
        raise InvalidInputError(f"the path names VM {uuid} but the body VM {spec.uuid}", remedy="name one VM")


@router.post("/{uuid}/disks/create")
async def disk_create(uuid: str, req: DiskChange, agent: AgentDep) -> DiskSpec:
    _same(uuid, req.spec)
    return await devices.create_disk(agent, req)


@router.post("/{uuid}/disks/remove-file")
async def disk_remove_file(uuid: str, req: DiskRemoval, agent: AgentDep) -> list[str]:
    _same(uuid, req.spec)
    return await asyncio.to_thread(devices.remove_disk_file, agent, req.spec, req.disk_id)


@router.post("/{uuid}/disks/plug")
async def disk_plug(uuid: str, req: DiskChange, agent: AgentDep) -> VMSpec:
    _same(uuid, req.spec)
    return await devices.plug_disk(agent, req)


@router.post("/{uuid}/disks/unplug")
async def disk_unplug(uuid: str, req: DiskRemoval, agent: AgentDep) -> VMSpec:
    _same(uuid, req.spec)
    return await devices.unplug_disk(agent, req.spec.uuid, req.disk_id, req.delete_file)

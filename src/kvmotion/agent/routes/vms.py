"""VM routes: files, power, devices, status, guest checks, leases."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query
from pydantic import BaseModel

from kvmotion.agent.routes.deps import AgentDep
from kvmotion.models.agent import (CdromSpec, DirtySample, GuestHealth, HealthCheckRequest, LeaseInfo, NameOrEmpty,
                                   StartRequest, VMRuntime, VMSpec)
from kvmotion.models.cloudinit import ProvisionSeedRequest

router = APIRouter(prefix="/v1/vms")


class LeaseRequest(BaseModel):
    expected_holder: NameOrEmpty | None = None


@router.get("")
async def vms(agent: AgentDep) -> list[VMRuntime]:
    return agent.list()


@router.post("/{uuid}/provision")
async def provision(uuid: str, req: ProvisionSeedRequest, agent: AgentDep) -> VMSpec:
    """The VM's folder and disks (disk0 from an image: converted or overlaid, off the event loop), and its
    cloud-init seed ISO when the request has one."""
    keys = agent.keywrap.unwrap_all(req.disk_keys)
    return await asyncio.to_thread(agent.provision, req.spec, keys, req.image, req.seed)


@router.post("/{uuid}/destroy-files")
async def destroy_files(uuid: str, spec: VMSpec, agent: AgentDep) -> dict[str, bool]:
    agent.destroy_files(spec)
    return {"ok": True}


@router.post("/{uuid}/start")
async def start(uuid: str, req: StartRequest, agent: AgentDep) -> VMRuntime:
    return await agent.start(req.spec, agent.keywrap.unwrap_all(req.disk_keys))


@router.post("/{uuid}/cdrom")
async def cdrom(uuid: str, req: CdromSpec, agent: AgentDep) -> dict[str, str]:
    return await agent.change_cdrom(uuid, req)


@router.post("/{uuid}/stop")
async def stop(uuid: str, agent: AgentDep) -> VMRuntime:
    return await agent.stop(uuid)


@router.get("/{uuid}")
async def status(uuid: str, agent: AgentDep) -> VMRuntime:
    return await agent.status(uuid)


@router.get("/{uuid}/dirty")
async def dirty(uuid: str, agent: AgentDep, max_age_s: float = Query(default=60.0, ge=0, le=86400),
                measure: bool = True) -> DirtySample:
    return await agent.dirty_sample(uuid, max_age_s, measure)


@router.post("/{uuid}/health-check")
async def health_check(uuid: str, req: HealthCheckRequest, agent: AgentDep) -> GuestHealth:
    return await agent.health_check(uuid, req)


@router.get("/{uuid}/serial")
async def serial(uuid: str, agent: AgentDep, lines: int = Query(default=20, ge=1, le=1000)) -> list[str]:
    return agent.serial_tail(uuid, lines)


@router.post("/{uuid}/lease")
async def lease(uuid: str, req: LeaseRequest, agent: AgentDep) -> LeaseInfo:
    return agent.take_lease(uuid, req.expected_holder)


@router.get("/{uuid}/locks")
async def locks(uuid: str, agent: AgentDep) -> dict[str, list[str]]:
    return agent.locks(uuid)

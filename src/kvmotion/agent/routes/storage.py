"""Storage routes: sizes, VM folders, leases, cold copies, NBD exports, and the disk mirrors of running VMs."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator

from kvmotion.agent import nbdtls
from kvmotion.agent.routes.deps import AgentDep
from kvmotion.models.agent import (MAX_DISKS, DiskCopyRequest, DiskCopyStatus, DiskExport, DiskRef, MirrorReport,
                                   MirrorRequest, PivotReport, VMSpec)
from kvmotion.models.nbd import NbdPsk

MAX_HOME_B64 = 200 * 1024 * 1024        # kernel + initrd, base64

router = APIRouter(prefix="/v1")


class MeasureRequest(BaseModel):
    spec: VMSpec
    formats: dict[DiskRef, str] = Field(max_length=MAX_DISKS)     # disk id -> the format it will have
    preallocate: bool = False

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(f for f in v.values() if f not in ("qcow2", "raw"))
        if bad:
            raise ValueError(f"unknown disk format(s) {bad}; use qcow2 or raw")
        return v


class HomePut(BaseModel):
    spec: VMSpec
    files: dict[DiskRef, str] = Field(max_length=8)               # file name -> base64

    @field_validator("files")
    @classmethod
    def _size(cls, v: dict[str, str]) -> dict[str, str]:
        if sum(len(x) for x in v.values()) > MAX_HOME_B64:
            raise ValueError(f"VM folder files exceed {MAX_HOME_B64 >> 20} MiB")
        return v


class RemoveFiles(BaseModel):
    spec: VMSpec
    disk_ids: list[DiskRef] = Field(default_factory=list, max_length=MAX_DISKS)
    home: bool = False


class SpecDisks(BaseModel):
    spec: VMSpec
    disk_ids: list[DiskRef] = Field(default_factory=list, max_length=MAX_DISKS)


class ExportRequest(BaseModel):
    spec: VMSpec
    disk_id: DiskRef
    listen_address: str = Field(pattern=r"^[0-9A-Fa-f.:]{2,45}$", description="an IP address of this host")
    # always TLS, one of: x509 admitting only this client identity (the destination host's), or the move's PSK
    tls_authz_identity: str | None = Field(default=None, max_length=255)
    psk: NbdPsk | None = None


class SpeedRequest(BaseModel):
    speed_bytes: int = Field(ge=0, le=1 << 40)


@router.post("/storage/measure")
async def measure(req: MeasureRequest, agent: AgentDep) -> dict[str, int]:
    return await asyncio.to_thread(agent.measure, req.spec, req.formats, req.preallocate)


@router.post("/storage/home/get")
async def home_get(spec: VMSpec, agent: AgentDep) -> dict[str, str]:
    return await asyncio.to_thread(agent.home_files, spec)


@router.post("/storage/home/put")
async def home_put(req: HomePut, agent: AgentDep) -> dict[str, str]:
    return {"folder": await asyncio.to_thread(agent.put_home, req.spec, req.files)}


@router.post("/storage/remove")
async def remove(req: RemoveFiles, agent: AgentDep) -> list[str]:
    return await asyncio.to_thread(agent.remove_files, req.spec, req.disk_ids, req.home)


@router.post("/storage/check")
async def check(req: SpecDisks, agent: AgentDep) -> dict[str, dict[str, Any]]:
    return await asyncio.to_thread(agent.check_images, req.spec, req.disk_ids)


@router.post("/storage/leases")
async def lease_holders(spec: VMSpec, agent: AgentDep) -> dict[str, str]:
    return agent.lease_holders(spec)


@router.post("/storage/export")
async def export(req: ExportRequest, agent: AgentDep) -> DiskExport:
    return await asyncio.to_thread(agent.disk_export, req.spec, req.disk_id, req.listen_address,
                                   req.tls_authz_identity, nbdtls.open_psk(agent.keywrap, req.psk))


@router.delete("/storage/export/{export_id}")
async def export_stop(export_id: str, agent: AgentDep) -> dict[str, bool]:
    return {"stopped": await asyncio.to_thread(agent.disk_export_stop, export_id)}


@router.post("/storage/copy")
async def copy(req: DiskCopyRequest, agent: AgentDep) -> DiskCopyStatus:
    req.source_psk = nbdtls.open_psk(agent.keywrap, req.source_psk)
    return agent.disk_copy(req)


@router.get("/storage/copy/{job}")
async def copy_status(job: str, agent: AgentDep) -> DiskCopyStatus:
    return agent.copy_status(job)


@router.delete("/storage/copy/{job}")
async def copy_cancel(job: str, agent: AgentDep) -> DiskCopyStatus:
    return await agent.copy_cancel(job)


@router.post("/vms/{uuid}/mirror")
async def mirror_start(uuid: str, req: MirrorRequest, agent: AgentDep) -> MirrorReport:
    req.disk_keys = agent.keywrap.unwrap_all(req.disk_keys)
    req.targets = [t.model_copy(update={"psk": nbdtls.open_psk(agent.keywrap, t.psk)}) for t in req.targets]
    return await agent.mirror_start(uuid, req)


@router.get("/vms/{uuid}/mirror")
async def mirror_status(uuid: str, agent: AgentDep) -> MirrorReport:
    return await agent.mirror_status(uuid)


@router.post("/vms/{uuid}/mirror/speed")
async def mirror_speed(uuid: str, req: SpeedRequest, agent: AgentDep) -> dict[str, int]:
    await agent.mirror_speed(uuid, req.speed_bytes)
    return {"speed_bytes": req.speed_bytes}


@router.post("/vms/{uuid}/mirror/pivot")
async def mirror_pivot(uuid: str, agent: AgentDep) -> PivotReport:
    return await agent.mirror_pivot(uuid)


@router.post("/vms/{uuid}/mirror/cancel")
async def mirror_cancel(uuid: str, agent: AgentDep) -> MirrorReport:
    return await agent.mirror_cancel(uuid)

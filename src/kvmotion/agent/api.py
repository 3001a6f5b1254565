"""The agent's REST API. The controller decides; the agent executes."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

from kvmotion import __version__
from kvmotion.agent.auth import SignedRequestsOnly
from kvmotion.agent.service import Agent
from kvmotion.common.errors import KvmotionError
from kvmotion.models.agent import MAX_CPU_FEATURES, MAX_DISKS, DirtySample, DiskRef, Name, NameOrEmpty
from kvmotion.models.agent import (DiskCopyRequest, DiskCopyStatus, DiskExport, MirrorReport, MirrorRequest,
                                   PivotReport)
from kvmotion.models.agent import GuestHealth, HealthCheckRequest, PostcopyRecover, PostcopyResume
from kvmotion.models.agent import (CdromSpec, HostFacts, TlsFact, IncomingReady, IncomingRequest, LeaseInfo, MigrationReport, MigrationTuning,
                                   OutgoingRequest, ReleaseReport, StartRequest, VMRuntime, VMSpec)


MAX_PEM = 16384
MAX_HOME_B64 = 200 * 1024 * 1024        # kernel + initrd, base64


class LeaseRequest(BaseModel):
    expected_holder: NameOrEmpty | None = None


class TlsInstall(BaseModel):
    ca_cert: str = Field(max_length=MAX_PEM)
    server_cert: str = Field(max_length=MAX_PEM)
    client_cert: str = Field(max_length=MAX_PEM)


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


class SpeedRequest(BaseModel):
    speed_bytes: int = Field(ge=0, le=1 << 40)


class CpuExpandRequest(BaseModel):
    model: Name
    mask: list[Name] = Field(default_factory=list, max_length=MAX_CPU_FEATURES)


def create_app(agent: Agent, secret: str, after_start: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    """The agent's API; every request must be signed with ``secret`` (the host's enrolment secret)."""
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await agent.startup()
        side = asyncio.create_task(after_start()) if after_start is not None else None
        yield
        if side is not None:
            side.cancel()
        await agent.shutdown()

    app = FastAPI(title="kvmotion agent", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(SignedRequestsOnly, secret=secret)

    @app.exception_handler(KvmotionError)
    async def _kvm_error(_: Request, exc: KvmotionError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()})

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "name": agent.cfg.name, "accelerator": agent.accel.accelerator}

    @app.get("/v1/facts")
    async def facts() -> HostFacts:
        return agent.facts()

    @app.post("/v1/tls/csr")
    async def tls_csr() -> dict[str, str]:
        return agent.tls_csrs()

    @app.post("/v1/tls/install")
    async def tls_install(req: TlsInstall) -> TlsFact:
        return agent.tls_install(req.ca_cert, req.server_cert, req.client_cert)

    @app.delete("/v1/tls")
    async def tls_remove() -> TlsFact:
        return agent.tls_remove()

    @app.post("/v1/cpu/expand")
    async def cpu_expand(req: CpuExpandRequest) -> list[str]:
        return agent.cpu_expand(req.model, req.mask)

    @app.get("/v1/vms")
    async def vms() -> list[VMRuntime]:
        return agent.list()

    @app.post("/v1/vms/{uuid}/provision")
    async def provision(uuid: str, req: StartRequest) -> dict[str, str]:
        return {"folder": str(agent.provision(req.spec, req.disk_keys))}

    @app.post("/v1/vms/{uuid}/destroy-files")
    async def destroy_files(uuid: str, spec: VMSpec) -> dict[str, bool]:
        agent.destroy_files(spec)
        return {"ok": True}

    @app.post("/v1/vms/{uuid}/start")
    async def start(uuid: str, req: StartRequest) -> VMRuntime:
        return await agent.start(req.spec, req.disk_keys)

    @app.post("/v1/vms/{uuid}/cdrom")
    async def cdrom(uuid: str, req: CdromSpec) -> dict[str, str]:
        return await agent.change_cdrom(uuid, req)

    @app.post("/v1/vms/{uuid}/stop")
    async def stop(uuid: str) -> VMRuntime:
        return await agent.stop(uuid)

    @app.get("/v1/vms/{uuid}")
    async def status(uuid: str) -> VMRuntime:
        return await agent.status(uuid)

    @app.get("/v1/vms/{uuid}/dirty")
    async def dirty(uuid: str, max_age_s: float = Query(default=60.0, ge=0, le=86400),
                    measure: bool = True) -> DirtySample:
        return await agent.dirty_sample(uuid, max_age_s, measure)

    @app.post("/v1/vms/{uuid}/health-check")
    async def health_check(uuid: str, req: HealthCheckRequest) -> GuestHealth:
        return await agent.health_check(uuid, req)

    @app.get("/v1/vms/{uuid}/serial")
    async def serial(uuid: str, lines: int = Query(default=20, ge=1, le=1000)) -> list[str]:
        return agent.serial_tail(uuid, lines)

    @app.post("/v1/vms/{uuid}/incoming")
    async def incoming(uuid: str, req: IncomingRequest) -> IncomingReady:
        return await agent.prepare_incoming(req)

    @app.delete("/v1/vms/{uuid}/incoming")
    async def abort_incoming(uuid: str) -> dict[str, bool]:
        return {"removed": await agent.abort_incoming(uuid)}

    @app.post("/v1/vms/{uuid}/outgoing")
    async def outgoing(uuid: str, req: OutgoingRequest) -> MigrationReport:
        return await agent.start_outgoing(uuid, req)

    @app.get("/v1/vms/{uuid}/migration")
    async def migration_report(uuid: str, wait_s: float = Query(default=0.0, ge=0, le=5),
                               since: str | None = Query(default=None, max_length=32)) -> MigrationReport:
        return await agent.migration_report(uuid, wait_s, since)

    @app.post("/v1/vms/{uuid}/migration/tune")
    async def tune(uuid: str, req: MigrationTuning) -> dict[str, Any]:
        return await agent.tune(uuid, req)

    @app.post("/v1/vms/{uuid}/migration/postcopy")
    async def postcopy_start(uuid: str) -> dict[str, Any]:
        return await agent.postcopy_start(uuid)

    @app.post("/v1/vms/{uuid}/migration/pause")
    async def postcopy_pause(uuid: str) -> dict[str, Any]:
        return await agent.postcopy_pause(uuid)

    @app.post("/v1/vms/{uuid}/migration/recover")
    async def postcopy_recover(uuid: str, req: PostcopyRecover) -> dict[str, Any]:
        return await agent.postcopy_recover(uuid, req.listen_address)

    @app.post("/v1/vms/{uuid}/migration/resume")
    async def postcopy_resume(uuid: str, req: PostcopyResume) -> dict[str, Any]:
        return await agent.postcopy_resume(uuid, req.uri, req.probe_address)

    @app.post("/v1/vms/{uuid}/migration/cancel")
    async def cancel(uuid: str, resume_if_completed: bool = True) -> MigrationReport | None:
        return await agent.cancel_outgoing(uuid, resume_if_completed)

    @app.post("/v1/vms/{uuid}/resume")
    async def resume(uuid: str, announce: bool = False) -> dict[str, Any]:
        return await agent.resume(uuid, announce)

    @app.post("/v1/vms/{uuid}/announce")
    async def announce(uuid: str) -> dict[str, Any]:
        return await agent.announce(uuid)

    @app.post("/v1/vms/{uuid}/lease")
    async def lease(uuid: str, req: LeaseRequest) -> LeaseInfo:
        return agent.take_lease(uuid, req.expected_holder)

    @app.get("/v1/vms/{uuid}/locks")
    async def locks(uuid: str) -> dict[str, list[str]]:
        return agent.locks(uuid)

    @app.post("/v1/vms/{uuid}/finalize-source")
    async def finalize_source(uuid: str) -> ReleaseReport:
        return await agent.finalize_source(uuid)

    # -- storage ------------------------------------------------------------------------------------
    @app.post("/v1/storage/measure")
    async def measure(req: MeasureRequest) -> dict[str, int]:
        return await asyncio.to_thread(agent.measure, req.spec, req.formats, req.preallocate)

    @app.post("/v1/storage/home/get")
    async def home_get(spec: VMSpec) -> dict[str, str]:
        return await asyncio.to_thread(agent.home_files, spec)

    @app.post("/v1/storage/home/put")
    async def home_put(req: HomePut) -> dict[str, str]:
        return {"folder": await asyncio.to_thread(agent.put_home, req.spec, req.files)}

    @app.post("/v1/storage/remove")
    async def remove(req: RemoveFiles) -> list[str]:
        return await asyncio.to_thread(agent.remove_files, req.spec, req.disk_ids, req.home)

    @app.post("/v1/storage/check")
    async def check(req: SpecDisks) -> dict[str, dict[str, Any]]:
        return await asyncio.to_thread(agent.check_images, req.spec, req.disk_ids)

    @app.post("/v1/storage/leases")
    async def lease_holders(spec: VMSpec) -> dict[str, str]:
        return agent.lease_holders(spec)

    @app.post("/v1/storage/export")
    async def export(req: ExportRequest) -> DiskExport:
        return await asyncio.to_thread(agent.disk_export, req.spec, req.disk_id, req.listen_address)

    @app.delete("/v1/storage/export/{export_id}")
    async def export_stop(export_id: str) -> dict[str, bool]:
        return {"stopped": await asyncio.to_thread(agent.disk_export_stop, export_id)}

    @app.post("/v1/storage/copy")
    async def copy(req: DiskCopyRequest) -> DiskCopyStatus:
        return agent.disk_copy(req)

    @app.get("/v1/storage/copy/{job}")
    async def copy_status(job: str) -> DiskCopyStatus:
        return agent.copy_status(job)

    @app.delete("/v1/storage/copy/{job}")
    async def copy_cancel(job: str) -> DiskCopyStatus:
        return await agent.copy_cancel(job)

    @app.post("/v1/vms/{uuid}/mirror")
    async def mirror_start(uuid: str, req: MirrorRequest) -> MirrorReport:
        return await agent.mirror_start(uuid, req)

    @app.get("/v1/vms/{uuid}/mirror")
    async def mirror_status(uuid: str) -> MirrorReport:
        return await agent.mirror_status(uuid)

    @app.post("/v1/vms/{uuid}/mirror/speed")
    async def mirror_speed(uuid: str, req: SpeedRequest) -> dict[str, int]:
        await agent.mirror_speed(uuid, req.speed_bytes)
        return {"speed_bytes": req.speed_bytes}

    @app.post("/v1/vms/{uuid}/mirror/pivot")
    async def mirror_pivot(uuid: str) -> PivotReport:
        return await agent.mirror_pivot(uuid)

    @app.post("/v1/vms/{uuid}/mirror/cancel")
    async def mirror_cancel(uuid: str) -> MirrorReport:
        return await agent.mirror_cancel(uuid)

    return app

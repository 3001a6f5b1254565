"""The controller's REST API (OpenAPI at /docs and /openapi.json)."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kvmotion import __version__
from kvmotion.common.errors import KvmotionError
from kvmotion.common.types import TlsFact
from kvmotion.controller import tasks as task_store
from kvmotion.controller.schemas import (CdromChange, ClusterCreate, ClusterOut, Finding, HostAdd, HostOut,
                                         MaintenanceRequest, MigrateRequest, TaskOut, VMCreate, VMOut, VMUpdate)
from kvmotion.controller.service import Controller


def create_app(ctl: Controller) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ctl.startup()
        yield
        await ctl.shutdown()

    app = FastAPI(title="kvmotion controller", version=__version__, lifespan=lifespan)
    inv = ctl.inventory

    @app.exception_handler(KvmotionError)
    async def _kvm_error(_: Request, exc: KvmotionError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()})

    @app.get("/api/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "running_tasks": len(ctl.scheduler.engines)}

    # -- hosts
    @app.get("/api/v1/hosts")
    async def hosts() -> list[HostOut]:
        return inv.list_hosts()

    @app.post("/api/v1/hosts", status_code=201)
    async def host_add(req: HostAdd) -> HostOut:
        return await ctl.add_host(req.address, req.name)

    @app.post("/api/v1/hosts/register", status_code=201)
    async def host_register(req: HostAdd) -> HostOut:
        return await ctl.add_host(req.address, req.name)

    @app.post("/api/v1/hosts/{name}/cert/renew")
    async def host_cert_renew(name: str) -> TlsFact:
        inv.get_host(name)
        return await ctl.certs.issue(name)

    @app.delete("/api/v1/hosts/{name}/cert")
    async def host_cert_remove(name: str) -> TlsFact:
        inv.get_host(name)
        return await ctl.certs.remove(name)

    @app.get("/api/v1/hosts/{name}")
    async def host_show(name: str) -> HostOut:
        inv.get_host(name)
        return await inv.refresh_host(name)

    @app.post("/api/v1/hosts/{name}/maintenance", status_code=202)
    async def host_maintenance(name: str, req: MaintenanceRequest) -> TaskOut | HostOut:
        """Enter: evacuate, then mark (returns the maintenance task). Exit: back in service."""
        if req.enter:
            return await ctl.maintenance.enter(name)
        ctl.maintenance.exit(name)
        return inv.get_host(name)

    # -- clusters (EVC)
    @app.get("/api/v1/clusters")
    async def clusters() -> list[ClusterOut]:
        return ctl.clusters.list()

    @app.post("/api/v1/clusters", status_code=201)
    async def cluster_create(req: ClusterCreate) -> ClusterOut:
        return ctl.clusters.create(req.name, req.evc_mode)   # hosts joining later must support the baseline

    @app.get("/api/v1/clusters/{name}")
    async def cluster_show(name: str) -> ClusterOut:
        return ctl.clusters.get(name)

    @app.post("/api/v1/clusters/{name}/hosts/{host}")
    async def cluster_add_host(name: str, host: str) -> ClusterOut:
        return ctl.clusters.add_host(name, host)

    @app.delete("/api/v1/clusters/{name}/hosts/{host}")
    async def cluster_remove_host(name: str, host: str) -> ClusterOut:
        return ctl.clusters.remove_host(name, host)

    @app.get("/api/v1/clusters/{name}/evc-modes")
    async def cluster_evc_modes(name: str) -> list[str]:
        return await ctl.clusters.evc_modes(name)

    @app.put("/api/v1/clusters/{name}/evc")
    async def cluster_set_evc(name: str, req: ClusterCreate) -> ClusterOut:
        return await ctl.clusters.set_evc(name, req.evc_mode)

    @app.get("/api/v1/datastores")
    async def datastores() -> list[dict[str, Any]]:
        return inv.datastores()

    @app.get("/api/v1/networks")
    async def networks() -> list[dict[str, Any]]:
        return inv.networks()

    # -- VMs
    @app.get("/api/v1/vms")
    async def vms() -> list[VMOut]:
        return inv.list_vms()

    @app.post("/api/v1/vms", status_code=201)
    async def vm_create(req: VMCreate) -> VMOut:
        return await inv.create_vm(req)

    @app.get("/api/v1/vms/{ref}")
    async def vm_show(ref: str) -> VMOut:
        return await inv.show_vm(ref)

    @app.post("/api/v1/vms/{ref}/start")
    async def vm_start(ref: str) -> VMOut:
        return await ctl.start_vm(ref)

    @app.post("/api/v1/vms/{ref}/stop")
    async def vm_stop(ref: str) -> VMOut:
        return await inv.stop_vm(ref)

    @app.delete("/api/v1/vms/{ref}")
    async def vm_delete(ref: str) -> dict[str, bool]:
        await inv.delete_vm(ref)
        return {"deleted": True}

    @app.patch("/api/v1/vms/{ref}")
    async def vm_set(ref: str, req: VMUpdate) -> VMOut:
        return inv.update_vm(ref, req)

    @app.post("/api/v1/vms/{ref}/cdrom")
    async def vm_cdrom(ref: str, req: CdromChange) -> VMOut:
        return await inv.change_cdrom(ref, req)

    @app.post("/api/v1/vms/{ref}/migrate/validate")
    async def vm_validate(ref: str, req: MigrateRequest) -> list[Finding]:
        return await ctl.validate_migration(ref, req)

    @app.post("/api/v1/vms/{ref}/migrate", status_code=202)
    async def vm_migrate(ref: str, req: MigrateRequest) -> TaskOut:
        return await ctl.migrate(ref, req)

    # -- tasks
    @app.get("/api/v1/tasks")
    async def task_list(limit: int = 50) -> list[TaskOut]:
        return task_store.list_tasks(ctl.sessions, min(max(limit, 1), 500))

    @app.get("/api/v1/tasks/{task_id}")
    async def task_show(task_id: str) -> TaskOut:
        return task_store.get_task(ctl.sessions, task_id)

    @app.post("/api/v1/tasks/{task_id}/cancel")
    async def task_cancel(task_id: str) -> TaskOut:
        return ctl.cancel(task_id)

    return app

"""The controller's REST API (OpenAPI at /docs and /openapi.json)."""
from __future__ import annotations

import asyncio
import re
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel

from kvmotion import __version__
from kvmotion.common.errors import InvalidInputError, KvmotionError
from kvmotion.models.agent import TlsFact
from kvmotion.controller import tasks as task_store
from kvmotion.models.api import (CdromChange, ClusterCreate, ClusterOut, ClusterUpdate, Finding, HostAdd, HostOut,
                                         MaintenanceRequest, MigrateRequest, TaskOut, VMCreate, VMOut, VMUpdate)
from kvmotion.controller.auth import (AUDIT_KEEP, AuditOut, Principal, Role, TokenCreate, TokenCreated, TokenOut,
                                      authenticate_bearer, require_role)
from kvmotion.controller.service import Controller


class ErrorDetail(BaseModel):
    code: str
    message: str
    remedy: str = ""
    details: dict[str, Any] | None = None
    cause: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what} for code, what in (
        (400, "the body is not valid JSON"), (401, "no token, or an unknown, revoked or expired one"), (403, "the token's role is too low"),
        (404, "no such object"), (409, "conflicts with the current state, or a check failed"),
        (422, "invalid input"), (502, "a host agent did not answer"), (504, "a deadline passed"))}


class _MethodIndex:
    """Which methods the API documents for a concrete path (for the Allow header of a 405)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._index: list[tuple[re.Pattern[str], list[str]]] | None = None

    def methods(self, path: str) -> list[str]:
        if self._index is None:
            self._index = [(re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)) + "$"),
                            sorted(m.upper() for m in ops)) for p, ops in self.app.openapi()["paths"].items()]
        matches = [(p.pattern.count("[^/]+"), ms) for p, ms in self._index if p.match(path)]
        return min(matches)[1] if matches else []        # the most specific path (fewest parameters)


def create_app(ctl: Controller) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ctl.startup()
        yield
        await ctl.shutdown()

    app = FastAPI(title="kvmotion controller", version=__version__, lifespan=lifespan)
    async def no_unknown_query(request: Request) -> None:
        """A misspelt query parameter is an error, not silently ignored (as with body fields)."""
        route = request.scope.get("route")
        known = {q.alias for q in route.dependant.query_params} if isinstance(route, APIRoute) else set()
        unknown = sorted(set(request.query_params) - known)
        if unknown:
            raise InvalidInputError(f"unknown query parameter(s): {', '.join(repr(u[:40]) for u in unknown[:5])}",
                                    remedy=f"use only: {', '.join(sorted(known)) or 'none'}")

    r = APIRouter(dependencies=[Depends(no_unknown_query)])
    bearer = HTTPBearer(auto_error=False, description="an API token (`kvmotion token create`)")
    inv = ctl.inventory

    def role(needed: Role) -> list[Any]:
        async def check(request: Request, cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
            what = f"{request.method} {request.url.path}"
            principal = await asyncio.to_thread(authenticate_bearer, ctl.tokens, cred.credentials if cred else None,
                                                what)
            request.state.principal = principal          # the audit names the caller even when refused
            require_role(principal, needed, what)
            return principal
        return [Depends(check)]

    @app.exception_handler(KvmotionError)
    async def _kvm_error(_: Request, exc: KvmotionError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """Bad input is a 422 in the same error shape, naming each field; the input itself is not echoed."""
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type"))}
                  for e in exc.errors()][:20]
        text = "; ".join(f"{'.'.join(x for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}" for e in errors)
        err = InvalidInputError(f"invalid request: {text}", remedy="fix the fields named above (schema: /docs)",
                                details={"errors": errors})
        return JSONResponse(status_code=422, content={"error": err.to_dict()})

    allowed = _MethodIndex(app)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed.methods(request.url.path))
        code = {404: "NOT_FOUND", 405: "INVALID_INPUT"}.get(exc.status_code, "INVALID_INPUT")
        return JSONResponse(status_code=exc.status_code, headers=headers, content={"error": {
            "code": code, "message": f"{request.method} {request.url.path}: {exc.detail}",
            "remedy": "see /docs for the API's paths and methods"}})

    @app.middleware("http")
    async def _audit(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            who: Principal | None = getattr(request.state, "principal", None)
            client = request.client.host if request.client else "?"
            await asyncio.to_thread(ctl.audit.record, who.name if who else "-", str(who.role) if who else "-",
                                    request.method, request.url.path, response.status_code, client)
        return response

    @r.get("/health", dependencies=role(Role.VIEWER))
    async def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "running_tasks": len(ctl.scheduler.engines)}

    # -- hosts
    @r.get("/hosts", dependencies=role(Role.VIEWER))
    async def hosts() -> list[HostOut]:
        return inv.list_hosts()

    @r.post("/hosts", status_code=201, dependencies=role(Role.ADMIN))
    async def host_add(req: HostAdd) -> HostOut:
        """Enrol a host (admin): its agent URL and the secret from its agent.secret file."""
        return await ctl.add_host(req.address, req.secret, req.name, replace=True)

    @r.post("/hosts/register", status_code=201, dependencies=role(Role.ENROL))
    async def host_register(req: HostAdd) -> HostOut:
        """Self-registration by an agent with an enrolment token; it cannot change an enrolled host's secret."""
        return await ctl.add_host(req.address, req.secret, req.name, replace=False)

    @r.post("/hosts/{name}/cert/renew", dependencies=role(Role.ADMIN))
    async def host_cert_renew(name: str) -> TlsFact:
        inv.get_host(name)
        return await ctl.certs.issue(name)

    @r.delete("/hosts/{name}/cert", dependencies=role(Role.ADMIN))
    async def host_cert_remove(name: str) -> TlsFact:
        inv.get_host(name)
        return await ctl.certs.remove(name)

    @r.get("/hosts/{name}", dependencies=role(Role.VIEWER))
    async def host_show(name: str) -> HostOut:
        inv.get_host(name)
        return await inv.refresh_host(name)

    @r.post("/hosts/{name}/maintenance", status_code=202, dependencies=role(Role.ADMIN))
    async def host_maintenance(name: str, req: MaintenanceRequest) -> TaskOut | HostOut:
        """Enter: evacuate, then mark (returns the maintenance task). Exit: back in service."""
        if req.enter:
            return await ctl.maintenance.enter(name)
        ctl.maintenance.exit(name)
        return inv.get_host(name)

    # -- clusters (EVC)
    @r.get("/clusters", dependencies=role(Role.VIEWER))
    async def clusters() -> list[ClusterOut]:
        return ctl.clusters.list()

    @r.post("/clusters", status_code=201, dependencies=role(Role.ADMIN))
    async def cluster_create(req: ClusterCreate) -> ClusterOut:
        return ctl.clusters.create(req.name, req.evc_mode)   # hosts joining later must support the baseline

    @r.get("/clusters/{name}", dependencies=role(Role.VIEWER))
    async def cluster_show(name: str) -> ClusterOut:
        return ctl.clusters.get(name)

    @r.post("/clusters/{name}/hosts/{host}", dependencies=role(Role.ADMIN))
    async def cluster_add_host(name: str, host: str) -> ClusterOut:
        return ctl.clusters.add_host(name, host)

    @r.delete("/clusters/{name}/hosts/{host}", dependencies=role(Role.ADMIN))
    async def cluster_remove_host(name: str, host: str) -> ClusterOut:
        return ctl.clusters.remove_host(name, host)

    @r.patch("/clusters/{name}", dependencies=role(Role.ADMIN))
    async def cluster_update(name: str, req: ClusterUpdate) -> ClusterOut:
        """The cluster's default migration policy (VMs and requests override it)."""
        return ctl.clusters.set_policy(name, req.migration_policy)

    @r.get("/clusters/{name}/evc-modes", dependencies=role(Role.VIEWER))
    async def cluster_evc_modes(name: str) -> list[str]:
        return await ctl.clusters.evc_modes(name)

    @r.put("/clusters/{name}/evc", dependencies=role(Role.ADMIN))
    async def cluster_set_evc(name: str, req: ClusterCreate) -> ClusterOut:
        return await ctl.clusters.set_evc(name, req.evc_mode)

    @r.get("/datastores", dependencies=role(Role.VIEWER))
    async def datastores() -> list[dict[str, Any]]:
        return inv.datastores()

    @r.get("/networks", dependencies=role(Role.VIEWER))
    async def networks() -> list[dict[str, Any]]:
        return inv.networks()

    # -- VMs
    @r.get("/vms", dependencies=role(Role.VIEWER))
    async def vms() -> list[VMOut]:
        return inv.list_vms()

    @r.post("/vms", status_code=201, dependencies=role(Role.ADMIN))
    async def vm_create(req: VMCreate) -> VMOut:
        return await inv.create_vm(req)

    @r.get("/vms/{ref}", dependencies=role(Role.VIEWER))
    async def vm_show(ref: str) -> VMOut:
        return await inv.show_vm(ref)

    @r.post("/vms/{ref}/start", dependencies=role(Role.OPERATOR))
    async def vm_start(ref: str) -> VMOut:
        return await ctl.start_vm(ref)

    @r.post("/vms/{ref}/stop", dependencies=role(Role.OPERATOR))
    async def vm_stop(ref: str) -> VMOut:
        return await inv.stop_vm(ref)

    @r.delete("/vms/{ref}", dependencies=role(Role.ADMIN))
    async def vm_delete(ref: str) -> dict[str, bool]:
        await inv.delete_vm(ref)
        return {"deleted": True}

    @r.patch("/vms/{ref}", dependencies=role(Role.ADMIN))
    async def vm_set(ref: str, req: VMUpdate) -> VMOut:
        return inv.update_vm(ref, req)

    @r.post("/vms/{ref}/cdrom", dependencies=role(Role.OPERATOR))
    async def vm_cdrom(ref: str, req: CdromChange) -> VMOut:
        return await inv.change_cdrom(ref, req)

    @r.post("/vms/{ref}/migrate/validate", dependencies=role(Role.OPERATOR))
    async def vm_validate(ref: str, req: MigrateRequest) -> list[Finding]:
        return await ctl.validate_migration(ref, req)

    @r.post("/vms/{ref}/migrate", status_code=202, dependencies=role(Role.OPERATOR))
    async def vm_migrate(ref: str, req: MigrateRequest) -> TaskOut:
        return await ctl.migrate(ref, req)

    # -- tasks
    @r.get("/tasks", dependencies=role(Role.VIEWER))
    async def task_list(limit: int = Query(default=50, ge=1, le=500)) -> list[TaskOut]:
        return task_store.list_tasks(ctl.sessions, limit)

    @r.get("/tasks/{task_id}", dependencies=role(Role.VIEWER))
    async def task_show(task_id: str) -> TaskOut:
        return task_store.get_task(ctl.sessions, task_id)

    @r.post("/tasks/{task_id}/cancel", dependencies=role(Role.OPERATOR))
    async def task_cancel(task_id: str) -> TaskOut:
        return ctl.cancel(task_id)

    @r.post("/tasks/{task_id}/force-complete", dependencies=role(Role.OPERATOR))
    async def task_force_complete(task_id: str) -> TaskOut:
        """Switch a live migration over now: its downtime limit is raised to cover what remains."""
        return ctl.scheduler.force_complete(task_id)

    # -- tokens and audit (admin)
    @r.post("/tokens", status_code=201, dependencies=role(Role.ADMIN))
    async def token_create(req: TokenCreate) -> TokenCreated:
        return ctl.tokens.create(req)

    @r.get("/tokens", dependencies=role(Role.ADMIN))
    async def token_list() -> list[TokenOut]:
        return ctl.tokens.list()

    @r.delete("/tokens/{name}", dependencies=role(Role.ADMIN))
    async def token_revoke(name: str) -> TokenOut:
        return ctl.tokens.revoke(name)

    @r.get("/audit", dependencies=role(Role.ADMIN))
    async def audit(limit: int = Query(default=100, ge=1, le=AUDIT_KEEP)) -> list[AuditOut]:
        return ctl.audit.list(limit)

    app.include_router(r, prefix="/api/v1", responses=ERROR_RESPONSES)
    return app

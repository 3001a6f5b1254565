"""Hosts: enrolment, facts, migration certificates, maintenance mode; and the health of the controller."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response

from kvmotion import __version__
from kvmotion.controller import listing
from kvmotion.controller.auth import Role
from kvmotion.controller.routes.deps import Ctl, next_page_header, paged, role
from kvmotion.models.agent import TlsFact
from kvmotion.models.api import HostAdd, HostOut, HostSummary, MaintenanceRequest, TaskOut
from kvmotion.models.onboarding import HostApprove, HostRemoved, PendingHostOut, RegistrationOut

router = APIRouter()


@router.get("/health", dependencies=role(Role.VIEWER))
async def health(ctl: Ctl) -> dict[str, Any]:
    return {"ok": True, "version": __version__, "running_tasks": len(ctl.scheduler.engines)}


@router.get("/hosts", dependencies=role(Role.VIEWER), response_class=Response,
            responses={200: {"model": list[HostOut] | list[HostSummary], "headers": next_page_header("hosts")}})
def hosts(ctl: Ctl, request: Request,
          limit: int = Query(default=listing.DEFAULT_LIMIT, ge=1, le=listing.MAX_LIMIT, description="hosts per page"),
          cursor: str | None = Query(default=None, max_length=listing.MAX_CURSOR_CHARS,
                                     description="the previous page's X-Next-Cursor; none: the first page"),
          view: listing.View = Query(default="full", description="summary: without the facts (GET /hosts/{name})"),
          cluster: str | None = Query(default=None, max_length=64, description="only the hosts of this cluster"),
          state: listing.HostState | None = None) -> Response:
    """Hosts by name, a page at a time (``X-Next-Cursor``: the next page's cursor; absent on the last page). A plain
    function: FastAPI runs it in a thread (off the event loop)."""
    page = listing.host_page(ctl.sessions, limit, cursor, view, cluster, state)
    return paged(page, listing.HOSTS_FULL if view == "full" else listing.HOSTS_SUMMARY, request)


@router.post("/hosts", status_code=201, dependencies=role(Role.ADMIN))
async def host_add(req: HostAdd, ctl: Ctl) -> HostOut:
    """Enrol a host (admin): its agent URL and the secret from its agent.secret file."""
    return await ctl.add_host(req.address, req.secret, req.name, replace=True)


@router.post("/hosts/register", status_code=202, dependencies=role(Role.ENROL))
async def host_register(req: HostAdd, request: Request, ctl: Ctl) -> RegistrationOut:
    """Self-registration by an agent with an enrolment token (used up): the host waits for an admin's approval;
    it cannot change an enrolled host's secret."""
    return await ctl.onboarding.register(req, request.state.principal.name)


@router.get("/hosts/pending", dependencies=role(Role.ADMIN))
async def hosts_pending(ctl: Ctl) -> list[PendingHostOut]:
    return ctl.onboarding.pending()


@router.post("/hosts/{name}/approve", dependencies=role(Role.ADMIN))
async def host_approve(name: str, req: HostApprove, request: Request, ctl: Ctl) -> HostOut:
    """Admit a pending host whose fingerprint the admin checked on the host."""
    return await ctl.onboarding.approve(name, req.fingerprint, request.state.principal.name)


@router.delete("/hosts/pending/{name}", dependencies=role(Role.ADMIN))
async def host_reject(name: str, ctl: Ctl) -> PendingHostOut:
    return ctl.onboarding.reject(name)


@router.delete("/hosts/{name}", dependencies=role(Role.ADMIN))
async def host_remove(name: str, ctl: Ctl) -> HostRemoved:
    """Remove a host without VMs: its certificates are revoked (every other host gets the CRL)."""
    return await ctl.onboarding.remove(name)


@router.post("/hosts/{name}/cert/renew", dependencies=role(Role.ADMIN))
async def host_cert_renew(name: str, ctl: Ctl) -> TlsFact:
    ctl.inventory.get_host(name)
    return await ctl.certs.issue(name)


@router.delete("/hosts/{name}/cert", dependencies=role(Role.ADMIN))
async def host_cert_remove(name: str, ctl: Ctl) -> TlsFact:
    ctl.inventory.get_host(name)
    return await ctl.certs.remove(name)


@router.get("/hosts/{name}", dependencies=role(Role.VIEWER))
async def host_show(name: str, ctl: Ctl) -> HostOut:
    ctl.inventory.get_host(name)
    return await ctl.inventory.refresh_host(name)


@router.post("/hosts/{name}/maintenance", status_code=202, dependencies=role(Role.ADMIN))
async def host_maintenance(name: str, req: MaintenanceRequest, ctl: Ctl) -> TaskOut | HostOut:
    """Enter: evacuate, then mark (returns the maintenance task). Exit: back in service."""
    if req.enter:
        return await ctl.maintenance.enter(name)
    ctl.maintenance.exit(name)
    return ctl.inventory.get_host(name)


@router.get("/datastores", dependencies=role(Role.VIEWER))
async def datastores(ctl: Ctl) -> list[dict[str, Any]]:
    return ctl.inventory.datastores()


@router.get("/networks", dependencies=role(Role.VIEWER))
async def networks(ctl: Ctl) -> list[dict[str, Any]]:
    return ctl.inventory.networks()

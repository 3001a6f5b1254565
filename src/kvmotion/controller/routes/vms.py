"""Virtual machines: inventory, power, settings, CD/DVD media, and their moves."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from kvmotion.controller import listing
from kvmotion.controller.auth import Role
from kvmotion.controller.routes.deps import Ctl, next_page_header, paged, role
from kvmotion.models.api import (CdromChange, Finding, MigratePlan, MigrateRequest, TaskOut, VMCreate, VMOut,
                                 VMSummary, VMUpdate)

router = APIRouter()


@router.get("/vms", dependencies=role(Role.VIEWER), response_class=Response,
            responses={200: {"model": list[VMOut] | list[VMSummary], "headers": next_page_header("VMs")}})
def vms(ctl: Ctl, request: Request,
        limit: int = Query(default=listing.DEFAULT_LIMIT, ge=1, le=listing.MAX_LIMIT, description="VMs per page"),
        cursor: str | None = Query(default=None, max_length=listing.MAX_CURSOR_CHARS,
                                   description="the previous page's X-Next-Cursor; none: the first page"),
        view: listing.View = Query(default="full", description="summary: without the specs (GET /vms/{ref})"),
        host: str | None = Query(default=None, max_length=64, description="only the VMs of this host"),
        power_state: listing.PowerState | None = None) -> Response:
    """VMs by name, a page at a time (``X-Next-Cursor``: the next page's cursor; absent on the last page). A plain
    function: FastAPI runs it in a thread (off the event loop)."""
    page = listing.vm_page(ctl.sessions, limit, cursor, view, host, power_state)
    return paged(page, listing.VMS_FULL if view == "full" else listing.VMS_SUMMARY, request)


@router.post("/vms", status_code=201, dependencies=role(Role.ADMIN))
async def vm_create(req: VMCreate, ctl: Ctl) -> VMOut:
    return await ctl.inventory.create_vm(req)


@router.get("/vms/{ref}", dependencies=role(Role.VIEWER))
async def vm_show(ref: str, ctl: Ctl, refresh_guest: bool = False) -> VMOut:
    """``runtime.guest``: what the guest agent tells (cached up to 30 s; ``refresh_guest`` reads it now), or
    ``guest_agent: not answering``; it never holds the answer more than about 1.5 s."""
    return await ctl.inventory.show_vm(ref, refresh_guest)


@router.post("/vms/{ref}/start", dependencies=role(Role.OPERATOR))
async def vm_start(ref: str, ctl: Ctl) -> VMOut:
    return await ctl.start_vm(ref)


@router.post("/vms/{ref}/stop", dependencies=role(Role.OPERATOR))
async def vm_stop(ref: str, ctl: Ctl) -> VMOut:
    return await ctl.inventory.stop_vm(ref)


@router.delete("/vms/{ref}", dependencies=role(Role.ADMIN))
async def vm_delete(ref: str, ctl: Ctl) -> dict[str, bool]:
    await ctl.inventory.delete_vm(ref)
    return {"deleted": True}


@router.patch("/vms/{ref}", dependencies=role(Role.ADMIN))
async def vm_set(ref: str, req: VMUpdate, ctl: Ctl) -> VMOut:
    return ctl.inventory.update_vm(ref, req)


@router.post("/vms/{ref}/cdrom", dependencies=role(Role.OPERATOR))
async def vm_cdrom(ref: str, req: CdromChange, ctl: Ctl) -> VMOut:
    return await ctl.inventory.change_cdrom(ref, req)


@router.post("/vms/{ref}/migrate/validate", dependencies=role(Role.OPERATOR))
async def vm_validate(ref: str, req: MigrateRequest, ctl: Ctl) -> list[Finding]:
    return await ctl.validate_migration(ref, req)


@router.post("/vms/{ref}/migrate/plan", dependencies=role(Role.OPERATOR))
async def vm_plan(ref: str, req: MigrateRequest, ctl: Ctl) -> MigratePlan:
    """What ``migrate`` would do: its kind, every finding, the prediction and the encryption; nothing is held."""
    return await ctl.plan_migration(ref, req)


@router.post("/vms/{ref}/migrate", status_code=202, dependencies=role(Role.OPERATOR))
async def vm_migrate(ref: str, req: MigrateRequest, ctl: Ctl) -> TaskOut:
    return await ctl.migrate(ref, req)

"""Virtual machines: inventory, power, settings, CD/DVD media, and their moves."""
from __future__ import annotations

from fastapi import APIRouter

from kvmotion.controller.auth import Role
from kvmotion.controller.routes.deps import Ctl, role
from kvmotion.models.api import CdromChange, Finding, MigratePlan, MigrateRequest, TaskOut, VMCreate, VMOut, VMUpdate

router = APIRouter()


@router.get("/vms", dependencies=role(Role.VIEWER))
def vms(ctl: Ctl) -> list[VMOut]:
    """A plain function: FastAPI runs it, and checks its answer, in a thread (off the event loop)."""
    return ctl.inventory.list_vms()


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

"""The image library: import, list, show and delete disk images; bring in a VM from an OVF/OVA package.

Reading is for every role (viewer up); importing, deleting and creating VMs is for admins, as with `vm create`.
"""
from __future__ import annotations

from fastapi import APIRouter

from kvmotion.controller.auth import Role
from kvmotion.controller.routes.deps import Ctl, role
from kvmotion.models.api import TaskOut, VMOut
from kvmotion.models.images import ImageImport, ImageOut, OvfImport

router = APIRouter()


@router.get("/images", dependencies=role(Role.VIEWER))
async def images(ctl: Ctl) -> list[ImageOut]:
    return ctl.images.list_images()


@router.post("/images", status_code=202, dependencies=role(Role.ADMIN))
async def image_import(req: ImageImport, ctl: Ctl) -> TaskOut:
    """The file is checked at once (bad input: an error, nothing written); the copy runs as a task
    (GET /tasks/{id}: phases convert, check, checksum, with percent; its result is the image)."""
    return await ctl.images.import_image(req)


@router.get("/images/{name}", dependencies=role(Role.VIEWER))
async def image_show(name: str, ctl: Ctl) -> ImageOut:
    return ctl.images.get_image(name)


@router.delete("/images/{name}", dependencies=role(Role.ADMIN))
async def image_delete(name: str, ctl: Ctl) -> dict[str, bool]:
    await ctl.images.delete_image(name)
    return {"deleted": True}


@router.post("/vms/import-ovf", status_code=201, dependencies=role(Role.ADMIN))
async def vm_import_ovf(req: OvfImport, ctl: Ctl) -> VMOut:
    return await ctl.images.import_ovf(req)

"""The controllers of this database: which one leads (docs/controllers.md)."""
from __future__ import annotations

from fastapi import APIRouter

from kvmotion.controller.auth import Role
from kvmotion.controller.routes.deps import Ctl, role
from kvmotion.models.controllers import ControllersOut

router = APIRouter()


@router.get("/controllers", dependencies=role(Role.VIEWER))
async def controllers_show(ctl: Ctl) -> ControllersOut:
    """This controller, whether it leads, and the leader the others hand state-changing calls to."""
    return ControllersOut.model_validate(ctl.leadership.status())

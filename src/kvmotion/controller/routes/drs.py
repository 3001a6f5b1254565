"""DRS of a cluster: settings, rules, load and recommendations, applying them (``controller.drs``)."""
from __future__ import annotations

from fastapi import APIRouter

from kvmotion.controller.auth import Role
from kvmotion.controller.routes.deps import Ctl, role
from kvmotion.models.drs import DrsApplied, DrsApply, DrsConfig, DrsRule, DrsStatus, DrsUpdate

router = APIRouter()


@router.get("/clusters/{name}/drs", dependencies=role(Role.VIEWER))
async def drs_status(name: str, ctl: Ctl) -> DrsStatus:
    """The cluster's settings, rules, host loads, imbalance, recommendations and rule faults, computed now."""
    return await ctl.drs.status(name)


@router.patch("/clusters/{name}/drs", dependencies=role(Role.ADMIN))
async def drs_update(name: str, req: DrsUpdate, ctl: Ctl) -> DrsConfig:
    """Automation level (off, manual, fully), migration threshold (1 conservative … 5 aggressive), interval,
    cooldown: the fields given replace the current ones."""
    return ctl.drs.update(name, req)


@router.post("/clusters/{name}/drs/rules", status_code=201, dependencies=role(Role.ADMIN))
async def drs_rule_add(name: str, req: DrsRule, ctl: Ctl) -> DrsConfig:
    return ctl.drs.add_rule(name, req)


@router.delete("/clusters/{name}/drs/rules/{rule}", dependencies=role(Role.ADMIN))
async def drs_rule_remove(name: str, rule: str, ctl: Ctl) -> DrsConfig:
    return ctl.drs.remove_rule(name, rule)


@router.post("/clusters/{name}/drs/apply", status_code=202, dependencies=role(Role.OPERATOR))
async def drs_apply(name: str, req: DrsApply, ctl: Ctl) -> DrsApplied:
    """Start the moves of the recommendations ``ids`` (as last listed), or of every current one; each is checked
    again and goes through admission control."""
    return await ctl.drs.apply(name, req.ids)

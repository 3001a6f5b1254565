"""API tokens and the audit log (admin only)."""
from __future__ import annotations

from fastapi import APIRouter, Query

from kvmotion.controller.auth import AUDIT_KEEP, AuditOut, Role, TokenCreate, TokenCreated, TokenOut
from kvmotion.controller.routes.deps import Ctl, role

router = APIRouter()


@router.post("/tokens", status_code=201, dependencies=role(Role.ADMIN))
async def token_create(req: TokenCreate, ctl: Ctl) -> TokenCreated:
    return ctl.tokens.create(req)


@router.get("/tokens", dependencies=role(Role.ADMIN))
async def token_list(ctl: Ctl) -> list[TokenOut]:
    return ctl.tokens.list()


@router.delete("/tokens/{name}", dependencies=role(Role.ADMIN))
async def token_revoke(name: str, ctl: Ctl) -> TokenOut:
    return ctl.tokens.revoke(name)


@router.get("/audit", dependencies=role(Role.ADMIN))
async def audit(ctl: Ctl, limit: int = Query(default=100, ge=1, le=AUDIT_KEEP)) -> list[AuditOut]:
    return ctl.audit.list(limit)

"""What every router depends on: the controller of the app, a role check per endpoint, strict query strings."""
from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kvmotion.common.errors import InvalidInputError
from kvmotion.controller.auth import Principal, Role, authenticate_bearer, require_role
from kvmotion.controller.gate import principal_of
from kvmotion.controller.service import Controller

bearer = HTTPBearer(auto_error=False, description="an API token (`kvmotion token create`)")


def get_controller(request: Request) -> Controller:
    """The controller the app was made for (``create_app`` puts it on the app's state)."""
    return request.app.state.controller


Ctl = Annotated[Controller, Depends(get_controller)]


def role(needed: Role) -> list[Any]:
    """The dependency an endpoint declares: a valid bearer token whose role is at least ``needed``."""
    async def check(request: Request, ctl: Ctl,
                    cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        what = f"{request.method} {request.url.path}"
        principal = principal_of(request.scope) or await asyncio.to_thread(   # the gate found it already
            authenticate_bearer, ctl.tokens, cred.credentials if cred else None, what)
        request.state.principal = principal          # the audit names the caller even when refused
        require_role(principal, needed, what)
        return principal
    return [Depends(check)]


async def no_unknown_query(request: Request) -> None:
    """A misspelt query parameter is an error, not silently ignored (as with body fields)."""
    route = request.scope.get("route")
    known = {q.alias for q in route.dependant.query_params} if isinstance(route, APIRoute) else set()
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise InvalidInputError(f"unknown query parameter(s): {', '.join(repr(u[:40]) for u in unknown[:5])}",
                                remedy=f"use only: {', '.join(sorted(known)) or 'none'}")

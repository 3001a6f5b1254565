"""What every router depends on: the controller of the app, a role check per endpoint, strict query strings."""
from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter

from kvmotion.common.errors import InvalidInputError
from kvmotion.controller.auth import Principal, Role, authenticate_bearer, require_role
from kvmotion.controller.gate import principal_of
from kvmotion.controller.listing import Page
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


def paged(page: Page[Any], adapter: TypeAdapter[Any], request: Request) -> Response:
    """A page of a list as JSON (the list itself, so a client that reads one page reads it as before); the next
    page's cursor in ``X-Next-Cursor`` and as ``Link: <…>; rel="next"`` (neither on the last page). Serialized by
    the model's own adapter in one pass (``adapter`` is of the page's item type)."""
    headers: dict[str, str] = {}
    if page.next_cursor is not None:
        headers["X-Next-Cursor"] = page.next_cursor
        following = request.url.include_query_params(cursor=page.next_cursor)
        headers["Link"] = f'<{following.path}?{following.query}>; rel="next"'
    return Response(adapter.dump_json(page.items), media_type="application/json", headers=headers)


def next_page_header(what: str) -> dict[str, Any]:
    """The OpenAPI description of a paged list's headers."""
    return {"X-Next-Cursor": {"description": f"the cursor of the next page of {what} (absent on the last page)",
                              "schema": {"type": "string"}},
            "Link": {"description": 'the next page\'s URL, rel="next" (absent on the last page)',
                     "schema": {"type": "string"}}}

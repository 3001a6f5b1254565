"""``/ui``: the web client's page and assets (public: they hold no data and no secret) with a strict
Content-Security-Policy, and its session endpoints (sign in with an API token, who am I, sign out)."""
from __future__ import annotations

import asyncio
import re
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, Field

from kvmotion.common.errors import NotFoundError, UnauthorizedError
from kvmotion.controller.auth import Principal, authenticate_bearer
from kvmotion.controller.routes.deps import Ctl
from kvmotion.controller.webui.sessions import (UiSessions, check_csrf, check_origin, clear_cookie_header, cookie_of,
                                                set_cookie_header)

router = APIRouter()
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
ASSET = re.compile(r"^[a-z][a-z0-9-]{0,40}\.(js|css|html)$")
TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8", "html": "text/html; charset=utf-8"}


class SignIn(BaseModel):
    token: str = Field(min_length=1, max_length=512, description="an API token (`kvmotion token create`)")


class SessionOut(BaseModel):
    name: str
    role: str
    csrf: str = Field(description="send it as X-CSRF-Token on every state-changing call")


def ui_sessions(request: Request) -> UiSessions:
    return request.app.state.ui_sessions


Sessions = Annotated[UiSessions, Depends(ui_sessions)]


def _asset(name: str) -> bytes:
    if not ASSET.match(name):
        raise NotFoundError(f"the web client has no file {name!r}", remedy="open /ui/")
    try:
        return resources.files("kvmotion.controller.webui").joinpath("static", name).read_bytes()
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise NotFoundError(f"the web client has no file {name!r}", remedy="open /ui/") from exc


async def _principal(ctl: Ctl, request: Request, token: str) -> Principal:
    principal = await asyncio.to_thread(authenticate_bearer, ctl.tokens, token, f"{request.method} /ui/session")
    request.state.principal = principal            # the audit names who signed in
    return principal


@router.post("/ui/session", tags=["web client"])
async def sign_in(req: SignIn, request: Request, response: Response, ctl: Ctl, sessions: Sessions) -> SessionOut:
    """Sign in with an API token: the session cookie (HttpOnly, Secure, SameSite=Strict) and the CSRF token."""
    check_origin(request.scope, "POST /ui/session")        # no signing a browser in from another site
    principal = await _principal(ctl, request, req.token.strip())
    s = sessions.open(req.token.strip())
    response.headers["Set-Cookie"] = set_cookie_header(s)
    response.headers["Cache-Control"] = "no-store"
    return SessionOut(name=principal.name, role=str(principal.role), csrf=s.csrf)


@router.get("/ui/session", tags=["web client"])
async def whoami(request: Request, response: Response, ctl: Ctl, sessions: Sessions) -> SessionOut:
    """The signed-in session (its CSRF token too, for a reloaded page); 401 when there is none."""
    s = sessions.find(cookie_of(request.scope))
    if s is None:
        raise UnauthorizedError("not signed in", remedy="sign in with an API token at /ui/")
    response.headers["Cache-Control"] = "no-store"
    principal = await _principal(ctl, request, s.token)
    return SessionOut(name=principal.name, role=str(principal.role), csrf=s.csrf)


@router.delete("/ui/session", tags=["web client"])
async def sign_out(request: Request, response: Response, sessions: Sessions) -> dict[str, bool]:
    """Sign out: the session ends here, the cookie is cleared."""
    s = sessions.find(cookie_of(request.scope))
    if s is not None:
        check_csrf(request.scope, s, "DELETE /ui/session")
        sessions.close(s.id)
    response.headers["Set-Cookie"] = clear_cookie_header()
    return {"signed_out": s is not None}


# after the session routes: /ui/{name} would match /ui/session
@router.get("/ui", include_in_schema=False)
async def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/", include_in_schema=False)
@router.get("/ui/{name}", include_in_schema=False)
async def ui_file(name: str = "index.html") -> Response:
    body = await asyncio.to_thread(_asset, name)
    return Response(body, media_type=TYPES[name.rpartition(".")[2]], headers=SECURITY_HEADERS)

"""The controller's REST API (OpenAPI at /docs and /openapi.json, for a viewer's token unless the docs are public):
the app that wires the routers, its Prometheus metrics at /metrics (a viewer's token too), and the web client at /ui.

Each domain has its router in :mod:`kvmotion.controller.routes`; every endpoint declares its role there.
"""
from __future__ import annotations

import asyncio
import logging
import re
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvmotion import __version__
from kvmotion.common.apierrors import invalid_input, kvmotion_error
from kvmotion.common.errors import InvalidInputError, KvmotionError
from kvmotion.controller.auth import Peer, Principal
from kvmotion.controller.forward import LeaderForward
from kvmotion.controller.gate import PEER_PREFIX, ApiGate
from kvmotion.controller.metrics import Exposition
from kvmotion.controller.routes import (clusters, console, controllers, crossmove, devices, domain, drs, guest,
                                        hosts, images, metrics, tasks, tokens, vms)
from kvmotion.controller.routes.deps import no_unknown_query
from kvmotion.controller.service import Controller
from kvmotion.controller.webui import routes as webui
from kvmotion.controller.webui.sessions import UiSessions

log = logging.getLogger(__name__)
PREFIX = "/api/v1"
ROUTERS = (hosts.router, clusters.router, drs.router, images.router, vms.router, tasks.router, tokens.router,
           devices.router, guest.router, domain.router, domain.peer_router, crossmove.peer_router, controllers.router)


class ErrorDetail(BaseModel):
    code: str
    message: str
    remedy: str = ""
    details: dict[str, Any] | None = None
    cause: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what} for code, what in (
        (400, "the body is not valid JSON"), (401, "no token, or an unknown, revoked or expired one"), (403, "the token's role is too low"),
        (404, "no such object"), (409, "conflicts with the current state, or a check failed"),
        (422, "invalid input"), (502, "a host agent did not answer"), (504, "a deadline passed"))}


class _MethodIndex:
    """Which methods the API documents for a concrete path (for the Allow header of a 405)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._index: list[tuple[re.Pattern[str], list[str]]] | None = None

    def methods(self, path: str) -> list[str]:
        if self._index is None:
            self._index = [(re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)) + "$"),
                            sorted(m.upper() for m in ops)) for p, ops in self.app.openapi()["paths"].items()]
        matches = [(p.pattern.count("[^/]+"), ms) for p, ms in self._index if p.match(path)]
        return min(matches)[1] if matches else []        # the most specific path (fewest parameters)


def create_app(ctl: Controller, public_docs: bool = False) -> FastAPI:
    """The API of one controller: its routers, the error shape, the audit of every state-changing call. Every
    call under /api/v1 needs a token before its body is read (``gate.ApiGate``); so do the metrics (/metrics) and
    the docs (/docs, /openapi.json), a viewer's token, the docs unless ``public_docs``."""
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ctl.startup()
        yield
        await ctl.shutdown()

    app = FastAPI(title="kvmotion controller", version=__version__, lifespan=lifespan)
    app.state.controller = ctl
    app.state.metrics = Exposition(ctl.sessions, leading=lambda: ctl.leadership.is_leader,
                                   drs=lambda: dict(ctl.drs.latest))          # reads at a scrape
    app.state.ui_sessions = UiSessions()               # the web client's signed-in browsers (webui/sessions.py)
    _error_handlers(app)
    docs = frozenset(p for p in (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
                     if p and not public_docs)
    app.add_middleware(LeaderForward, leadership=ctl.leadership, ca_file=ctl.pki_dir / "ca-cert.pem")  # in the gate
    app.add_middleware(ApiGate, tokens=ctl.tokens, viewer_paths=docs | {metrics.PATH},   # inside the audit
                       peers=ctl.domain.authenticate, ui=app.state.ui_sessions)
    _audit(app, ctl)
    for router in ROUTERS:
        app.include_router(router, prefix=PREFIX, responses=ERROR_RESPONSES,
                           dependencies=[Depends(no_unknown_query)])
    app.include_router(metrics.router, responses=ERROR_RESPONSES, dependencies=[Depends(no_unknown_query)])
    app.include_router(console.router, prefix=PREFIX)      # websockets: their own auth (routes/console.py)
    app.include_router(webui.router, responses=ERROR_RESPONSES)   # /ui: the web client (docs/web-client.md)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error in one shape: ``{"error": {code, message, remedy, …}}``."""
    allowed = _MethodIndex(app)

    app.add_exception_handler(KvmotionError, kvmotion_error)
    app.add_exception_handler(RequestValidationError, invalid_input("fix the fields named above (schema: /docs)"))

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, exc: DataError) -> JSONResponse:
        """A value the database refused (PostgreSQL is strict where SQLite is lax): bad input, not a crash."""
        log.warning("%s %s: the database refused a value: %s", request.method, request.url.path, exc.orig)
        err = InvalidInputError("a value of this request does not fit the database: a text longer than its field "
                                "allows, a NUL character, or a number out of range",
                                remedy="shorten the value or leave the character out (the controller's log names "
                                       "the database's reason)")
        return JSONResponse(status_code=err.http_status, content={"error": err.to_dict()})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed.methods(request.url.path))
        code = {404: "NOT_FOUND", 405: "INVALID_INPUT"}.get(exc.status_code, "INVALID_INPUT")
        return JSONResponse(status_code=exc.status_code, headers=headers, content={"error": {
            "code": code, "message": f"{request.method} {request.url.path}: {exc.detail}",
            "remedy": "see /docs for the API's paths and methods"}})


def _audit(app: FastAPI, ctl: Controller) -> None:
    """Every state-changing call, also a refused one, is recorded with the caller the role check found; so is
    every call of another controller (``/api/v1/peer/``), with that controller's name."""
    @app.middleware("http")
    async def audit(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        if request.method not in ("GET", "HEAD", "OPTIONS") or request.url.path.startswith(PEER_PREFIX):
            who: Principal | Peer | None = getattr(request.state, "principal", None)
            client = request.client.host if request.client else "?"
            await asyncio.to_thread(ctl.audit.record, who.name if who else "-", str(who.role) if who else "-",
                                    request.method, request.url.path, response.status_code, client)
        return response

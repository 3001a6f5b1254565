"""The agent's REST API. The controller decides; the agent executes."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kvmotion import __version__
from kvmotion.agent.auth import SignedRequestsOnly
from kvmotion.agent.console import ConsoleSessions
from kvmotion.agent.routes import console, devices, guest, host, images, migration, storage, vms
from kvmotion.agent.service import Agent
from kvmotion.common.errors import KvmotionError


async def _kvm_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KvmotionError)
    return JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()})


def create_app(agent: Agent, secret: str, after_start: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    """The agent's API; every request must be signed with ``secret`` (the host's enrolment secret)."""
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await agent.startup()
        side = asyncio.create_task(after_start()) if after_start is not None else None
        yield
        if side is not None:
            side.cancel()
        await agent.shutdown()

    app = FastAPI(title="kvmotion agent", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.agent = agent
    app.state.consoles = ConsoleSessions()
    app.add_middleware(SignedRequestsOnly, secret=secret)
    app.add_exception_handler(KvmotionError, _kvm_error)
    for module in (host, vms, migration, storage, devices, images, guest):
        app.include_router(module.router)
    app.include_router(console.router)
    return app

"""The agent's REST API. The controller decides; the agent executes."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from kvmotion import __version__
from kvmotion.agent.auth import SignedRequestsOnly
from kvmotion.agent.console import ConsoleSessions
from kvmotion.agent.nonces import NONCE_FILE, NonceJournal
from kvmotion.agent.routes import console, devices, guest, host, images, migration, storage, vms
from kvmotion.agent.service import Agent
from kvmotion.common.apierrors import invalid_input, kvmotion_error
from kvmotion.common.errors import KvmotionError
from kvmotion.common.hostauth import NonceCache


def create_app(agent: Agent, secret: str, after_start: Callable[[], Awaitable[None]] | None = None,
               state_dir: Path | None = None) -> FastAPI:
    """The agent's API; every request must be signed with ``secret`` (the host's enrolment secret). With
    ``state_dir`` the replay memory survives a restart (``kvmotion.agent.nonces``); without it (tests), it is
    kept in memory only."""
    nonces = NonceJournal(state_dir / NONCE_FILE) if state_dir is not None else NonceCache()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await agent.startup()
        side = asyncio.create_task(after_start()) if after_start is not None else None
        yield
        if side is not None:
            side.cancel()
        await agent.shutdown()
        nonces.close()

    app = FastAPI(title="kvmotion agent", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.agent = agent
    app.state.consoles = ConsoleSessions()
    app.add_middleware(SignedRequestsOnly, secret=secret, nonces=nonces)
    app.add_exception_handler(KvmotionError, kvmotion_error)
    app.add_exception_handler(RequestValidationError, invalid_input(
        "fix the fields named above (the controller and this agent may run different kvmotion versions)"))
    for module in (host, vms, migration, storage, devices, images, guest):
        app.include_router(module.router)
    app.include_router(console.router)
    return app

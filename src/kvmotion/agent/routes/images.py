"""Image library routes: import a file as a library image, remove one, open and close OVF packages.

Every route is behind the agent's signed-request check (``SignedRequestsOnly`` in ``agent.api``), like the others.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter

from kvmotion.agent import imagelib, ovfpkg
from kvmotion.agent.routes.deps import AgentDep
from kvmotion.models.images import (AgentImageImport, AgentImageRemove, AgentImportStatus, OvfClose, OvfOpen,
                                    OvfPackage)

router = APIRouter(prefix="/v1")


def _roots(agent: AgentDep) -> list[Path]:
    return [p.resolve() for p in agent.cfg.import_dirs]


@router.post("/images/import")
async def image_import(req: AgentImageImport, agent: AgentDep) -> AgentImportStatus:
    """Checks the file at once (bad input: an error here), then copies it in the background (poll the job)."""
    return await agent.image_imports.start(agent.context(), req, _roots(agent))


@router.get("/images/import/{job}")
async def image_import_status(job: str, agent: AgentDep) -> AgentImportStatus:
    return agent.image_imports.status(job)


@router.post("/images/remove")
async def image_remove(req: AgentImageRemove, agent: AgentDep) -> dict[str, bool]:
    return {"removed": await asyncio.to_thread(imagelib.remove_image, agent.context(), req.datastore, req.name)}


@router.post("/images/ovf/open")
async def ovf_open(req: OvfOpen, agent: AgentDep) -> OvfPackage:
    return await asyncio.to_thread(ovfpkg.open_package, agent.context(), req, _roots(agent))


@router.post("/images/ovf/close")
async def ovf_close(req: OvfClose, agent: AgentDep) -> dict[str, bool]:
    return {"removed": await asyncio.to_thread(ovfpkg.close_package, agent.context(), req)}

"""Live migration routes, both sides: the shadow, the outgoing stream, post-copy, finalize."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from kvmotion.agent import nbdtls
from kvmotion.agent.routes.deps import AgentDep
from kvmotion.models.agent import (IncomingReady, IncomingRequest, MigrationReport, MigrationTuning, OutgoingRequest,
                                   PostcopyRecover, PostcopyResume, ReleaseReport)

router = APIRouter(prefix="/v1/vms")


@router.post("/{uuid}/incoming")
async def incoming(uuid: str, req: IncomingRequest, agent: AgentDep) -> IncomingReady:
    req.disk_keys = agent.keywrap.unwrap_all(req.disk_keys)
    req.nbd_psk = nbdtls.open_psk(agent.keywrap, req.nbd_psk)
    return await agent.prepare_incoming(req)


@router.delete("/{uuid}/incoming")
async def abort_incoming(uuid: str, agent: AgentDep) -> dict[str, bool]:
    return {"removed": await agent.abort_incoming(uuid)}


@router.post("/{uuid}/outgoing")
async def outgoing(uuid: str, req: OutgoingRequest, agent: AgentDep) -> MigrationReport:
    return await agent.start_outgoing(uuid, req)


@router.get("/{uuid}/migration")
async def migration_report(uuid: str, agent: AgentDep, wait_s: float = Query(default=0.0, ge=0, le=5),
                           since: str | None = Query(default=None, max_length=32)) -> MigrationReport:
    return await agent.migration_report(uuid, wait_s, since)


@router.post("/{uuid}/migration/tune")
async def tune(uuid: str, req: MigrationTuning, agent: AgentDep) -> dict[str, Any]:
    return await agent.tune(uuid, req)


@router.post("/{uuid}/migration/postcopy")
async def postcopy_start(uuid: str, agent: AgentDep) -> dict[str, Any]:
    return await agent.postcopy_start(uuid)


@router.post("/{uuid}/migration/pause")
async def postcopy_pause(uuid: str, agent: AgentDep) -> dict[str, Any]:
    return await agent.postcopy_pause(uuid)


@router.post("/{uuid}/migration/recover")
async def postcopy_recover(uuid: str, req: PostcopyRecover, agent: AgentDep) -> dict[str, Any]:
    return await agent.postcopy_recover(uuid, req.listen_address)


@router.post("/{uuid}/migration/resume")
async def postcopy_resume(uuid: str, req: PostcopyResume, agent: AgentDep) -> dict[str, Any]:
    return await agent.postcopy_resume(uuid, req.uri, req.probe_address)


@router.post("/{uuid}/migration/cancel")
async def cancel(uuid: str, agent: AgentDep, resume_if_completed: bool = True) -> MigrationReport | None:
    return await agent.cancel_outgoing(uuid, resume_if_completed)


@router.post("/{uuid}/resume")
async def resume(uuid: str, agent: AgentDep, announce: bool = False) -> dict[str, Any]:
    return await agent.resume(uuid, announce)


@router.post("/{uuid}/announce")
async def announce(uuid: str, agent: AgentDep) -> dict[str, Any]:
    return await agent.announce(uuid)


@router.post("/{uuid}/finalize-source")
async def finalize_source(uuid: str, agent: AgentDep) -> ReleaseReport:
    return await agent.finalize_source(uuid)

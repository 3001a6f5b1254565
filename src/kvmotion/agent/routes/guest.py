"""Guest routes: what the guest agent tells, the guest clock, graceful power operations."""
from __future__ import annotations

from fastapi import APIRouter, Query

from kvmotion.agent.routes.deps import AgentDep
from kvmotion.models.guest import ClockSyncRequest, GuestClock, GuestFacts, PowerOpResult, PowerRequest

router = APIRouter(prefix="/v1/vms")


@router.get("/{uuid}/guest")
async def guest_facts(uuid: str, agent: AgentDep, max_age_s: float = Query(default=30.0, ge=0, le=86400),
                      deadline_s: float = Query(default=1.5, ge=0.1, le=30)) -> GuestFacts:
    """Cached up to ``max_age_s``; a guest agent silent past ``deadline_s`` gives ``guest_agent: not answering``."""
    return await agent.guest_facts(uuid, max_age_s, deadline_s)


@router.post("/{uuid}/guest/ping")
async def guest_ping(uuid: str, agent: AgentDep,
                     deadline_s: float = Query(default=2.0, ge=0.1, le=30)) -> dict[str, float]:
    """``guest-ping``: its round trip, or GUEST_AGENT_SILENT (504)."""
    return await agent.guest_ping(uuid, deadline_s)


@router.post("/{uuid}/guest/clock-sync")
async def guest_clock_sync(uuid: str, req: ClockSyncRequest, agent: AgentDep) -> GuestClock:
    return await agent.guest_clock_sync(uuid, req.deadline_s, req.step_ms, agent.cfg.name, req.set_allowance_s)


@router.post("/{uuid}/shutdown")
async def shutdown(uuid: str, req: PowerRequest, agent: AgentDep) -> PowerOpResult:
    return await agent.power_graceful(uuid, "shutdown", req.timeout_s, req.force)


@router.post("/{uuid}/reboot")
async def reboot(uuid: str, req: PowerRequest, agent: AgentDep) -> PowerOpResult:
    return await agent.power_graceful(uuid, "reboot", req.timeout_s, req.force)

"""After a move: does the guest live where it runs now? The host's agent samples and judges
(:mod:`kvmotion.agent.hv.qemu.health`); the task's result records the verdict, with a finding when it is not healthy.

The check starts once the guest runs on its new host (after resume and announce, or after a Storage vMotion's
pivot) and overlaps the steps that follow, so it adds nothing to the guest's pause. It never fails the move:
a check that cannot be made gives the verdict ``unknown`` with its error.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kvmotion.models.findings import Finding, Severity
from kvmotion.common.errors import KvmotionError
from kvmotion.models.agent import GuestHealth, HealthCheckRequest
from kvmotion.migration.ports import HostClient

log = logging.getLogger(__name__)

WINDOW_S = 1.5                # long enough for a few ARP probes and CPU ticks, short against a move

Check = asyncio.Task[GuestHealth]


async def check(agent: HostClient, uuid: str, since: float | None) -> GuestHealth:
    """The agent's verdict; ``unknown`` with the error when the check itself fails. Never raises."""
    try:
        return await agent.health_check(uuid, HealthCheckRequest(window_s=WINDOW_S, since=since))
    except KvmotionError as exc:
        error = exc.message
    except Exception as exc:  # noqa: BLE001 - a check must never fail the move
        log.exception("guest check of %s on %s crashed", uuid, agent.host)
        error = f"{type(exc).__name__}: {exc}"
    return GuestHealth(verdict="unknown", host=agent.host, reasons=[f"the check failed: {error}"], errors=[error],
                       checked_at=time.time())


def start(agent: HostClient, uuid: str, since: float | None) -> Check:
    """Start the check beside whatever follows; :func:`outcome` collects it."""
    return asyncio.create_task(check(agent, uuid, since), name=f"guest-check-{uuid}")


def finding(h: GuestHealth, vm_name: str) -> Finding | None:
    """GUEST_UNHEALTHY (warning) or GUEST_HEALTH_UNKNOWN (info); None when healthy."""
    if h.verdict == "healthy":
        return None
    why = "; ".join(h.reasons) or "no reason given"
    if h.verdict == "unhealthy":
        return Finding(code="GUEST_UNHEALTHY", severity=Severity.WARNING, subject=f"vm:{vm_name}",
                       message=f"the guest looks hung or unreachable on {h.host} after the move: {why}",
                       remedy=f"the move itself completed and the VM runs on {h.host}: look at its console "
                              f"(`kvmotion vm show {vm_name}`) and its QEMU log there; if the guest does not "
                              f"recover, restart it (`kvmotion vm stop {vm_name}`, then `vm start`)")
    return Finding(code="GUEST_HEALTH_UNKNOWN", severity=Severity.INFO, subject=f"vm:{vm_name}",
                   message=f"whether the guest lives on {h.host} after the move is not known: {why}",
                   remedy=f"check the guest yourself (`kvmotion vm show {vm_name}`, a ping to it)")


async def outcome(task: Check | None, vm_name: str) -> dict[str, Any]:
    """The task result's fields: ``guest_health``, and ``findings``/``warnings`` when it is not healthy."""
    if task is None:
        return {}
    h = await task              # bounded: the agent call has a deadline, and check() never raises
    out: dict[str, Any] = {"guest_health": h.model_dump()}
    f = finding(h, vm_name)
    if f is not None:
        out["findings"] = [f.model_dump(mode="json")]
        if f.severity == Severity.WARNING:
            out["warnings"] = [f"{f.code}: {f.message}"]
    return out

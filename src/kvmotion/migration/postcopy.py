"""Post-copy steps the controller carries out (the engine and reconciliation share them).

Post-copy is never cancelled: the guest runs on the destination while part of its memory is on the source. A
stalled link is paused on both sides; a paused one is reconnected (the destination listens again, the source
dials it), as often as it takes.
"""
from __future__ import annotations

import asyncio
from typing import Any

from kvmotion.common.errors import KvmotionError
from kvmotion.migration.ports import HostClient


async def pause_both(src: HostClient, dst: HostClient, uuid: str) -> dict[str, Any]:
    """Pause each side that still waits on the link (a side that noticed the failure paused itself)."""
    out: dict[str, Any] = {}
    for side, agent in (("source", src), ("destination", dst)):
        try:
            out[side] = (await agent.postcopy_pause(uuid))["status"]
        except KvmotionError as exc:
            out[f"{side}_error"] = exc.message
    return out


async def recover(src: HostClient, dst: HostClient, uuid: str, dst_address: str) -> dict[str, Any]:
    """One reconnection attempt: the destination listens on a new port, the source dials it once the
    destination's migration address answers. Raises when an attempt cannot be made (retried by the caller)."""
    listening = await dst.postcopy_recover(uuid, dst_address)
    resumed = await src.postcopy_resume(uuid, listening["uri"], dst_address)
    return {"uri": listening["uri"], "source": resumed.get("status")}


async def dst_migration_status(dst: HostClient, uuid: str) -> str | None:
    """The destination's migration status as its agent follows it (from events: never a QEMU call), or None
    when the agent does not answer."""
    try:
        return (await dst.migration(uuid)).status
    except (KvmotionError, asyncio.TimeoutError):
        return None

"""After a live move: the guest's clock against its new host's, set through the guest agent (as VMware Tools does
after a vMotion). The destination's agent reads ``guest-get-time``, sets the time with ``guest-set-time`` when the
guest is off by more than a step, and reads it again (:mod:`kvmotion.agent.hv.qemu.guestinfo`).

It starts once the guest runs on the destination and overlaps the release of the source, so it adds nothing to
the guest's pause nor to the move's total time; it has its own deadline and never fails the move. The task's
result records ``guest_clock: {offset_before_ms, offset_after_ms, set, why}``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from kvmotion.common.errors import KvmotionError
from kvmotion.migration.ports import HostClient
from kvmotion.models.guest import GuestClock

log = logging.getLogger(__name__)

DEADLINE_S = 2.0     # the agent's for the sync and the first read: a silent guest agent costs this much
SET_S = 3.0          # more for a set and the read after it (qemu-ga's hwclock -w waits for the RTC's next second),
                     # and once more when the set answers late (measured 3 s+ on a loaded 2-core TCG host)
SLACK_S = 6.0        # the HTTP round trip on top, before the controller gives up on the answer

ClockTask = asyncio.Task[GuestClock]


async def sync(agent: HostClient, uuid: str) -> GuestClock:
    """The agent's answer; ``set: false`` with why when the call itself fails. Never raises."""
    try:
        return await agent.guest_clock_sync(uuid, deadline_s=DEADLINE_S, set_allowance_s=SET_S)
    except KvmotionError as exc:
        why = f"the clock could not be checked: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - the clock must never fail the move
        log.exception("guest clock sync of %s on %s crashed", uuid, getattr(agent, "host", "?"))
        why = f"the clock could not be checked: {type(exc).__name__}: {exc}"
    return GuestClock(host=getattr(agent, "host", ""), why=why)


def start(agent: HostClient, uuid: str) -> ClockTask:
    return asyncio.create_task(sync(agent, uuid), name=f"guest-clock-{uuid}")


async def outcome(task: ClockTask | None) -> dict[str, Any]:
    """The task result's ``guest_clock``; bounded (the call has its deadline, and sync() never raises)."""
    if task is None:
        return {}
    try:
        clock = await asyncio.wait_for(task, timeout=DEADLINE_S + 2 * SET_S + SLACK_S)
    except asyncio.TimeoutError:
        clock = GuestClock(why="the destination's agent did not answer the clock sync in time")
    return {"guest_clock": clock.model_dump(include={"offset_before_ms", "offset_after_ms", "set", "why", "host",
                                                      "rtt_ms", "seconds"})}

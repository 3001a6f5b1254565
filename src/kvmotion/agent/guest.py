"""The agent's guest operations: guest facts, the clock after a move, graceful power, and the VMs that power off
by themselves (mixed into :class:`kvmotion.agent.service.Agent`).

A VM whose QEMU ends by itself (the guest powered off, or QEMU died) is found within ``REAP_S``: the hypervisor
cleans it up and forgets it, its disk leases are released, and a power event is kept for the host's facts
(``vm_power_events``), from which the controller's inventory marks it powered off.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from kvmotion.models.guest import GuestClock, GuestFacts, PowerOpResult, VMPowerEvent

if TYPE_CHECKING:
    from kvmotion.agent.hv.base import Hypervisor

log = logging.getLogger(__name__)

REAP_S = 1.0
EVENTS_KEPT = 200
EVENT_TTL_S = 3600.0


class GuestOps:
    """Needs ``hv`` and ``release_leases`` (:class:`kvmotion.agent.storage.AgentStorage`) from the class it is
    mixed into."""

    hv: "Hypervisor"

    def _events(self) -> collections.deque[VMPowerEvent]:
        if not hasattr(self, "_power_events"):
            self._power_events: collections.deque[VMPowerEvent] = collections.deque(maxlen=EVENTS_KEPT)
        return self._power_events

    def power_events(self) -> list[dict[str, Any]]:
        """The power-offs of the last hour that no one asked for, oldest first."""
        now = time.time()
        return [e.model_dump() for e in self._events() if now - e.at <= EVENT_TTL_S]

    async def reap_once(self) -> list[VMPowerEvent]:
        events = []
        for event, spec in await self.hv.reap():
            try:
                self.release_leases(spec)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - a lease left behind is taken over at the next start
                log.exception("could not release the leases of %s", spec.name)
            self._events().append(event)
            events.append(event)
        return events

    async def reap_forever(self) -> None:
        while True:
            try:
                await self.reap_once()
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("reaping exited VMs failed")
            await asyncio.sleep(REAP_S)

    def start_reaper(self) -> None:
        self._reaper = asyncio.create_task(self.reap_forever(), name="vm-reaper")

    def stop_reaper(self) -> None:
        task = getattr(self, "_reaper", None)
        if task is not None:
            task.cancel()

    # -- guest agent ----------------------------------------------------------------------
    async def guest_facts(self, uuid: str, max_age_s: float, deadline_s: float) -> GuestFacts:
        return await self.hv.guest_facts(uuid, max_age_s, deadline_s)

    async def guest_ping(self, uuid: str, deadline_s: float) -> dict[str, float]:
        return {"rtt_ms": await self.hv.guest_ping(uuid, deadline_s)}

    async def guest_clock_sync(self, uuid: str, deadline_s: float, step_ms: float, host_name: str,
                               set_allowance_s: float = 3.0) -> GuestClock:
        return await self.hv.guest_clock_sync(uuid, deadline_s, step_ms, host_name, set_allowance_s)

    async def power_graceful(self, uuid: str, action: str, timeout_s: float, force: bool) -> PowerOpResult:
        result = await self.hv.power_graceful(uuid, action, timeout_s, force)
        if result.runtime is not None and result.runtime.spec is not None and \
                result.outcome in ("poweredOff", "forced-off"):
            self.release_leases(result.runtime.spec)  # type: ignore[attr-defined]
        return result

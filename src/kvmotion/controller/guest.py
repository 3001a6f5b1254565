"""The controller's guest operations: guest facts, graceful shutdown and reboot, and the inventory following the
VMs that power off by themselves.

A host's agent reports such VMs in its facts (``vm_power_events``: the guest powered off, or QEMU died; the agent
has forgotten the VM and released its leases). Each refresh of the host's facts (every few seconds) marks them
powered off here, when all of these hold: the VM is powered on in the inventory on that host, the host does not
run it, no migration task of it is unfinished, and its inventory row did not change since the facts were asked
for (else the next refresh decides, with newer facts).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from kvmotion.common.errors import ConflictError, GuestAgentSilent
from kvmotion.controller import tasks as task_store
from kvmotion.controller.db import VM
from kvmotion.models.agent import HostFacts
from kvmotion.models.api import VMOut
from kvmotion.models.guest import NOT_ANSWERING, GuestFacts, PowerOpResult, PowerRequest

if TYPE_CHECKING:
    from kvmotion.controller.inventory import Inventory

log = logging.getLogger(__name__)

SHOW_DEADLINE_S = 1.5       # what `vm show` waits for the guest agent at most
SHOW_MAX_AGE_S = 30.0       # facts younger than this are shown from the agent's cache


class PowerOpOut(BaseModel):
    vm: VMOut
    result: PowerOpResult


async def guest_view(inv: "Inventory", host: str, uuid: str, refresh: bool) -> dict[str, Any]:
    """The ``guest`` part of `vm show`: facts (maybe cached), or "not answering"; never raises, never waits long."""
    try:
        facts = await inv.agent(host).guest_facts(uuid, max_age_s=0 if refresh else SHOW_MAX_AGE_S,
                                                  deadline_s=SHOW_DEADLINE_S)
    except Exception as exc:  # noqa: BLE001 - `vm show` shows what it has
        return GuestFacts(guest_agent=NOT_ANSWERING, error=f"the host's agent did not answer: {exc}").model_dump()
    return facts.model_dump()


def follow_power_events(inv: "Inventory", host: str, facts: HostFacts, asked_at: float) -> list[str]:
    """Mark powered off the VMs the host says ended by themselves (see the module's rules); their names. Never
    raises: a refresh of the host's facts goes on whatever happens here."""
    try:
        return _follow(inv, host, facts, asked_at)
    except Exception:  # noqa: BLE001 - the next refresh tries again
        log.exception("could not follow the power events of %s", host)
        return []


def _follow(inv: "Inventory", host: str, facts: HostFacts, asked_at: float) -> list[str]:
    events = {e.get("uuid"): e for e in facts.vm_power_events if isinstance(e, dict)}
    if not events:
        return []
    running = set(facts.vms)
    busy = {t.vm_uuid for t in task_store.unfinished(inv.sessions)}
    changed = []
    with inv.sessions.begin() as s:
        for uuid, event in events.items():
            v = s.get(VM, uuid) if uuid else None
            if v is None or v.host != host or v.power_state != "poweredOn" or uuid in running or uuid in busy:
                continue
            if v.updated_at > asked_at:       # changed after the facts were asked for: the next refresh decides
                continue
            v.power_state, v.updated_at = "poweredOff", time.time()
            changed.append(v.name)
            log.info("VM %s on %s is powered off: %s", v.name, host, event.get("reason", "it ended by itself"))
    return changed


class GuestControl:
    def __init__(self, inv: "Inventory") -> None:
        self.inv = inv

    def _running(self, ref: str, doing: str) -> VMOut:
        vm = self.inv.owned_vm(ref)
        if vm.power_state != "poweredOn":
            raise ConflictError(f"VM {vm.name} is powered off; {doing} needs it powered on",
                                remedy=f"power it on first: kvmotion vm start {vm.name}")
        return vm

    async def facts(self, ref: str, refresh: bool = True) -> GuestFacts:
        """Fresh facts (or cached within 30 s without ``refresh``); ``GuestAgentSilent`` when the agent is silent."""
        vm = self._running(ref, "asking its guest agent")
        facts = await self.inv.agent(vm.host).guest_facts(vm.uuid, max_age_s=0 if refresh else SHOW_MAX_AGE_S,
                                                          deadline_s=3.0)
        if facts.guest_agent == NOT_ANSWERING:
            raise GuestAgentSilent(facts.error or f"the guest agent of VM {vm.name} is not answering",
                                   remedy=facts.remedy or "", details={"vm": vm.name})
        return facts

    async def power(self, ref: str, action: str, req: PowerRequest) -> PowerOpOut:
        """``action``: shutdown | reboot. The inventory is powered off when the guest (or --force) ended QEMU."""
        vm = self._running(ref, action)
        if any(t.vm_uuid == vm.uuid for t in task_store.unfinished(self.inv.sessions)):
            raise ConflictError(f"VM {vm.name} is being migrated", remedy="wait for the migration to end")
        result = await self.inv.agent(vm.host).power(vm.uuid, action, req)
        if result.outcome in ("poweredOff", "forced-off"):
            self.inv.set_vm(vm.uuid, power_state="poweredOff")
        return PowerOpOut(vm=self.inv.get_vm(vm.uuid), result=result)

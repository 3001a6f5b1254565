"""Guest integration: what the guest agent tells, graceful shutdown and reboot (``vm stop`` is the hard stop)."""
from __future__ import annotations

from fastapi import APIRouter

from kvmotion.controller.auth import Role
from kvmotion.controller.guest import PowerOpOut
from kvmotion.controller.routes.deps import Ctl, role
from kvmotion.models.guest import GuestFacts, PowerRequest

router = APIRouter()


@router.get("/vms/{ref}/guest", dependencies=role(Role.VIEWER))
async def vm_guest(ref: str, ctl: Ctl, refresh: bool = True) -> GuestFacts:
    """Read now (``refresh``, the default) or within 30 s; GUEST_AGENT_SILENT (504) when the guest agent does not
    answer: qemu-guest-agent is not installed or not running in the guest."""
    return await ctl.guest.facts(ref, refresh)


@router.post("/vms/{ref}/shutdown", dependencies=role(Role.OPERATOR))
async def vm_shutdown(ref: str, req: PowerRequest, ctl: Ctl) -> PowerOpOut:
    """The guest agent's guest-shutdown, else the ACPI power button; waits until QEMU exits or ``timeout_s``
    (then ``force`` hard-stops it, else TIMEOUT 504)."""
    return await ctl.guest.power(ref, "shutdown", req)


@router.post("/vms/{ref}/reboot", dependencies=role(Role.OPERATOR))
async def vm_reboot(ref: str, req: PowerRequest, ctl: Ctl) -> PowerOpOut:
    """The guest agent's guest-shutdown mode=reboot, waiting for the guest's reset; without a guest agent the VM
    is reset (QEMU has no ACPI reboot) and the result says so."""
    return await ctl.guest.power(ref, "reboot", req)

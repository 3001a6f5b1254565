"""Graceful power operations on a running VM, and the exits a VM makes by itself.

Shutdown: the guest agent's ``guest-shutdown`` (mode powerdown), else the ACPI power button (``system_powerdown``);
then wait until QEMU exits (a VM's QEMU runs without ``-no-shutdown``: the guest's power-off ends the process).
Reboot: ``guest-shutdown`` mode reboot, then wait for the guest's reset (QMP ``RESET`` with ``guest: true``).
QEMU has no ACPI reboot request: a guest without an agent is reset (``system_reset``, the reset button) and the
result says so. Past the timeout, ``force`` hard-stops (shutdown) or resets (reboot); without it the call fails
with what was tried, and the guest may still act on the request later.

Guests often ignore the ACPI power button for a while after boot (systemd-logind's 30 s hold-off) and some never
handle it (a busybox initramfs): then the timeout and ``--force`` are the way.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from kvmotion.agent.hv.qemu.guestagent import GuestAgent
from kvmotion.common.errors import ConflictError, DeadlineExceeded, GuestAgentError, GuestAgentSilent
from kvmotion.models.guest import PowerOpResult

if TYPE_CHECKING:
    from kvmotion.agent.hv.qemu.process import QemuVM

GA_DEADLINE_S = 2.0      # for the guest agent to take the request before ACPI (or a reset) is used
POLL_S = 0.05
RESET_NOTE = ("QEMU has no ACPI reboot request: the guest agent did not answer, so the VM was reset (its reset "
              "button): the guest did not shut down cleanly")


async def ask_guest_agent(ga: GuestAgent, mode: str) -> str | None:
    """``guest-shutdown``; None when the agent took it, else why not (its error)."""
    try:
        await ga.execute("guest-shutdown", {"mode": mode}, deadline_s=GA_DEADLINE_S, reply=False)
        return None
    except (GuestAgentSilent, GuestAgentError) as exc:
        return exc.message


def plan(mode: str, agent_error: str | None) -> tuple[str, str | None, str]:
    """(method, the QMP command to send, the note) for a power request, given whether the guest agent took it
    (``agent_error`` None). Pure."""
    if agent_error is None:
        return "guest-agent", None, ""
    if mode == "reboot":
        return "reset", "system_reset", RESET_NOTE
    return "acpi", "system_powerdown", ""


def guest_reset_since(history: Any, since: float) -> bool:
    """A guest-initiated RESET among the QMP events after ``since`` (wall clock)."""
    return any(ev.get("event") == "RESET" and (ev.get("data") or {}).get("guest", True) for t, ev in list(history)
               if t >= since)


def exit_reason(history: Any, returncode: int | None) -> tuple[str, bool]:
    """Why a VM's QEMU ended by itself: (the reason, whether the guest asked for it), from its last QMP events."""
    for _, ev in reversed(list(history)):
        name, data = ev.get("event"), ev.get("data") or {}
        if name == "SHUTDOWN":
            reason = data.get("reason", "")
            if data.get("guest"):
                return f"the guest powered itself off ({reason or 'guest-shutdown'})", True
            return f"QEMU shut down ({reason or 'host request'})", False
        if name == "GUEST_PANICKED":
            return "the guest kernel panicked and QEMU exited", False
    code = f" (exit code {returncode})" if returncode is not None else ""
    return f"QEMU exited unexpectedly{code}", False


async def _wait(until: Any, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if until():
            return True
        await asyncio.sleep(POLL_S)
    return bool(until())


async def graceful(vm: "QemuVM", ga: GuestAgent, action: str, timeout_s: float, force: bool) -> PowerOpResult:
    """Shut down (``action`` "shutdown") or reboot a running VM; the caller holds ``vm.lock`` and cleans up a
    QEMU that exited."""
    if vm.qmp is None or not vm.alive():
        raise ConflictError(f"VM {vm.name} has no running QEMU", remedy="power it on first")
    mode = "reboot" if action == "reboot" else "powerdown"
    t0, since = time.monotonic(), time.time()
    agent_error = await ask_guest_agent(ga, mode)
    method, command, note = plan(mode, agent_error)
    if command is not None:
        await vm.qmp.execute(command, timeout=5)
    result = PowerOpResult(action=action, method=method, outcome="", guest_agent_error=agent_error, note=note)
    if method == "reset":
        result.outcome, result.seconds = "reset", round(time.monotonic() - t0, 3)
        return result
    left = max(timeout_s - (time.monotonic() - t0), 0.0)
    if mode == "powerdown":
        done = await _wait(lambda: not vm.alive(), left)
    else:   # the guest resets itself (or powers off instead)
        history = vm.qmp.history
        done = await _wait(lambda: guest_reset_since(history, since) or not vm.alive(), left)
    result.seconds = round(time.monotonic() - t0, 3)
    if done:
        result.outcome = "poweredOff" if not vm.alive() else "rebooted"
        return result
    if not force:
        asked = {"guest-agent": f"the guest agent took guest-shutdown (mode {mode})",
                 "acpi": "the ACPI power button was pressed"}[method]
        why = f" (the guest agent: {agent_error})" if agent_error else ""
        raise DeadlineExceeded(
            f"VM {vm.name} did not {'power off' if mode == 'powerdown' else 'reboot'} within {timeout_s:g}s: "
            f"{asked}{why}; the guest may still act on it",
            remedy=("retry with --force to hard-stop it after the timeout, or give it longer with --timeout"
                    if mode == "powerdown" else
                    "retry with --force to reset it after the timeout, or give it longer with --timeout"),
            details={"method": method, "seconds": result.seconds, "guest_agent_error": agent_error})
    result.forced = True
    if mode == "powerdown":
        await vm.stop(graceful_timeout=5.0)
        result.outcome = "forced-off"
    else:
        await vm.qmp.execute("system_reset", timeout=5)
        result.outcome = "forced-reset"
    result.seconds = round(time.monotonic() - t0, 3)
    return result

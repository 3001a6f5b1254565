"""Reconciling an unfinished vMotion: what both hosts really run decides, never what the journal hoped for.

``observe`` asks each agent about the VM (its QEMU's run state, or that it has none, or that the host did not
answer); ``decide`` is a pure function of the two views; ``Service`` carries the resolution out. Nothing
destructive happens while a host does not answer: the task is ``unknown`` until it does. A ``lost`` resolution
(no host has the VM's latest state) stays ``unknown`` for an operator; kvmotion has no command for that yet.
Post-copy in flight is never completed early nor rolled back: reconciliation waits for it, pauses it when it
sent nothing between two checks, and reconnects it once both sides are paused.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kvmotion.common.errors import ErrorCode, KvmotionError
from kvmotion.models.agent import POSTCOPY_STATES
from kvmotion.migration import decisions, postcopy
from kvmotion.migration.ports import HostClient, InventoryView, Journal
from kvmotion.models.agent import VMSpec
from kvmotion.models.api import TaskOut


class Seen(StrEnum):
    RUNNING = "running"          # QEMU runs the guest
    HELD = "held"                # QEMU exists, the guest does not run (incoming, paused, postmigrate, …)
    ABSENT = "absent"            # the agent answers and has no QEMU for the VM
    UNREACHABLE = "unreachable"  # the agent did not answer


class Resolution(StrEnum):
    COMPLETE = "complete"                        # the destination runs it: release the source, owner → dst
    RESUME_DESTINATION = "resume-destination"    # the destination holds the complete state, the source is done
    ROLLBACK = "rollback"                        # the source runs it: remove the shadow
    RESUME_SOURCE = "resume-source"              # the source is paused and the destination has nothing
    WAIT = "wait"                                # a host does not answer: nothing destructive (unknown)
    POSTCOPY_WAIT = "postcopy-wait"              # post-copy runs: it completes by itself (unknown meanwhile)
    POSTCOPY_RECOVER = "postcopy-recover"        # post-copy paused on both sides: reconnect them
    LOST = "lost"                                # no host has the VM: an operator must decide


@dataclass(frozen=True)
class View:
    seen: Seen
    qemu_status: str | None = None
    incoming_completed: bool = False             # destination: its incoming migration completed
    migration: str | None = None                 # its QEMU's migration status, when it has one
    sent: int = 0                                # memory its migration has sent so far (source)


@dataclass(frozen=True)
class Decision:
    resolution: Resolution
    reason: str


# Source QEMU states after a completed switchover: it may never run again.
SWITCHED = {"postmigrate"}


def decide(src: View, dst: View) -> Decision:
    if src.migration in POSTCOPY_STATES or dst.migration in POSTCOPY_STATES:
        # The guest runs on the destination, part of its memory is on the source: neither may be stopped, the
        # source never resumed. It completes by itself, or it is paused and must be reconnected.
        if dst.seen == Seen.ABSENT or src.seen == Seen.ABSENT:
            gone = "destination" if dst.seen == Seen.ABSENT else "source"
            return Decision(Resolution.LOST, f"the {gone} QEMU is gone during post-copy: the guest's memory was "
                                             "split between the hosts; an operator must decide (the other QEMU "
                                             "is kept as it is)")
        if src.migration == "postcopy-paused" and dst.migration == "postcopy-paused":
            return Decision(Resolution.POSTCOPY_RECOVER, "post-copy is paused on both hosts: reconnect them")
        return Decision(Resolution.POSTCOPY_WAIT, f"post-copy in flight (source {src.migration or src.seen}, "
                                                  f"destination {dst.migration or dst.seen}): both QEMUs are kept")
    if dst.seen == Seen.RUNNING:
        # The destination runs the guest: the switchover happened. A source found running too is stale:
        # it is never resumed and never kept (its guest diverged at the switchover).
        why = "the destination runs the VM"
        if src.seen == Seen.RUNNING:
            why += "; the source copy also runs and is stale: it is stopped, never resumed"
        elif src.seen == Seen.UNREACHABLE:
            why += "; the source does not answer: it is released when it does"
        return Decision(Resolution.COMPLETE, why)
    if dst.seen == Seen.UNREACHABLE:
        return Decision(Resolution.WAIT, "the destination host does not answer: the VM may run there")
    if src.seen == Seen.UNREACHABLE:
        return Decision(Resolution.WAIT, "the source host does not answer and the destination does not run the VM")
    if dst.seen == Seen.HELD and dst.incoming_completed and src.seen != Seen.RUNNING:
        return Decision(Resolution.RESUME_DESTINATION,
                        "the destination holds the complete state and the source stopped at the switchover")
    if src.seen == Seen.RUNNING:
        return Decision(Resolution.ROLLBACK, "the source runs the VM; the destination never ran it")
    if src.seen == Seen.HELD:
        if src.qemu_status in SWITCHED:
            return Decision(Resolution.LOST, "the source stopped at a switchover but the destination has no "
                                             "complete state: an operator must decide")
        return Decision(Resolution.RESUME_SOURCE, "the source is paused and the destination never ran the VM")
    return Decision(Resolution.LOST, "neither host has a QEMU for the VM")


async def observe(agent: HostClient, uuid: str, destination: bool) -> View:
    try:
        rt = await agent.status(uuid)
    except KvmotionError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            return View(Seen.ABSENT)
        return View(Seen.UNREACHABLE)
    status = rt.qemu_status
    if status in (None, "exited"):
        return View(Seen.ABSENT, status)
    if status == "unreachable":
        return View(Seen.UNREACHABLE, status)
    try:
        rep = await agent.migration(uuid)
        migration, sent = rep.status, rep.ram_transferred
    except KvmotionError:
        migration, sent = None, 0
    completed = destination and status != "running" and migration == "completed"
    return View(Seen.RUNNING if status == "running" else Seen.HELD, status, completed, migration, sent)


def postcopy_stalled(previous: dict[str, Any], src: View, now: float) -> bool:
    """Post-copy runs but sent nothing since the previous check (at least ``POSTCOPY_STALL_S`` ago): its link is
    dead and QEMU has not noticed (a silent link only fails at TCP's timeout). Pure."""
    return (src.migration == "postcopy-active" and previous.get("postcopy_sent") == src.sent
            and now - float(previous.get("checked_at", now)) >= decisions.POSTCOPY_STALL_S)


async def _stop_source(src: HostClient, uuid: str, view: View) -> dict[str, Any]:
    """Free the source after a switchover: finalize a parked source, stop a stale running one."""
    try:
        if view.seen == Seen.RUNNING:
            await src.stop(uuid)
            return {"source": "stale copy stopped (never resumed)"}
        if view.seen == Seen.HELD:
            return {"source": "released", **(await src.finalize_source(uuid)).model_dump()}
    except KvmotionError as exc:
        return {"source": "not released", "source_error": exc.message}
    return {"source": "gone" if view.seen == Seen.ABSENT else "pending: the source host does not answer"}


@dataclass(frozen=True)
class Recovery:
    """What reconciliation works with: the task, its journal, the inventory view and both hosts' clients."""

    task: TaskOut
    journal: Journal
    inv: InventoryView
    src: HostClient
    dst: HostClient

    def relocation(self) -> dict[str, Any] | None:
        """The file sets the engine persisted at its precheck (None: the task has none recorded)."""
        first = self.task.phases[0] if self.task.phases else None
        return (first.detail or {}).get("relocation") if first is not None else None


async def reconcile_live(r: Recovery) -> dict[str, Any]:
    """vMotion / shared-nothing: observe both hosts, decide, and carry the resolution out."""
    t = r.task
    src, dst = await asyncio.gather(observe(r.src, t.vm_uuid, False), observe(r.dst, t.vm_uuid, True))
    d = decide(src, dst)
    out: dict[str, Any] = {"task": t.id, "phase": t.phase, "source_seen": str(src.seen),
                           "destination_seen": str(dst.seen), "resolution": str(d.resolution), "reason": d.reason,
                           "checked_at": time.time()}
    if d.resolution in (Resolution.POSTCOPY_WAIT, Resolution.POSTCOPY_RECOVER):
        await _postcopy(r, src, d, out)
    if d.resolution in (Resolution.WAIT, Resolution.LOST, Resolution.POSTCOPY_WAIT, Resolution.POSTCOPY_RECOVER):
        await asyncio.to_thread(r.journal.mark_unknown, out)      # checked again in RECONCILE_S
        return out
    if d.resolution == Resolution.RESUME_DESTINATION:
        try:
            out["resumed"] = await r.dst.resume(t.vm_uuid, announce=True)
        except KvmotionError as exc:
            out["resume_error"] = exc.message
            await asyncio.to_thread(r.journal.mark_unknown, out)
            return out
    if d.resolution in (Resolution.COMPLETE, Resolution.RESUME_DESTINATION):
        await _complete(r, src, out)
    else:
        await _roll_back(r, dst, out)
    return out


async def _postcopy(r: Recovery, src: View, d: Decision, out: dict[str, Any]) -> None:
    t = r.task
    if d.resolution == Resolution.POSTCOPY_WAIT and src.migration == "postcopy-active":
        out["postcopy_sent"] = src.sent
        if postcopy_stalled(t.live.get("unknown") or {}, src, out["checked_at"]):
            out["paused"] = await postcopy.pause_both(r.src, r.dst, t.vm_uuid)
    if d.resolution == Resolution.POSTCOPY_RECOVER:
        try:
            out["recovered"] = await postcopy.recover(r.src, r.dst, t.vm_uuid, r.inv.migration_address(t.destination))
        except KvmotionError as exc:
            out["recover_error"] = exc.message


async def _complete(r: Recovery, src: View, out: dict[str, Any]) -> None:
    """The destination runs the VM: free the source, take the lease, remove the source's moved files; the
    owner changes last."""
    t = r.task
    out |= await _stop_source(r.src, t.vm_uuid, src)
    try:
        lease = await r.dst.take_lease(t.vm_uuid, expected_holder=t.source)
        out["lease_holder"] = lease.host
    except KvmotionError as exc:
        out["lease_error"] = exc.message
    rel = r.relocation()
    if rel and rel["moved_ids"] or rel and rel["home_moves"]:       # shared-nothing: the old set goes
        try:
            out["source_files_removed"] = await r.src.remove_files(VMSpec.model_validate(rel["before"]),
                                                                   rel["moved_ids"], home=rel["home_moves"])
        except KvmotionError as exc:
            out["source_files_error"] = exc.message
    runtime = await r.dst.status(t.vm_uuid)
    spec = runtime.spec or (VMSpec.model_validate(rel["after"]) if rel else None)
    await asyncio.to_thread(r.inv.set_owner, t.vm_uuid, spec, t.destination)     # the owner changes last
    out["vm_runs_on"] = t.destination
    await asyncio.to_thread(r.journal.finish, "success", {"reconciled": out})


async def _roll_back(r: Recovery, dst: View, out: dict[str, Any]) -> None:
    """ROLLBACK / RESUME_SOURCE: the shadow goes first (with any partial disks), then the source runs on."""
    t = r.task
    if dst.seen != Seen.ABSENT:
        try:
            out["shadow_removed"] = await r.dst.abort_incoming(t.vm_uuid)
        except KvmotionError as exc:
            out["shadow_error"] = exc.message
            await asyncio.to_thread(r.journal.mark_unknown, out)
            return
    rel = r.relocation()
    if rel and (rel["moved_ids"] or rel["home_moves"]) and t.source != t.destination:
        try:        # shared-nothing: what the shadow got of the new set (disks, folder) goes too
            out["destination_files_removed"] = await r.dst.remove_files(
                VMSpec.model_validate(rel["after"]), rel["moved_ids"], home=rel["home_moves"])
        except KvmotionError as exc:
            out["destination_files_error"] = exc.message
    for step, call in (("mirror", r.src.mirror_cancel), ("outgoing", r.src.cancel_outgoing)):
        try:
            await call(t.vm_uuid)
        except KvmotionError as exc:
            out[f"{step}_cancel"] = exc.message
    seen = await observe(r.src, t.vm_uuid, False)
    out["source_running"] = seen.seen == Seen.RUNNING
    out["vm_runs_on"] = t.source if out["source_running"] else None
    earlier = ((t.live or {}).get("unknown") or {}).get("error") if t.state == "unknown" else None
    if earlier:        # the engine had failed and could not finish its rollback: now it is finished
        error = earlier | {"rollback": (earlier.get("rollback") or {}) | {"reconciled": out}}
    else:
        error = restarted(t, out, f"the VM stays on {t.source}", "start the migration again")
    await asyncio.to_thread(r.journal.finish, "error", None, error)


def restarted(t: TaskOut, rollback: dict[str, Any], outcome: str, remedy: str) -> dict[str, Any]:
    return {"code": "CONTROLLER_RESTARTED", "phase": t.phase, "rollback": rollback, "remedy": remedy,
            "message": f"the controller restarted during {t.phase} of a {t.kind} move; {outcome}"}

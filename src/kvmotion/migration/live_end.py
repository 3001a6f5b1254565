"""The end of a live move: resume on the destination, announce, release the source; its summary; its failure.

A mixin of ``live.LiveMove`` (the phases after the switchover and what the task reports).
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from kvmotion.common.errors import ConflictError, KvmotionError
from kvmotion.migration import decisions, guestcheck, guestclock, predict
from kvmotion.migration.engine import HaltRollback, Outcome
from kvmotion.models.agent import MigrationReport
from kvmotion.models.moves import Phase

if TYPE_CHECKING:
    from kvmotion.migration.live import LiveMove

    _Base = LiveMove
else:
    _Base = object


class LiveEnd(_Base):
    async def on_resume(self) -> Outcome:
        resumed = await self._resume()       # confirms the run and sends the announce series, one call
        ann = resumed.pop("announce", None)
        if ann is None:                      # confirmed by status after a failed resume call: announce now
            try:
                ann = await self.dst.announce(self.spec.uuid)
            except KvmotionError as exc:
                ann = {"error": exc.message}
        self.resume_info["announce"] = ann
        at = ann.get("announced_at")
        return Outcome(next=Phase.ANNOUNCE, ended_at=at, result=resumed, next_at=at)

    async def _resume(self) -> dict[str, Any]:
        try:
            result = await self.dst.resume(self.spec.uuid, announce=True)
        except KvmotionError:
            # Did the destination run? Only if it never did may the source continue.
            status = await self.dst.status(self.spec.uuid)
            if status.qemu_status != "running":
                raise
            result = {"qemu_status": status.qemu_status, "confirmed_at": time.time()}
        self.resumed = True
        self.resume_info = dict(result)
        return result

    async def on_announce(self) -> Outcome:
        """RARP/GARP: QEMU announced at completion already; this is the agent's series from the running VM."""
        ann = self.resume_info.get("announce") or {}
        self.guest_check = guestcheck.start(self.dst, self.spec.uuid, since=None)   # since it arrived there
        self.guest_clock = guestclock.start(self.dst, self.spec.uuid)      # its clock against the new host's
        return Outcome(next=Phase.RELEASE, status="failed" if "error" in ann else "ok", result=ann)

    async def on_release(self) -> Outcome:
        assert self.reloc is not None
        lease = await self.dst.take_lease(self.spec.uuid, expected_holder=self.source)
        release, locks = await asyncio.gather(self.src.finalize_source(self.spec.uuid), self.dst.locks(self.spec.uuid))
        removed: list[str] = []
        if self.xv:     # the source's copies of the moved files are released: remove them
            try:
                removed = await self.src.remove_files(self.spec, list(self.reloc.moved_ids), home=self.reloc.home_moves)
            except KvmotionError as exc:
                removed = [f"not removed: {exc.message}"]
        await asyncio.to_thread(self.inv.set_owner, self.spec.uuid, self.target, self.destination)   # owner last
        return Outcome(result={"lease_holder": lease.host, "lease_epoch": lease.epoch, "source_files_removed": removed,
                               "destination_image_locks": sum(len(v) for v in locks.values()), **release.model_dump()})

    async def succeed(self) -> dict[str, Any]:
        assert self.report is not None
        summary = self.summary(self.report)
        summary.update(await self._predicted_vs_actual(summary))
        summary.update(await guestcheck.outcome(self.guest_check, self.spec.name))   # after total_time_s: not in it
        summary.update(await guestclock.outcome(self.guest_clock))
        return summary

    def live_view(self, r: MigrationReport, watch: decisions.ProgressWatch | None = None) -> dict[str, Any]:
        """The task's live view; the ETA only while pre-copy is watched."""
        return {"status": r.status, "pass": r.passes[-1].pass_no if r.passes else 0, "ram_total": r.ram_total,
                "bandwidth_mbps": self.ctx.bandwidth_mbps,
                "transferred": r.ram_transferred, "remaining": r.ram_remaining, "mbps": r.mbps,
                "dirty_pages_rate": r.dirty_pages_rate, "eta_s": watch.eta_s if watch else None,
                "converging": watch.converging if watch else False,
                "passes": [p.model_dump() for p in r.passes[-50:]]}

    def summary(self, r: MigrationReport) -> dict[str, Any]:
        total = r.ram_total or self.spec.memory_mb * 1024 * 1024
        resumed_at = self.resume_info.get("resumed_at")
        pause = (resumed_at - r.pre_switchover_at) * 1000 if resumed_at and r.pre_switchover_at else None
        return {"guest_pause_ms": round(pause, 1) if pause is not None else None, "encryption": self.encryption,
                "kind": str(self.kind.name), "disks": self.disk_summary, "total_time_s": self.elapsed(),
                "flattened": self.reloc.flattened if self.reloc is not None else [],
                "qemu_total_time_ms": r.total_time_ms, "downtime_ms": r.downtime_ms, "parked_ms": r.parked_ms,
                "setup_time_ms": r.setup_time_ms, "bytes_sent": r.ram_transferred, "ram_bytes": total,
                "sent_ratio": round(r.ram_transferred / total, 3) if total else None, "passes": len(r.passes),
                "downtime_steps": self.downtime_steps, "bandwidth_log": self.bandwidth_log,
                "stream": self.stream.as_dict() if self.stream else None,
                "multifd_bytes": r.extra.get("multifd_bytes", 0), "xbzrle": r.extra.get("xbzrle"),
                "max_cpu_throttle_pct": r.extra.get("max_cpu_throttle_pct", 0),
                "postcopy": self.postcopy_summary or None,
                "pass_log": [p.model_dump() for p in r.passes]}

    async def _predicted_vs_actual(self, summary: dict[str, Any]) -> dict[str, Any]:
        if self.prediction is None:
            return {}
        try:
            pred = await asyncio.wait_for(self.prediction, timeout=5)
        except (asyncio.TimeoutError, KvmotionError):
            return {}
        if pred is None:
            return {}
        out = pred.as_dict()
        return {"prediction": out, "predicted_vs_actual": predict.compare(
            out, summary["total_time_s"], summary["downtime_ms"], summary["passes"])}

    def failure_result(self) -> dict[str, Any]:
        return self.summary(self.report) if self.report else {}

    async def after_rollback(self, out: dict[str, Any]) -> None:
        if "source_running" in out:        # decided by an undo (the destination runs the VM)
            return
        try:
            out["source_running"] = (await self.src.status(self.spec.uuid)).qemu_status == "running"
        except KvmotionError as exc:
            out["source_running"], out["source_error"] = False, exc.message

    def rolled_back(self, out: dict[str, Any]) -> bool:
        return bool(out.get("source_running"))

    async def conclude_failure(self, exc: KvmotionError, failed_phase: str, rollback: dict[str, Any]) -> None:
        if self.prediction is not None and not self.prediction.done():
            self.prediction.cancel()
        error = exc.to_dict() | {"phase": failed_phase, "rollback": rollback}
        if self.postcopy_requested and not self.resumed:
            # Post-copy is never rolled back: its memory may be split between the hosts. Reconciliation sees
            # where QEMU runs and what its migration does, and completes or recovers it.
            await asyncio.to_thread(self.journal.mark_unknown, {
                "reason": f"{exc.message}; post-copy had started: reconciliation completes or recovers it",
                "error": error, "checked_at": time.time()})
            return
        if self.resumed or rollback.get("needs_reconcile"):
            # The VM may run on the destination (resumed), or a host did not answer the rollback: where it
            # runs is not known for sure. Nothing more is done until reconciliation sees both hosts.
            side = "destination" if rollback.get("needs_reconcile") else "either"
            await asyncio.to_thread(self.journal.mark_unknown, {
                "reason": f"{exc.message}; the {side} host must answer before the move is completed or undone",
                "error": error, "checked_at": time.time()})
            return
        await asyncio.to_thread(self.journal.finish, "error", self.failure_result(), error)


async def remove_shadow(m: "LiveMove", out: dict[str, Any]) -> None:
    """The shadow goes before the source may resume; a destination that runs the VM stops the rollback."""
    try:
        await m.dst.abort_incoming(m.spec.uuid)
        out["shadow_removed"] = True
    except ConflictError as exc:   # the destination runs the VM: it must not run twice
        out.update(shadow_error=exc.message, source_running=False, vm_runs_on=m.destination, needs_reconcile=True)
        raise HaltRollback from exc     # reconciliation completes the move (inventory, lease, source)
    except KvmotionError as exc:    # unknown: the shadow may exist, and may even run
        out["shadow_error"] = exc.message
        out["needs_reconcile"] = True
        return
    if m.home_made and m.reloc is not None:
        try:
            out["destination_files_removed"] = await m.dst.remove_files(m.reloc.after, [], home=True)
        except KvmotionError as exc:
            out["destination_files_error"] = exc.message

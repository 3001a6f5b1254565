"""vMotion and shared-nothing vMotion: a running VM's memory (and, shared-nothing, its disks) to another host.

PRECHECK -> SHADOW -> [DISKS] -> PRECOPY -> SWITCHOVER -> [POSTCOPY] -> RESUME -> ANNOUNCE -> RELEASE. Until the
destination resumed (or post-copy started) a failure rolls back: the disk streams stop, the shadow goes (the
source may run only once the destination cannot), then the outgoing migration is cancelled. Both sides are
always finalized; the VM's owner in the inventory changes last.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from kvmotion.checks.rules import encryption_plan
from kvmotion.common.errors import ConflictError, KvmotionError, MirrorFailed
from kvmotion.migration import decisions, guestcheck, guestclock, predict, tuning
from kvmotion.migration.engine import MBIT, MoveContext, MoveEngine, Outcome, Step
from kvmotion.migration.follow import POLL_S, PrecopyFollower, follow_postcopy, shadow_alive
from kvmotion.migration.live_end import LiveEnd, remove_shadow
from kvmotion.migration.relocate import Relocation
from kvmotion.models.agent import (DiskTarget, IncomingReady, MigrationReport, MigrationTuning, MirrorRequest,
                                   OutgoingRequest, VMSpec)
from kvmotion.models.moves import MoveKind, Phase
from kvmotion.models.nbd import TLS_PSK, TLS_X509, NbdPsk

log = logging.getLogger(__name__)


class LiveMove(LiveEnd, MoveEngine):
    """One vMotion task (``vmotion`` or ``xvmotion``) to its end."""

    def __init__(self, ctx: MoveContext) -> None:
        super().__init__(ctx)
        self.xv = ctx.kind.name == MoveKind.XVMOTION
        self.reloc: Relocation | None = None
        self.target: VMSpec = ctx.spec
        self.ready: IncomingReady | None = None
        self.dst_address = ""
        self.shadow_created = self.home_made = self.mirror_started = self.outgoing_started = False
        self.resumed = self.switching = self.force_requested = False
        self.postcopy_requested = False          # from here: never cancelled, never rolled back
        self.postcopy_block: str | None = None   # None: not allowed; "": possible; else why not
        self.postcopy_summary: dict[str, Any] = {}
        self.encryption: dict[str, Any] = {}
        self.use_tls = False
        self.nbd_psk: NbdPsk | None = None       # shared-nothing without x509: the disk streams' key, this move only
        self.bandwidth_log: list[dict[str, Any]] = [{"t": time.time(), "mbps": ctx.bandwidth_mbps}]
        self.downtime_steps: list[dict[str, Any]] = []
        self.resume_info: dict[str, Any] = {}
        self.report: MigrationReport | None = None
        self.disk_summary: dict[str, Any] = {}
        self.prediction: asyncio.Task[predict.Prediction | None] | None = None
        self.stream: tuning.StreamPlan | None = None
        self.follower: PrecopyFollower | None = None
        self.guest_check: guestcheck.Check | None = None
        self.guest_clock: guestclock.ClockTask | None = None

    def steps(self) -> dict[Phase, Step]:
        return {Phase.PRECHECK: Step(self.on_precheck), Phase.SHADOW: Step(self.on_shadow, self.undo_shadow),
                Phase.DISKS: Step(self.on_disks, self.undo_disks),
                Phase.PRECOPY: Step(self.on_precopy, self.undo_precopy),
                Phase.SWITCHOVER: Step(self.on_switchover), Phase.POSTCOPY: Step(self.on_postcopy),
                Phase.RESUME: Step(self.on_resume), Phase.ANNOUNCE: Step(self.on_announce),
                Phase.RELEASE: Step(self.on_release)}

    def rollback_order(self, entered: list[Phase]) -> list[Phase]:
        """The disk streams stop first; the shadow goes before the source may resume."""
        return [p for p in (Phase.DISKS, Phase.SHADOW, Phase.PRECOPY) if p in entered]

    @property
    def committed(self) -> bool:
        return self.resumed or self.postcopy_requested

    def cancel_refusal(self) -> str | None:
        if self.postcopy_requested:
            return (f"in post-copy: the VM runs on {self.destination} and part of its memory is still on "
                    f"{self.source}; it completes by itself (a failed link is paused and recovered)")
        return "past its switchover" if self.resumed or self.switching else None

    def request_force_complete(self) -> None:
        if self.resumed or self.switching:
            raise ConflictError(f"the migration of {self.spec.name} is already switching over", remedy="nothing to do")
        self.force_requested = True

    async def set_bandwidth(self, mbps: int) -> None:
        """Admission gave this migration a new share of its links: apply it live."""
        if mbps == self.ctx.bandwidth_mbps or self.req.tuning == "qemu-defaults":
            return
        self.ctx.bandwidth_mbps = mbps
        self.bandwidth_log.append({"t": time.time(), "mbps": mbps})
        if self.outgoing_started and not self.switching:
            try:
                await self.src.tune(self.spec.uuid, MigrationTuning(max_bandwidth_bytes=mbps * MBIT))
            except KvmotionError as exc:
                log.warning("could not set the bandwidth of %s: %s", self.spec.name, exc)

    # -- phases ------------------------------------------------------------------------------------
    async def on_precheck(self) -> Outcome:
        reloc, findings = await self.inv.precheck(self.spec.uuid, self.req, self.journal.id)
        self.reloc, self.target = reloc, reloc.after
        self.use_tls, why, _ = encryption_plan(self.spec.encrypted_vmotion, self.inv.host_facts(self.source),
                                               self.inv.host_facts(self.destination),
                                               any(d.encrypted for d in self.spec.disks))
        self.encryption = {"mode": "tls" if self.use_tls else "plain", "reason": why,
                           "policy": self.spec.encrypted_vmotion}
        if self.xv:         # the disk streams: never plain (docs/security.md, "Disk streams")
            self.nbd_psk = None if self.use_tls else NbdPsk.new()
            self.encryption["disk_streams"] = TLS_PSK if self.nbd_psk else TLS_X509
        self.postcopy_block = self._postcopy_blocker()
        self.stream = self._plan(None)     # channels depend on the link only (the shadow needs them)
        self.prediction = asyncio.create_task(self.inv.predict(
            self.spec, self.source, self.destination, self.stream.downtime_steps[-1],
            self.stream.max_bandwidth_bytes / MBIT, self.use_tls), name=f"predict-{self.spec.name}")
        return Outcome(next=Phase.SHADOW, result={"findings": [f.model_dump(mode="json") for f in findings],
                                                  "kind": reloc.kind, "relocation": relocation_record(reloc)},
                       next_detail={"host": self.destination, "encryption": self.encryption["mode"],
                                    "multifd_channels": self.stream.multifd_channels})

    async def on_shadow(self) -> Outcome:
        assert self.reloc is not None and self.stream is not None
        self.shadow_created = True
        self.dst_address = self.inv.migration_address(self.destination)
        if self.xv and self.reloc.home_moves:
            files = await self.src.home_files(self.spec)
            self.home_made = True
            await self.dst.put_home(self.target, files)
        self.ready = await self.dst.prepare_incoming(
            self.target, self.dst_address, self.inv.tls_identity(self.source) if self.use_tls else None,
            self.inv.disk_keys(self.spec), list(self.reloc.moved_ids) if self.xv else None,
            self.stream.multifd_channels, postcopy=self.stream.postcopy, nbd_psk=self.nbd_psk)
        self.check_cancel()
        result = {"uri": self.ready.uri, "shadow_pid": self.ready.pid, "nbd_port": self.ready.nbd_port}
        if self.xv:
            return Outcome(next=Phase.DISKS, result=result, next_detail={
                "disks": list(self.reloc.moved_ids), "encryption": self.encryption["disk_streams"]})
        return Outcome(next=Phase.PRECOPY, result=result, next_detail=await self._precopy_opening())

    async def undo_shadow(self, out: dict[str, Any]) -> None:
        if self.shadow_created:
            await remove_shadow(self, out)

    async def on_disks(self) -> Outcome:
        """Shared-nothing: the source mirrors every moved disk into the shadow's NBD exports (write-blocking,
        so the copy converges under any write load); memory pre-copy starts once all are in sync."""
        assert self.reloc is not None and self.ready is not None
        ready, addr = self.ready, self.dst_address
        targets = [DiskTarget(disk_id=d, kind="nbd", nbd_host=addr, nbd_port=ready.nbd_port or 0,
                              export=ready.exports[d], tls_hostname=addr if self.use_tls else None, psk=self.nbd_psk)
                   for d in self.reloc.moved_ids]
        t0 = time.time()
        self.mirror_started = True
        await self.src.mirror_start(self.spec.uuid, MirrorRequest(
            targets=targets, speed_bytes=(self.req.disk_mbps or 0) * MBIT, copy_mode="write-blocking"))
        while True:
            r = await self.src.mirror_status(self.spec.uuid)
            await self.live({"disk_bytes_done": r.done, "disk_bytes_total": r.total, "disk_mbps": r.mbps,
                             "state": r.state, "eta_s": decisions.copy_eta_s(r.done, r.total, r.mbps)},
                            self.band(Phase.DISKS, r.done / r.total if r.total else 0))
            if r.state == "failed" or not await shadow_alive(self):
                raise MirrorFailed(f"the disk streams to {self.destination} failed: "
                                  f"{r.error or 'the destination QEMU is gone'}",
                                  remedy="check the destination host's agent and QEMU logs, then retry")
            if r.state == "ready":
                break
            self.check_cancel()
            await asyncio.sleep(POLL_S)
        secs = time.time() - t0
        self.disk_summary = {"bytes": r.done, "seconds": round(secs, 3),
                             "throughput_mbps": round(r.done * 8 / 1e6 / max(secs, 1e-3), 1),
                             "encryption": self.encryption["disk_streams"]}
        self.check_cancel()
        return Outcome(next=Phase.PRECOPY, result=dict(self.disk_summary), next_detail=await self._precopy_opening())

    async def undo_disks(self, out: dict[str, Any]) -> None:
        if self.mirror_started:        # the disk streams stop first; the source keeps its own disks
            try:
                out["mirror"] = (await self.src.mirror_cancel(self.spec.uuid)).state
            except KvmotionError as exc:
                out["mirror_error"] = exc.message

    async def _precopy_opening(self) -> dict[str, Any]:
        """The stream plan with the prediction (when ready), as the PRECOPY phase's opening detail."""
        self.stream = plan = self._plan(await self._prediction_now())
        return {"max_bandwidth_bytes": plan.max_bandwidth_bytes, "downtime_budget_ms": plan.downtime_steps[-1],
                "downtime_first_step_ms": plan.downtime_steps[0], "stream": plan.as_dict()}

    async def on_precopy(self) -> Outcome:
        assert self.ready is not None and self.stream is not None
        plan = self.stream
        self.outgoing_started = True
        await self.src.start_outgoing(self.spec.uuid, OutgoingRequest(
            uri=self.ready.uri, max_bandwidth_bytes=plan.max_bandwidth_bytes, downtime_limit_ms=plan.downtime_steps[0],
            tls_hostname=self.dst_address if self.use_tls else None, multifd_channels=plan.multifd_channels,
            xbzrle_cache_bytes=plan.xbzrle_cache_bytes, auto_converge=plan.auto_converge, postcopy=plan.postcopy,
            postcopy_bandwidth_bytes=(self.req.postcopy_bandwidth_mbps or 0) * MBIT, stream_nice=plan.stream_nice))
        self.follower = PrecopyFollower(self)
        return await self.follower.until_switchover()

    async def undo_precopy(self, out: dict[str, Any]) -> None:
        if not self.outgoing_started:
            return
        try:
            rep = await self.src.cancel_outgoing(self.spec.uuid, resume_if_completed=not out.get("needs_reconcile"))
            out["cancelled"] = True
            if rep is not None and rep.status == "completed" and out.get("needs_reconcile"):
                out["source_parked"] = "the switchover completed on the wire; the source stays paused"
        except KvmotionError as exc:
            out["cancel_error"] = exc.message

    async def on_switchover(self) -> Outcome:
        assert self.follower is not None
        return await self.follower.until_completed()

    async def on_postcopy(self) -> Outcome:
        return await follow_postcopy(self, self.dst_address)

    async def start_postcopy(self, why: str) -> None:
        """The last escalation step: from here the migration is never cancelled or rolled back."""
        self.postcopy_requested = True
        self.postcopy_summary = {"requested_at": time.time(), "why": why, "pauses": 0, "recoveries": 0,
                                 "recovery_log": []}
        self.downtime_steps.append({"t": time.time(), "postcopy": True, "why": why})
        await self.src.postcopy_start(self.spec.uuid)

    # -- planning ----------------------------------------------------------------------------------
    def _plan(self, pred: predict.Prediction | None) -> tuning.StreamPlan:
        """The stream plan; the second call (with the prediction) keeps the first's channels: the shadow has them."""
        first = self.stream
        multifd = first.multifd_channels if first is not None else self.req.multifd_channels
        p = tuning.plan(self.req.tuning, self.ctx.bandwidth_mbps, self.req.downtime_ms, self.spec.memory_mb,
                        pred.converges if pred else None, pred.dirty_mb_s if pred else 0.0,
                        multifd=multifd, xbzrle=self.req.xbzrle, auto_converge=self.req.auto_converge,
                        postcopy=self.postcopy_block, guest_first=self.req.guest_first is not False)
        if first is None or len(p.why) < 2:
            return p
        return dataclasses.replace(p, why=[p.why[0], first.why[1], *p.why[2:]])

    def _postcopy_blocker(self) -> str | None:
        """None: the policy does not allow post-copy; "": allowed and possible; else why it cannot be used."""
        if not self.req.allow_postcopy or self.req.tuning == "qemu-defaults":
            return None
        if self.xv:
            return "the disks are copied with the memory (post-copy is for moves on shared storage)"
        for host in (self.source, self.destination):
            facts = self.inv.host_facts(host)
            if facts is None or not facts.postcopy:
                return f"host {host} cannot do post-copy (no userfaultfd, or guest RAM is file-backed)"
        return ""

    async def _prediction_now(self, timeout: float = 3.0) -> predict.Prediction | None:
        """The prediction, if it is ready within ``timeout`` (it reads a cached sample; it rarely waits)."""
        if self.prediction is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(self.prediction), timeout=timeout)
        except (asyncio.TimeoutError, KvmotionError):
            return None


def relocation_record(reloc: Relocation) -> dict[str, Any]:
    """What reconciliation needs to clean up after a crash: both file sets and which disks move."""
    return {"before": reloc.before.model_dump(mode="json"), "after": reloc.after.model_dump(mode="json"),
            "moved_ids": list(reloc.moved_ids), "home_moves": reloc.home_moves}

"""The vMotion engine (controller side): validate -> precheck -> execute, one persisted phase per step.

Both sides are always finalized; the VM's owner in the inventory changes last.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from enum import StrEnum
from typing import Any

from kvmotion.common.errors import AgentUnreachable, ConflictError, KvmotionError, MigrationFailed
from kvmotion.models.agent import (POSTCOPY_STATES, DiskTarget, MigrationReport, MigrationTuning, MirrorRequest,
                                   OutgoingRequest, VMSpec)
from kvmotion.checks.rules import encryption_plan
from kvmotion.controller import compat, decisions, guestcheck, postcopy, predict, tuning
from kvmotion.controller.pki import client_identity
from kvmotion.controller.agents import AgentClient
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.relocate import Relocation
from kvmotion.models.api import MigrateRequest
from kvmotion.controller.tasks import TaskJournal

log = logging.getLogger(__name__)

POLL_S = 0.2
AGENT_GRACE_S = 30.0      # an agent may restart mid-migration (it re-adopts QEMU and its migration)
OUTAGE_POLL_S = 0.5
MBIT = 125_000            # bytes/s per Mbit/s


class Phase(StrEnum):
    PRECHECK = "precheck"
    SHADOW = "shadow"                 # shadow VM on the destination
    DISKS = "disks"                   # shared-nothing: every disk mirrored to the destination over NBD
    PRECOPY = "precopy"               # iterative memory pre-copy with dirty tracking
    SWITCHOVER = "switchover"         # quiesce, last pages and device state
    POSTCOPY = "postcopy"             # (escalation) the guest runs on the destination and pulls the rest
    RESUME = "resume"                 # run on the destination, confirmed
    ANNOUNCE = "announce"             # RARP/GARP
    RELEASE = "release"               # locks to the destination, source freed, owner changes
    ROLLBACK = "rollback"


# Where each phase starts in the task's 0..100 progress.
PROGRESS_AT = {Phase.PRECHECK: 0, Phase.SHADOW: 5, Phase.DISKS: 6, Phase.PRECOPY: 10, Phase.SWITCHOVER: 90,
               Phase.POSTCOPY: 91, Phase.RESUME: 93, Phase.ANNOUNCE: 96, Phase.RELEASE: 97}


CRASH_AT_ENV = "KVMOTION_FAULT_CRASH_AT"


def crash_point(phase: Phase) -> None:
    """Fault injection for the crash tests: the controller dies right after persisting ``phase``, the way a
    power cut would, when ``KVMOTION_FAULT_CRASH_AT`` names it. Unset in production."""
    if os.environ.get(CRASH_AT_ENV) == str(phase):
        log.critical("fault injection: controller exits at phase %s", phase)
        os._exit(70)


def migration_address(inv: Inventory, host: str) -> str:
    facts = inv.host_facts(host)
    for iface in facts.migration_interfaces if facts else []:
        if iface.enabled and iface.address:
            return iface.address
    raise MigrationFailed(f"host {host} has no migration interface address", remedy="configure its migration interface")


class VMotion:
    """Runs one vMotion task to its end. Every step's phase is persisted before the step."""

    def __init__(self, inv: Inventory, journal: TaskJournal, spec: VMSpec, source: str, destination: str,
                 req: MigrateRequest, bandwidth_mbps: int) -> None:
        self.inv, self.journal, self.spec, self.req = inv, journal, spec, req
        self.source, self.destination = source, destination
        self.src: AgentClient = inv.agent(source)
        self.dst: AgentClient = inv.agent(destination)
        self.shadow_created = False
        self.outgoing_started = False
        self.resumed = False
        self.switching = False
        self.resume_info: dict[str, Any] = {}
        self.downtime_steps: list[dict[str, Any]] = []
        self.cancel_requested = False
        self.force_requested = False        # the operator asked to switch over now
        self.outages: dict[str, float] = {}  # side -> since when its agent does not answer
        self.encryption: dict[str, Any] = {}
        self.bandwidth_mbps = bandwidth_mbps          # this migration's share of its links, set by admission
        self.bandwidth_log: list[dict[str, Any]] = [{"t": time.time(), "mbps": bandwidth_mbps}]
        self.report: MigrationReport | None = None
        self.marks: dict[str, float] = {"start": time.time()}
        self.reloc: Relocation | None = None          # shared-nothing: where the files go
        self.home_made = False
        self.mirror_started = False
        self.disk_summary: dict[str, Any] = {}
        self.prediction: asyncio.Task[predict.Prediction | None] | None = None
        self.stream: tuning.StreamPlan | None = None
        self.postcopy_requested = False     # from here: never cancelled, never rolled back
        self.postcopy_block: str | None = None   # None: not allowed; "": possible; else why not
        self.postcopy_summary: dict[str, Any] = {}
        self.guest_check: guestcheck.Check | None = None   # does the guest live on the destination (after resume)

    async def set_bandwidth(self, mbps: int) -> None:
        """Admission gave this migration a new share of its links: apply it live."""
        if mbps == self.bandwidth_mbps or self.req.tuning == "qemu-defaults":
            return
        self.bandwidth_mbps = mbps
        self.bandwidth_log.append({"t": time.time(), "mbps": mbps})
        if self.outgoing_started and not self.switching:
            try:
                await self.src.tune(self.spec.uuid, MigrationTuning(max_bandwidth_bytes=mbps * MBIT))
            except KvmotionError as exc:
                log.warning("could not set the bandwidth of %s: %s", self.spec.name, exc)

    def request_force_complete(self) -> None:
        if self.resumed or self.switching:
            raise ConflictError(f"the migration of {self.spec.name} is already switching over", remedy="nothing to do")
        self.force_requested = True

    def request_cancel(self) -> None:
        if self.postcopy_requested:
            raise ConflictError(f"the migration of {self.spec.name} is in post-copy: the VM runs on "
                                f"{self.destination} and part of its memory is still on {self.source}",
                                remedy="let it complete; a failed link is paused and recovered")
        if self.resumed or self.switching:
            raise ConflictError(f"the migration of {self.spec.name} is past its switchover", remedy="let it finish")
        self.cancel_requested = True

    def _check_cancel(self) -> None:
        """Between steps before the switchover: a cancel takes effect here (and in the pre-copy loop)."""
        if self.cancel_requested:
            raise MigrationFailed("cancelled by the user", remedy="nothing to do; the VM stays on the source")

    async def begin(self, phase: Phase, **detail: Any) -> None:
        await asyncio.to_thread(self.journal.begin_phase, str(phase), PROGRESS_AT.get(phase, 0), None, detail)
        crash_point(phase)

    async def end(self, status: str = "ok", ended_at: float | None = None, **detail: Any) -> None:
        await asyncio.to_thread(self.journal.end_phase, status, detail, ended_at)

    async def run(self) -> None:
        try:
            await self._execute()
        except KvmotionError as exc:
            await self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - the task must always end in a state a user can act on
            log.exception("vMotion of %s crashed", self.spec.name)
            await self._fail(MigrationFailed(f"internal error: {type(exc).__name__}: {exc}",
                                             remedy="report this bug; the VM was rolled back to the source"))

    async def _execute(self) -> None:
        await self.begin(Phase.PRECHECK)
        reloc, _, findings = await compat.validate_move(self.inv, self.journal.sessions, self.spec.uuid, self.req,
                                                        exclude_task=self.journal.id)
        compat.raise_on_errors(self.spec.name, self.destination, findings)
        await self.end(findings=compat.findings_json(findings), kind=reloc.kind)
        xv = reloc.kind == "xvmotion"
        self.reloc = reloc if xv else None
        target = reloc.after if xv else self.spec

        use_tls, why, _ = encryption_plan(self.spec.encrypted_vmotion, self.inv.host_facts(self.source),
                                          self.inv.host_facts(self.destination), any(d.encrypted for d in self.spec.disks))
        self.encryption = {"mode": "tls" if use_tls else "plain", "reason": why, "policy": self.spec.encrypted_vmotion}
        self.postcopy_block = self._postcopy_blocker(xv)
        # Channels depend on the link only (the shadow needs them); xbzrle waits for the prediction.
        self.stream = self._plan(None)
        self.prediction = asyncio.create_task(   # from the source's dirty-rate sample; runs beside the shadow
            compat.predict_move(self.inv, self.journal.sessions, self.spec, self.source, self.destination,
                                self.stream.downtime_steps[-1],
                                link=self.stream.max_bandwidth_bytes / MBIT, tls=use_tls,
                                max_age_s=86400, measure=False),
            name=f"predict-{self.spec.name}")
        await self.begin(Phase.SHADOW, host=self.destination, encryption=self.encryption["mode"],
                         multifd_channels=self.stream.multifd_channels)
        self.shadow_created = True
        dst_address = migration_address(self.inv, self.destination)
        if xv and reloc.home_moves:
            files = await self.src.home_files(self.spec)
            self.home_made = True
            await self.dst.put_home(target, files)
        ready = await self.dst.prepare_incoming(target, dst_address,
                                                client_identity(self.source) if use_tls else None,
                                                self.inv.disk_keys(self.spec), list(reloc.moved_ids) if xv else None,
                                                self.stream.multifd_channels, postcopy=self.stream.postcopy)
        await self.end(uri=ready.uri, shadow_pid=ready.pid, nbd_port=ready.nbd_port)
        self._check_cancel()
        if xv:
            await self._mirror_disks(reloc, dst_address, ready, use_tls)
        self._check_cancel()

        self.stream = plan = self._plan(await self._prediction_now())
        await self.begin(Phase.PRECOPY, max_bandwidth_bytes=plan.max_bandwidth_bytes,
                         downtime_budget_ms=plan.downtime_steps[-1], downtime_first_step_ms=plan.downtime_steps[0],
                         stream=plan.as_dict())
        self.outgoing_started = True
        await self.src.start_outgoing(self.spec.uuid, OutgoingRequest(
            uri=ready.uri, max_bandwidth_bytes=plan.max_bandwidth_bytes, downtime_limit_ms=plan.downtime_steps[0],
            tls_hostname=dst_address if use_tls else None, multifd_channels=plan.multifd_channels,
            xbzrle_cache_bytes=plan.xbzrle_cache_bytes, auto_converge=plan.auto_converge, postcopy=plan.postcopy,
            postcopy_bandwidth_bytes=(self.req.postcopy_bandwidth_mbps or 0) * MBIT))
        report = await self._follow_precopy()
        if report.status in POSTCOPY_STATES:
            report = await self._follow_postcopy(report, dst_address)

        await self.begin(Phase.RESUME, host=self.destination)
        resumed = await self._resume()       # confirms the run and sends the announce series, one call
        ann = resumed.pop("announce", None)
        if ann is None:                      # confirmed by status after a failed resume call: announce now
            try:
                ann = await self.dst.announce(self.spec.uuid)
            except KvmotionError as exc:
                ann = {"error": exc.message}
        announced_at = ann.get("announced_at")
        await self.end(ended_at=announced_at, **resumed)

        # RARP/GARP: QEMU announced at completion already; this is the agent's series from the running VM.
        await asyncio.to_thread(self.journal.begin_phase, str(Phase.ANNOUNCE), PROGRESS_AT[Phase.ANNOUNCE],
                                announced_at, {})
        await self.end("failed" if "error" in ann else "ok", **ann)
        self.guest_check = guestcheck.start(self.dst, self.spec.uuid, since=None)   # since it arrived there

        await self.begin(Phase.RELEASE)
        lease = await self.dst.take_lease(self.spec.uuid, expected_holder=self.source)
        release, locks = await asyncio.gather(self.src.finalize_source(self.spec.uuid),
                                              self.dst.locks(self.spec.uuid))
        removed: list[str] = []
        if xv:     # the source's copies of the moved files are released: remove them
            try:
                removed = await self.src.remove_files(self.spec, list(reloc.moved_ids), home=reloc.home_moves)
            except KvmotionError as exc:
                removed = [f"not removed: {exc.message}"]
        await asyncio.to_thread(self.inv.set_vm, self.spec.uuid, host=self.destination,   # the owner changes last
                                spec_json=target.model_dump_json())
        await self.end(lease_holder=lease.host, lease_epoch=lease.epoch, source_files_removed=removed,
                       destination_image_locks=sum(len(v) for v in locks.values()), **release.model_dump())
        summary = self._summary(report)
        summary.update(await self._predicted_vs_actual(summary))
        summary.update(await guestcheck.outcome(self.guest_check, self.spec.name))   # after total_time_s: not in it
        await asyncio.to_thread(self.journal.finish, "success", summary)

    def _plan(self, pred: predict.Prediction | None) -> tuning.StreamPlan:
        """The stream plan; the second call (with the prediction) keeps the first's channels: the shadow has them."""
        first = self.stream
        multifd = first.multifd_channels if first is not None else self.req.multifd_channels
        p = tuning.plan(self.req.tuning, self.bandwidth_mbps, self.req.downtime_ms, self.spec.memory_mb,
                        pred.converges if pred else None, pred.dirty_mb_s if pred else 0.0,
                        multifd=multifd, xbzrle=self.req.xbzrle, auto_converge=self.req.auto_converge,
                        postcopy=self.postcopy_block)
        if first is None or len(p.why) < 2:
            return p
        return dataclasses.replace(p, why=[p.why[0], first.why[1], *p.why[2:]])

    def _postcopy_blocker(self, xv: bool) -> str | None:
        """None: the policy does not allow post-copy; "": allowed and possible; else why it cannot be used."""
        if not self.req.allow_postcopy or self.req.tuning == "qemu-defaults":
            return None
        if xv:
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

    async def _mirror_disks(self, reloc: Relocation, dst_address: str, ready: Any, use_tls: bool) -> None:
        """Shared-nothing: the source mirrors every moved disk into the shadow's NBD exports (write-blocking,
        so the copy converges under any write load); memory pre-copy starts once all are in sync."""
        speed = (self.req.disk_mbps or 0) * MBIT
        targets = [DiskTarget(disk_id=d, kind="nbd", nbd_host=dst_address, nbd_port=ready.nbd_port or 0,
                              export=ready.exports[d], tls_hostname=dst_address if use_tls else None)
                   for d in reloc.moved_ids]
        await self.begin(Phase.DISKS, disks=list(reloc.moved_ids), encryption=self.encryption["mode"])
        t0 = time.time()
        self.mirror_started = True
        await self.src.mirror_start(self.spec.uuid, MirrorRequest(targets=targets, speed_bytes=speed,
                                                                  copy_mode="write-blocking"))
        while True:
            r = await self.src.mirror_status(self.spec.uuid)
            await asyncio.to_thread(self.journal.live, {"disk_bytes_done": r.done, "disk_bytes_total": r.total,
                                                        "disk_mbps": r.mbps, "state": r.state,
                                                        "eta_s": decisions.copy_eta_s(r.done, r.total, r.mbps)},
                                    6 + 40 * (r.done / r.total if r.total else 0))
            if r.state == "failed" or not await self._shadow_alive():
                raise MigrationFailed(f"the disk streams to {self.destination} failed: "
                                      f"{r.error or 'the destination QEMU is gone'}",
                                      remedy="check the destination host's agent and QEMU logs, then retry")
            if r.state == "ready":
                break
            self._check_cancel()
            await asyncio.sleep(POLL_S)
        secs = time.time() - t0
        self.disk_summary = {"bytes": r.done, "seconds": round(secs, 3),
                             "throughput_mbps": round(r.done * 8 / 1e6 / max(secs, 1e-3), 1),
                             "encryption": self.encryption["mode"]}
        await self.end(**self.disk_summary)

    async def _follow_precopy(self) -> MigrationReport:
        watch = decisions.ProgressWatch(started=time.time())
        steps = self.stream.downtime_steps if self.stream else decisions.downtime_steps(self.req.downtime_ms)
        watch.downtime_ms, watch.step_at = steps[0], time.time()
        since: str | None = None
        while True:
            # A long poll: it returns at once when QEMU's status changes (pre-switchover, completion).
            got, alive = await asyncio.gather(self.src.migration(self.spec.uuid, wait_s=POLL_S, since=since),
                                              self._shadow_alive(), return_exceptions=True)
            if isinstance(got, AgentUnreachable):          # an agent restart: QEMU goes on, so do we, a while
                self._outage("source", self.source)
                await asyncio.sleep(OUTAGE_POLL_S)
                continue
            if isinstance(got, BaseException):
                raise got
            self.outages.pop("source", None)
            report = got
            if report.status in ("failed", "cancelled"):   # say why: look at the destination after the failure
                alive = await self._shadow_alive()
            if alive is None:
                self._outage("destination", self.destination)
            else:
                self.outages.pop("destination", None)
            dst_alive = alive is not False
            since = report.status
            now = time.time()
            watch.observe(report, now)
            self.report = report
            decision = decisions.decide(report, dst_alive, watch, now, self.spec.memory_mb,
                                        self.req.progress_timeout_s, self.req.completion_timeout_s_per_gib,
                                        steps[-1], postcopy=bool(self.stream and self.stream.postcopy)
                                        and not self.postcopy_requested)
            if decision.action == decisions.Action.RAISE_DOWNTIME and decision.downtime_ms is not None:
                await self.src.tune(self.spec.uuid, MigrationTuning(downtime_limit_ms=decision.downtime_ms))
                watch.downtime_ms, watch.step_at = decision.downtime_ms, now
                watch.step_pass = report.passes[-1].pass_no if report.passes else 0
                self.downtime_steps.append({"t": now, "downtime_ms": decision.downtime_ms, "why": decision.reason})
            if decision.action in (decisions.Action.WAIT, decisions.Action.START_POSTCOPY):
                self._check_cancel()
            if decision.action == decisions.Action.START_POSTCOPY:
                await self._start_postcopy(decision.reason)
            if self.force_requested and not self.switching and decision.action == decisions.Action.WAIT and \
                    self.stream is not None and self.stream.postcopy and not self.postcopy_requested:
                self.force_requested = False
                await self._start_postcopy("forced by the operator")
            if self.force_requested and not self.switching and decision.action == decisions.Action.WAIT:
                self.force_requested = False
                forced = decisions.forced_downtime_ms(report, steps[-1])
                await self.src.tune(self.spec.uuid, MigrationTuning(downtime_limit_ms=forced))
                watch.downtime_ms, watch.step_at = forced, now
                self.downtime_steps.append({"t": now, "downtime_ms": forced, "why": "forced by the operator"})
            if decision.action in (decisions.Action.SWITCHING, decisions.Action.COMPLETED,
                                   decisions.Action.POSTCOPY) and not self.switching:
                self.switching = True
                await self.end(ended_at=report.pre_switchover_at, passes=len(report.passes),
                               transferred=report.ram_transferred,
                               downtime_limit_ms=watch.downtime_ms, downtime_raises=len(self.downtime_steps))
                await asyncio.to_thread(self.journal.begin_phase, str(Phase.SWITCHOVER),
                                        PROGRESS_AT[Phase.SWITCHOVER], report.pre_switchover_at, {})
                crash_point(Phase.SWITCHOVER)
            await asyncio.to_thread(self.journal.live, self._live(report, watch),
                                    PROGRESS_AT[Phase.PRECOPY] + 0.8 * decisions.percent(report)
                                    if not self.switching else None)
            if decision.action == decisions.Action.COMPLETED:
                await self.end(ended_at=report.completed_at, downtime_ms=report.downtime_ms,
                               parked_ms=round(report.parked_ms or 0.0, 2))
                return report
            if decision.action == decisions.Action.POSTCOPY:
                await self.end(postcopy=True, parked_ms=round(report.parked_ms or 0.0, 2))
                return report
            if decision.action == decisions.Action.ABORT:
                raise MigrationFailed(decision.reason, remedy=_remedy_for(decision.reason))

    async def _start_postcopy(self, why: str) -> None:
        """The last escalation step: from here the migration is never cancelled or rolled back."""
        self.postcopy_requested = True
        self.postcopy_summary = {"requested_at": time.time(), "why": why, "pauses": 0, "recoveries": 0,
                                 "recovery_log": []}
        self.downtime_steps.append({"t": time.time(), "postcopy": True, "why": why})
        await self.src.postcopy_start(self.spec.uuid)

    async def _follow_postcopy(self, report: MigrationReport, dst_address: str) -> MigrationReport:
        """Post-copy runs until it completes: a stalled link is paused on both sides and reconnected."""
        await self.begin(Phase.POSTCOPY, host=self.destination, why=self.postcopy_summary.get("why"))
        pc = self.postcopy_summary
        for key, empty in (("pauses", 0), ("recoveries", 0), ("recovery_log", [])):
            pc.setdefault(key, empty)
        now = time.time()
        w = decisions.PostcopyWatch(started=now, best_transferred=report.ram_transferred, progress_at=now)
        since: str | None = report.status
        log_ = pc["recovery_log"]
        while True:
            try:
                report = await self.src.migration(self.spec.uuid, wait_s=POLL_S, since=since)
            except AgentUnreachable:          # QEMU goes on without its agent; post-copy is never abandoned
                await asyncio.sleep(OUTAGE_POLL_S)
                continue
            since = report.status
            self.report = report
            dst_status = await postcopy.dst_migration_status(self.dst, self.spec.uuid)
            now = time.time()
            new_episode = w.paused_at is None
            d = decisions.decide_postcopy(report, dst_status, w, now)
            if d.action == decisions.Action.PAUSE:
                w.last_pause_at = now
                pc["pauses"] += 1 if new_episode else 0
                log_.append({"t": now, "step": "pause", "why": d.reason,
                             **await postcopy.pause_both(self.src, self.dst, self.spec.uuid)})
            elif d.action == decisions.Action.RECOVER:
                w.last_recover_at = now
                try:
                    got = await postcopy.recover(self.src, self.dst, self.spec.uuid, dst_address)
                    pc["recoveries"] += 1
                    log_.append({"t": now, "step": "recover", **got})
                except KvmotionError as exc:
                    if not log_ or log_[-1].get("error") != exc.message:     # one line per distinct failure
                        log_.append({"t": now, "step": "recover", "error": exc.message})
            del log_[:-50]
            await asyncio.to_thread(self.journal.live, self._live(report) | {
                "postcopy": {"status": report.status, "destination": dst_status, "pauses": pc["pauses"],
                             "recoveries": pc["recoveries"], "paused_since": w.paused_at,
                             "postcopy_bytes": report.extra.get("postcopy_bytes", 0)}},
                PROGRESS_AT[Phase.POSTCOPY] + 2 * decisions.percent(report) / 100)
            if d.action == decisions.Action.COMPLETED:
                pc.update(completed_at=report.completed_at, bytes=report.extra.get("postcopy_bytes", 0),
                          page_requests=report.extra.get("postcopy_requests", 0))
                await self.end(ended_at=report.completed_at, pauses=pc["pauses"], recoveries=pc["recoveries"],
                               postcopy_bytes=pc["bytes"], page_requests=pc["page_requests"])
                return report
            if d.action == decisions.Action.LOST:
                raise MigrationFailed(d.reason, remedy="both QEMUs are kept; see the task's reconciliation")

    async def _shadow_alive(self) -> bool | None:
        """True/False as the destination agent reports it; None when the agent does not answer."""
        try:
            rep = await self.dst.migration(self.spec.uuid)
            return rep.status not in ("failed", "cancelled")
        except AgentUnreachable:
            return None
        except KvmotionError:
            return False

    def _outage(self, side: str, host: str) -> None:
        """An agent does not answer: QEMU's migration does not need it, so wait up to ``AGENT_GRACE_S``."""
        since = self.outages.setdefault(side, time.time())
        if time.time() - since > AGENT_GRACE_S:
            raise MigrationFailed(f"the {side} host {host}'s agent has not answered for {AGENT_GRACE_S:.0f}s",
                                  remedy=f"check kvmotion-agent on {host}; the migration was rolled back")

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
        self.resume_info = result
        return result

    def _live(self, r: MigrationReport, watch: decisions.ProgressWatch | None = None) -> dict[str, Any]:
        """The task's live view; the ETA only while pre-copy is watched."""
        return {"status": r.status, "pass": r.passes[-1].pass_no if r.passes else 0, "ram_total": r.ram_total,
                "bandwidth_mbps": self.bandwidth_mbps,
                "transferred": r.ram_transferred, "remaining": r.ram_remaining, "mbps": r.mbps,
                "dirty_pages_rate": r.dirty_pages_rate, "eta_s": watch.eta_s if watch else None,
                "converging": watch.converging if watch else False,
                "passes": [p.model_dump() for p in r.passes[-50:]]}

    def _summary(self, r: MigrationReport) -> dict[str, Any]:
        total = r.ram_total or self.spec.memory_mb * 1024 * 1024
        resumed_at = self.resume_info.get("resumed_at")
        pause = (resumed_at - r.pre_switchover_at) * 1000 if resumed_at and r.pre_switchover_at else None
        return {"guest_pause_ms": round(pause, 1) if pause is not None else None, "encryption": self.encryption,
                "kind": "xvmotion" if self.reloc else "vmotion", "disks": self.disk_summary,
                "total_time_s": round(time.time() - self.marks["start"], 3),
                "qemu_total_time_ms": r.total_time_ms, "downtime_ms": r.downtime_ms, "parked_ms": r.parked_ms,
                "setup_time_ms": r.setup_time_ms, "bytes_sent": r.ram_transferred, "ram_bytes": total,
                "sent_ratio": round(r.ram_transferred / total, 3) if total else None, "passes": len(r.passes),
                "downtime_steps": self.downtime_steps, "bandwidth_log": self.bandwidth_log,
                "stream": self.stream.as_dict() if self.stream else None,
                "multifd_bytes": r.extra.get("multifd_bytes", 0), "xbzrle": r.extra.get("xbzrle"),
                "max_cpu_throttle_pct": r.extra.get("max_cpu_throttle_pct", 0),
                "postcopy": self.postcopy_summary or None,
                "pass_log": [p.model_dump() for p in r.passes]}

    async def _fail(self, exc: KvmotionError) -> None:
        if self.prediction is not None and not self.prediction.done():
            self.prediction.cancel()
        failed_phase = self.journal.read().phase
        await self.end("failed", error=exc.message)
        rollback: dict[str, Any] = {}
        if not self.resumed and not self.postcopy_requested:
            await self.begin(Phase.ROLLBACK)
            rollback = await self._rollback()
            await self.end("ok" if rollback.get("source_running") else "failed", **rollback)
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
        result = self._summary(self.report) if self.report else {}
        await asyncio.to_thread(self.journal.finish, "error", result, error)

    async def _rollback(self) -> dict[str, Any]:
        """Before RESUME: remove the shadow, then cancel; the VM keeps running on the source.

        The shadow goes first: the source may be resumed only once the destination cannot run.
        """
        out: dict[str, Any] = {}
        if self.mirror_started:        # the disk streams stop first; the source keeps its own disks
            try:
                out["mirror"] = (await self.src.mirror_cancel(self.spec.uuid)).state
            except KvmotionError as exc:
                out["mirror_error"] = exc.message
        if self.shadow_created:
            try:
                await self.dst.abort_incoming(self.spec.uuid)
                out["shadow_removed"] = True
            except ConflictError as exc:   # the destination runs the VM: it must not run twice
                out["shadow_error"] = exc.message
                out["source_running"] = False
                out["vm_runs_on"] = self.destination
                out["needs_reconcile"] = True   # reconciliation completes the move (inventory, lease, source)
                return out
            except KvmotionError as exc:    # unknown: the shadow may exist, and may even run
                out["shadow_error"] = exc.message
                out["needs_reconcile"] = True
        if self.outgoing_started:
            try:
                rep = await self.src.cancel_outgoing(self.spec.uuid, resume_if_completed=not out.get("needs_reconcile"))
                out["cancelled"] = True
                if rep is not None and rep.status == "completed" and out.get("needs_reconcile"):
                    out["source_parked"] = "the switchover completed on the wire; the source stays paused"
            except KvmotionError as exc:
                out["cancel_error"] = exc.message
        if self.home_made and self.reloc is not None and out.get("shadow_removed"):
            try:
                out["destination_files_removed"] = await self.dst.remove_files(self.reloc.after, [], home=True)
            except KvmotionError as exc:
                out["destination_files_error"] = exc.message
        try:
            out["source_running"] = (await self.src.status(self.spec.uuid)).qemu_status == "running"
        except KvmotionError as exc:
            out["source_running"], out["source_error"] = False, exc.message
        return out


def _remedy_for(reason: str) -> str:
    if "link stalls" in reason:
        return "check the migration network between the hosts (links, MTU, firewall); the VM stays on the source"
    if "converge" in reason or "timeout" in reason:
        return "raise --downtime-ms, give the migration more bandwidth, or lower the guest's write rate"
    if "shadow" in reason or "destination" in reason:
        return "check the destination host's agent log and its QEMU log, then retry"
    return "see the error; the VM still runs on the source"

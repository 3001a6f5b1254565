"""Storage vMotion (a running VM's files to other datastores, same host) and cold migration (a powered-off VM).

Storage vMotion: PRECHECK -> MIRROR -> PIVOT -> VERIFY -> CLEANUP; until the pivot the VM runs on its original
disks and a failure removes the partial targets. Cold migration: PRECHECK -> COPY (``qemu-img convert`` and
``qemu-img compare``) -> REGISTER -> CLEANUP; the source files are removed only after the copies verified and
the inventory points at them.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from kvmotion.checks.rules import encryption_plan
from kvmotion.common.errors import CopyFailed, KvmotionError, MirrorFailed
from kvmotion.migration import decisions, guestcheck
from kvmotion.migration.engine import MBIT, MoveContext, MoveEngine, Outcome, Step
from kvmotion.migration.live import relocation_record
from kvmotion.migration.relocate import DiskMove, Relocation
from kvmotion.models.agent import DiskCopyRequest, DiskSpec, DiskTarget, MirrorReport, MirrorRequest, PivotReport
from kvmotion.models.moves import Phase
from kvmotion.models.nbd import TLS_PSK, TLS_X509, NbdPsk

POLL_S = 0.25


class FileMove(MoveEngine):
    """What Storage vMotion and cold migration share: the precheck, and the result's timing and guest check."""

    def __init__(self, ctx: MoveContext) -> None:
        super().__init__(ctx)
        self.reloc: Relocation | None = None
        self.result: dict[str, Any] = {"kind": str(self.kind.name)}
        self.guest_check: guestcheck.Check | None = None    # a running VM after its switch: does the guest live

    async def precheck(self, first: Phase) -> Outcome:
        reloc, findings = await self.inv.precheck(self.spec.uuid, self.req, self.journal.id)
        self.reloc = reloc
        self.result["flattened"] = reloc.flattened
        moves = {m.disk_id: f"{m.source.datastore}:{m.source.path} -> {m.target.datastore}:{m.target.path}"
                 for m in reloc.moves}
        return Outcome(next=first, result={"findings": [f.model_dump(mode="json") for f in findings],
                                           "kind": reloc.kind, "moves": moves, "relocation": relocation_record(reloc),
                                           "home_to": reloc.after.boot_datastore if reloc.home_moves else None})

    async def succeed(self) -> dict[str, Any]:
        self.result["total_time_s"] = self.elapsed()
        return self.result | await guestcheck.outcome(self.guest_check, self.spec.name)

    def failure_result(self) -> dict[str, Any]:
        return self.result | {"total_time_s": self.elapsed()}


class StorageVMotion(FileMove):
    """A running VM's disks (and folder) to other datastores on the same host; the VM never stops."""

    def __init__(self, ctx: MoveContext) -> None:
        super().__init__(ctx)
        self.mirror_started = False
        self.pivot: PivotReport | None = None
        self.bad: dict[str, Any] = {}           # images qemu-img check found at fault
        self.qemu_status: str | None = None

    def steps(self) -> dict[Phase, Step]:
        return {Phase.PRECHECK: Step(self.on_precheck), Phase.MIRROR: Step(self.on_mirror, self.undo_mirror),
                Phase.PIVOT: Step(self.on_pivot), Phase.VERIFY: Step(self.on_verify), Phase.CLEANUP: Step(self.on_cleanup)}

    def cancel_refusal(self) -> str | None:
        return "past its switch to the new files" if self.pivot is not None or self.phase == Phase.PIVOT else None

    @property
    def committed(self) -> bool:
        """Once QEMU pivoted, the VM runs on the new files: they are never undone."""
        return self.pivot is not None or super().committed

    async def on_precheck(self) -> Outcome:
        out = await self.precheck(Phase.MIRROR)
        assert self.reloc is not None
        out.next_detail = {"disks": list(self.reloc.moved_ids), "speed_bytes": (self.req.disk_mbps or 0) * MBIT}
        return out

    async def on_mirror(self) -> Outcome:
        assert self.reloc is not None
        reloc = self.reloc
        targets = [DiskTarget(disk_id=m.disk_id, kind="file", datastore=m.target.datastore, path=m.target.path,
                              format=m.target.format, preallocate=m.target.format == "raw") for m in reloc.moves]
        self.mirror_started = True
        t0 = time.time()
        await self.src.mirror_start(self.spec.uuid, MirrorRequest(
            targets=targets, speed_bytes=(self.req.disk_mbps or 0) * MBIT, copy_mode="background",
            home_datastore=reloc.after.boot_datastore, disk_keys=self.inv.disk_keys(self.spec)))
        report = await self._follow()
        secs = round(time.time() - t0, 3)
        self.result["mirror"] = {"bytes": report.done, "seconds": secs,
                                 "throughput_mbps": round(report.done * 8 / 1e6 / max(secs, 1e-3), 1)}
        self.check_cancel()
        return Outcome(next=Phase.PIVOT, result={"bytes": report.done, "seconds": secs, "mbps": report.mbps})

    async def _follow(self) -> MirrorReport:
        while True:
            r = await self.src.mirror_status(self.spec.uuid)
            await self.live({"bytes_done": r.done, "bytes_total": r.total, "mbps": r.mbps,
                             "eta_s": decisions.copy_eta_s(r.done, r.total, r.mbps), "state": r.state,
                             "disks": [j.model_dump() for j in r.jobs]},
                            self.band(Phase.MIRROR, r.done / r.total if r.total else 0))
            if r.state == "failed":
                raise MirrorFailed(f"the disk mirror failed: {r.error}")
            if r.state == "ready":
                return r
            self.check_cancel()
            await asyncio.sleep(POLL_S)

    async def undo_mirror(self, out: dict[str, Any]) -> None:
        """Before the pivot: stop the mirrors and remove the partial targets; the VM keeps its disks."""
        if self.mirror_started:
            assert self.reloc is not None
            out["mirror"] = (await self.src.mirror_cancel(self.spec.uuid)).state
            out["partial_targets_removed"] = await self.src.remove_files(    # their folders, now empty
                self.reloc.after, list(self.reloc.moved_ids), home=self.reloc.home_moves)

    async def after_rollback(self, out: dict[str, Any]) -> None:
        try:
            out["vm_running"] = (await self.src.status(self.spec.uuid)).qemu_status == "running"
        except KvmotionError as exc:
            out["vm_running"], out["error"] = False, exc.message

    async def on_pivot(self) -> Outcome:
        self.pivot = pivot = await self.src.mirror_pivot(self.spec.uuid)
        # The VM runs on the new files from here on: the inventory follows at once.
        await asyncio.to_thread(self.inv.set_owner, self.spec.uuid, pivot.spec)
        self.guest_check = guestcheck.start(self.src, self.spec.uuid, pivot.pivoted_at)
        self.result |= {"write_stall_ms": pivot.write_stall_ms, "new_files": pivot.new_files,
                        "encryption": {"mode": "not applicable",
                                       "reason": "Storage vMotion within one host sends nothing over the network"}}
        return Outcome(next=Phase.VERIFY, result={"write_stall_ms": pivot.write_stall_ms,
                                                  "old_files_closed": pivot.old_files_closed})

    async def on_verify(self) -> Outcome:
        assert self.pivot is not None and self.reloc is not None
        checks = await self.src.check_images(self.pivot.spec, list(self.reloc.moved_ids))
        self.bad = {k: v for k, v in checks.items() if not v.get("ok")}
        self.qemu_status = (await self.src.status(self.spec.uuid)).qemu_status
        self.result["qemu_img_check"] = {k: bool(v.get("ok")) for k, v in checks.items()}
        return Outcome(next=Phase.CLEANUP, status="ok" if not self.bad else "failed",
                       result={"images": checks, "qemu_status": self.qemu_status})

    async def on_cleanup(self) -> Outcome:
        assert self.pivot is not None and self.reloc is not None
        pivot = self.pivot
        if self.bad or not pivot.old_files_closed or self.qemu_status != "running":
            why = "qemu-img check failed" if self.bad else "the old files are still open" \
                if not pivot.old_files_closed else f"the VM is {self.qemu_status}"
            self.result["old_files_kept"] = pivot.old_files
            return Outcome(status="skipped", result={"reason": f"{why}: the old files are kept for inspection",
                                                     "kept": pivot.old_files})
        removed = await self.src.remove_files(self.spec, list(self.reloc.moved_ids), home=self.reloc.home_moves)
        self.result["removed"] = removed
        return Outcome(result={"removed": removed})


class ColdMigration(FileMove):
    """A powered-off VM to another host and/or datastores: copy, verify, re-register, remove the source."""

    def __init__(self, ctx: MoveContext) -> None:
        super().__init__(ctx)
        self.copied: list[str] = []          # disk ids whose copy was started on the destination
        self.home_made = False
        self.registered = False
        self.nbd_psk: NbdPsk | None = None   # NBD copies without x509: this move's key (never in the journal)
        self.nbd_tls: dict[str, Any] = {}    # how the NBD copies are secured (the result's "encryption")

    def steps(self) -> dict[Phase, Step]:
        return {Phase.PRECHECK: Step(self.on_precheck), Phase.COPY: Step(self.on_copy, self.undo_copy),
                Phase.REGISTER: Step(self.on_register, self.undo_register), Phase.CLEANUP: Step(self.on_cleanup)}

    def cancel_refusal(self) -> str | None:
        return "past its re-registration" if self.registered else None

    @property
    def committed(self) -> bool:
        return self.registered

    async def on_precheck(self) -> Outcome:
        out = await self.precheck(Phase.COPY)
        assert self.reloc is not None
        self._plan_nbd_tls()
        out.next_detail = {"disks": list(self.reloc.moved_ids)}
        return out

    def _plan_nbd_tls(self) -> None:
        """An NBD copy runs over TLS: x509 when the move would encrypt a live migration between these hosts
        (the source admits only the destination's client certificate), else a PSK made for this move."""
        x509, why, _ = encryption_plan(self.spec.encrypted_vmotion, self.inv.host_facts(self.source),
                                       self.inv.host_facts(self.destination), any(d.encrypted for d in self.spec.disks))
        self.nbd_psk = None if x509 else NbdPsk.new()
        self.nbd_tls = {"mode": TLS_X509 if x509 else TLS_PSK, "policy": self.spec.encrypted_vmotion,
                        "reason": why if x509 else f"{why}: TLS with a key made for this move"}
        self.result["encryption"] = {"mode": "not applicable", "reason": "no disk crossed the network"}

    async def on_copy(self) -> Outcome:
        assert self.reloc is not None
        dst_ds = {d.name: d for d in (self.inv.host_facts(self.destination).datastores or [])}
        t0, copied_bytes = time.time(), 0
        for i, m in enumerate(self.reloc.moves):
            self.check_cancel()
            copied_bytes += await self._copy(m, i, len(self.reloc.moves), dst_ds)
        secs = round(time.time() - t0, 3)
        self.result["copy"] = {"bytes": copied_bytes, "seconds": secs,
                               "throughput_mbps": round(copied_bytes * 8 / 1e6 / max(secs, 1e-3), 1),
                               "verified": "qemu-img compare: identical"}
        return Outcome(next=Phase.REGISTER, result={"bytes": copied_bytes, "seconds": secs},
                       next_detail={"host": self.destination})

    async def _copy(self, m: DiskMove, i: int, n: int, dst_ds: dict[str, Any]) -> int:
        req = copy_request(m.source, m.target)
        export = None
        src_store = dst_ds.get(m.source.datastore)
        if src_store is not None and src_store.readable:      # the destination reads the source directly
            req.source_path = f"{src_store.path}/{m.source.path}"
        else:                                                 # read-only NBD export from the source host, TLS
            address = self.inv.migration_address(self.source)
            export = await self.src.disk_export(self.spec, m.disk_id, address,
                                                None if self.nbd_psk else self.inv.tls_identity(self.destination),
                                                self.nbd_psk)
            req.source_uri, req.source_psk = export.uri, self.nbd_psk
            req.source_tls_hostname = None if self.nbd_psk else address
            self.result["encryption"] = self.nbd_tls
        held = {"export": export.export_id if export else None}       # reconciliation stops what was left running
        try:
            await self.live({"disk": m.disk_id, "disk_index": i + 1, "disks": n, "percent": 0, **held}, None)
            self.copied.append(m.disk_id)
            job = await self.dst.disk_copy(req)
            while job.state in ("copying", "verifying"):
                await self.live({"disk": m.disk_id, "disk_index": i + 1, "disks": n, "percent": job.percent,
                                 "state": job.state, "via": "nbd" if export else "local", "job": job.job, **held},
                                self.band(Phase.COPY, (i + job.percent / 100) / max(n, 1)))
                if self.cancel_requested:
                    await self.dst.copy_cancel(job.job)
                    self.check_cancel()
                await asyncio.sleep(POLL_S)
                job = await self.dst.copy_status(job.job)
            if job.state != "done":
                raise CopyFailed(f"copying {m.disk_id} failed: {job.error}")
            return job.bytes_total
        finally:
            if export is not None:
                await self.src.disk_export_stop(export.export_id)

    async def undo_copy(self, out: dict[str, Any]) -> None:
        """Remove every copy made so far; the VM stays where it was, with its files."""
        assert self.reloc is not None
        out["removed"] = await self.dst.remove_files(self.reloc.after, list(self.copied), home=False)
        out["vm_stays_on"] = self.source

    async def on_register(self) -> Outcome:
        assert self.reloc is not None
        if self.reloc.home_moves:
            self.check_cancel()
            files = await self.src.home_files(self.reloc.before)
            self.home_made = True
            await self.dst.put_home(self.reloc.after, files)
        self.registered = True
        await asyncio.to_thread(self.inv.set_owner, self.spec.uuid, self.reloc.after, self.destination)
        return Outcome(next=Phase.CLEANUP, result={"folder_moved": self.reloc.home_moves})

    async def undo_register(self, out: dict[str, Any]) -> None:
        assert self.reloc is not None
        if self.home_made:
            out["folder_removed"] = await self.dst.remove_files(self.reloc.after, [], home=True)

    async def on_cleanup(self) -> Outcome:
        assert self.reloc is not None
        try:
            removed = await self.src.remove_files(self.reloc.before, list(self.reloc.moved_ids),
                                                  home=self.reloc.home_moves)
        except KvmotionError as exc:
            self.result["cleanup_error"] = exc.message
            return Outcome(status="failed", result={"error": exc.message})
        self.result["removed"] = removed
        return Outcome(result={"removed": removed})


def copy_request(src: DiskSpec, dst: DiskSpec) -> DiskCopyRequest:
    return DiskCopyRequest(datastore=dst.datastore, path=dst.path, format=dst.format,
                           preallocate=dst.format == "raw", source_format=src.format, verbatim=src.encrypted)


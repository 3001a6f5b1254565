"""Storage vMotion (a running VM's files to other datastores, same host) and cold migration (a powered-off VM).

Both persist each phase before acting. Storage vMotion: mirror -> pivot -> verify -> cleanup; until the pivot
the VM runs on its original disks and a failure removes the partial targets. Cold migration: copy (with
``qemu-img convert`` and ``qemu-img compare``) -> register -> cleanup; the source files are removed only after
the copies verified and the inventory points at them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kvmotion.common.errors import ConflictError, KvmotionError, MigrationFailed
from kvmotion.models.agent import DiskCopyRequest, DiskTarget, MirrorReport, MirrorRequest, VMSpec
from kvmotion.controller import compat, decisions, guestcheck
from kvmotion.controller.agents import AgentClient
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.relocate import Relocation
from kvmotion.models.api import MigrateRequest
from kvmotion.controller.tasks import TaskJournal
from kvmotion.controller.vmotion import MBIT, migration_address

log = logging.getLogger(__name__)

POLL_S = 0.25


class MoveEngine:
    """Phases persisted before each step; one failure path that undoes what is not yet committed."""

    kind = "move"

    def __init__(self, inv: Inventory, journal: TaskJournal, spec: VMSpec, source: str, destination: str,
                 req: MigrateRequest) -> None:
        self.inv, self.journal, self.spec, self.req = inv, journal, spec, req
        self.source, self.destination = source, destination
        self.src: AgentClient = inv.agent(source)
        self.dst: AgentClient = inv.agent(destination)
        self.cancel_requested = False
        self.committed = False            # past the point of no return (pivot / inventory switched)
        self.reloc: Relocation | None = None
        self.mirror_started = False
        self.marks: dict[str, float] = {"start": time.time()}
        self.result: dict[str, Any] = {"kind": self.kind}
        self.guest_check: guestcheck.Check | None = None    # a running VM after its switch: does the guest live

    async def set_bandwidth(self, mbps: int) -> None:       # admission re-shares links; disks copy at their cap
        return None

    def request_cancel(self) -> None:
        if self.committed:
            raise ConflictError(f"the move of {self.spec.name} is past its switch", remedy="let it finish")
        self.cancel_requested = True

    def check_cancel(self) -> None:
        if self.cancel_requested:
            raise MigrationFailed("cancelled by the user", remedy="nothing to do; the VM keeps its original files")

    async def begin(self, phase: str, progress: float, **detail: Any) -> None:
        await asyncio.to_thread(self.journal.begin_phase, phase, progress, None, detail)

    async def end(self, status: str = "ok", **detail: Any) -> None:
        await asyncio.to_thread(self.journal.end_phase, status, detail, None)

    async def live(self, data: dict[str, Any], progress: float | None) -> None:
        await asyncio.to_thread(self.journal.live, data, progress)

    async def precheck(self) -> Relocation:
        await self.begin("precheck", 0)
        reloc, _, findings = await compat.validate_move(self.inv, self.journal.sessions, self.spec.uuid, self.req,
                                                        exclude_task=self.journal.id)
        compat.raise_on_errors(self.spec.name, reloc.host, findings)
        await self.end(findings=compat.findings_json(findings), kind=reloc.kind,
                       moves={m.disk_id: f"{m.source.datastore}:{m.source.path} -> {m.target.datastore}:{m.target.path}"
                              for m in reloc.moves}, home_to=reloc.after.boot_datastore if reloc.home_moves else None)
        self.reloc = reloc
        return reloc

    async def run(self) -> None:
        try:
            await self.execute()
            self.result["total_time_s"] = round(time.time() - self.marks["start"], 3)
            self.result |= await guestcheck.outcome(self.guest_check, self.spec.name)
            await asyncio.to_thread(self.journal.finish, "success", self.result)
        except KvmotionError as exc:
            await self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - the task must always end in a state a user can act on
            log.exception("%s of %s crashed", self.kind, self.spec.name)
            await self._fail(MigrationFailed(f"internal error: {type(exc).__name__}: {exc}",
                                             remedy="report this bug"))

    async def execute(self) -> None:
        raise NotImplementedError

    async def rollback(self) -> dict[str, Any]:
        raise NotImplementedError

    async def _fail(self, exc: KvmotionError) -> None:
        failed_phase = self.journal.read().phase
        await self.end("failed", error=exc.message)
        rollback: dict[str, Any] = {}
        if not self.committed:
            await self.begin("rollback", 0)
            try:
                rollback = await self.rollback()
            except KvmotionError as exc2:
                rollback = {"error": exc2.message}
            await self.end("ok" if not rollback.get("error") else "failed", **rollback)
        error = exc.to_dict() | {"phase": failed_phase, "rollback": rollback}
        self.result["total_time_s"] = round(time.time() - self.marks["start"], 3)
        await asyncio.to_thread(self.journal.finish, "error", self.result, error)


class StorageVMotion(MoveEngine):
    """A running VM's disks (and folder) to other datastores on the same host; the VM never stops."""

    kind = "svmotion"

    async def execute(self) -> None:
        reloc = await self.precheck()
        speed = (self.req.disk_mbps or 0) * MBIT
        targets = [DiskTarget(disk_id=m.disk_id, kind="file", datastore=m.target.datastore, path=m.target.path,
                              format=m.target.format, preallocate=m.target.format == "raw") for m in reloc.moves]
        await self.begin("mirror", 5, disks=[t.disk_id for t in targets], speed_bytes=speed)
        self.mirror_started = True
        t0 = time.time()
        await self.src.mirror_start(self.spec.uuid, MirrorRequest(
            targets=targets, speed_bytes=speed, copy_mode="background", home_datastore=reloc.after.boot_datastore,
            disk_keys=self.inv.disk_keys(self.spec)))
        report = await self._follow(t0)
        await self.end(bytes=report.done, seconds=round(time.time() - t0, 3), mbps=report.mbps)
        self.result["mirror"] = {"bytes": report.done, "seconds": round(time.time() - t0, 3),
                                 "throughput_mbps": round(report.done * 8 / 1e6 / max(time.time() - t0, 1e-3), 1)}

        await self.begin("pivot", 85)
        self.check_cancel()
        self.committed = True
        pivot = await self.src.mirror_pivot(self.spec.uuid)
        # The VM runs on the new files from here on: the inventory follows at once.
        await asyncio.to_thread(self.inv.set_vm, self.spec.uuid, spec_json=pivot.spec.model_dump_json())
        await self.end(write_stall_ms=pivot.write_stall_ms, old_files_closed=pivot.old_files_closed)
        self.guest_check = guestcheck.start(self.src, self.spec.uuid, pivot.pivoted_at)
        self.result |= {"write_stall_ms": pivot.write_stall_ms, "new_files": pivot.new_files,
                        "encryption": {"mode": "not applicable",
                                       "reason": "Storage vMotion within one host sends nothing over the network"}}

        await self.begin("verify", 92)
        checks = await self.src.check_images(pivot.spec, list(reloc.moved_ids))
        bad = {k: v for k, v in checks.items() if not v.get("ok")}
        status = await self.src.status(self.spec.uuid)
        await self.end("ok" if not bad else "failed", images=checks, qemu_status=status.qemu_status)
        self.result["qemu_img_check"] = {k: bool(v.get("ok")) for k, v in checks.items()}

        await self.begin("cleanup", 96)
        if bad or not pivot.old_files_closed or status.qemu_status != "running":
            why = "qemu-img check failed" if bad else "the old files are still open" if not pivot.old_files_closed \
                else f"the VM is {status.qemu_status}"
            await self.end("skipped", reason=f"{why}: the old files are kept for inspection", kept=pivot.old_files)
            self.result["old_files_kept"] = pivot.old_files
            return
        removed = await self.src.remove_files(self.spec, list(reloc.moved_ids), home=reloc.home_moves)
        await self.end(removed=removed)
        self.result["removed"] = removed

    async def _follow(self, t0: float) -> MirrorReport:
        while True:
            r = await self.src.mirror_status(self.spec.uuid)
            await self.live({"bytes_done": r.done, "bytes_total": r.total, "mbps": r.mbps,
                             "eta_s": decisions.copy_eta_s(r.done, r.total, r.mbps), "state": r.state,
                             "disks": [j.model_dump() for j in r.jobs]},
                            5 + 80 * (r.done / r.total if r.total else 0))
            if r.state == "failed":
                raise MigrationFailed(f"the disk mirror failed: {r.error}",
                                      remedy="check the target datastore (space, permissions) and retry")
            if r.state == "ready":
                return r
            self.check_cancel()
            await asyncio.sleep(POLL_S)

    async def rollback(self) -> dict[str, Any]:
        """Before the pivot: stop the mirrors and remove the partial targets; the VM keeps its disks."""
        out: dict[str, Any] = {}
        if self.mirror_started:
            r = await self.src.mirror_cancel(self.spec.uuid)
            out["mirror"] = r.state
            out["partial_targets_removed"] = True
        try:
            out["vm_running"] = (await self.src.status(self.spec.uuid)).qemu_status == "running"
        except KvmotionError as exc:
            out["vm_running"], out["error"] = False, exc.message
        return out


class ColdMigration(MoveEngine):
    """A powered-off VM to another host and/or datastores: copy, verify, re-register, remove the source."""

    kind = "cold"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.copied: list[tuple[str, str]] = []        # (datastore, path) written on the destination
        self.home_made = False

    async def execute(self) -> None:
        reloc = await self.precheck()
        before, after = reloc.before, reloc.after
        dst_ds = {d.name: d for d in (self.inv.host_facts(self.destination).datastores or [])}
        await self.begin("copy", 5, disks=list(reloc.moved_ids))
        t0, copied_bytes = time.time(), 0
        for i, m in enumerate(reloc.moves):
            self.check_cancel()
            copied_bytes += await self._copy(m.source, m.target, i, len(reloc.moves), dst_ds)
        await self.end(bytes=copied_bytes, seconds=round(time.time() - t0, 3))
        self.result["copy"] = {"bytes": copied_bytes, "seconds": round(time.time() - t0, 3),
                               "throughput_mbps": round(copied_bytes * 8 / 1e6 / max(time.time() - t0, 1e-3), 1),
                               "verified": "qemu-img compare: identical"}

        await self.begin("register", 85, host=self.destination)
        if reloc.home_moves:
            self.check_cancel()
            files = await self.src.home_files(before)
            self.home_made = True
            await self.dst.put_home(after, files)
        self.committed = True
        await asyncio.to_thread(self.inv.set_vm, self.spec.uuid, host=self.destination,
                                spec_json=after.model_dump_json())
        await self.end(folder_moved=reloc.home_moves)

        await self.begin("cleanup", 95)
        try:
            removed = await self.src.remove_files(before, list(reloc.moved_ids), home=reloc.home_moves)
            await self.end(removed=removed)
            self.result["removed"] = removed
        except KvmotionError as exc:
            await self.end("failed", error=exc.message)
            self.result["cleanup_error"] = exc.message

    async def _copy(self, src_disk: Any, dst_disk: Any, i: int, n: int, dst_ds: dict[str, Any]) -> int:
        req = DiskCopyRequest(datastore=dst_disk.datastore, path=dst_disk.path, format=dst_disk.format,
                              preallocate=dst_disk.format == "raw", source_format=src_disk.format,
                              verbatim=src_disk.encrypted)
        export = None
        src_store = dst_ds.get(src_disk.datastore)
        if src_store is not None and src_store.readable:      # the destination reads the source directly
            req.source_path = f"{src_store.path}/{src_disk.path}"
        else:                                                 # read-only NBD export from the source host
            export = await self.src.disk_export(self.spec, src_disk.id, migration_address(self.inv, self.source))
            req.source_uri = export.uri
        try:
            job = await self.dst.disk_copy(req)
            self.copied.append((dst_disk.datastore, dst_disk.path))
            while job.state in ("copying", "verifying"):
                await self.live({"disk": src_disk.id, "disk_index": i + 1, "disks": n, "percent": job.percent,
                                 "state": job.state, "via": "nbd" if export else "local"},
                                5 + 80 * (i + job.percent / 100) / max(n, 1))
                if self.cancel_requested:
                    await self.dst.copy_cancel(job.job)
                    self.check_cancel()
                await asyncio.sleep(POLL_S)
                job = await self.dst.copy_status(job.job)
            if job.state != "done":
                raise MigrationFailed(f"copying {src_disk.id} failed: {job.error}",
                                      remedy="check the target datastore (space, permissions) and retry")
            return job.bytes_total
        finally:
            if export is not None:
                await self.src.disk_export_stop(export.export_id)

    async def rollback(self) -> dict[str, Any]:
        """Remove every copy made so far; the VM stays where it was, with its files."""
        assert self.reloc is not None
        done = {(ds, p) for ds, p in self.copied}
        ids = [m.disk_id for m in self.reloc.moves if (m.target.datastore, m.target.path) in done]
        removed = await self.dst.remove_files(self.reloc.after, ids, home=self.home_made)
        return {"removed": removed, "vm_stays_on": self.source}

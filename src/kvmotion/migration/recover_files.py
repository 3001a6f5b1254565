"""Reconciling an unfinished Storage vMotion or cold migration after a controller restart.

Storage vMotion: the VM runs on whatever files its QEMU has open. Before the pivot the mirror is cancelled (the
partial targets go) and the VM stays on its old disks; after it, the inventory follows the new files and the old
ones go. Cold migration: a copy still running is cancelled; if the inventory already names the copies the move
completes (the source files go), else every copy made so far goes and the VM stays where it was.
"""
from __future__ import annotations

import asyncio
from typing import Any

from kvmotion.common.errors import ErrorCode, KvmotionError
from kvmotion.migration.recover import Recovery, restarted
from kvmotion.models.agent import VMSpec
from kvmotion.models.moves import Phase


async def reconcile_storage(r: Recovery) -> dict[str, Any]:
    t, agent = r.task, r.src
    out: dict[str, Any] = {"task": t.id, "phase": t.phase}
    rel = r.relocation()
    try:
        out["mirror"] = (await agent.mirror_cancel(t.vm_uuid)).state        # a no-op after the pivot
        runtime = await agent.status(t.vm_uuid)
    except KvmotionError as exc:
        out["error"] = exc.message
        return await _unknown(r, out, "the host does not answer: which files the VM uses is not known")
    spec = runtime.spec
    if spec is None or rel is None:
        out["resolution"] = "the inventory follows the files the VM's QEMU uses"
        await asyncio.to_thread(r.inv.set_owner, t.vm_uuid, spec)
        return await _error(r, out, "check `kvmotion vm show`, then start the move again")
    before, after = VMSpec.model_validate(rel["before"]), VMSpec.model_validate(rel["after"])
    now = {d.id: (d.datastore, d.path) for d in spec.disks}
    pivoted = all(now.get(d.id) == (d.datastore, d.path) for d in after.disks if d.id in rel["moved_ids"])
    await asyncio.to_thread(r.inv.set_owner, t.vm_uuid, spec)          # the files QEMU has open decide
    try:        # pivoted: the old set goes; not: what the mirror made of the new set goes (folders included)
        out["removed"] = await agent.remove_files(before if pivoted else after, rel["moved_ids"],
                                                  home=rel["home_moves"])
    except KvmotionError as exc:
        out["cleanup_error"] = exc.message
    out["vm_runs_on_files"] = "new" if pivoted else "original"
    if pivoted:
        out["resolution"] = "the VM had switched to the new files: the move is completed, the old files removed"
        await asyncio.to_thread(r.journal.finish, "success", {"kind": t.kind, "reconciled": out})
        return out
    out["resolution"] = "the VM stays on its original files; the partial targets were removed"
    return await _error(r, out, "start the move again")


async def reconcile_cold(r: Recovery) -> dict[str, Any]:
    t = r.task
    out: dict[str, Any] = {"task": t.id, "phase": t.phase}
    rel = r.relocation()
    if rel is None:
        out["resolution"] = "the VM stays registered where it was; partial copies may remain"
        return await _error(r, out, "check `kvmotion vm show`, then start the move again")
    before, after = VMSpec.model_validate(rel["before"]), VMSpec.model_validate(rel["after"])
    if t.phase == Phase.COPY:
        await _stop_copy(r, t.live or {}, out)
    host, spec = await asyncio.to_thread(r.inv.owner, t.vm_uuid)
    if host == t.destination and spec == after:        # registered: only the cleanup was left
        try:
            out["removed"] = await r.src.remove_files(before, rel["moved_ids"], home=rel["home_moves"])
        except KvmotionError as exc:
            out["cleanup_error"] = exc.message
        out["resolution"] = "the VM was registered on its copies: the move is completed, the source files removed"
        await asyncio.to_thread(r.journal.finish, "success", {"kind": t.kind, "reconciled": out})
        return out
    try:
        out["removed"] = await r.dst.remove_files(after, rel["moved_ids"], home=rel["home_moves"])
    except KvmotionError as exc:
        out["cleanup_error"] = exc.message
        return await _unknown(r, out, "the partial copies could not be removed yet")
    out["resolution"] = f"the VM stays registered on {t.source} with its files; the partial copies were removed"
    return await _error(r, out, "start the move again")


async def _stop_copy(r: Recovery, live: dict[str, Any], out: dict[str, Any]) -> None:
    """The copy job on the destination and the NBD export on the source, as the journal last recorded them."""
    try:        # only a copy still running: cancelling a finished one would remove its (registered) target
        if live.get("job") and (await r.dst.copy_status(live["job"])).state in ("copying", "verifying"):
            out["copy_cancelled"] = (await r.dst.copy_cancel(live["job"])).state
    except KvmotionError as exc:
        if exc.code != ErrorCode.NOT_FOUND:
            out["copy_cancel_error"] = exc.message
    try:
        if live.get("export"):
            out["export_stopped"] = await r.src.disk_export_stop(live["export"])
    except KvmotionError as exc:
        out["export_stop_error"] = exc.message


async def _error(r: Recovery, out: dict[str, Any], remedy: str) -> dict[str, Any]:
    await asyncio.to_thread(r.journal.finish, "error", None,
                            restarted(r.task, out, out.get("resolution", ""), remedy))
    return out


async def _unknown(r: Recovery, out: dict[str, Any], why: str) -> dict[str, Any]:
    out["reason"] = why
    await asyncio.to_thread(r.journal.mark_unknown, out)
    return out

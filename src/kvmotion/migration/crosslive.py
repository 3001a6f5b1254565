"""vMotion to a host of another controller: the same phases as any vMotion (``live.LiveMove``), with what a
move between controllers always has: encrypted streams, no post-copy, and a rollback that also releases the
place the destination controller held. The handoff of ownership is the inventory view's (``set_owner``)."""
from __future__ import annotations

from typing import Any, Protocol

from kvmotion.common.errors import KvmotionError
from kvmotion.migration.engine import MoveContext
from kvmotion.migration.live import LiveMove
from kvmotion.migration.ports import InventoryView


class CrossInventory(InventoryView, Protocol):
    controller: str          # the destination controller

    async def release(self) -> dict[str, Any]: ...


class CrossLiveMove(LiveMove):
    def __init__(self, ctx: MoveContext) -> None:
        # between controllers the streams are always encrypted, whatever the VM's own policy
        ctx.spec = ctx.spec.model_copy(update={"encrypted_vmotion": "required"})
        super().__init__(ctx)

    def _postcopy_blocker(self) -> str | None:
        if not self.req.allow_postcopy or self.req.tuning == "qemu-defaults":
            return None
        return "post-copy is not used between controllers (a failed link would split the VM between them)"

    async def after_rollback(self, out: dict[str, Any]) -> None:
        await super().after_rollback(out)
        if out.get("needs_reconcile") or out.get("vm_runs_on"):
            return                   # the VM may run there: reconciliation commits or releases
        inv: CrossInventory = self.inv        # type: ignore[assignment]
        try:
            out["reservation"] = await inv.release()
        except KvmotionError as exc:
            out["reservation_error"] = exc.message

    async def succeed(self) -> dict[str, Any]:
        out = await super().succeed()
        inv: CrossInventory = self.inv        # type: ignore[assignment]
        out["cross_controller"] = {"controller": inv.controller, "host": self.destination,
                                   "handoff": "committed there, released here"}
        return out

"""Which engine runs each kind of move, and which reconciler finishes it after a controller restart."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from kvmotion.common.errors import InvalidInputError

from kvmotion.migration.crosslive import CrossLiveMove
from kvmotion.migration.engine import MoveContext, MoveEngine
from kvmotion.migration.files import ColdMigration, StorageVMotion
from kvmotion.migration.live import LiveMove
from kvmotion.migration.recover import Recovery, reconcile_live
from kvmotion.migration.recover_files import reconcile_cold, reconcile_storage
from kvmotion.models.moves import MoveKind

Reconciler = Callable[[Recovery], Awaitable[dict[str, Any]]]

ENGINES: dict[MoveKind, type[MoveEngine]] = {MoveKind.VMOTION: LiveMove, MoveKind.XVMOTION: LiveMove,
                                             MoveKind.SVMOTION: StorageVMotion, MoveKind.COLD: ColdMigration}
CROSS_ENGINES: dict[MoveKind, type[MoveEngine]] = {MoveKind.VMOTION: CrossLiveMove, MoveKind.XVMOTION: CrossLiveMove}
RECONCILERS: dict[MoveKind, Reconciler] = {MoveKind.VMOTION: reconcile_live, MoveKind.XVMOTION: reconcile_live,
                                           MoveKind.SVMOTION: reconcile_storage, MoveKind.COLD: reconcile_cold}


def engine(ctx: MoveContext) -> MoveEngine:
    if ctx.cross:
        if ctx.kind.name not in CROSS_ENGINES:
            raise InvalidInputError(f"a {ctx.kind.title} cannot go to another controller",
                                    remedy="move the VM live (it must run)")
        return CROSS_ENGINES[ctx.kind.name](ctx)
    return ENGINES[ctx.kind.name](ctx)


async def reconcile(r: Recovery) -> dict[str, Any]:
    return await RECONCILERS[MoveKind(r.task.kind)](r)

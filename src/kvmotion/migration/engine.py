"""The one engine every kind of move runs on: declared phases, one handler and one undo per phase.

A kind (``migration.kinds``) declares its phases and transitions. An engine subclass declares, per phase, the
handler that does the phase's work and the undo that reverses it. The base class owns the rest, in one place:
each phase is checked against the kind's table and persisted with its timestamp before its handler runs (then
the fault-injection crash point fires); each phase ends with what its handler reports; a failure before the
kind's commit point runs the undos of the phases entered (in the kind's rollback order) inside a persisted
ROLLBACK phase. The engine gets its inventory view, journal and host clients injected (``MoveContext``).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from kvmotion.common.errors import Cancelled, ConflictError, KvmotionError, MigrationFailed
from kvmotion.migration.kinds import Kind
from kvmotion.migration.ports import HostClient, InventoryView, Journal
from kvmotion.models.agent import VMSpec
from kvmotion.models.api import MigrateRequest
from kvmotion.models.moves import Phase

log = logging.getLogger(__name__)

CRASH_AT_ENV = "KVMOTION_FAULT_CRASH_AT"
MBIT = 125_000            # bytes/s per Mbit/s


def crash_point(where: str) -> None:
    """Fault injection for the crash tests: the controller dies here, the way a power cut would, when
    ``KVMOTION_FAULT_CRASH_AT`` names it: a phase (right after it was persisted) or ``<phase>.progress`` (at
    its first progress report, i.e. mid-phase). Unset in production."""
    if os.environ.get(CRASH_AT_ENV) == where:
        log.critical("fault injection: controller exits at %s", where)
        os._exit(70)


@dataclass
class MoveContext:
    """Everything a move works with, injected by whoever runs it."""

    kind: Kind
    journal: Journal
    inventory: InventoryView
    src: HostClient
    dst: HostClient
    spec: VMSpec
    source: str
    destination: str
    req: MigrateRequest
    bandwidth_mbps: int = 0
    cross: bool = False          # the destination host is another controller's (``migration.crosslive``)


@dataclass
class Outcome:
    """What a phase's handler reports: how its phase ended, and which phase comes next (None: the move is done)."""

    next: Phase | None = None
    result: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    ended_at: float | None = None
    next_detail: dict[str, Any] = field(default_factory=dict)
    next_at: float | None = None        # when the next phase really started (e.g. QEMU's pre-switchover time)


Handler = Callable[[], Awaitable[Outcome]]
Undo = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Step:
    handler: Handler
    undo: Undo | None = None


class HaltRollback(Exception):
    """An undo found that nothing more may be undone (e.g. the destination already runs the VM)."""


class MoveEngine:
    """Runs one move to its end: success, error (rolled back), or unknown (reconciliation decides)."""

    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx
        self.kind = ctx.kind
        self.journal, self.inv, self.src, self.dst = ctx.journal, ctx.inventory, ctx.src, ctx.dst
        self.spec, self.req, self.source, self.destination = ctx.spec, ctx.req, ctx.source, ctx.destination
        self.phase: Phase | None = None
        self.entered: list[Phase] = []
        self.cancel_requested = False
        self.marks: dict[str, float] = {"start": time.time()}
        self._progress_seen: set[Phase] = set()

    # -- what a kind's engine declares ---------------------------------------------------------
    def steps(self) -> dict[Phase, Step]:
        raise NotImplementedError

    def rollback_order(self, entered: list[Phase]) -> list[Phase]:
        return list(reversed(entered))

    def cancel_refusal(self) -> str | None:
        """Why a cancel cannot be taken now (None: it can)."""
        return "past its commit point" if self.committed else None

    async def succeed(self) -> dict[str, Any]:
        """The task's result after the last phase."""
        return {"kind": str(self.kind.name), "total_time_s": self.elapsed()}

    async def conclude_failure(self, exc: KvmotionError, failed_phase: str, rollback: dict[str, Any]) -> None:
        error = exc.to_dict() | {"phase": failed_phase, "rollback": rollback}
        await asyncio.to_thread(self.journal.finish, "error", self.failure_result(), error)

    def failure_result(self) -> dict[str, Any]:
        return {"kind": str(self.kind.name), "total_time_s": self.elapsed()}

    async def set_bandwidth(self, mbps: int) -> None:
        """Admission re-shares the links; kinds that send memory apply it live."""
        self.ctx.bandwidth_mbps = mbps

    # -- the machine ---------------------------------------------------------------------------
    @property
    def committed(self) -> bool:
        return any(p in self.kind.commit for p in self.entered)

    def elapsed(self) -> float:
        return round(time.time() - self.marks["start"], 3)

    def request_cancel(self) -> None:
        why = self.cancel_refusal()
        if why is not None:
            raise ConflictError(f"the {self.kind.title} of {self.spec.name} is {why}", remedy="let it finish")
        self.cancel_requested = True

    def check_cancel(self) -> None:
        if self.cancel_requested:
            raise Cancelled("cancelled by the user")

    async def begin(self, phase: Phase, started_at: float | None = None, **detail: Any) -> None:
        """Persist the phase (checked against the kind's table) before anything of it happens."""
        self.kind.check(self.phase, phase)
        await asyncio.to_thread(self.journal.begin_phase, str(phase), self.kind.progress_at.get(phase, 0),
                                started_at, detail)
        self.phase = phase
        if phase not in (Phase.ROLLBACK, Phase.RECONCILE):
            self.entered.append(phase)
        crash_point(str(phase))

    async def end(self, status: str = "ok", ended_at: float | None = None, **detail: Any) -> None:
        await asyncio.to_thread(self.journal.end_phase, status, detail, ended_at)

    async def live(self, data: dict[str, Any], progress: float | None) -> None:
        await asyncio.to_thread(self.journal.live, data, progress)
        if self.phase is not None and self.phase not in self._progress_seen:
            self._progress_seen.add(self.phase)
            crash_point(f"{self.phase}.progress")

    def band(self, phase: Phase, share: float) -> float:
        """A point in ``phase``'s band of the task's progress (share in 0..1)."""
        order = self.kind.phases
        start = self.kind.progress_at.get(phase, 0)
        later = [self.kind.progress_at[p] for p in order[order.index(phase) + 1:] if p in self.kind.progress_at]
        return start + (min(later, default=100) - start) * max(0.0, min(1.0, share))

    async def run(self) -> None:
        try:
            await self._drive()
        except KvmotionError as exc:
            await self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - the task must always end in a state a user can act on
            log.exception("%s of %s crashed", self.kind.name, self.spec.name)
            await self._fail(MigrationFailed(f"internal error: {type(exc).__name__}: {exc}",
                                        remedy="report this bug; see the task's rollback for where the VM is"))

    async def _drive(self) -> None:
        steps = self.steps()
        await self.begin(self.kind.first)
        while True:
            assert self.phase is not None
            out = await steps[self.phase].handler()
            await self.end(out.status, out.ended_at, **out.result)
            if out.next is None:
                break
            await self.begin(out.next, out.next_at, **out.next_detail)
        await asyncio.to_thread(self.journal.finish, "success", await self.succeed())

    async def _fail(self, exc: KvmotionError) -> None:
        failed_phase = str(self.phase or "")
        await self.end("failed", error=exc.message)
        rollback: dict[str, Any] = {}
        if self.phase is not None and self.kind.allows(self.phase, Phase.ROLLBACK) and not self.committed:
            await self.begin(Phase.ROLLBACK)
            rollback = await self.undo_all()
            await self.end("ok" if self.rolled_back(rollback) else "failed", **rollback)
        await self.conclude_failure(exc, failed_phase, rollback)

    async def undo_all(self) -> dict[str, Any]:
        steps = self.steps()
        out: dict[str, Any] = {}
        for phase in self.rollback_order([p for p in self.entered if steps.get(p) and steps[p].undo]):
            undo = steps[phase].undo
            assert undo is not None
            try:
                await undo(out)
            except HaltRollback:
                break
            except KvmotionError as exc:
                out.setdefault("errors", {})[str(phase)] = exc.message
                out["error"] = exc.message
        await self.after_rollback(out)
        return out

    async def after_rollback(self, out: dict[str, Any]) -> None:
        """Where the VM is after the undos (a kind reports it in its own words)."""

    def rolled_back(self, out: dict[str, Any]) -> bool:
        return not out.get("error") and not out.get("needs_reconcile")

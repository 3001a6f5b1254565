"""Following QEMU's migration for a live move: pre-copy up to the switchover, the switchover, post-copy.

Each loop polls the source (a long poll that returns as soon as QEMU's status changes), asks the pure
``decisions`` what to do, and does it. An agent that does not answer is waited for (``AGENT_GRACE_S``): QEMU's
migration does not need it.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from kvmotion.common.errors import (AgentSilent, AgentUnreachable, Failure, KvmotionError, PeerUnreachable,
                                    migration_failure)
from kvmotion.migration import decisions, postcopy
from kvmotion.migration.decisions import Action
from kvmotion.migration.engine import Outcome
from kvmotion.models.agent import POSTCOPY_STATES, MigrationReport, MigrationTuning
from kvmotion.models.moves import Phase

if TYPE_CHECKING:
    from kvmotion.migration.live import LiveMove

POLL_S = 0.2
AGENT_GRACE_S = 30.0      # an agent may restart mid-migration (it re-adopts QEMU and its migration)
OUTAGE_POLL_S = 0.5


class PrecopyFollower:
    """The pre-copy and switchover loop of one live move; its state lives across both phases."""

    def __init__(self, move: "LiveMove") -> None:
        self.m = move
        steps = move.stream.downtime_steps if move.stream else decisions.downtime_steps(move.req.downtime_ms)
        self.steps = steps
        self.watch = decisions.ProgressWatch(started=time.time())
        self.watch.downtime_ms, self.watch.step_at = steps[0], time.time()
        self.since: str | None = None
        self.outages: dict[str, float] = {}   # side -> since when its agent does not answer

    async def until_switchover(self) -> Outcome:
        """Pre-copy, until QEMU stops the guest for the switchover (or completes, or goes post-copy)."""
        while True:
            report, d = await self._step()
            if d.action in (Action.SWITCHING, Action.COMPLETED, Action.POSTCOPY):
                self.m.switching = True
                w = self.watch
                return Outcome(next=Phase.SWITCHOVER, ended_at=report.pre_switchover_at, next_at=report.pre_switchover_at,
                               result={"passes": len(report.passes), "transferred": report.ram_transferred,
                                       "downtime_limit_ms": w.downtime_ms, "downtime_raises": len(self.m.downtime_steps)})

    async def until_completed(self) -> Outcome:
        """The switchover: QEMU sends the last pages and device state (or hands over to post-copy)."""
        report = self.m.report
        while report is None or report.status != "completed" and report.status not in POSTCOPY_STATES:
            report, _ = await self._step()
        if report.status == "completed":
            return Outcome(next=Phase.RESUME, ended_at=report.completed_at, next_detail={"host": self.m.destination},
                           result={"downtime_ms": report.downtime_ms, "parked_ms": round(report.parked_ms or 0.0, 2)})
        return Outcome(next=Phase.POSTCOPY, result={"postcopy": True, "parked_ms": round(report.parked_ms or 0.0, 2)},
                       next_detail={"host": self.m.destination, "why": self.m.postcopy_summary.get("why")})

    async def _poll(self) -> tuple[MigrationReport, bool]:
        m = self.m
        while True:
            got, alive = await asyncio.gather(m.src.migration(m.spec.uuid, wait_s=POLL_S, since=self.since),
                                              shadow_alive(m), return_exceptions=True)
            if isinstance(got, AgentUnreachable):
                self._outage("source", m.source)
                await asyncio.sleep(OUTAGE_POLL_S)
                continue
            if isinstance(got, BaseException):
                raise got
            self.outages.pop("source", None)
            if got.status in ("failed", "cancelled"):      # say why: look at the destination after the failure
                alive = await shadow_alive(m)
            if alive is None:
                self._outage("destination", m.destination)
            else:
                self.outages.pop("destination", None)
            self.since = got.status
            return got, alive is not False

    async def _step(self) -> tuple[MigrationReport, decisions.Decision]:
        m, w = self.m, self.watch
        report, dst_alive = await self._poll()
        now = time.time()
        w.observe(report, now)
        m.report = report
        d = decisions.decide(report, dst_alive, w, now, m.spec.memory_mb, m.req.progress_timeout_s,
                             m.req.completion_timeout_s_per_gib, self.steps[-1],
                             postcopy=bool(m.stream and m.stream.postcopy) and not m.postcopy_requested)
        await self._act(d, report, now)
        await m.live(m.live_view(report, w), m.kind.progress_at[Phase.PRECOPY] + 0.8 * decisions.percent(report)
                     if not m.switching else None)
        if d.action == Action.ABORT:
            raise migration_failure(d.failure or Failure.QEMU_FAILED, d.reason)
        return report, d

    async def _act(self, d: decisions.Decision, report: MigrationReport, now: float) -> None:
        m, w = self.m, self.watch
        if d.action == Action.RAISE_DOWNTIME and d.downtime_ms is not None:
            await m.src.tune(m.spec.uuid, MigrationTuning(downtime_limit_ms=d.downtime_ms))
            w.downtime_ms, w.step_at = d.downtime_ms, now
            w.step_pass = report.passes[-1].pass_no if report.passes else 0
            m.downtime_steps.append({"t": now, "downtime_ms": d.downtime_ms, "why": d.reason})
        if d.action in (Action.WAIT, Action.START_POSTCOPY):
            m.check_cancel()
        if d.action == Action.START_POSTCOPY:
            await m.start_postcopy(d.reason)
        if not m.force_requested or m.switching or d.action != Action.WAIT:
            return
        m.force_requested = False
        if m.stream is not None and m.stream.postcopy and not m.postcopy_requested:
            await m.start_postcopy("forced by the operator")
            return
        forced = decisions.forced_downtime_ms(report, self.steps[-1])
        await m.src.tune(m.spec.uuid, MigrationTuning(downtime_limit_ms=forced))
        w.downtime_ms, w.step_at = forced, now
        m.downtime_steps.append({"t": now, "downtime_ms": forced, "why": "forced by the operator"})

    def _outage(self, side: str, host: str) -> None:
        """An agent does not answer: QEMU's migration does not need it, so wait up to ``AGENT_GRACE_S``."""
        since = self.outages.setdefault(side, time.time())
        if time.time() - since > AGENT_GRACE_S:
            raise AgentSilent(f"the {side} host {host}'s agent has not answered for {AGENT_GRACE_S:.0f}s",
                              remedy=f"check kvmotion-agent on {host}; the migration was rolled back")


async def shadow_alive(m: "LiveMove") -> bool | None:
    """True/False as the destination agent reports it; None when the agent (or, for a host of another
    controller, that controller) does not answer."""
    try:
        rep = await m.dst.migration(m.spec.uuid)
        return rep.status not in ("failed", "cancelled")
    except (AgentUnreachable, PeerUnreachable):
        return None
    except KvmotionError:
        return False


async def follow_postcopy(m: "LiveMove", dst_address: str) -> Outcome:
    """Post-copy runs until it completes: a stalled link is paused on both sides and reconnected."""
    pc = m.postcopy_summary
    for key, empty in (("pauses", 0), ("recoveries", 0), ("recovery_log", [])):
        pc.setdefault(key, empty)
    report = m.report
    assert report is not None
    now = time.time()
    w = decisions.PostcopyWatch(started=now, best_transferred=report.ram_transferred, progress_at=now)
    since: str | None = report.status
    while True:
        try:
            report = await m.src.migration(m.spec.uuid, wait_s=POLL_S, since=since)
        except AgentUnreachable:          # QEMU goes on without its agent; post-copy is never abandoned
            await asyncio.sleep(OUTAGE_POLL_S)
            continue
        since = report.status
        m.report = report
        dst_status = await postcopy.dst_migration_status(m.dst, m.spec.uuid)
        new_episode = w.paused_at is None
        d = decisions.decide_postcopy(report, dst_status, w, time.time())
        await _postcopy_act(m, d, w, dst_address, new_episode)
        await m.live(m.live_view(report) | {"postcopy": _postcopy_view(report, dst_status, pc, w)},
                     m.kind.progress_at[Phase.POSTCOPY] + 2 * decisions.percent(report) / 100)
        if d.action == Action.COMPLETED:
            pc.update(completed_at=report.completed_at, bytes=report.extra.get("postcopy_bytes", 0),
                      page_requests=report.extra.get("postcopy_requests", 0))
            return Outcome(next=Phase.RESUME, ended_at=report.completed_at, next_detail={"host": m.destination},
                           result={"pauses": pc["pauses"], "recoveries": pc["recoveries"],
                                   "postcopy_bytes": pc["bytes"], "page_requests": pc["page_requests"]})
        if d.action == Action.LOST:
            raise migration_failure(d.failure or Failure.POSTCOPY_LOST, d.reason)


def _postcopy_view(report: MigrationReport, dst_status: str | None, pc: dict[str, Any],
                   w: decisions.PostcopyWatch) -> dict[str, Any]:
    return {"status": report.status, "destination": dst_status, "pauses": pc["pauses"],
            "recoveries": pc["recoveries"], "paused_since": w.paused_at,
            "postcopy_bytes": report.extra.get("postcopy_bytes", 0)}


async def _postcopy_act(m: "LiveMove", d: decisions.Decision, w: decisions.PostcopyWatch, dst_address: str,
                        new_episode: bool) -> None:
    pc, log_ = m.postcopy_summary, m.postcopy_summary["recovery_log"]
    now = time.time()
    if d.action == Action.PAUSE:
        pc["pauses"] += 1 if new_episode else 0
        w.last_pause_at = now
        log_.append({"t": now, "step": "pause", "why": d.reason,
                     **await postcopy.pause_both(m.src, m.dst, m.spec.uuid)})
    elif d.action == Action.RECOVER:
        w.last_recover_at = now
        try:
            got = await postcopy.recover(m.src, m.dst, m.spec.uuid, dst_address)
            pc["recoveries"] += 1
            log_.append({"t": now, "step": "recover", **got})
        except KvmotionError as exc:
            if not log_ or log_[-1].get("error") != exc.message:     # one line per distinct failure
                log_.append({"t": now, "step": "recover", "error": exc.message})
    del log_[:-50]

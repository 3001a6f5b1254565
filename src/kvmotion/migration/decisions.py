"""Pure decisions for a running migration: given what was observed, what to do next."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kvmotion.common.errors import Failure
from kvmotion.models.agent import POSTCOPY_STATES, MigrationReport

GIB = 1024 ** 3
PAGE = 4096


class Action(StrEnum):
    WAIT = "wait"
    RAISE_DOWNTIME = "raise-downtime"
    SWITCHING = "switching"
    COMPLETED = "completed"
    ABORT = "abort"
    START_POSTCOPY = "start-postcopy"    # the last escalation step (policy permitting)
    POSTCOPY = "postcopy"                # post-copy runs: follow it with ``decide_postcopy``
    PAUSE = "pause"                      # post-copy's link stalls: pause both sides
    RECOVER = "recover"                  # post-copy paused: reconnect
    LOST = "lost"                        # post-copy failed: the memory is split, an operator must look


POSTCOPY_AFTER_S = 4.0         # at the downtime ceiling, no new low of the remaining memory for this long
POSTCOPY_STALL_S = 3.0         # post-copy: no byte moved for this long = the link stalls
RECOVER_EVERY_S = 1.0
POSTCOPY_PAUSED_GIVEUP_S = 300.0   # then the task is `unknown`; reconciliation keeps recovering it


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    downtime_ms: int | None = None
    failure: Failure | None = None       # ABORT / LOST: why, for the engine's error subclass


# The switchover target starts low and is raised, step by step, up to the budget while pre-copy does not
# converge (the schedule oVirt and Nova use): low downtime when the guest allows it, the budget when not.
FIRST_STEP_MS = 50
PASSES_PER_STEP = 3
SECONDS_PER_STEP = 2.0


ETA_SMOOTHING = 0.5


def downtime_steps(budget_ms: int) -> list[int]:
    steps = [s for s in (FIRST_STEP_MS, 100, 200, 350) if s < budget_ms]
    return steps + [budget_ms]


@dataclass
class ProgressWatch:
    """What the engine remembers between polls: the best `remaining` seen, and when."""

    started: float
    best_remaining: int | None = None
    best_at: float = 0.0
    eta_s: float | None = None
    downtime_ms: int | None = None        # the switchover target now set in QEMU
    step_pass: int = 0                    # pass count when it was set
    step_at: float = 0.0
    converging: bool = False              # the estimate would go up: the ETA holds and says "converging…"
    eta_at: float = 0.0
    sent: int = 0                         # bytes sent so far, and when that last grew: a stalled link
    sent_at: float = 0.0

    def observe(self, report: MigrationReport, now: float) -> None:
        if report.ram_total and (self.best_remaining is None or report.ram_remaining < self.best_remaining):
            self.best_remaining, self.best_at = report.ram_remaining, now
        if report.ram_transferred > self.sent or not self.sent_at:
            self.sent, self.sent_at = report.ram_transferred, now
        if report.mbps > 0 and report.ram_total:
            raw = report.ram_remaining * 8 / (report.mbps * 1e6)
            if self.eta_s is None:
                self.eta_s, self.eta_at = raw, now
                return
            shown = max(0.0, self.eta_s - (now - self.eta_at))          # the last ETA, counted down
            smoothed = ETA_SMOOTHING * raw + (1 - ETA_SMOOTHING) * shown
            self.converging = smoothed > shown
            self.eta_s, self.eta_at = min(shown, smoothed), now         # never goes up


def completion_timeout_s(memory_mb: int, per_gib_s: float) -> float:
    return max(60.0, per_gib_s * memory_mb * 1024 * 1024 / GIB)


def decide(report: MigrationReport, dst_alive: bool, watch: ProgressWatch, now: float, memory_mb: int,
           progress_timeout_s: float, completion_per_gib_s: float, budget_ms: int = 500,
           postcopy: bool = False) -> Decision:
    """``postcopy``: the ladder may end in post-copy (allowed, capable, not started yet)."""
    if report.status == "completed":
        return Decision(Action.COMPLETED)
    if report.status in POSTCOPY_STATES:
        return Decision(Action.POSTCOPY)
    if not dst_alive:
        qemu = f" (QEMU: {report.error})" if report.error else ""
        when = "at the switchover" if report.pre_switchover_at or report.status in ("pre-switchover", "device") \
            else "during pre-copy"
        return Decision(Action.ABORT, f"the destination's shadow VM stopped {when}{qemu}", failure=Failure.DESTINATION_LOST)
    if report.status in ("failed", "cancelled"):
        return Decision(Action.ABORT, report.error or f"QEMU reports the migration {report.status}",
                        failure=Failure.QEMU_FAILED)
    if report.status in ("pre-switchover", "device") or report.pre_switchover_at:
        return Decision(Action.SWITCHING)
    if watch.downtime_ms is not None and watch.downtime_ms < budget_ms:
        pass_no = report.passes[-1].pass_no if report.passes else 0
        if pass_no - watch.step_pass >= PASSES_PER_STEP or now - watch.step_at >= SECONDS_PER_STEP:
            higher = [s for s in downtime_steps(budget_ms) if s > watch.downtime_ms]
            return Decision(Action.RAISE_DOWNTIME, f"not converged after {pass_no} passes at "
                                                   f"{watch.downtime_ms} ms", downtime_ms=higher[0])
    since_progress = now - (watch.best_at or watch.started)
    at_ceiling = watch.downtime_ms is None or watch.downtime_ms >= budget_ms
    if postcopy and at_ceiling and now - watch.step_at >= POSTCOPY_AFTER_S and since_progress >= POSTCOPY_AFTER_S:
        return Decision(Action.START_POSTCOPY, f"pre-copy does not converge at the downtime ceiling of {budget_ms} ms"
                                               f" (the remaining memory did not shrink for {since_progress:.0f}s; "
                                               f"{_rates(report)})")
    if since_progress > progress_timeout_s and now - (watch.sent_at or watch.started) > progress_timeout_s:
        left = (watch.best_remaining or report.ram_remaining) / 1e6
        return Decision(Action.ABORT, f"the migration link stalls: no memory moved for "
                                      f"{now - (watch.sent_at or watch.started):.0f}s with {left:.1f} MB left",
                        failure=Failure.LINK_STALLED)
    if since_progress > progress_timeout_s:
        dirty = report.dirty_pages_rate * PAGE / 1e6
        link = report.mbps / 8
        left = (watch.best_remaining or report.ram_remaining) / 1e6
        rates = (f"dirty rate {dirty:.1f} MB/s > bandwidth {link:.1f} MB/s" if dirty > link else
                 f"the guest rewrites {left:.1f} MB between passes, {left / link * 1000 if link else 0:.0f} ms at "
                 f"{link:.1f} MB/s, more than the downtime target; dirty rate {dirty:.1f} MB/s")
        return Decision(Action.ABORT, f"did not converge: {rates}; the remaining memory did not shrink for "
                                      f"{since_progress:.0f}s (downtime target {watch.downtime_ms} ms reached)",
                        failure=Failure.NOT_CONVERGING)
    limit = completion_timeout_s(memory_mb, completion_per_gib_s)
    if now - watch.started > limit:
        if postcopy:
            return Decision(Action.START_POSTCOPY, f"pre-copy reached its completion timeout of {limit:.0f}s")
        return Decision(Action.ABORT, f"migration exceeded its completion timeout of {limit:.0f}s",
                        failure=Failure.TIMED_OUT)
    return Decision(Action.WAIT)


def _rates(report: MigrationReport) -> str:
    dirty = report.dirty_pages_rate * PAGE / 1e6
    return f"dirty rate {dirty:.1f} MB/s, bandwidth {report.mbps / 8:.1f} MB/s"


@dataclass
class PostcopyWatch:
    """What the engine remembers while post-copy runs."""

    started: float
    best_transferred: int = 0
    progress_at: float = 0.0
    paused_at: float | None = None
    last_pause_at: float = 0.0
    last_recover_at: float = 0.0


def decide_postcopy(report: MigrationReport, dst_status: str | None, w: PostcopyWatch, now: float) -> Decision:
    """Post-copy cannot be rolled back: it completes, or it is paused and recovered, never cancelled.
    ``dst_status`` is the destination's migration status (None when its agent does not answer)."""
    if report.status == "completed":
        return Decision(Action.COMPLETED)
    if report.status in ("failed", "cancelled"):
        return Decision(Action.LOST, f"post-copy {report.status}: {report.error or 'no detail'}; the guest's memory "
                                     "is split between the hosts", failure=Failure.POSTCOPY_LOST)
    if dst_status in ("failed", "cancelled"):
        return Decision(Action.LOST, "the destination QEMU failed during post-copy (its stream broke where QEMU "
                                     "cannot resume it); the source keeps the guest's state at the switchover, paused", failure=Failure.POSTCOPY_LOST)
    if report.status == "postcopy-active":
        w.paused_at = None
        if report.ram_transferred > w.best_transferred:
            w.best_transferred, w.progress_at = report.ram_transferred, now
            return Decision(Action.WAIT)
        if now - (w.progress_at or w.started) >= POSTCOPY_STALL_S:
            return Decision(Action.PAUSE, f"no memory moved for {now - (w.progress_at or w.started):.0f}s: "
                                          "the migration link stalls")
        return Decision(Action.WAIT)
    if report.status == "postcopy-paused":
        w.paused_at = w.paused_at or now
        if dst_status == "postcopy-active":          # the destination has not noticed the dead link
            if now - w.last_pause_at >= RECOVER_EVERY_S:
                return Decision(Action.PAUSE, "the destination still waits on the dead link")
        if dst_status == "postcopy-paused" and now - w.last_recover_at >= RECOVER_EVERY_S:
            return Decision(Action.RECOVER, "both sides paused: reconnect")
        if now - w.paused_at > POSTCOPY_PAUSED_GIVEUP_S:
            return Decision(Action.LOST, f"post-copy paused for {now - w.paused_at:.0f}s: the migration link "
                                         "is down; reconciliation keeps recovering it", failure=Failure.POSTCOPY_LOST)
    return Decision(Action.WAIT)


MAX_FORCED_DOWNTIME_MS = 60_000
FORCED_MIN_MS = 5_000


def forced_downtime_ms(report: MigrationReport, ceiling_ms: int) -> int:
    """The downtime limit that makes QEMU switch over at its next check whatever the guest rewrites meanwhile:
    its remaining memory swings from nearly nothing to the whole working set within a pass, so the limit
    covers ten times what remains now at the measured rate, and at least 5 s. The real pause is what is left
    at switchover ÷ the link (QEMU's last stage is not rate-limited)."""
    rate = report.mbps * 125_000            # bytes/s
    need = report.ram_remaining / rate * 1000 * 10 if rate > 0 else MAX_FORCED_DOWNTIME_MS
    return int(min(MAX_FORCED_DOWNTIME_MS, max(ceiling_ms, FORCED_MIN_MS, need)))


def percent(report: MigrationReport) -> float:
    """Pre-copy progress as a share of memory sent, in 0..100, for the PRECOPY band of the task."""
    done = report.ram_transferred
    left = report.ram_remaining
    if done + left <= 0:
        return 0.0
    return 100.0 * done / (done + left)


def copy_eta_s(done: int, total: int, mbps: float) -> float | None:
    """Seconds left for a disk copy at its measured rate (None while the rate is unknown)."""
    rate = mbps * 1e6 / 8
    return round((total - done) / rate, 1) if rate > 0 and total > done else None

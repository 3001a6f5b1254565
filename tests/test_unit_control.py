"""Control-plane unit tests: pure checks and decisions, the task journal, leases, the error tree."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvmotion.agent import lease
from kvmotion.common.errors import ConflictError, ErrorCode, KvmotionError, NotFoundError
from kvmotion.common.types import MigrationReport
from kvmotion.controller import decisions
from kvmotion.controller.db import make_engine, make_sessionmaker
from kvmotion.controller.tasks import TaskJournal, get_task, unfinished


def report(status: str = "active", remaining: int = 100, transferred: int = 50, mbps: float = 800.0) -> MigrationReport:
    return MigrationReport(role="source", status=status, ram_total=1000, ram_remaining=remaining,
                           ram_transferred=transferred, mbps=mbps)


def test_decide_waits_switches_completes_and_aborts() -> None:
    now = time.time()
    w = decisions.ProgressWatch(started=now)
    args = dict(memory_mb=256, progress_timeout_s=150, completion_per_gib_s=800)
    r = report()
    w.observe(r, now)
    assert decisions.decide(r, True, w, now, **args).action == decisions.Action.WAIT
    assert decisions.decide(report("pre-switchover"), True, w, now, **args).action == decisions.Action.SWITCHING
    assert decisions.decide(report("completed"), True, w, now, **args).action == decisions.Action.COMPLETED
    d = decisions.decide(r, False, w, now, **args)
    assert d.action == decisions.Action.ABORT and "destination" in d.reason
    failed = report("failed")
    failed.error = "Broken pipe"
    assert decisions.decide(failed, True, w, now, **args).reason == "Broken pipe"
    both = decisions.decide(failed, False, w, now, **args).reason
    assert "destination" in both and "Broken pipe" in both
    stalled = decisions.decide(r, True, w, now + 151, **args)
    assert stalled.action == decisions.Action.ABORT and "no progress" in stalled.reason


def test_completion_timeout_scales_with_memory() -> None:
    assert decisions.completion_timeout_s(1024, 800) == pytest.approx(800)
    assert decisions.completion_timeout_s(4096, 800) == pytest.approx(3200)
    assert decisions.completion_timeout_s(64, 800) == 60.0


def test_eta_only_goes_down() -> None:
    w = decisions.ProgressWatch(started=0)
    w.observe(report(remaining=100_000_000, mbps=800), 1)
    first = w.eta_s
    w.observe(report(remaining=200_000_000, mbps=800), 2)   # the guest dirtied more: ETA must not rise
    assert first is not None and w.eta_s == first
    w.observe(report(remaining=10_000_000, mbps=800), 3)
    assert w.eta_s is not None and w.eta_s < first


def test_task_journal_persists_phases_in_order(tmp_path: Path) -> None:
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    j = TaskJournal.create(sessions, "vmotion", "u1", "vm1", "h1", "h2", {"host": "h2"})
    j.begin_phase("precheck", 0)
    j.end_phase("ok")
    j.begin_phase("shadow", 5)
    # A controller restarting now finds the task unfinished, in phase "shadow".
    again = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    pending = unfinished(again)
    assert [t.phase for t in pending] == ["shadow"]
    j.end_phase("failed", {"error": "boom"})
    j.finish("error", error={"code": "X", "message": "boom"})
    t = get_task(sessions, j.id[:8])
    assert [p.name for p in t.phases] == ["precheck", "shadow"]
    assert t.phases[1].status == "failed" and t.phases[1].ended_at >= t.phases[1].started_at
    assert t.state == "error" and unfinished(sessions) == []
    with pytest.raises(NotFoundError):
        get_task(sessions, "nope")


def test_lease_hand_over_is_compare_and_swap(tmp_path: Path) -> None:
    first = lease.take_lease(tmp_path, "u1", "h1", None)
    assert first.epoch == 1
    with pytest.raises(ConflictError) as exc:
        lease.take_lease(tmp_path, "u1", "h2", None)           # h1 still holds it
    assert exc.value.details["holder"] == "h1"
    second = lease.take_lease(tmp_path, "u1", "h2", expected_holder="h1")   # the migration hand-over
    assert second.host == "h2" and second.epoch == 2
    assert lease.release_lease(tmp_path, "h1") is False      # h1 no longer holds it
    assert lease.release_lease(tmp_path, "h2") is True and lease.read_lease(tmp_path) is None


def test_error_tree_round_trips_codes() -> None:
    err = ConflictError("busy", remedy="wait", details={"a": 1})
    back = KvmotionError.from_dict(err.to_dict())
    assert isinstance(back, ConflictError) and back.code == ErrorCode.CONFLICT and back.remedy == "wait"
    assert back.http_status == 409
    assert NotFoundError("x").http_status == 404


def test_downtime_is_raised_step_by_step_up_to_the_budget() -> None:
    assert decisions.downtime_steps(500) == [50, 100, 200, 350, 500]
    assert decisions.downtime_steps(80) == [50, 80]
    now = time.time()
    w = decisions.ProgressWatch(started=now, downtime_ms=50, step_at=now)
    args = dict(memory_mb=256, progress_timeout_s=150, completion_per_gib_s=800, budget_ms=500)
    r = report()
    assert decisions.decide(r, True, w, now + 0.5, **args).action == decisions.Action.WAIT
    d = decisions.decide(r, True, w, now + 2.5, **args)              # no switchover after 2 s at 50 ms
    assert d.action == decisions.Action.RAISE_DOWNTIME and d.downtime_ms == 100
    w.downtime_ms = 500                                               # at the budget: never above it
    assert decisions.decide(r, True, w, now + 10, **args).action == decisions.Action.WAIT

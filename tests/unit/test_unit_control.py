"""Control-plane unit tests: pure checks and decisions, the task journal, leases, the error tree."""
from __future__ import annotations

import random

import time
from pathlib import Path

import pytest

from kvmotion.agent import lease
from kvmotion.common.confined import Place
from kvmotion.common.errors import ConflictError, ErrorCode, KvmotionError, NotFoundError
from kvmotion.models.agent import MigrationReport
from kvmotion.migration import decisions
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
    link_dead = decisions.decide(r, True, w, now + 151, **args)      # nothing sent for 151 s: the link, not the guest
    assert link_dead.action == decisions.Action.ABORT
    assert link_dead.reason == "the migration link stalls: no memory moved for 151s with 0.0 MB left"
    w.observe(report(transferred=5000), now + 150)         # bytes keep moving, the remaining memory does not shrink
    r.dirty_pages_rate = 50_000                            # 204.8 MB/s against 100 MB/s sent
    stalled = decisions.decide(r, True, w, now + 151, **args)
    assert stalled.action == decisions.Action.ABORT
    assert stalled.reason.startswith("did not converge: dirty rate 204.8 MB/s > bandwidth 100.0 MB/s;")
    assert "151s" in stalled.reason
    r.dirty_pages_rate = 5000
    slow = decisions.decide(r, True, w, now + 151, **args).reason
    assert slow.startswith("did not converge: the guest rewrites 0.0 MB between passes")
    assert "dirty rate 20.5 MB/s" in slow


def test_completion_timeout_scales_with_memory() -> None:
    assert decisions.completion_timeout_s(1024, 800) == pytest.approx(800)
    assert decisions.completion_timeout_s(4096, 800) == pytest.approx(3200)
    assert decisions.completion_timeout_s(64, 800) == 60.0


def test_eta_is_smoothed_counts_down_and_never_rises() -> None:
    w = decisions.ProgressWatch(started=0)
    w.observe(report(remaining=100_000_000, mbps=800), 1.0)             # 1.0 s left
    assert w.eta_s == pytest.approx(1.0) and not w.converging
    w.observe(report(remaining=200_000_000, mbps=800), 1.2)             # the guest dirtied more: 2.0 s raw
    assert w.converging and w.eta_s == pytest.approx(0.8)               # held (counted down), "converging…"
    w.observe(report(remaining=10_000_000, mbps=800), 1.4)              # 0.1 s raw, smoothed with 0.6 shown
    assert not w.converging and w.eta_s == pytest.approx(0.35)
    rng = random.Random(7)
    last, t = w.eta_s, 1.4
    for _ in range(200):
        t += 0.2
        w.observe(report(remaining=rng.randrange(1, 400_000_000), mbps=rng.choice([200, 800, 3000])), t)
        assert w.eta_s is not None and w.eta_s <= last
        last = w.eta_s


def test_task_journal_persists_phases_in_order(db_url: str) -> None:
    sessions = make_sessionmaker(make_engine(db_url))
    j = TaskJournal.create(sessions, "vmotion", "u1", "vm1", "h1", "h2", {"host": "h2"})
    j.begin_phase("precheck", 0)
    j.end_phase("ok")
    j.begin_phase("shadow", 5)
    # A controller restarting now finds the task unfinished, in phase "shadow".
    again = make_sessionmaker(make_engine(db_url))
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
    disks = [Place.of(tmp_path, "ds/vm/a.qcow2"), Place.of(tmp_path, "ds/vm/b.raw")]
    paths = lease.lease_paths(Place.of(tmp_path, "ds/vm"), disks)
    assert [p.name for p in paths] == [".kvmotion.lease", ".a.qcow2.lease", ".b.raw.lease"]
    first = lease.take_all(paths, "u1", "h1", None)
    assert first.epoch == 1
    with pytest.raises(ConflictError) as exc:
        lease.take_all(paths, "u1", "h2", None)           # h1 still holds them
    assert exc.value.details["holder"] == "h1"
    second = lease.take_all(paths, "u1", "h2", expected_holder="h1")   # the migration hand-over
    assert second.host == "h2" and second.epoch == 2
    assert lease.release_all(paths, "h1") == 0                # h1 no longer holds any
    assert lease.release_all(paths, "h2") == 3 and lease.read_lease(paths[1]) is None
    assert lease.take_one(paths[1], "u1", "h1", None)[0].epoch == 3    # the epoch only grows


def test_a_conflict_on_one_disk_takes_no_lease(tmp_path: Path) -> None:
    paths = lease.lease_paths(Place.of(tmp_path), [Place.of(tmp_path, "a.qcow2"), Place.of(tmp_path, "b.qcow2")])
    lease.take_one(paths[2], "u1", "h9", None)                # another host holds the second disk
    with pytest.raises(ConflictError):
        lease.take_all(paths, "u1", "h1", None)
    assert lease.held_by(paths, "h1") == []


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


def test_admission_slots_bandwidth_and_priority() -> None:
    from kvmotion.controller.admission import Link, Request, plan, shares_mbps

    links = {"h1": Link("h1", 1000), "h2": Link("h2", 1000), "h3": Link("h3", 10000)}
    reqs = [Request(f"t{i}", "h1", "h2", frozenset({"shared"}), created_at=i) for i in range(6)]
    p = plan(reqs, [], links)
    assert p.start == ["t0", "t1", "t2", "t3"]                  # 4 slots below 10 GbE
    assert set(p.waiting) == {"t4", "t5"} and p.position == {"t4": 1, "t5": 2}
    running = reqs[:4]
    assert sum(shares_mbps(running, links).values()) <= 1000       # the link is never oversubscribed
    assert all(s >= 250 for s in shares_mbps(running, links).values())
    high = Request("hi", "h1", "h2", frozenset({"shared"}), priority="high", created_at=99)
    p = plan(reqs[4:] + [high], reqs[:3], links)                 # one slot frees: the high one takes it
    assert p.start == ["hi"] and p.position == {"t4": 1, "t5": 2}
    other = Request("o1", "h3", "h2", frozenset({"shared"}), created_at=100)
    p = plan(reqs[4:] + [other], reqs[:4], links)                # h2 is full: h3->h2 waits too ...
    assert p.start == [] and "h2" in p.waiting["o1"]
    p = plan([Request("o2", "h3", "h3x", frozenset(), created_at=1)], [], links | {"h3x": Link("h3x", 10000)})
    assert p.start == ["o2"]                                     # ... but other hosts are not held back
    fast = {"a": Link("a", 10000), "b": Link("b", 10000)}
    assert len(plan([Request(f"f{i}", "a", "b", frozenset(), created_at=i) for i in range(9)], [], fast).start) == 8
    slow = {"a": Link("a", 400), "b": Link("b", 400)}
    assert len(plan([Request(f"s{i}", "a", "b", frozenset(), created_at=i) for i in range(3)], [], slow).start) == 1
    ds = plan([Request(f"d{i}", "h1", "h3", frozenset({"x"}), created_at=i) for i in range(2)], [], links, ds_limit=1)
    assert ds.start == ["d0"] and "datastore x" in ds.waiting["d1"]


def test_storage_vmotion_limits() -> None:
    from kvmotion.controller.admission import Link, Request, plan

    links = {"h1": Link("h1", 1000), "h2": Link("h2", 1000)}
    sv = [Request(f"s{i}", "h1", "h1", frozenset({f"ds{i % 2}"}), created_at=i, local=True) for i in range(3)]
    p = plan(sv, [], links)
    assert p.start == ["s0", "s1"] and "Storage vMotion slots" in p.waiting["s2"]     # 2 per host
    many = [Request(f"m{i}", f"x{i}", f"x{i}", frozenset({"big"}), created_at=i, local=True) for i in range(9)]
    p = plan(many, [], {})
    assert len(p.start) == 8 and "8 Storage vMotions" in p.waiting["m8"]            # 8 per datastore
    vm = Request("v", "h1", "h2", frozenset({"ds0"}), created_at=99)
    assert plan([vm], sv[:2], links).start == ["v"]        # Storage vMotions hold no network slot


def test_concurrent_incoming_preparations_get_different_ports() -> None:
    """A port handed out stays reserved until QEMU has bound it: two preparations at once never share one."""
    from kvmotion.agent.ports import PORT_RANGE, pick_port

    ports = [pick_port("127.0.0.1") for _ in range(5)]       # nothing binds them in between
    assert len(set(ports)) == 5 and all(p in PORT_RANGE for p in ports)


def test_forced_downtime_covers_the_working_set() -> None:
    r = report(remaining=1_000_000, mbps=80.0)                       # 100 ms at 10 MB/s now
    assert decisions.forced_downtime_ms(r, 500) == decisions.FORCED_MIN_MS
    r = report(remaining=100_000_000, mbps=80.0)                     # 10 s now
    assert decisions.forced_downtime_ms(r, 500) == decisions.MAX_FORCED_DOWNTIME_MS
    assert decisions.forced_downtime_ms(report(mbps=0.0), 500) == decisions.MAX_FORCED_DOWNTIME_MS


def test_force_complete_is_refused_clearly_for_anything_but_a_running_live_migration(db_url: str) -> None:
    from kvmotion.controller.scheduler import Scheduler
    sessions = make_sessionmaker(make_engine(db_url))
    sched = Scheduler(sessions, None)  # type: ignore[arg-type]   # refusals never reach the inventory
    done = TaskJournal.create(sessions, "vmotion", "u1", "vm1", "h1", "h2", {"host": "h2"})
    done.finish("success", {})
    with pytest.raises(ConflictError, match="only a running live migration can be forced") as exc:
        sched.force_complete(done.id)
    assert exc.value.remedy and get_task(sessions, done.id).state == "success"      # nothing changed
    cold = TaskJournal.create(sessions, "cold", "u2", "vm2", "h1", "h2", {"host": "h2"})   # running, not live
    with pytest.raises(ConflictError, match="cold task"):
        sched.force_complete(cold.id)
    with pytest.raises(NotFoundError):
        sched.force_complete("nope")


def test_the_ladder_ends_in_postcopy_only_when_allowed_and_only_at_the_ceiling() -> None:
    now = time.time()
    args = dict(memory_mb=256, progress_timeout_s=150, completion_per_gib_s=800, budget_ms=500)
    r = report()
    r.dirty_pages_rate = 50_000
    w = decisions.ProgressWatch(started=now, downtime_ms=200, step_at=now)
    w.observe(r, now)
    # below the ceiling the downtime is raised first, even with post-copy allowed
    assert decisions.decide(r, True, w, now + 5, postcopy=True, **args).action == decisions.Action.RAISE_DOWNTIME
    w.downtime_ms, w.step_at = 500, now
    assert decisions.decide(r, True, w, now + 1, postcopy=True, **args).action == decisions.Action.WAIT
    d = decisions.decide(r, True, w, now + 5, postcopy=True, **args)   # stalled 5 s at the ceiling
    assert d.action == decisions.Action.START_POSTCOPY
    assert "ceiling of 500 ms" in d.reason and "dirty rate 204.8 MB/s, bandwidth 100.0 MB/s" in d.reason
    assert decisions.decide(r, True, w, now + 5, postcopy=False, **args).action == decisions.Action.WAIT
    # still shrinking at the ceiling: no post-copy yet
    w2 = decisions.ProgressWatch(started=now, downtime_ms=500, step_at=now)
    w2.observe(r, now + 4.5)
    assert decisions.decide(r, True, w2, now + 5, postcopy=True, **args).action == decisions.Action.WAIT
    # the completion timeout starts post-copy instead of cancelling when it is allowed
    w2.observe(report(remaining=10), now + 799)              # a slow migration that still shrinks
    late = decisions.decide(r, True, w2, now + 800, postcopy=True, progress_timeout_s=10_000, memory_mb=1024,
                            completion_per_gib_s=700, budget_ms=500)
    assert late.action == decisions.Action.START_POSTCOPY and "completion timeout" in late.reason
    # once running, post-copy is followed, never aborted by the pre-copy rules
    assert decisions.decide(report("postcopy-active"), False, w, now + 999, **args).action == \
        decisions.Action.POSTCOPY


def test_postcopy_is_paused_when_the_link_stalls_and_recovered_when_both_sides_paused() -> None:
    A = decisions.Action
    now = time.time()
    w = decisions.PostcopyWatch(started=now, best_transferred=50, progress_at=now)
    assert decisions.decide_postcopy(report("postcopy-active", transferred=60), "postcopy-active", w,
                                     now + 1).action == A.WAIT
    assert w.best_transferred == 60
    stalled = decisions.decide_postcopy(report("postcopy-active", transferred=60), "postcopy-active", w, now + 4.5)
    assert stalled.action == A.PAUSE and "link stalls" in stalled.reason
    # the source paused; the destination still waits on the dead link: pause it too
    assert decisions.decide_postcopy(report("postcopy-paused"), "postcopy-active", w, now + 5).action == A.PAUSE
    assert decisions.decide_postcopy(report("postcopy-paused"), "postcopy-paused", w, now + 5).action == A.RECOVER
    w.last_recover_at = now + 5
    assert decisions.decide_postcopy(report("postcopy-paused"), "postcopy-paused", w, now + 5.5).action == A.WAIT
    assert decisions.decide_postcopy(report("postcopy-paused"), None, w, now + 6).action == A.WAIT
    assert decisions.decide_postcopy(report("postcopy-recover"), "postcopy-recover", w, now + 7).action == A.WAIT
    gave_up = decisions.decide_postcopy(report("postcopy-paused"), None, w, now + 5 + 301)
    assert gave_up.action == A.LOST and "reconciliation keeps recovering" in gave_up.reason
    assert decisions.decide_postcopy(report("completed"), "completed", w, now + 400).action == A.COMPLETED
    dst_gone = decisions.decide_postcopy(report("postcopy-paused"), "failed", w, now)
    assert dst_gone.action == A.LOST and "destination QEMU failed during post-copy" in dst_gone.reason
    failed = report("failed")
    failed.error = "Broken pipe"
    lost = decisions.decide_postcopy(failed, None, w, now)
    assert lost.action == A.LOST and "Broken pipe" in lost.reason and "split" in lost.reason

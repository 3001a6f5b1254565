"""Task retention (controller/retention.py): finished tasks older than the retention, or beyond the cap, are deleted
in bounded batches, oldest first; unfinished tasks and the moves of an unfinished evacuation never are."""
from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import insert, select

from kvmotion.common.errors import ConfigInvalid
from kvmotion.controller import retention
from kvmotion.controller.config import ControllerConfig
from kvmotion.controller.db import Task
from kvmotion.controller.retention import TaskRetention, child_ids, doomed, prune_batch
from kvmotion.controller.service import Controller

NOW = 1_000_000_000.0
DAY = 86400.0


@pytest.fixture()
def ctl(tmp_path: Path, db_url: str) -> Iterator[Controller]:
    c = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    yield c
    c.engine.dispose()


def add(ctl: Controller, name: str, state: str = "success", age_days: float = 0.0, kind: str = "vmotion",
        source: str = "h9", created_days: float | None = None, **extra: Any) -> str:
    """A task ``name`` (its vm_name) that finished ``age_days`` ago (unfinished: finished_at 0)."""
    finished = NOW - age_days * DAY if state in ("success", "error") else 0.0
    created = NOW - (created_days if created_days is not None else age_days) * DAY - 60
    tid = str(uuid.uuid4())
    with ctl.engine.begin() as c:
        c.execute(insert(Task), [dict(id=tid, kind=kind, vm_uuid="u", vm_name=name, source=source, state=state,
                                      created_at=created, finished_at=finished, **extra)])
    return tid


def left(ctl: Controller) -> set[str]:
    with ctl.sessions() as s:
        return set(s.scalars(select(Task.vm_name)).all())


def test_old_finished_tasks_go_recent_and_unfinished_ones_stay(ctl: Controller) -> None:
    add(ctl, "old-ok", "success", 31)
    add(ctl, "old-failed", "error", 45)
    add(ctl, "recent", "success", 29)
    for state in ("running", "queued", "unknown"):
        add(ctl, f"old-{state}", state, created_days=400)
    assert prune_batch(ctl.sessions, NOW, 30, 100_000) == 2
    assert left(ctl) == {"recent", "old-running", "old-queued", "old-unknown"}
    assert prune_batch(ctl.sessions, NOW, 30, 100_000) == 0                        # nothing more to do


def test_beyond_the_cap_the_oldest_finished_tasks_go_whatever_their_age(ctl: Controller) -> None:
    for i in range(6):
        add(ctl, f"t{i}", "success", age_days=5 - i * 0.5)                         # t0 oldest … t5 newest
    add(ctl, "running", "running", created_days=10)                                # not counted, not deleted
    assert prune_batch(ctl.sessions, NOW, 30, 4) == 2
    assert left(ctl) == {"t2", "t3", "t4", "t5", "running"}


def test_a_pass_deletes_in_bounded_batches_oldest_first(ctl: Controller) -> None:
    for i in range(12):
        add(ctl, f"t{i:02d}", "success", age_days=100 - i)
    assert prune_batch(ctl.sessions, NOW, 30, 100_000, batch=5) == 5
    assert left(ctl) == {f"t{i:02d}" for i in range(5, 12)}                          # the five oldest went
    keeper = TaskRetention(ctl.sessions, days=30, batch=3)
    assert keeper.prune(NOW) == 7 and keeper.deleted == 7 and left(ctl) == set()     # batches of 3: 3, 3, 1


def test_the_moves_of_an_unfinished_evacuation_stay_until_it_ends(ctl: Controller) -> None:
    recorded = add(ctl, "recorded-child", "success", 90, source="h7")               # named in its journal only
    add(ctl, "child", "success", 80, source="h1")                                   # a move off h1 since it began
    add(ctl, "before", "success", 95, source="h1", created_days=95)                 # off h1, before it began
    add(ctl, "elsewhere", "success", 80, source="h2")
    live = {"children": {"vm-a": {"task": recorded, "state": "success"}}}
    mid = add(ctl, "host h1", "running", kind="maintenance", source="h1", created_days=91,
              progress_json=json.dumps(live))
    assert prune_batch(ctl.sessions, NOW, 30, 100_000) == 2
    assert left(ctl) == {"recorded-child", "child", "host h1"}
    assert prune_batch(ctl.sessions, NOW, 30, 1) == 0          # not even beyond the cap
    with ctl.engine.begin() as c:                              # the evacuation ends, long ago
        c.execute(Task.__table__.update().where(Task.id == mid).values(state="error", finished_at=NOW - 70 * DAY))
    assert prune_batch(ctl.sessions, NOW, 30, 100_000) == 3 and left(ctl) == set()


def test_child_ids_reads_the_journal_of_a_maintenance_task() -> None:
    live = json.dumps({"children": {"a": {"task": "t1"}, "b": {"state": "x"}}, "blocked": {}})
    phases = json.dumps([{"name": "plan", "detail": {"migrations": {"a": "t1", "c": "t2"}}},
                         {"name": "evacuate", "detail": {"results": {"d": {"task": "t3"}, "e": "junk"}}}, "junk"])
    assert child_ids(live, phases) == {"t1", "t2", "t3"}
    assert child_ids("{}", "[]") == set() and child_ids("", "") == set()


def test_doomed_is_the_prefix_beyond_the_cap_or_before_the_cutoff() -> None:
    rows = [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)]
    assert doomed(rows, 0, 2.5) == ["a", "b"]
    assert doomed(rows, 3, 0.0) == ["a", "b", "c"]
    assert doomed(rows, -5, 0.0) == []


def test_tick_runs_a_pass_at_most_every_every_s_and_never_raises(ctl: Controller,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    add(ctl, "ancient", "success")                           # finished at NOW (2001): long ago by the real clock
    keeper = TaskRetention(ctl.sessions, every_s=3600)
    assert asyncio.run(keeper.tick()) == 1 and left(ctl) == set()
    add(ctl, "ancient2", "success")
    assert asyncio.run(keeper.tick()) == 0 and left(ctl) == {"ancient2"}          # within the hour: no pass

    def broken(*_: Any) -> int:
        raise RuntimeError("database gone")
    monkeypatch.setattr(retention, "prune_batch", broken)
    keeper.last = float("-inf")
    assert asyncio.run(keeper.tick()) == 0                    # logged; the monitor goes on


def test_the_settings_have_defaults_limits_and_reach_the_controller(ctl: Controller) -> None:
    cfg = ControllerConfig()
    assert (cfg.task_retention_days, cfg.task_retention_max) == (30, 100_000)
    assert (ctl.retention.days, ctl.retention.max_finished) == (30, 100_000)
    for bad in ({"task_retention_days": 0}, {"task_retention_max": 10}):
        with pytest.raises(ConfigInvalid):
            ControllerConfig.resolve(None, bad)

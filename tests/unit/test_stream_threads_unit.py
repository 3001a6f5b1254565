"""The outgoing stream's threads are found by name and reniced once; the final times are read after the race."""
from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvmotion.agent.hv.qemu import migration, threads

pytestmark = pytest.mark.unit


def _proc(tmp: Path, pid: int, names: dict[int, str]) -> Path:
    for tid, comm in names.items():
        d = tmp / str(pid) / "task" / str(tid)
        d.mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
    return tmp


def test_stream_threads_are_found_by_qemus_names(tmp_path: Path) -> None:
    proc = _proc(tmp_path, 10, {10: "qemu-system-x86", 11: "CPU 0/TCG", 12: "live_migration",
                                13: "multifdsend_0", 14: "multifdsend_1", 15: "IO mon_iothread"})
    assert threads.stream_threads(10, proc) == [12, 13, 14]
    assert threads.stream_threads(99, proc) == []


def test_lower_stream_threads_renices_each_thread_once() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="live_migration")
    t.start()
    try:
        tid = t.native_id
        Path(f"/proc/self/task/{tid}/comm").write_text("live_migration")
        done: set[int] = set()
        assert threads.lower_stream_threads(os.getpid(), 5, done) == [tid]
        assert os.getpriority(os.PRIO_PROCESS, tid) == 5
        assert threads.lower_stream_threads(os.getpid(), 5, done) == []          # once
        assert threads.lower_stream_threads(os.getpid(), 0, set()) == []         # 0: nothing changes
        assert os.getpriority(os.PRIO_PROCESS, os.getpid()) == 0                 # the main thread is untouched
    finally:
        stop.set()
        t.join()


def test_a_completion_is_read_again_until_qemu_has_computed_its_times(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([{"status": "completed", "total-time": 0, "downtime": 0},
                    {"status": "completed", "total-time": 0, "downtime": 0},
                    {"status": "completed", "total-time": 1830, "downtime": 41}])

    async def fake_query(vm: object) -> dict:
        return next(answers)

    monkeypatch.setattr(migration, "query_migrate", fake_query)
    info = asyncio.run(migration.settled_query(SimpleNamespace(), pause_s=0))
    assert info["total-time"] == 1830 and info["downtime"] == 41
    active = iter([{"status": "active", "total-time": 10}])
    monkeypatch.setattr(migration, "query_migrate", lambda vm: _const(next(active)))
    assert asyncio.run(migration.settled_query(SimpleNamespace(), pause_s=0))["status"] == "active"


async def _const(v: dict) -> dict:
    return v

"""What a scrape of /metrics costs at fleet scale: a controller database with 1,000 hosts, 20,000 VMs and N finished
vMotions (results of a live move's size), scraped until the journal is read, then twice more.

Run:  python3 benchmarks/metrics_scrape.py [--tasks 100000] [--db postgresql+psycopg://USER@HOST/DB]
(default: a SQLite file in a scratch folder; a PostgreSQL database gets the tables made in it: use an empty one).
Prints each scrape's time, SQL statements and size; asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import event, insert

from kvmotion.controller.db import VM, Host, Task, make_engine, make_sessionmaker
from kvmotion.controller.metrics import Exposition

HOSTS, VMS, BATCH = 1000, 20000, 10000


def live_result(now: float) -> str:
    """About 4 KB, as a live move's result with its pass and bandwidth logs."""
    return json.dumps({"kind": "VMOTION", "total_time_s": 12.3, "downtime_ms": 42.0, "guest_pause_ms": 51.0,
                       "bytes_sent": 2_000_000_000,
                       "pass_log": [{"pass_no": i, "transferred": 123456789, "dirty_pages_rate": 1234, "mbps": 941.2,
                                     "t": now} for i in range(12)],
                       "bandwidth_log": [{"t": now + i, "mbps": 941} for i in range(60)]})


def fill(engine, tasks: int, hosts: int = HOSTS, vms: int = VMS,  # noqa: ANN001 - an Engine
         vm_row: Callable[[int, dict[str, Any]], dict[str, Any]] = lambda _i, row: row) -> None:
    """``hosts`` hosts h0…, ``vms`` VMs vm0… spread over them (``vm_row`` may change each row), ``tasks`` finished
    vMotions."""
    now, result = time.time(), live_result(time.time())
    with engine.begin() as c:
        c.execute(insert(Host), [dict(name=f"h{i}", address="https://198.18.0.1:8770", last_seen=now - i)
                                 for i in range(hosts)])
        c.execute(insert(VM), [vm_row(i, dict(uuid=str(uuid.uuid4()), name=f"vm{i}", host=f"h{i % hosts}",
                                              power_state="poweredOn", spec_json="{}")) for i in range(vms)])
        for start in range(0, tasks, BATCH):
            c.execute(insert(Task), [dict(id=str(uuid.uuid4()), kind="vmotion", vm_uuid="u", vm_name="v",
                                          state="success", result_json=result, created_at=now - tasks + i - 5,
                                          started_at=now - tasks + i - 3, finished_at=now - tasks + i)
                                     for i in range(start, min(tasks, start + BATCH))])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=100000)
    ap.add_argument("--db", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(args.db or f"sqlite:///{Path(scratch) / 'c.db'}")
        fill(engine, args.tasks)
        statements = [0]
        event.listen(engine, "before_cursor_execute", lambda *_: statements.__setitem__(0, statements[0] + 1))
        page = Exposition(make_sessionmaker(engine))
        after_complete, n = 0, 0
        while after_complete < 2:
            statements[0], n = 0, n + 1
            t0 = time.perf_counter()
            body = page.render()
            ms = (time.perf_counter() - t0) * 1000
            complete = page.collector.finished.complete
            print(f"scrape {n}: {ms:8.1f} ms  {statements[0]:3d} statements  {len(body):7d} bytes"
                  f"  {'journal read' if complete else 'reading the journal'}")
            after_complete += complete
        engine.dispose()


if __name__ == "__main__":
    main()

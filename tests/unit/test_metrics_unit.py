"""Prometheus metrics at /metrics (controller.metrics): a viewer's token, the text format 0.0.4, values equal to what
the task journal and the inventory hold, and scrapes whose cost does not grow with the number of finished tasks.

The controller's app runs in-process without its lifespan: no scheduler admits the queued tasks put here and no
host monitor contacts the hosts, so what a test writes stays as it wrote it."""
from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from kvmotion import __version__
from kvmotion.controller import metrics
from kvmotion.controller.api import create_app
from kvmotion.controller.auth import Role, TokenCreate
from kvmotion.controller.db import VM, Host, Task
from kvmotion.controller.metrics import DURATION_BUCKETS, PAUSE_BUCKETS, WAIT_BUCKETS, Exposition
from kvmotion.controller.service import Controller

NOW = 1_800_000_000.0
FINISHED_FAMILIES = ("kvmotion_migrations_", "kvmotion_migration_bytes_", *(h.name for h in metrics.HISTOGRAMS))
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Api:
    def __init__(self, root: Path, db_url: str) -> None:
        self.ctl = Controller(db_url, pki_dir=root / "pki", token_dir=root)
        self.app = create_app(self.ctl)
        self.app.state.metrics.collector.clock = lambda: NOW
        self.client = TestClient(self.app)            # not entered: no lifespan, see the module
        self.tokens = {r: self.ctl.tokens.create(TokenCreate(name=f"t-{r}", role=r)).token
                       for r in (Role.VIEWER, Role.ENROL)}

    def scrape(self) -> Samples:
        r = self.client.get("/metrics", headers={"Authorization": f"Bearer {self.tokens[Role.VIEWER]}"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse(r.text)


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture()
def api(tmp_path: Path, db_url: str) -> Iterator[Api]:
    a = Api(tmp_path, db_url)
    yield a
    a.ctl.engine.dispose()


def add_task(api: Api, kind: str, state: str, result: dict[str, Any] | str | None = None, created: float = NOW - 100,
             started: float = 0.0, finished: float = 0.0) -> str:
    task_id = str(uuid.uuid4())
    with api.ctl.sessions.begin() as s:
        s.add(Task(id=task_id, kind=kind, vm_uuid=str(uuid.uuid4()), vm_name="vm", state=state,
                   result_json=result if isinstance(result, str) else json.dumps(result or {}),
                   created_at=created, started_at=started, finished_at=finished))
    return task_id


def live_result(total_s: float, downtime_ms: float, pause_ms: float, sent: int) -> dict[str, Any]:
    """The figures a live move's result carries (migration/live_end.py, summary), among others it has."""
    return {"kind": "VMOTION", "total_time_s": total_s, "downtime_ms": downtime_ms, "guest_pause_ms": pause_ms,
            "bytes_sent": sent, "ram_bytes": 2 * sent, "disks": {}, "passes": 3, "pass_log": [{"pass_no": 1}]}


def test_metrics_need_a_token_of_the_viewer_role(api: Api) -> None:
    r = api.client.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
    assert api.client.get("/metrics", headers={"Authorization": "Bearer kvm_0123456789ab_" + "A" * 43}
                          ).status_code == 401
    assert api.client.get("/metrics", headers={"Authorization": f"Bearer {api.tokens[Role.ENROL]}"}
                          ).status_code == 403
    assert value(api.scrape(), "kvmotion_build_info", version=__version__) == 1.0


def test_the_leader_gauge(api: Api, db_url: str) -> None:
    """SQLite: the one controller leads. PostgreSQL: not before its start tried the lock (no lifespan here)."""
    assert value(api.scrape(), "kvmotion_controller_leader") == (1.0 if db_url.startswith("sqlite") else 0.0)


def test_finished_migrations_are_counted_with_their_figures(api: Api) -> None:
    moves = [(12.0, 40.0, 55.0, 1000), (90.0, 120.0, 150.0, 3000), (3000.0, 8.0, 9.5, 5000)]
    for i, (total, downtime, pause, sent) in enumerate(moves):
        add_task(api, "vmotion", "success", live_result(total, downtime, pause, sent), created=NOW - 50 - i,
                 started=NOW - 50 + 2.5 * i, finished=NOW - 10 + i)
    add_task(api, "vmotion", "error", {"kind": "VMOTION", "total_time_s": 7.0, "bytes_sent": 700},
             started=NOW - 90, finished=NOW - 5)
    add_task(api, "vmotion", "error", created=NOW - 30, finished=NOW - 4)            # cancelled while queued
    add_task(api, "svmotion", "success", {"total_time_s": 4.0, "mirror": {"bytes": 2048}}, started=NOW - 99,
             finished=NOW - 3)
    add_task(api, "xvmotion", "success", live_result(30.0, 20.0, 25.0, 400) | {"disks": {"bytes": 8192}},
             started=NOW - 99, finished=NOW - 2)
    add_task(api, "cold", "success", {"total_time_s": 6.0, "copy": {"bytes": 4096}}, started=NOW - 99,
             finished=NOW - 1)
    add_task(api, "maintenance", "success", {"results": []}, started=NOW - 99, finished=NOW - 1)   # not a move
    m = api.scrape()

    assert value(m, "kvmotion_migrations_total", kind="vmotion", result="success") == 3
    assert value(m, "kvmotion_migrations_total", kind="vmotion", result="error") == 2
    assert value(m, "kvmotion_migrations_total", kind="cold", result="error") == 0
    assert sum(v for (name, _), v in m.items() if name == "kvmotion_migrations_total") == 8
    duration = dict(kind="vmotion")
    assert value(m, "kvmotion_migration_duration_seconds_count", **duration) == 3        # the failed one: no
    assert value(m, "kvmotion_migration_duration_seconds_sum", **duration) == 3102.0
    assert value(m, "kvmotion_migration_duration_seconds_bucket", le="20.0", **duration) == 1
    assert value(m, "kvmotion_migration_duration_seconds_bucket", le="120.0", **duration) == 2
    assert value(m, "kvmotion_migration_duration_seconds_bucket", le="1800.0", **duration) == 2
    assert value(m, "kvmotion_migration_duration_seconds_bucket", le="+Inf", **duration) == 3
    assert value(m, "kvmotion_migration_downtime_seconds_sum", kind="vmotion") == pytest.approx(0.168)
    assert value(m, "kvmotion_migration_downtime_seconds_bucket", le="0.01", kind="vmotion") == 1
    assert value(m, "kvmotion_migration_downtime_seconds_bucket", le="0.05", kind="vmotion") == 2
    assert value(m, "kvmotion_migration_guest_pause_seconds_sum", kind="vmotion") == pytest.approx(0.2145)
    assert value(m, "kvmotion_migration_guest_pause_seconds_count", kind="xvmotion") == 1
    assert ("kvmotion_migration_downtime_seconds_count", frozenset({("kind", "cold")})) not in m  # no memory moved
    assert value(m, "kvmotion_migration_duration_seconds_sum", kind="cold") == 6.0
    assert value(m, "kvmotion_migration_bytes_total", kind="vmotion", what="memory") == 1000 + 3000 + 5000 + 700
    assert value(m, "kvmotion_migration_bytes_total", kind="xvmotion", what="memory") == 400
    assert value(m, "kvmotion_migration_bytes_total", kind="xvmotion", what="disk") == 8192
    assert value(m, "kvmotion_migration_bytes_total", kind="svmotion", what="disk") == 2048
    assert value(m, "kvmotion_migration_bytes_total", kind="cold", what="disk") == 4096
    # admission, queued to started: waits of 0, 3.5, 7 and 10 s; the one never started is left out
    assert value(m, "kvmotion_admission_wait_seconds_count", kind="vmotion") == 4
    assert value(m, "kvmotion_admission_wait_seconds_sum", kind="vmotion") == pytest.approx(20.5)
    assert value(m, "kvmotion_admission_wait_seconds_bucket", le="5.0", kind="vmotion") == 2


def test_the_queue_and_its_oldest_wait(api: Api) -> None:
    m = api.scrape()
    assert value(m, "kvmotion_migration_tasks", state="queued") == 0
    assert value(m, "kvmotion_admission_queue_oldest_seconds") == 0
    for created in (NOW - 40, NOW - 75):
        add_task(api, "vmotion", "queued", created=created)
    add_task(api, "xvmotion", "running", created=NOW - 500, started=NOW - 400)
    add_task(api, "cold", "unknown", created=NOW - 600, started=NOW - 600)
    add_task(api, "image-import", "running", created=NOW - 9000)                         # not a move
    m = api.scrape()
    assert value(m, "kvmotion_migration_tasks", state="queued") == 2
    assert value(m, "kvmotion_migration_tasks", state="running") == 1
    assert value(m, "kvmotion_migration_tasks", state="unknown") == 1
    assert value(m, "kvmotion_admission_queue_oldest_seconds") == 75.0


def test_hosts_agent_health_facts_age_and_vms(api: Api) -> None:
    with api.ctl.sessions.begin() as s:
        s.add(Host(name="h1", address="https://198.18.0.11:8770", state="connected", last_seen=NOW - 120.5))
        s.add(Host(name="h2", address="https://198.18.0.12:8770", state="disconnected", last_seen=NOW - 3600))
        s.add(Host(name="h3", address="https://198.18.0.13:8770", state="disconnected", last_seen=0.0))
        for i, power in enumerate(("poweredOn", "poweredOn", "poweredOff")):
            s.add(VM(uuid=str(uuid.uuid4()), name=f"vm{i}", host="h1", power_state=power, spec_json="{}"))
    m = api.scrape()
    assert value(m, "kvmotion_hosts", state="connected") == 1 and value(m, "kvmotion_hosts", state="disconnected") == 2
    assert [value(m, "kvmotion_host_up", host=h) for h in ("h1", "h2", "h3")] == [1, 0, 0]
    assert value(m, "kvmotion_host_facts_age_seconds", host="h1") == 120.5
    assert value(m, "kvmotion_host_facts_age_seconds", host="h2") == 3600
    assert ("kvmotion_host_facts_age_seconds", frozenset({("host", "h3")})) not in m      # never heard from
    assert value(m, "kvmotion_vms", power_state="poweredOn") == 2
    assert value(m, "kvmotion_vms", power_state="poweredOff") == 1


def test_drs_imbalance_target_recommendations_and_faults_per_cluster(api: Api) -> None:
    from kvmotion.models.drs import DrsConfig, DrsStatus, Recommendation, RuleFault
    rec = Recommendation(id="r", vm="vm1", source="h1", destination="h2", reason="balance", priority=3, gain=0.2,
                         cost_s=1.0, cost_mb=100.0, imbalance_after=0.1)
    fault = RuleFault(rule="apart", must=True, vms=["vm1", "vm2"], message="m", remedy="r")
    api.ctl.drs.latest["c1"] = DrsStatus(cluster="c1", config=DrsConfig(), imbalance=0.3, target=0.1, hosts=[],
                                         recommendations=[rec], faults=[fault])
    api.ctl.drs.latest["c2"] = DrsStatus(cluster="c2", config=DrsConfig(threshold=1), imbalance=0.05, target=None,
                                         hosts=[], recommendations=[], faults=[])
    m = api.scrape()
    assert value(m, "kvmotion_drs_imbalance", cluster="c1") == 0.3 and value(m, "kvmotion_drs_imbalance", cluster="c2") == 0.05
    assert value(m, "kvmotion_drs_target_imbalance", cluster="c1") == 0.1
    assert ("kvmotion_drs_target_imbalance", frozenset({("cluster", "c2")})) not in m      # rules only
    assert value(m, "kvmotion_drs_recommendations", cluster="c1") == 1
    assert value(m, "kvmotion_drs_rule_faults", cluster="c1", must="true") == 1
    assert value(m, "kvmotion_drs_rule_faults", cluster="c2", must="true") == 0


def test_a_result_without_usable_figures_is_counted_and_adds_no_figure(api: Api) -> None:
    add_task(api, "vmotion", "success", "not json", started=NOW - 1, finished=NOW - 1)
    add_task(api, "vmotion", "success", {"total_time_s": "12", "downtime_ms": None, "bytes_sent": True,
                                         "guest_pause_ms": -3}, started=NOW - 1, finished=NOW)
    with api.ctl.sessions.begin() as s:       # json.dumps writes NaN for a float that is not a number
        s.add(Task(id=str(uuid.uuid4()), kind="vmotion", vm_uuid="u", vm_name="vm", state="success",
                   result_json=json.dumps({"total_time_s": math.nan}), finished_at=NOW))
    m = api.scrape()
    assert value(m, "kvmotion_migrations_total", kind="vmotion", result="success") == 3
    assert value(m, "kvmotion_migration_duration_seconds_count", kind="vmotion") == 0
    assert value(m, "kvmotion_migration_guest_pause_seconds_count", kind="vmotion") == 0
    assert value(m, "kvmotion_migration_bytes_total", kind="vmotion", what="memory") == 0


class Statements:
    """The SQL statements the engine runs while counting."""

    def __init__(self, api: Api) -> None:
        self.engine = api.ctl.engine
        self.seen: list[str] = []

    def __enter__(self) -> list[str]:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self.seen

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        self.seen.append(statement)


def test_a_scrape_reads_each_finished_task_once_in_pages_not_a_query_per_task(api: Api, monkeypatch) -> None:
    monkeypatch.setattr(metrics, "PAGE", 7)
    for i in range(60):         # finish times tie in runs of 4, so runs straddle the pages' edges
        add_task(api, "vmotion", "success", live_result(10.0, 5.0, 6.0, 100), started=NOW - 200,
                 finished=NOW - 100 + i // 4)
    exposition = Exposition(api.ctl.sessions, clock=lambda: NOW)
    with Statements(api) as first:
        m = parse(exposition.render().decode())
    assert value(m, "kvmotion_migrations_total", kind="vmotion", result="success") == 60
    assert value(m, "kvmotion_migration_bytes_total", kind="vmotion", what="memory") == 6000
    assert len(first) == 60 // 7 + 1 + 3          # the pages of the first read, then the queue, hosts and VMs
    with Statements(api) as steady:
        parse(exposition.render().decode())
    for i in range(5):
        add_task(api, "vmotion", "error", started=NOW - 10, finished=NOW - 40 + i)
    with Statements(api) as after:
        m = parse(exposition.render().decode())
    assert len(steady) == len(after) == 4           # one page of what finished since (nothing, or 5), and the rest
    assert value(m, "kvmotion_migrations_total", kind="vmotion", result="success") == 60
    assert value(m, "kvmotion_migrations_total", kind="vmotion", result="error") == 5


def test_the_first_reads_are_spread_over_scrapes_and_never_show_a_partial_count(api: Api, monkeypatch) -> None:
    monkeypatch.setattr(metrics, "PAGE", 7)
    monkeypatch.setattr(metrics, "MAX_PAGES", 3)
    for i in range(60):
        add_task(api, "cold", "success", {"total_time_s": 1.0}, finished=NOW - 100 + i)
    exposition = Exposition(api.ctl.sessions, clock=lambda: NOW)
    for _ in range(2):                                      # 21 and 42 of the 60 read: no migration family yet
        with Statements(api) as seen:
            m = parse(exposition.render().decode())
        assert len(seen) == 3 + 3
        assert not [name for name, _ in m if name.startswith(FINISHED_FAMILIES)]
        assert value(m, "kvmotion_migration_tasks", state="queued") == 0 and ("kvmotion_hosts", frozenset(
            {("state", "connected")})) in m
    m = parse(exposition.render().decode())
    assert value(m, "kvmotion_migrations_total", kind="cold", result="success") == 60
    assert value(m, "kvmotion_migration_duration_seconds_count", kind="cold") == 60


def test_a_late_commit_is_counted_once_and_a_restart_counts_the_same(api: Api) -> None:
    add_task(api, "vmotion", "success", live_result(10.0, 5.0, 6.0, 100), started=NOW - 20, finished=NOW)
    exposition = Exposition(api.ctl.sessions, clock=lambda: NOW)
    exposition.render()
    # finished before the newest one read, committed after it was read (within the overlap): counted next time
    add_task(api, "vmotion", "success", live_result(20.0, 5.0, 6.0, 100), started=NOW - 20, finished=NOW - 30)
    first = parse(exposition.render().decode())
    again = parse(exposition.render().decode())
    restarted = parse(Exposition(api.ctl.sessions, clock=lambda: NOW).render().decode())
    for m in (first, again, restarted):
        assert value(m, "kvmotion_migrations_total", kind="vmotion", result="success") == 2
        assert value(m, "kvmotion_migration_duration_seconds_sum", kind="vmotion") == 30.0
    assert first == again == restarted


def test_buckets_are_sorted_and_each_histogram_ends_at_infinity() -> None:
    for buckets in (DURATION_BUCKETS, PAUSE_BUCKETS, WAIT_BUCKETS):
        assert list(buckets) == sorted(set(buckets)) and all(b > 0 for b in buckets)
    h = metrics.Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 9.0):                 # le: a value equal to a bound falls in that bound's bucket
        h.observe(v)
    assert h.buckets() == [("1.0", 2.0), ("2.0", 3.0), ("+Inf", 4.0)] and h.total == 12.0

"""DRS's service on a real controller database with agents answering from memory (control plane only): the
snapshot it builds from the hosts' measured loads, rules and their validation, recommendations and their ids, and
maintenance mode honouring must rules."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from kvmotion.common.errors import ConflictError, InvalidInputError, NotFoundError
from kvmotion.controller.db import VM, Host
from kvmotion.controller.service import Controller
from kvmotion.models.agent import DirtySample, VMLoad
from kvmotion.models.drs import Automation, DrsRule, DrsUpdate, RuleKind

from test_checks_unit import facts, spec

HOSTS = ("h1", "h2", "h3")


class Agent:
    async def cpu_expand(self, model: str, mask: list[str]) -> list[str]:
        return ["sse2"]

    async def dirty_sample(self, uuid: str, max_age_s: float = 60.0, measure: bool = True) -> DirtySample:
        return DirtySample(dirty_mb_s=1.0, sampled_at=time.time(), memory_mb=256, ram_touched_mb=100)


def vm_row(n: int, host: str) -> VM:
    s = spec(uuid=f"u{n}", name=f"vm{n}", nics=[])
    return VM(uuid=s.uuid, name=s.name, host=host, power_state="poweredOn", spec_json=s.model_dump_json())


@pytest.fixture
def ctl(db_url: str, tmp_path: Path) -> Any:
    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    ctl.clusters.create("c1", None)
    with ctl.sessions.begin() as s:
        s.add_all(Host(name=n, address="https://198.18.0.9:8770", cluster="c1") for n in HOSTS)
        s.add_all(vm_row(n, "h1") for n in (1, 2, 3))
    ctl.inventory.store_facts("h1", facts("h1").model_copy(update={"vm_load": [
        VMLoad(uuid=f"u{n}", cpu_pct=66.0, cpu_pct_now=70.0, mem_mb=120) for n in (1, 2, 3)]}))
    for n in HOSTS[1:]:
        ctl.inventory.store_facts(n, facts(n))
    ctl.inventory.agent = lambda _host: Agent()         # type: ignore[method-assign]
    yield ctl
    ctl.engine.dispose()


def test_the_snapshot_is_the_measured_load_and_three_loaded_vms_are_spread(ctl: Any) -> None:
    ctl.drs.update("c1", DrsUpdate(automation=Automation.MANUAL, threshold=3))
    status = asyncio.run(ctl.drs.status("c1"))
    h1 = next(h for h in status.hosts if h.host == "h1")
    assert (h1.cpu_pct, h1.cpu_capacity_pct, h1.mem_mb, h1.vms) == (198.0, 200.0, 360.0, ["vm1", "vm2", "vm3"])
    assert h1.load == pytest.approx(0.99) and status.imbalance > 0.4 and status.target == 0.10
    recs = status.recommendations
    assert len(recs) == 2 and {r.destination for r in recs} == {"h2", "h3"} and {r.source for r in recs} == {"h1"}
    assert all(r.cost_s and r.cost_s > 0 and r.cost_mb and r.reason == "balance" for r in recs)
    assert [r.id for r in asyncio.run(ctl.drs.status("c1")).recommendations] == [r.id for r in recs]


def test_drs_off_recommends_nothing_and_refuses_to_apply(ctl: Any) -> None:
    assert asyncio.run(ctl.drs.status("c1")).recommendations == []
    with pytest.raises(ConflictError) as exc:
        asyncio.run(ctl.drs.apply("c1"))
    assert "manual" in exc.value.remedy
    ctl.drs.update("c1", DrsUpdate(automation=Automation.MANUAL))
    with pytest.raises(ConflictError) as exc:
        asyncio.run(ctl.drs.apply("c1", ["000000000000"]))
    assert "no longer current" in exc.value.message and "recommendations c1" in exc.value.remedy


def test_rules_are_validated_named_once_and_removed(ctl: Any) -> None:
    rule = DrsRule(name="apart", kind=RuleKind.ANTI_AFFINITY, vms=["vm1", "vm2"], must=True)
    assert [r.name for r in ctl.drs.add_rule("c1", rule).rules] == ["apart"]
    with pytest.raises(ConflictError):
        ctl.drs.add_rule("c1", rule)
    with pytest.raises(NotFoundError) as exc:
        ctl.drs.add_rule("c1", DrsRule(name="x", kind=RuleKind.AFFINITY, vms=["vm1", "nope"]))
    assert "nope" in exc.value.message
    with pytest.raises(NotFoundError) as exc:
        ctl.drs.add_rule("c1", DrsRule(name="y", kind=RuleKind.VM_HOST, vms=["vm1"], hosts=["h9"]))
    assert "h9" in exc.value.message and "add-host" in exc.value.remedy
    with pytest.raises(ValueError):
        DrsRule(name="z", kind=RuleKind.VM_HOST, vms=["vm1"])
    with pytest.raises(NotFoundError):
        ctl.drs.remove_rule("c1", "nope")
    assert ctl.drs.remove_rule("c1", "apart").rules == []
    with pytest.raises(NotFoundError):
        ctl.drs.config("c9")
    assert InvalidInputError            # the API turns a malformed rule into 422 (test_api_fuzz covers the shape)


def test_a_must_rule_is_fixed_at_threshold_1_and_an_unmeetable_one_is_a_fault(ctl: Any) -> None:
    ctl.drs.update("c1", DrsUpdate(automation=Automation.MANUAL, threshold=1))
    ctl.drs.add_rule("c1", DrsRule(name="apart", kind=RuleKind.ANTI_AFFINITY, vms=["vm1", "vm2"], must=True))
    ctl.drs.add_rule("c1", DrsRule(name="pin", kind=RuleKind.VM_HOST, vms=["vm3"], hosts=["h1", "h2"], must=True))
    status = asyncio.run(ctl.drs.status("c1"))
    assert [(r.rule, r.priority) for r in status.recommendations] == [("apart", 1)] and status.faults == []
    ctl.drs.remove_rule("c1", "pin")
    ctl.drs.add_rule("c1", DrsRule(name="pin", kind=RuleKind.VM_HOST, vms=["vm3"], hosts=["h2"], must=True))
    ctl.inventory.set_maintenance("h2", 1)            # the rule's only host is out of service
    status = asyncio.run(ctl.drs.status("c1"))
    assert [f.rule for f in status.faults] == ["pin"] and all(r.vm != "vm3" for r in status.recommendations)


def test_maintenance_mode_does_not_move_a_pinned_vm_and_keeps_anti_affine_vms_apart(ctl: Any) -> None:
    ctl.drs.add_rule("c1", DrsRule(name="pin", kind=RuleKind.VM_HOST, vms=["vm3"], hosts=["h1"], must=True))
    ctl.drs.add_rule("c1", DrsRule(name="apart", kind=RuleKind.ANTI_AFFINITY, vms=["vm1", "vm2"], must=True))
    fleet = ctl.maintenance.fleet()
    target, findings = asyncio.run(ctl.maintenance.plan_vm(ctl.inventory.get_vm("vm3"), "h1", fleet))
    assert target is None and {f["code"] for f in findings} == {"DRS_RULE"} and "pin" in findings[0]["message"]
    first = asyncio.run(ctl.maintenance.plan_vm(ctl.inventory.get_vm("vm1"), "h1", fleet))[0]
    second = asyncio.run(ctl.maintenance.plan_vm(ctl.inventory.get_vm("vm2"), "h1", fleet))[0]
    assert {first, second} == {"h2", "h3"}


def test_a_listed_recommendation_stays_applicable_by_id_after_later_rounds(ctl: Any) -> None:
    ctl.drs.update("c1", DrsUpdate(automation=Automation.MANUAL, threshold=3))
    listed = asyncio.run(ctl.drs.status("c1")).recommendations
    ctl.drs.latest.clear()                       # a later round replaced the latest status
    ctl.drs.offered["c1"] = {i: (t - 10.0, r) for i, (t, r) in ctl.drs.offered["c1"].items()}
    assert set(ctl.drs.offered["c1"]) == {r.id for r in listed}
    ctl.drs.offered["c1"] = {i: (t - 3600.0, r) for i, (t, r) in ctl.drs.offered["c1"].items()}
    with pytest.raises(ConflictError):           # an hour old: listed again first
        asyncio.run(ctl.drs.apply("c1", [listed[0].id]))

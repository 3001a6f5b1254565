"""DRS's pure decisions (controller/drs/model.py): balance, rules, faults, cost, and no ping-pong."""
from __future__ import annotations

import random

from kvmotion.controller.drs import model
from kvmotion.controller.drs.model import Cluster, HostLoad, VmLoad
from kvmotion.models.drs import DrsRule, RuleKind

HOSTS = ("h1", "h2", "h3")


def cluster(vms: dict[str, tuple[str, float]], rules: tuple[DrsRule, ...] = (), hosts: tuple[str, ...] = HOSTS,
            cost: float | None = 2.0, out_of_service: tuple[str, ...] = ()) -> Cluster:
    return Cluster(hosts={h: HostLoad(h, 200.0, 8192.0, h not in out_of_service) for h in hosts},
                   vms={n: VmLoad(n, h, cpu, 256.0, frozenset(hosts), cost_s=cost, cost_mb=300.0)
                        for n, (h, cpu) in vms.items()}, rules=rules)


def apply(c: Cluster, plan: model.Plan) -> Cluster:
    for r in plan.recommendations:
        c = model.moved(c, r.vm, r.destination)
    return Cluster(c.hosts, {n: VmLoad(v.name, v.host, v.cpu_pct, v.mem_mb, v.allowed, cost_s=v.cost_s)
                             for n, v in c.vms.items()}, c.rules)


def placement(c: Cluster) -> dict[str, str]:
    return {n: v.host for n, v in c.vms.items()}


def test_three_loaded_vms_on_one_host_are_spread_one_per_host() -> None:
    c = cluster({"a": ("h1", 66.0), "b": ("h1", 66.0), "c": ("h1", 66.0)})
    plan = model.plan(c, 3)
    assert plan.imbalance > 0.4 and plan.target == 0.10
    assert [r.reason for r in plan.recommendations] == ["balance", "balance"]
    after = apply(c, plan)
    assert sorted(placement(after).values()) == ["h1", "h2", "h3"]
    assert model.imbalance(after) < 1e-9 and model.plan(after, 3).recommendations == []
    assert all(r.gain > 0 and r.cost_s == 2.0 and r.cost_mb == 300.0 for r in plan.recommendations)


def test_a_balanced_cluster_and_threshold_1_move_nothing() -> None:
    loaded = cluster({"a": ("h1", 66.0), "b": ("h1", 66.0), "c": ("h1", 66.0)})
    assert model.plan(loaded, 1).recommendations == [] and model.plan(loaded, 1).target is None
    even = cluster({"a": ("h1", 60.0), "b": ("h2", 66.0), "c": ("h3", 70.0)})
    assert model.plan(even, 5).recommendations == []


def test_a_must_anti_affinity_rule_separates_its_vms_even_at_threshold_1() -> None:
    rule = DrsRule(name="apart", kind=RuleKind.ANTI_AFFINITY, vms=["a", "b"], must=True)
    c = cluster({"a": ("h1", 1.0), "b": ("h1", 1.0)}, (rule,))
    plan = model.plan(c, 1)
    assert [(r.reason, r.rule, r.priority) for r in plan.recommendations] == [("rule", "apart", 1)]
    assert model.violations(rule, apply(c, plan)) == 0 and plan.faults == []


def test_a_must_rule_that_cannot_be_met_is_reported_and_no_move_breaks_it_further() -> None:
    rule = DrsRule(name="apart3", kind=RuleKind.ANTI_AFFINITY, vms=["a", "b", "c"], must=True)
    c = cluster({"a": ("h1", 50.0), "b": ("h1", 50.0), "c": ("h2", 50.0)}, (rule,), hosts=("h1", "h2"))
    plan = model.plan(c, 5)
    assert [f.rule for f in plan.faults] == ["apart3"] and plan.faults[0].must
    assert "need as many hosts" in plan.faults[0].message and plan.faults[0].remedy
    assert model.violations(rule, apply(c, plan)) <= model.violations(rule, c)
    pinned = DrsRule(name="pin", kind=RuleKind.VM_HOST, vms=["a"], hosts=["h9"], must=True)
    c = cluster({"a": ("h1", 50.0)}, (pinned,))
    plan = model.plan(c, 5)
    assert plan.recommendations == [] and [f.rule for f in plan.faults] == ["pin"]


def test_balance_never_breaks_a_rule_and_a_pinned_vm_stays() -> None:
    pin = DrsRule(name="pin", kind=RuleKind.VM_HOST, vms=["a", "b"], hosts=["h1"], must=True)
    together = DrsRule(name="together", kind=RuleKind.AFFINITY, vms=["c", "d"])
    c = cluster({"a": ("h1", 66.0), "b": ("h1", 66.0), "c": ("h1", 40.0), "d": ("h1", 40.0), "e": ("h1", 50.0)},
                (pin, together))
    plan = model.plan(c, 5)
    after = apply(c, plan)
    assert after.vms["a"].host == after.vms["b"].host == "h1"
    assert after.vms["c"].host == after.vms["d"].host                  # the should rule holds through balancing
    assert after.vms["e"].host != "h1" and model.imbalance(after) < model.imbalance(c)
    assert model.legal_for(c, "a", "h2") == pin and model.legal_for(c, "c", "h2") is None


def test_affinity_and_host_rules_are_fixed() -> None:
    together = DrsRule(name="together", kind=RuleKind.AFFINITY, vms=["a", "b"], must=True)
    away = DrsRule(name="away", kind=RuleKind.VM_NOT_HOST, vms=["c"], hosts=["h3"])
    c = cluster({"a": ("h1", 5.0), "b": ("h2", 5.0), "c": ("h3", 5.0)}, (together, away))
    plan = model.plan(c, 1)
    after = apply(c, plan)
    assert after.vms["a"].host == after.vms["b"].host and after.vms["c"].host != "h3"
    assert {(r.rule, r.priority) for r in plan.recommendations} == {("together", 1), ("away", 2)}


def test_moves_the_predictor_cannot_cost_or_that_cost_too_much_are_not_made() -> None:
    assert model.plan(cluster({"a": ("h1", 90.0), "b": ("h1", 90.0)}, cost=None), 5).recommendations == []
    assert model.plan(cluster({"a": ("h1", 90.0), "b": ("h1", 90.0)}, cost=100.0), 3).recommendations == []
    assert len(model.plan(cluster({"a": ("h1", 90.0), "b": ("h1", 90.0)}, cost=100.0), 4).recommendations) == 1


def test_vms_out_of_cooldown_or_in_a_move_are_left_alone_and_hosts_out_of_service_get_nothing() -> None:
    c = cluster({"a": ("h1", 66.0), "b": ("h1", 66.0)}, out_of_service=("h2",))
    assert {r.destination for r in model.plan(c, 3).recommendations} == {"h3"}
    settled = Cluster(c.hosts, {n: VmLoad(v.name, v.host, v.cpu_pct, v.mem_mb, v.allowed, settled=True, cost_s=1.0)
                                for n, v in c.vms.items()})
    assert model.plan(settled, 5).recommendations == []


def test_a_steady_noisy_load_settles_and_then_nothing_ping_pongs() -> None:
    """Six VMs of uneven load on three hosts, their CPU measured with ±10 % noise each round, DRS applied every
    round (fully automated) for 200 rounds: it settles within a few rounds and then moves nothing."""
    rng = random.Random(7)
    base = {"a": 80.0, "b": 60.0, "c": 50.0, "d": 30.0, "e": 20.0, "f": 10.0}
    c = cluster({n: ("h1", cpu) for n, cpu in base.items()})
    moves_per_round = []
    for _ in range(200):
        noisy = Cluster(c.hosts, {n: VmLoad(n, v.host, base[n] * rng.uniform(0.9, 1.1), v.mem_mb, v.allowed,
                                            cost_s=2.0) for n, v in c.vms.items()})
        plan = model.plan(noisy, 3)
        moves_per_round.append(len(plan.recommendations))
        c = apply(noisy, plan)
    assert sum(moves_per_round[:5]) >= 2 and sum(moves_per_round[5:]) == 0
    assert model.imbalance(c) <= 0.10


def test_the_imbalance_after_one_move_from_sums_equals_recomputing_it() -> None:
    rng = random.Random(3)
    c = cluster({f"v{i}": (rng.choice(HOSTS), rng.uniform(1, 90)) for i in range(12)}, out_of_service=("h3",))
    spread = model.Spread(c, model.sums(c))
    for vm in c.vms:
        for dst in HOSTS:
            assert abs(spread.after(vm, dst) - model.imbalance(model.moved(c, vm, dst))) < 1e-9

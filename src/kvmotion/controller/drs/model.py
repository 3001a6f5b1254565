"""DRS's decisions, pure: the cluster's load, its imbalance, rule violations, and the moves to recommend.

Nothing here reads the database or calls a host: ``service`` builds a ``Cluster`` snapshot and gets back a
``Plan``. Loads are fractions of a host's capacity: the larger of CPU (the VMs' CPU time against the host's CPUs)
and memory (the VMs' resident RAM against the host's). The imbalance is the standard deviation of the in-service
hosts' loads (vSphere's classic measure).

A recommendation is one of:
- a **rule** fix (priority 1 for a must rule, 2 for a should rule): a move that lowers the rule's violations and
  raises no must rule's;
- a **balance** move: it lowers the imbalance by at least the threshold's minimum gain, its cost (the convergence
  predictor's seconds) stays under the threshold's ceiling, it breaks no rule that holds now, and it is the best
  gain per second of cost on offer. Balancing stops once the imbalance is within the threshold's target.

What keeps DRS from ping-ponging: the target band (a balanced cluster is left alone), the minimum gain (noise does
not pay for a move), the cooldown (a VM DRS moved is not a candidate again for a while; ``service``) and the
predicted cost.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

from kvmotion.models.drs import DrsRule, Recommendation, RuleFault, RuleKind

# threshold → (target imbalance, minimum gain of one move, most seconds a balance move may cost)
THRESHOLDS: dict[int, tuple[float | None, float, float]] = {
    1: (None, math.inf, 0.0),        # rules only
    2: (0.20, 0.08, 30.0),
    3: (0.10, 0.04, 60.0),
    4: (0.05, 0.02, 120.0),
    5: (0.02, 0.01, 300.0),
}
MAX_MOVES = 32                       # per round: the rest waits for the next one


@dataclass(frozen=True)
class HostLoad:
    name: str
    cpu_capacity_pct: float          # 100 per CPU
    mem_capacity_mb: float
    in_service: bool                 # connected and not in (or entering) maintenance


@dataclass(frozen=True)
class VmLoad:
    name: str
    host: str
    cpu_pct: float                   # percent of one CPU
    mem_mb: float
    allowed: frozenset[str]          # hosts the migration checks accept for a live move now
    movable: bool = True             # False: in a move already (or moved earlier in this plan)
    settled: bool = False            # DRS moved it within the cooldown: rule fixes only, no balance move
    cost_s: float | None = None      # the predictor's time for a live move (None: unknown)
    cost_mb: float | None = None


@dataclass(frozen=True)
class Cluster:
    hosts: dict[str, HostLoad]
    vms: dict[str, VmLoad]           # running VMs only
    rules: tuple[DrsRule, ...] = ()


@dataclass
class Plan:
    imbalance: float
    target: float | None
    recommendations: list[Recommendation] = field(default_factory=list)
    faults: list[RuleFault] = field(default_factory=list)
    loads: dict[str, float] = field(default_factory=dict)


Sums = dict[str, tuple[float, float]]      # host → (CPU percent, memory MB) of its running VMs


def sums(c: Cluster) -> Sums:
    out = {h: (0.0, 0.0) for h in c.hosts}
    for vm in c.vms.values():
        if vm.host in out:
            cpu, mem = out[vm.host]
            out[vm.host] = (cpu + vm.cpu_pct, mem + vm.mem_mb)
    return out


def _load(hl: HostLoad, cpu: float, mem: float) -> float:
    return max(cpu / max(hl.cpu_capacity_pct, 1.0), mem / max(hl.mem_capacity_mb, 1.0))


def host_loads(c: Cluster, by_host: Sums | None = None) -> dict[str, float]:
    by_host = sums(c) if by_host is None else by_host
    return {h: _load(hl, *by_host[h]) for h, hl in c.hosts.items()}


def stdev(loads: list[float]) -> float:
    if len(loads) < 2:
        return 0.0
    mean = sum(loads) / len(loads)
    return math.sqrt(sum((x - mean) ** 2 for x in loads) / len(loads))


def imbalance(c: Cluster, by_host: Sums | None = None) -> float:
    return stdev([v for h, v in host_loads(c, by_host).items() if c.hosts[h].in_service])


def imbalance_if(c: Cluster, by_host: Sums, vm: str, dst: str) -> float:
    """``imbalance`` after moving ``vm`` to ``dst``, from the sums before (only two hosts change)."""
    v = c.vms[vm]
    after = dict(by_host)
    cpu, mem = after[v.host]
    after[v.host] = (cpu - v.cpu_pct, mem - v.mem_mb)
    cpu, mem = after[dst]
    after[dst] = (cpu + v.cpu_pct, mem + v.mem_mb)
    return imbalance(c, after)


def violations(rule: DrsRule, c: Cluster) -> int:
    """How far the placement is from the rule: VMs to move (0: the rule holds). Powered-off VMs do not count."""
    hosts = [c.vms[v].host for v in dict.fromkeys(rule.vms) if v in c.vms]
    if not rule.enabled or not hosts:
        return 0
    if rule.kind is RuleKind.AFFINITY:
        return len(hosts) - max(hosts.count(h) for h in hosts)
    if rule.kind is RuleKind.ANTI_AFFINITY:
        return len(hosts) - len(set(hosts))
    if rule.kind is RuleKind.VM_HOST:
        return sum(1 for h in hosts if h not in rule.hosts)
    return sum(1 for h in hosts if h in rule.hosts)


def moved(c: Cluster, vm: str, dst: str) -> Cluster:
    return replace(c, vms={**c.vms, vm: replace(c.vms[vm], host=dst, movable=False)})


def breaks(before: Cluster, after: Cluster, vm: str, must_only: bool) -> DrsRule | None:
    """The first rule naming ``vm`` the move makes worse (must rules, and should rules unless ``must_only``)."""
    for rule in before.rules:
        if vm in rule.vms and (rule.must or not must_only) and violations(rule, after) > violations(rule, before):
            return rule
    return None


def candidates(c: Cluster, vm: str, balance: bool = False) -> list[str]:
    v = c.vms[vm]
    if not v.movable or (balance and v.settled):
        return []
    return sorted(h for h in v.allowed if h != v.host and h in c.hosts and c.hosts[h].in_service)


def rec_id(vm: str, src: str, dst: str) -> str:
    return hashlib.sha256(f"{vm}\0{src}\0{dst}".encode()).hexdigest()[:12]


def _rec(c: Cluster, after: Cluster, vm: str, reason: str, rule: str | None, priority: int) -> Recommendation:
    v = c.vms[vm]
    dst = after.vms[vm].host
    return Recommendation(id=rec_id(vm, v.host, dst), vm=vm, source=v.host, destination=dst, reason=reason,
                          rule=rule, priority=priority, gain=round(imbalance(c) - imbalance(after), 4),
                          cost_s=v.cost_s, cost_mb=v.cost_mb, imbalance_after=round(imbalance(after), 4))


def fix_rule(c: Cluster, rule: DrsRule) -> tuple[Cluster, Recommendation] | None:
    """The best single move that lowers ``rule``'s violations and makes no must rule worse (nor, fixing a should
    rule, another should rule): the lowest imbalance after it, then the cheapest, then by name."""
    best: tuple[tuple[float, float, str, str], Cluster, str] | None = None
    for vm in rule.vms:
        if vm not in c.vms:
            continue
        for dst in candidates(c, vm):
            after = moved(c, vm, dst)
            if violations(rule, after) >= violations(rule, c) or breaks(c, after, vm, must_only=rule.must):
                continue
            key = (imbalance(after), c.vms[vm].cost_s or 0.0, vm, dst)
            if best is None or key < best[0]:
                best = (key, after, vm)
    if best is None:
        return None
    _, after, vm = best
    return after, _rec(c, after, vm, "rule", rule.name, 1 if rule.must else 2)


def balance_move(c: Cluster, threshold: int) -> tuple[Cluster, Recommendation] | None:
    """The move with the best gain per second of cost among those worth it (``THRESHOLDS``), or None."""
    target, min_gain, max_cost = THRESHOLDS[threshold]
    by_host = sums(c)
    now = imbalance(c, by_host)
    if target is None or now <= target:
        return None
    best: tuple[tuple[float, str, str], str, str] | None = None
    for vm in sorted(c.vms):
        cost = c.vms[vm].cost_s
        if cost is None or cost > max_cost:
            continue                  # a move the predictor cannot cost, or that would not converge, is not made
        for dst in candidates(c, vm, balance=True):
            gain = now - imbalance_if(c, by_host, vm, dst)
            if gain < min_gain or (best is not None and (-gain / (1.0 + cost), vm, dst) >= best[0]):
                continue
            if breaks(c, moved(c, vm, dst), vm, must_only=False):
                continue
            best = ((-gain / (1.0 + cost), vm, dst), vm, dst)
    if best is None:
        return None
    _, vm, dst = best
    after = moved(c, vm, dst)
    rec = _rec(c, after, vm, "balance", None, 3)
    return after, rec.model_copy(update={"priority": 3 if rec.gain >= 4 * min_gain else 4 if rec.gain >= 2 * min_gain else 5})


def fault(rule: DrsRule, c: Cluster) -> RuleFault:
    running = [v for v in rule.vms if v in c.vms]
    in_service = [h for h, hl in c.hosts.items() if hl.in_service]
    if rule.kind is RuleKind.ANTI_AFFINITY and len(running) > len(in_service):
        why = f"its {len(running)} running VMs need as many hosts; the cluster has {len(in_service)} in service"
        remedy = "add hosts to the cluster, power a VM off, or remove a VM from the rule"
    elif rule.kind is RuleKind.VM_HOST:
        why = "no host of the rule takes the VMs (not in the cluster, not in service, or the checks refuse them)"
        remedy = "check the rule's hosts (kvmotion cluster drs show) and kvmotion vm validate VM HOST"
    else:
        why = "no move fixes it without breaking a must rule or a migration check"
        remedy = "check the rules together (kvmotion cluster drs show) and kvmotion vm validate for the VMs"
    return RuleFault(rule=rule.name, must=rule.must, vms=running, remedy=remedy,
                     message=f"{'must' if rule.must else 'should'} rule {rule.name} ({rule.kind}) is not met: {why}")


def plan(c: Cluster, threshold: int) -> Plan:
    """Rule fixes first (must rules, then should rules), then balance moves, each applied to the snapshot before
    the next is chosen; at most ``MAX_MOVES``."""
    out = Plan(imbalance=round(imbalance(c), 4), target=THRESHOLDS[threshold][0],
               loads={h: round(v, 4) for h, v in host_loads(c).items()})
    ordered = sorted((r for r in c.rules if r.enabled), key=lambda r: (not r.must, r.name))
    for rule in ordered:
        while violations(rule, c) and len(out.recommendations) < MAX_MOVES:
            step = fix_rule(c, rule)
            if step is None:
                break
            c, rec = step
            out.recommendations.append(rec)
        if violations(rule, c):
            out.faults.append(fault(rule, c))
    while len(out.recommendations) < MAX_MOVES:
        step = balance_move(c, threshold)
        if step is None:
            break
        c, rec = step
        out.recommendations.append(rec)
    return out


def legal_for(c: Cluster, vm: str, dst: str) -> DrsRule | None:
    """The must rule a move of ``vm`` to ``dst`` would make worse (maintenance mode's placement asks), or None."""
    return breaks(c, moved(c, vm, dst), vm, must_only=True) if vm in c.vms else None

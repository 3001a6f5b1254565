"""DRS's decisions, pure: the cluster's load, its imbalance, rule violations, and the moves to recommend.

Nothing here reads the database or calls a host: ``service`` builds a ``Cluster`` snapshot and gets back a
``Plan``. Loads are fractions of a host's capacity: the larger of CPU (the VMs' CPU time against the host's CPUs)
and memory (the VMs' resident RAM against the host's). The imbalance is the standard deviation of the in-service
hosts' loads (vSphere's classic measure).

A recommendation is one of:
- a **rule** fix (priority 1 for a must rule, 2 for a should rule): a move that lowers the rule's violations and
  raises no must rule's;
- a **balance** move: its benefit (the imbalance's drop times the hosts in service) reaches the threshold's
  minimum, its cost (the convergence
  predictor's seconds) stays under the threshold's ceiling, it breaks no rule that holds now, and it is the best
  gain per second of cost on offer. Balancing starts when the imbalance is above the threshold's target and goes
  on down to half the target (``SETTLE``).

What keeps DRS from ping-ponging: the target band with its hysteresis (a cluster balanced to half the target is left
alone until it drifts past the whole target), the minimum gain, the cooldown (a VM DRS moved is not a balance
candidate again for a while; ``service``) and the predicted cost.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

from kvmotion.models.drs import DrsRule, Recommendation, RuleFault, RuleKind

# threshold → (target imbalance, minimum benefit of one move, most seconds a balance move may cost). A move's
# benefit is its gain (how much the imbalance drops) times the number of in-service hosts: about the load it
# carries from a busier host to a less busy one, the same measure in a cluster of 3 hosts or 64.
THRESHOLDS: dict[int, tuple[float | None, float, float]] = {
    1: (None, math.inf, 0.0),        # rules only
    2: (0.20, 0.05, 30.0),
    3: (0.10, 0.02, 60.0),
    4: (0.05, 0.01, 120.0),
    5: (0.02, 0.005, 300.0),
}
SETTLE = 0.5                         # balancing, once started (above the target), goes on down to target × SETTLE
MAX_MOVES = 32                       # per round: the rest waits for the next one
DESTINATIONS = 4                     # a balance move of a VM is weighed to its 4 least loaded allowed hosts


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


class Spread:
    """The in-service hosts' loads as sums (count, Σ load, Σ load²): the imbalance after one move in O(1)."""

    def __init__(self, c: Cluster, by_host: Sums) -> None:
        self.c, self.by_host = c, by_host
        self.loads = host_loads(c, by_host)
        live = [v for h, v in self.loads.items() if c.hosts[h].in_service]
        self.n, self.s1, self.s2 = len(live), sum(live), sum(x * x for x in live)

    def after(self, vm: str, dst: str) -> float:
        v = self.c.vms[vm]
        s1, s2 = self.s1, self.s2
        if dst == v.host:
            return self.now()
        for host, sign in ((v.host, -1.0), (dst, 1.0)):
            if host in self.c.hosts and self.c.hosts[host].in_service:
                cpu, mem = self.by_host[host]
                new = _load(self.c.hosts[host], cpu + sign * v.cpu_pct, mem + sign * v.mem_mb)
                old = self.loads[host]
                s1, s2 = s1 - old + new, s2 - old * old + new * new
        return self._stdev(s1, s2)

    def now(self) -> float:
        return self._stdev(self.s1, self.s2)

    def _stdev(self, s1: float, s2: float) -> float:
        if self.n < 2:
            return 0.0
        mean = s1 / self.n
        return math.sqrt(max(0.0, s2 / self.n - mean * mean))


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


def balance_move(c: Cluster, threshold: int, started: bool) -> tuple[Cluster, Recommendation] | None:
    """The move with the best gain per second of cost among those worth it (``THRESHOLDS``), or None: a VM of a
    host loaded above the mean, to one of the ``DESTINATIONS`` least loaded hosts it may go to. Balancing
    starts above the target and, once ``started`` (this round), goes on down to ``SETTLE`` × the target: the
    hysteresis that keeps noise around the target from moving VMs."""
    target, min_gain, max_cost = THRESHOLDS[threshold]
    spread = Spread(c, sums(c))
    now = imbalance(c, spread.by_host)
    if target is None or now <= (target * SETTLE if started else target):
        return None
    best: tuple[tuple[float, str, str], str, str] | None = None
    ruled = {v for r in c.rules if r.enabled for v in r.vms}
    mean = spread.s1 / spread.n
    lightest = sorted((h for h in c.hosts if c.hosts[h].in_service), key=lambda h: (spread.loads[h], h))
    for vm in sorted(c.vms):
        cost = c.vms[vm].cost_s
        if cost is None or cost > max_cost or spread.loads.get(c.vms[vm].host, 0.0) <= mean:
            continue                  # not costed, would not converge, or on a host not above the mean
        allowed = set(candidates(c, vm, balance=True))
        for dst in [h for h in lightest if h in allowed][:DESTINATIONS]:
            gain = now - spread.after(vm, dst)
            if gain * spread.n < min_gain or (best is not None and (-gain / (1.0 + cost), vm, dst) >= best[0]):
                continue
            if vm in ruled and breaks(c, moved(c, vm, dst), vm, must_only=False):
                continue
            best = ((-gain / (1.0 + cost), vm, dst), vm, dst)
    if best is None:
        return None
    _, vm, dst = best
    after = moved(c, vm, dst)
    rec = _rec(c, after, vm, "balance", None, 3)
    assert target is not None
    return after, rec.model_copy(update={"priority": 3 if rec.gain >= target / 2 else 4 if rec.gain >= target / 8
                                         else 5})


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
    started = False
    while len(out.recommendations) < MAX_MOVES:
        step = balance_move(c, threshold, started)
        started = True
        if step is None:
            break
        c, rec = step
        out.recommendations.append(rec)
    return out


def legal_for(c: Cluster, vm: str, dst: str) -> DrsRule | None:
    """The must rule a move of ``vm`` to ``dst`` would make worse (maintenance mode's placement asks), or None."""
    return breaks(c, moved(c, vm, dst), vm, must_only=True) if vm in c.vms else None

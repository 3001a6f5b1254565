"""DRS for each cluster: its settings and rules (clusters.drs_json), a snapshot of the cluster's load for the pure
``model``, the recommendations, applying them through the scheduler (admission control), and the loop that runs
each cluster every ``interval_s`` (manual: recommendations kept for an admin; fully automated: applied).

The snapshot is real: each host's CPU capacity and memory from its facts, each running VM's CPU (its QEMU
process's CPU time, smoothed) and resident RAM as its agent measures them (``HostFacts.vm_load``), which hosts
the migration checks accept for it (``compat``), and the convergence predictor's time and bytes for moving it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common.errors import ConflictError, KvmotionError, NotFoundError
from kvmotion.controller import compat
from kvmotion.controller import tasks as task_store
from kvmotion.controller.db import VM, Cluster as ClusterRow, Host, Task
from kvmotion.controller.drs import model
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.scheduler import Scheduler
from kvmotion.models.agent import HostFacts
from kvmotion.models.api import MigrateRequest
from kvmotion.models.drs import (Automation, DrsApplied, DrsConfig, DrsRule, DrsSkipped, DrsStatus, DrsUpdate,
                                 HostLoadOut, Recommendation, RuleKind)
from kvmotion.models.findings import Finding, blockers, finding

log = logging.getLogger(__name__)
TICK_S = 5.0
OFFERED_S = 3600.0                # a listed recommendation can be applied by its id this long (checked again then)
MAX_OFFERED = 256                 # ids kept per cluster, the newest
PREDICT_SAMPLE_AGE_S = 120.0      # the agent's background dirty-rate sample is fresh enough to cost a move


def _missing(name: str) -> NotFoundError:
    return NotFoundError(f"cluster {name!r} does not exist", remedy="create it: kvmotion cluster create NAME")


class Drs:
    def __init__(self, sessions: sessionmaker[Session], inv: Inventory, scheduler: Scheduler) -> None:
        self.sessions, self.inv, self.scheduler = sessions, inv, scheduler
        self.latest: dict[str, DrsStatus] = {}        # per cluster: the last round's status (bounded by clusters)
        self.offered: dict[str, dict[str, tuple[float, Recommendation]]] = {}   # per cluster: ids listed lately

    # -- settings and rules --------------------------------------------------------------------
    def config(self, name: str) -> DrsConfig:
        with self.sessions() as s:
            row = s.get(ClusterRow, name)
            if row is None:
                raise _missing(name)
            return DrsConfig.model_validate_json(row.drs_json or "{}")

    def _store(self, name: str, change: Any) -> DrsConfig:
        """Read, change (``change(cfg) -> cfg``) and write the cluster's settings in one transaction."""
        with self.sessions.begin() as s:
            row = s.get(ClusterRow, name, with_for_update=True)
            if row is None:
                raise _missing(name)
            cfg = DrsConfig.model_validate(change(DrsConfig.model_validate_json(row.drs_json or "{}")).model_dump())
            row.drs_json = cfg.model_dump_json()
        self.latest.pop(name, None)
        return cfg

    def update(self, name: str, change: DrsUpdate) -> DrsConfig:
        return self._store(name, lambda cfg: cfg.model_copy(update=change.model_dump(exclude_none=True)))

    def add_rule(self, name: str, rule: DrsRule) -> DrsConfig:
        with self.sessions() as s:
            known = set(s.scalars(select(VM.name).where(VM.name.in_(rule.vms))).all())
            hosts = set(s.scalars(select(Host.name).where(Host.name.in_(rule.hosts), Host.cluster == name)).all())
        if set(rule.vms) - known:
            raise NotFoundError(f"rule {rule.name}: no VM named {', '.join(sorted(set(rule.vms) - known))}",
                                remedy="name existing VMs (kvmotion vm list)")
        if set(rule.hosts) - hosts:
            raise NotFoundError(f"rule {rule.name}: {', '.join(sorted(set(rule.hosts) - hosts))} is not a host of "
                                f"cluster {name}", remedy=f"add the host first: kvmotion cluster add-host {name} HOST")

        def add(cfg: DrsConfig) -> DrsConfig:
            if any(r.name == rule.name for r in cfg.rules):
                raise ConflictError(f"cluster {name} already has a rule {rule.name}",
                                    remedy=f"remove it first (kvmotion cluster drs rule-remove {name} {rule.name}) "
                                           "or choose another name")
            return cfg.model_copy(update={"rules": [*cfg.rules, rule]})
        return self._store(name, add)

    def remove_rule(self, name: str, rule: str) -> DrsConfig:
        def remove(cfg: DrsConfig) -> DrsConfig:
            if not any(r.name == rule for r in cfg.rules):
                raise NotFoundError(f"cluster {name} has no rule {rule}", remedy=f"kvmotion cluster drs show {name}")
            return cfg.model_copy(update={"rules": [r for r in cfg.rules if r.name != rule]})
        return self._store(name, remove)

    # -- the snapshot ------------------------------------------------------------------------------
    def _read(self, name: str) -> tuple[list[compat.Destination], list[tuple[str, str, str, int]]]:
        """The cluster's hosts with their facts, and its running VMs (uuid, name, host, memory MB)."""
        with self.sessions() as s:
            members = set(s.scalars(select(Host.name).where(Host.cluster == name)).all())
            rows = s.execute(select(VM.uuid, VM.name, VM.host, VM.spec_json)
                             .where(VM.host.in_(members), VM.power_state == "poweredOn")).all()
        dests = [d for d in compat.destinations(self.inv) if d[0].name in members]
        return dests, [(u, n, h, int(json.loads(spec).get("memory_mb", 0))) for u, n, h, spec in rows]

    def _settled(self, name: str, cooldown_s: float) -> tuple[set[str], bool]:
        """VMs (uuids) DRS moved within the cooldown, and whether a DRS move of the cluster is still unfinished."""
        since = time.time() - cooldown_s
        with self.sessions() as s:
            rows = s.execute(select(Task.vm_uuid, Task.state, Task.options_json).where(
                Task.kind.in_(task_store.MIGRATION_KINDS),
                or_(Task.state.not_in(task_store.TERMINAL_STATES), Task.finished_at >= since))).all()
        settled, busy = set(), False
        for uuid, state, options in rows:
            if (json.loads(options or "{}").get("drs") or {}).get("cluster") == name:
                settled.add(uuid)
                busy = busy or state not in task_store.TERMINAL_STATES
        return settled, busy

    async def _vm_load(self, uuid: str, vm: str, host: str, memory_mb: int, dests: list[compat.Destination],
                       loads: dict[str, Any], settled: set[str], budget_ms: int) -> model.VmLoad:
        by_name = {d[0].name: d for d in dests}
        side = await compat.vm_side(self.inv, self.sessions, uuid, hosts=by_name)
        allowed = frozenset(h.name for h, facts in dests if h.name != host and not blockers(side.check(h, facts)))
        cost_s = cost_mb = None
        if allowed:
            p = await compat.predict_move(self.inv, self.sessions, side.spec, host, sorted(allowed)[0], budget_ms,
                                          max_age_s=PREDICT_SAMPLE_AGE_S, measure=False)
            if p is not None and p.converges and p.total_s is not None:
                cost_s, cost_mb = round(p.total_s, 3), round(p.touched_mb + p.dirty_mb_s * p.total_s, 1)
        measured = loads.get(uuid)
        return model.VmLoad(vm, host, measured.cpu_pct if measured else 0.0,
                            float(measured.mem_mb if measured and measured.mem_mb is not None else memory_mb),
                            allowed, movable=not side.migrating, settled=uuid in settled, cost_s=cost_s,
                            cost_mb=cost_mb)

    async def snapshot(self, name: str, cfg: DrsConfig) -> tuple[model.Cluster, bool]:
        """The cluster as DRS decides on it, and whether a DRS move of it is still running."""
        dests, vms = await asyncio.to_thread(self._read, name)
        settled, busy = await asyncio.to_thread(self._settled, name, cfg.cooldown_s)
        hosts: dict[str, model.HostLoad] = {}
        loads: dict[str, Any] = {}
        for row, facts in dests:
            f = facts or HostFacts.model_construct(cpu_count=0, mem_total_mb=0, vm_load=[])
            hosts[row.name] = model.HostLoad(row.name, 100.0 * f.cpu_count, float(f.mem_total_mb),
                                             row.state == "connected" and not row.maintenance and facts is not None)
            loads.update({v.uuid: v for v in f.vm_load})
        budget = int(self._policy(name).get("downtime_ms", 500))
        placed = [await self._vm_load(u, n, h, mem, dests, loads, settled, budget) for u, n, h, mem in vms]
        return model.Cluster(hosts, {v.name: v for v in placed}, tuple(cfg.rules)), busy

    def _policy(self, name: str) -> dict[str, Any]:
        with self.sessions() as s:
            row = s.get(ClusterRow, name)
            return json.loads(row.policy_json or "{}") if row else {}

    # -- recommendations ---------------------------------------------------------------------------
    async def status(self, name: str) -> DrsStatus:
        """The cluster's load, imbalance, recommendations and rule faults, computed now (and kept for apply)."""
        cfg = await asyncio.to_thread(self.config, name)
        cluster, _ = await self.snapshot(name, cfg)
        out = self._status(name, cfg, cluster, model.plan(cluster, cfg.threshold))
        self._keep(name, out)
        return out

    def _keep(self, name: str, status: DrsStatus) -> None:
        """The status as the cluster's latest, and its recommendations as applicable by id for ``OFFERED_S``."""
        self.latest[name] = status
        now = time.time()
        kept = {i: (t, r) for i, (t, r) in self.offered.get(name, {}).items() if now - t < OFFERED_S}
        kept.update({r.id: (now, r) for r in status.recommendations})
        self.offered[name] = dict(sorted(kept.items(), key=lambda kv: kv[1][0])[-MAX_OFFERED:])

    @staticmethod
    def _status(name: str, cfg: DrsConfig, c: model.Cluster, plan: model.Plan) -> DrsStatus:
        by_host = model.sums(c)
        hosts = [HostLoadOut(host=h, load=plan.loads[h], cpu_pct=round(by_host[h][0], 2),
                             cpu_capacity_pct=hl.cpu_capacity_pct, mem_mb=round(by_host[h][1], 1),
                             mem_capacity_mb=hl.mem_capacity_mb, in_service=hl.in_service,
                             vms=sorted(v.name for v in c.vms.values() if v.host == h))
                 for h, hl in sorted(c.hosts.items())]
        return DrsStatus(cluster=name, config=cfg, imbalance=plan.imbalance, target=plan.target, hosts=hosts,
                         recommendations=plan.recommendations if cfg.automation is not Automation.OFF else [],
                         faults=plan.faults, last_run=time.time())

    async def apply(self, name: str, ids: list[str] | None = None) -> DrsApplied:
        """Start the moves of the recommendations ``ids`` (those last listed), or of every current one. Each is
        checked again now; one the checks refuse is skipped with why, never forced."""
        cfg = await asyncio.to_thread(self.config, name)
        if cfg.automation is Automation.OFF:
            raise ConflictError(f"DRS is off for cluster {name}",
                                remedy=f"kvmotion cluster drs set {name} --automation manual")
        if ids is None:
            recs = (await self.status(name)).recommendations
        else:
            now = time.time()
            known = {i: r for i, (t, r) in self.offered.get(name, {}).items() if now - t < OFFERED_S}
            stale = [i for i in ids if i not in known]
            if stale:
                raise ConflictError(f"recommendation {', '.join(stale)} of cluster {name} is no longer current",
                                    remedy=f"list them again: kvmotion cluster drs recommendations {name}")
            recs = [known[i] for i in dict.fromkeys(ids)]
        return await self._submit(name, recs)

    async def _submit(self, name: str, recs: list[Recommendation]) -> DrsApplied:
        tasks: list[str] = []
        skipped: list[DrsSkipped] = []
        placed = (await asyncio.to_thread(self.placement)).get(name)
        for r in recs:
            try:
                rule = model.legal_for(placed, r.vm, r.destination) if placed is not None else None
                if rule is not None:                  # the VMs moved since it was listed: never break a must rule
                    raise ConflictError(f"moving {r.vm} to {r.destination} now breaks must rule {rule.name}",
                                        remedy=f"list the recommendations again: kvmotion cluster drs "
                                               f"recommendations {name}")
                ctx, findings = await compat.validate(self.inv, self.sessions, r.vm, r.destination)
                if ctx.source.name != r.source:
                    raise ConflictError(f"{r.vm} is on {ctx.source.name} now, not {r.source}",
                                        remedy=f"list the recommendations again: kvmotion cluster drs "
                                               f"recommendations {name}")
                compat.raise_on_errors(r.vm, r.destination, findings)
                t = await self.scheduler.submit(ctx.spec, r.source, MigrateRequest(host=r.destination),
                                                compat.findings_json(findings), extra={"drs": {
                                                    "cluster": name, "recommendation": r.id, "reason": r.reason,
                                                    "rule": r.rule, "gain": r.gain}})
                tasks.append(t.id)
                if placed is not None and r.vm in placed.vms:
                    placed = model.moved(placed, r.vm, r.destination)
            except KvmotionError as exc:
                skipped.append(DrsSkipped(id=r.id, vm=r.vm, error=exc.to_dict()))
        log.info("DRS %s: %d move(s) started, %d skipped", name, len(tasks), len(skipped))
        return DrsApplied(tasks=tasks, skipped=skipped)

    # -- automation ----------------------------------------------------------------------------------
    async def run_once(self, name: str) -> DrsStatus | None:
        """One round for a cluster: skipped while DRS's previous moves of it run; fully automated: applied."""
        cfg = await asyncio.to_thread(self.config, name)
        if cfg.automation is Automation.OFF:
            return None
        cluster, busy = await self.snapshot(name, cfg)
        if busy:
            return None
        status = self._status(name, cfg, cluster, model.plan(cluster, cfg.threshold))
        if cfg.automation is Automation.FULLY and status.recommendations:
            applied = await self._submit(name, status.recommendations)
            status = status.model_copy(update={"last_applied": applied.tasks})
        self._keep(name, status)
        return status

    def _due(self) -> list[str]:
        now = time.time()
        with self.sessions() as s:
            rows = s.execute(select(ClusterRow.name, ClusterRow.drs_json)).all()
        due = []
        for name, raw in rows:
            cfg = DrsConfig.model_validate_json(raw or "{}")
            last = self.latest.get(name)
            if cfg.automation is not Automation.OFF and (last is None or now - (last.last_run or 0) >= cfg.interval_s):
                due.append(name)
        return due

    async def loop(self) -> None:
        while True:
            try:
                for name in await asyncio.to_thread(self._due):
                    await self.run_once(name)
            except Exception:  # noqa: BLE001 - DRS must keep running
                log.exception("DRS round failed")
            await asyncio.sleep(TICK_S)

    # -- placement for maintenance mode ----------------------------------------------------------------
    def placement(self) -> dict[str, model.Cluster]:
        """Per cluster with must rules: where its running VMs are and its rules, for ``model.legal_for``."""
        out: dict[str, model.Cluster] = {}
        with self.sessions() as s:
            clusters = s.execute(select(ClusterRow.name, ClusterRow.drs_json)).all()
            running = s.execute(select(VM.name, VM.host).where(VM.power_state == "poweredOn")).all()
        for name, raw in clusters:
            rules = tuple(r for r in DrsConfig.model_validate_json(raw or "{}").rules if r.must and r.enabled)
            if rules:
                named = {v for r in rules for v in r.vms}
                out[name] = model.Cluster({}, {n: model.VmLoad(n, h, 0.0, 0.0, frozenset()) for n, h in running
                                              if n in named}, rules)
        return out


def rule_finding(rule: DrsRule, vm: str, host: str) -> Finding:
    where = {RuleKind.VM_HOST: f"runs only on {', '.join(rule.hosts)}",
             RuleKind.VM_NOT_HOST: f"never runs on {', '.join(rule.hosts)}",
             RuleKind.AFFINITY: f"runs with {', '.join(v for v in rule.vms if v != vm)}",
             RuleKind.ANTI_AFFINITY: f"never runs with {', '.join(v for v in rule.vms if v != vm)}"}[rule.kind]
    return finding("DRS_RULE", f"vm:{vm}", f"must rule {rule.name}: {vm} {where}; {host} would break it",
                   f"change the rule (kvmotion cluster drs rule-remove CLUSTER {rule.name}) or power {vm} off")

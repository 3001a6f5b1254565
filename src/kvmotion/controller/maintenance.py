"""Maintenance mode: evacuate a host (running VMs by vMotion, powered-off VMs by re-registering), then mark it.

The host is marked ``maintenance`` only once it is empty. A VM that cannot move is named with the checker's
findings, and the host goes back to normal service: never a half state.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.models.findings import Finding, blockers
from kvmotion.common.errors import ConflictError, KvmotionError
from kvmotion.models.agent import VMSpec
from kvmotion.controller import compat
from kvmotion.controller import tasks as task_store
from kvmotion.controller.db import VM, Host
from kvmotion.controller.drs import model as drs_model
from kvmotion.controller.drs.service import rule_finding
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.scheduler import Scheduler
from kvmotion.models.api import MigrateRequest, TaskOut, VMOut
from kvmotion.controller.tasks import TaskJournal

log = logging.getLogger(__name__)

NORMAL, IN_MAINTENANCE, ENTERING = 0, 1, 2
POLL_S = 0.5


@dataclass
class Fleet:
    """The hosts as an evacuation plans with them, read once: each with its facts (the source's too), and VMs
    running per host."""
    hosts: list[compat.Destination]
    running: dict[str, int]
    cpu: dict[compat.CpuKey, frozenset[str]] = field(default_factory=dict)   # cpu_expand answers, asked once
    rules: dict[str, drs_model.Cluster] = field(default_factory=dict)   # per cluster: its must rules, placement
    cluster_of: dict[str, str] = field(default_factory=dict)           # host → its cluster
    best_first: list[compat.Destination] = field(init=False)     # the hosts in ``rank_key`` order
    by_name: dict[str, compat.Destination] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {d[0].name: d for d in self.hosts}
        self.best_first = sorted(self.hosts, key=lambda d: rank_key(d[0].name, d[1].mem_free_mb if d[1] else 0,
                                                                    self.running.get(d[0].name, 0)))


def rank_key(name: str, mem_free_mb: int, load: int) -> tuple[int, int, str]:
    """Destinations by free memory (most first), then by current load (fewest VMs first), then by name. Pure."""
    return -mem_free_mb, load, name


def rank(candidates: list[tuple[str, int, int]]) -> list[str]:
    return [h for h, _, _ in sorted(candidates, key=lambda c: rank_key(*c))]


class Maintenance:
    def __init__(self, sessions: sessionmaker[Session], inv: Inventory, scheduler: Scheduler,
                 placement: Callable[[], dict[str, drs_model.Cluster]] = dict) -> None:
        self.sessions, self.inv, self.scheduler = sessions, inv, scheduler
        self.placement = placement            # DRS's must rules per cluster (drs.service.Drs.placement)
        self.running: dict[str, asyncio.Task[None]] = {}

    def exit(self, host: str) -> None:
        if self.inv.get_host(host).maintenance == ENTERING:
            raise ConflictError(f"host {host} is still being evacuated", remedy="wait for the maintenance task")
        self.inv.set_maintenance(host, NORMAL)

    async def enter(self, host: str) -> TaskOut:
        h = self.inv.get_host(host)
        if h.maintenance:
            raise ConflictError(f"host {host} is already {'in' if h.maintenance == IN_MAINTENANCE else 'entering'} "
                                "maintenance mode", remedy="nothing to do")
        self.inv.set_maintenance(host, ENTERING)      # nothing new is placed here from now on
        journal = TaskJournal.create(self.sessions, "maintenance", "", f"host {host}", host, "", {"host": host})
        task = asyncio.create_task(self._evacuate(host, journal), name=f"maintenance-{host}")
        self.running[journal.id] = task
        task.add_done_callback(lambda _t, tid=journal.id: self.running.pop(tid, None))
        return journal.read()

    def fleet(self) -> Fleet:
        with self.sessions() as s:
            running = dict(s.execute(select(VM.host, func.count()).where(VM.power_state == "poweredOn")
                                     .group_by(VM.host)).all())
            cluster_of = dict(s.execute(select(Host.name, Host.cluster).where(Host.cluster.is_not(None))).all())
        return Fleet(compat.destinations(self.inv), running, rules=self.placement(), cluster_of=cluster_of)

    @staticmethod
    def _rule_errors(fleet: Fleet, vm: str, host: str, other: str) -> list[Finding]:
        """A must rule of the evacuated host's cluster that moving ``vm`` to ``other`` would break."""
        c = fleet.rules.get(fleet.cluster_of.get(host, ""))
        rule = drs_model.legal_for(c, vm, other) if c is not None else None
        return [rule_finding(rule, vm, other)] if rule is not None else []

    @staticmethod
    def _placed(fleet: Fleet, vm: str, host: str, target: str) -> None:
        """The plan's later VMs see this one on ``target`` (anti-affinity between VMs evacuated together)."""
        cluster = fleet.cluster_of.get(host, "")
        if cluster in fleet.rules and vm in fleet.rules[cluster].vms:
            fleet.rules[cluster] = drs_model.moved(fleet.rules[cluster], vm, target)

    async def _candidates(self, vm: VMOut, host: str, fleet: Fleet) -> tuple[str | None, list[dict[str, Any]]]:
        """The best destination with no error findings, or None and the findings of the closest one.

        The hosts are checked best first (``rank_key``) and the first with no error wins: the host ranking first
        among all those without errors, found without checking the rest. Only a VM that no host takes is checked
        against every host, for the closest one (the fewest errors, the first in the fleet's order on a tie)."""
        side = await compat.vm_side(self.inv, self.sessions, vm.uuid, fleet.cpu, fleet.by_name)
        errors: dict[str, list[Finding]] = {}
        for other, facts in fleet.best_first:
            if other.name != host and other.state == "connected" and not other.maintenance:
                errors[other.name] = (blockers(side.check(other, facts))
                                      or self._rule_errors(fleet, vm.name, host, other.name))
                if not errors[other.name]:
                    self._placed(fleet, vm.name, host, other.name)
                    return other.name, []
        closest = None
        for other, _ in fleet.hosts:                  # every host in service was checked: the first with fewest errors
            found = errors.get(other.name)
            if found is not None and (closest is None or len(found) < len(closest[1])):
                closest = (other.name, found)
        return None, [f.model_dump(mode="json") | {"host": closest[0]} for f in closest[1]] if closest else []

    def _reregister_target(self, vm: VMOut, host: str, fleet: Fleet) -> str | None:
        spec = VMSpec.model_validate(vm.spec)
        needed = {spec.boot_datastore} | {d.datastore for d in spec.disks if d.kind == "file"}
        for other, facts in fleet.hosts:
            if other.name == host or other.maintenance or other.state != "connected" or facts is None:
                continue
            if needed <= {d.name for d in facts.datastores if d.readable} and not any(d.kind == "rdm" for d in spec.disks):
                return other.name
        return None

    async def plan_vm(self, vm: VMOut, host: str, fleet: Fleet) -> tuple[str | None, list[dict[str, Any]]]:
        """Where a VM leaving ``host`` goes (read-only; ``fleet`` read once per evacuation): a powered-off VM is
        re-registered on a host that sees its datastores, a running one moves to the best host the checks allow;
        None and the findings when none."""
        if vm.power_state != "poweredOn":
            target = self._reregister_target(vm, host, fleet)
            return target, [] if target else [{
                "code": "DATASTORE_NOT_ACCESSIBLE", "severity": "error",
                "message": f"no other host sees the datastores of powered-off VM {vm.name}",
                "remedy": "move its storage first, or power it on and migrate it"}]
        target, findings = await self._candidates(vm, host, fleet)
        return target, [] if target else (findings or [{"code": "NO_DESTINATION",
                                                         "message": "no other connected host"}])

    async def _evacuate(self, host: str, journal: TaskJournal) -> None:
        moves: dict[str, str] = {}                      # vm name -> child task id
        blocked: dict[str, Any] = {}
        reregistered: dict[str, str] = {}
        try:
            await asyncio.to_thread(journal.begin_phase, "plan", 0)
            vms = [v for v in self.inv.list_vms() if v.host == host]
            fleet = await asyncio.to_thread(self.fleet)
            for vm in vms:
                target, findings = await self.plan_vm(vm, host, fleet)
                if target is None:
                    blocked[vm.name] = findings
                    continue
                if vm.power_state != "poweredOn":
                    self.inv.set_vm(vm.uuid, host=target)       # re-register on a host that sees its files
                    reregistered[vm.name] = target
                    continue
                ctx, f = await compat.validate(self.inv, self.sessions, vm.uuid, target)
                t = await self.scheduler.submit(ctx.spec, host, MigrateRequest(host=target), compat.findings_json(f))
                moves[vm.name] = t.id
            await asyncio.to_thread(journal.end_phase, "ok", {"migrations": moves, "reregistered": reregistered,
                                                              "blocked": list(blocked)})
            await asyncio.to_thread(journal.begin_phase, "evacuate", 5)
            results = await self._wait(journal, moves, reregistered, blocked)
            failed = {n: r for n, r in results.items() if r["state"] != "success"}
            await asyncio.to_thread(journal.end_phase, "ok" if not failed else "failed", {"results": results})
            still = [v.name for v in self.inv.list_vms() if v.host == host]
            if blocked or failed or still:
                self.inv.set_maintenance(host, NORMAL)
                names = sorted(set(blocked) | set(failed) | set(still))
                journal.finish("error", {"results": results, "reregistered": reregistered}, {
                    "code": "EVACUATION_INCOMPLETE", "phase": "evacuate",
                    "message": f"host {host} was not evacuated: {', '.join(names)} could not move; "
                               f"the host stays in service",
                    "remedy": "fix the findings listed for each VM, then enter maintenance mode again",
                    "blocked": blocked, "failed": failed})
                return
            self.inv.set_maintenance(host, IN_MAINTENANCE)
            journal.finish("success", {"results": results, "reregistered": reregistered, "host_state": "maintenance"})
        except KvmotionError as exc:
            self.inv.set_maintenance(host, NORMAL)
            journal.finish("error", error=exc.to_dict() | {"phase": "plan"})
        except Exception as exc:  # noqa: BLE001 - never leave a host stuck in "entering"
            log.exception("maintenance of %s crashed", host)
            self.inv.set_maintenance(host, NORMAL)
            journal.finish("error", error={"code": "INTERNAL", "message": str(exc), "phase": "evacuate"})

    async def _wait(self, journal: TaskJournal, moves: dict[str, str], reregistered: dict[str, str],
                    blocked: dict[str, Any]) -> dict[str, Any]:
        while True:
            children = {name: task_store.get_task(self.sessions, tid) for name, tid in moves.items()}
            done = [c for c in children.values() if c.state in task_store.TERMINAL_STATES]
            total = len(children) + len(reregistered) + len(blocked)
            progress = 5 + 95 * (len(done) + len(reregistered)) / total if total else 100
            await asyncio.to_thread(journal.live, {"children": {n: {"task": c.id, "state": c.state, "phase": c.phase,
                                                                    "progress": c.progress, "destination": c.destination}
                                                                for n, c in children.items()},
                                                   "reregistered": reregistered, "blocked": blocked}, progress)
            if len(done) == len(children):
                return {n: {"task": c.id, "state": c.state, "destination": c.destination,
                            "downtime_ms": c.result.get("downtime_ms"),
                            "error": (c.error or {}).get("message")} for n, c in children.items()}
            await asyncio.sleep(POLL_S)

"""Runs migration tasks under admission control: queue, start, re-share bandwidth, cancel."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common.errors import ConflictError, KvmotionError
from kvmotion.models.agent import VMSpec
from kvmotion.models.moves import MoveKind
from kvmotion.controller import admission, compat
from kvmotion.controller import tasks as task_store
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.policy import effective
from kvmotion.models.api import MigrateRequest, TaskOut
from kvmotion.controller.tasks import TaskJournal
from kvmotion.controller.moveview import ControllerView, move_context
from kvmotion.migration import kinds, registry
from kvmotion.migration.engine import MoveContext, MoveEngine
from kvmotion.migration.live import LiveMove

log = logging.getLogger(__name__)

TICK_S = 1.0
DEFAULT_LINK_MBPS = 1000


class Scheduler:
    def __init__(self, sessions: sessionmaker[Session], inv: Inventory, admission_enabled: bool = True,
                 policy_layers: Callable[[str], tuple[dict[str, Any], dict[str, Any]]] | None = None) -> None:
        self.sessions = sessions
        self.inv = inv
        # VM uuid -> (its cluster's migration policy, its own): both empty without clusters
        self.policy_layers = policy_layers or (lambda uuid: ({}, {}))
        self.admission_enabled = admission_enabled     # off only for benchmarks: everything starts at once
        self.view = ControllerView(inv, sessions)
        self.engines: dict[str, MoveEngine] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self.stood_down = False          # this controller stopped leading: it launches nothing (``run``)
        # a cross-controller task's context (``controller.crossmove``); None: this controller moves nothing across
        self.cross_context: Callable[[TaskOut, VMSpec, MigrateRequest, int], MoveContext] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
        for t in list(self.tasks.values()):
            t.cancel()

    async def run(self) -> None:
        """The scheduler while this controller leads (``leader.Leadership.run_while_leader``): when it is
        cancelled, so is every engine it started (the next leader reconciles their moves), and nothing is
        scheduled here any more until it runs again."""
        self.stood_down = False
        try:
            await self._loop()
        finally:
            self.stood_down = True
            for t in list(self.tasks.values()):
                t.cancel()

    async def _loop(self) -> None:
        while True:
            try:
                await self.schedule()
            except Exception:  # noqa: BLE001 - the scheduler must keep running
                log.exception("scheduling failed")
            await asyncio.sleep(TICK_S)

    async def submit(self, spec: VMSpec, source: str, req: MigrateRequest, findings: list[dict],
                     kind: str = MoveKind.VMOTION, destination: str | None = None,
                     policy: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> TaskOut:
        """Queue a task and run one admission pass: it comes back started, or queued with its place and reason.
        The task keeps the migration policy it runs under (each value and where it came from)."""
        if policy is None:           # every submission (a user's move, an evacuation): the VM's and cluster's
            req, policy = effective(req, *self.policy_layers(spec.uuid))
        journal = TaskJournal.create(self.sessions, kind, spec.uuid, spec.name, source, destination or req.host or source,
                                     req.model_dump() | {"findings": findings, "policy": policy or {}} | (extra or {}),
                                     state="queued")
        await self.schedule()
        return journal.read()

    # -- admission ----------------------------------------------------------------------------
    def _links(self, hosts: set[str]) -> dict[str, admission.Link]:
        links = {}
        for h in hosts:
            try:
                facts = self.inv.host_facts(h)
            except KvmotionError:
                continue
            speeds = [i.speed_mbps for i in (facts.migration_interfaces if facts else []) if i.enabled and i.speed_mbps]
            links[h] = admission.Link(h, max(speeds) if speeds else DEFAULT_LINK_MBPS)
        return links

    def _request(self, t: TaskOut) -> admission.Request:
        try:
            spec = VMSpec.model_validate(self.inv.get_vm(t.vm_uuid).spec)
            stores = frozenset({spec.boot_datastore} | {d.datastore for d in spec.disks if d.kind == "file"})
        except KvmotionError:
            stores = frozenset()
        local = kinds.kind(t.kind).is_local(t.source, t.destination)
        return admission.Request(t.id, t.source, t.destination, stores, t.options.get("priority", "normal"),
                                 t.created_at, t.options.get("max_bandwidth_mbps"),
                                 local=local)

    async def schedule(self) -> None:
        if self.stood_down:
            return
        async with self._lock:
            queued_t = task_store.unfinished(self.sessions, "queued")
            running_t = [t for t in task_store.unfinished(self.sessions, "running") if t.id in self.engines]
            queued, running = [self._request(t) for t in queued_t], [self._request(t) for t in running_t]
            links = self._links({h for r in queued + running for h in (r.source, r.destination)})
            for t in queued_t + running_t:        # another controller's host: the link its verdict gave
                if t.options.get("remote_link_mbps"):
                    links.setdefault(t.destination, admission.Link(t.destination, int(t.options["remote_link_mbps"])))
            if self.admission_enabled:
                p = admission.plan(queued, running, links, compat.datastore_limit())
            else:
                p = admission.Plan(start=[r.task_id for r in admission.queue_order(queued)])
            for tid, why in p.waiting.items():
                await asyncio.to_thread(TaskJournal(self.sessions, tid).live,
                                        {"queue_position": p.position[tid], "waiting_for": why})
            by_id = {r.task_id: r for r in queued}
            started = [by_id[tid] for tid in p.start if tid in by_id]      # in admission order
            shares = admission.shares_mbps(running + started, links)
            for req in started:
                self._launch(req, shares.get(req.task_id, 0))
            for req in running:
                engine = self.engines.get(req.task_id)
                if engine is not None and req.task_id in shares:
                    await engine.set_bandwidth(shares[req.task_id])

    def _launch(self, req: admission.Request, bandwidth_mbps: int) -> None:
        t = task_store.get_task(self.sessions, req.task_id)
        journal = TaskJournal(self.sessions, t.id)
        try:
            spec = VMSpec.model_validate(self.inv.get_vm(t.vm_uuid).spec)
        except KvmotionError as exc:
            journal.finish("error", error=exc.to_dict() | {"phase": "queued"})
            return
        journal.set_state("running")
        req_ = MigrateRequest.model_validate({k: v for k, v in t.options.items() if k in MigrateRequest.model_fields})
        try:
            ctx = (self.cross_context(t, spec, req_, bandwidth_mbps) if req_.controller and self.cross_context
                   else move_context(self.view, t, spec, req_, bandwidth_mbps))
        except KvmotionError as exc:             # e.g. the destination controller left the domain meanwhile
            journal.finish("error", error=exc.to_dict() | {"phase": "queued"})
            return
        engine = registry.engine(ctx)
        task = asyncio.create_task(engine.run(), name=f"{t.kind}-{spec.name}")
        self.engines[t.id] = engine
        self.tasks[t.id] = task
        task.add_done_callback(lambda _t, tid=t.id: self._finished(tid))

    def _finished(self, task_id: str) -> None:
        self.engines.pop(task_id, None)
        self.tasks.pop(task_id, None)
        try:
            asyncio.get_running_loop().create_task(self.schedule())   # shares grow; the queue moves
        except RuntimeError:
            pass

    def cancel(self, task_id: str) -> TaskOut:
        """Cancel a queued task at once, or ask a running one to roll back (before its switchover)."""
        task = task_store.get_task(self.sessions, task_id)
        if task.state == "queued":
            TaskJournal(self.sessions, task.id).finish("error", error={
                "code": "CANCELLED", "phase": "queued", "message": "cancelled by the user while queued",
                "remedy": "nothing to do; the VM did not move", "rollback": {"source_running": True}})
            return task_store.get_task(self.sessions, task.id)
        engine = self.engines.get(task.id)
        if engine is None or task.state != "running":
            raise ConflictError(f"task {task.id[:8]} is {task.state}; only a queued or running migration can be "
                                "cancelled", remedy="nothing to do")
        engine.request_cancel()
        return task

    def force_complete(self, task_id: str) -> TaskOut:
        """Ask a running live migration to switch over now (its downtime limit covers what remains)."""
        task = task_store.get_task(self.sessions, task_id)
        engine = self.engines.get(task.id)
        if task.state != "running" or not isinstance(engine, LiveMove):
            raise ConflictError(f"task {task.id[:8]} is a {task.kind} task, {task.state}; only a running live "
                                "migration can be forced to complete", remedy="nothing to do")
        engine.request_force_complete()
        return task

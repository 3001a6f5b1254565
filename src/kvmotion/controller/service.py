"""The controller (vCenter role): inventory, migration tasks, host monitoring, reconciliation."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from kvmotion.common.errors import ConflictError, KvmotionError
from kvmotion.controller import compat
from kvmotion.controller import tasks as task_store
from kvmotion.controller.db import make_engine, make_sessionmaker
from kvmotion.controller.clusters import Clusters
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.schemas import Finding, MigrateRequest, TaskOut, VMOut
from kvmotion.controller.tasks import TaskJournal
from kvmotion.controller.vmotion import VMotion

log = logging.getLogger(__name__)

REFRESH_S = 5.0
MAX_RUNNING = 64


class Controller:
    def __init__(self, db_url: str, vm_ip_pool: str | None = None) -> None:
        self.engine = make_engine(db_url)
        self.sessions = make_sessionmaker(self.engine)
        self.inventory = Inventory(self.sessions, vm_ip_pool)
        self.clusters = Clusters(self.sessions, self.inventory)
        self.running: dict[str, asyncio.Task[None]] = {}     # task id -> engine task (bounded by MAX_RUNNING)
        self.engines: dict[str, VMotion] = {}
        self._monitor: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        await self.reconcile()
        self._monitor = asyncio.create_task(self._monitor_hosts(), name="host-monitor")

    async def shutdown(self) -> None:
        if self._monitor:
            self._monitor.cancel()
        for t in list(self.running.values()):
            t.cancel()
        self.engine.dispose()

    async def _monitor_hosts(self) -> None:
        while True:
            for host in await asyncio.to_thread(self.inventory.list_hosts):
                try:
                    await self.inventory.refresh_host(host.name)
                except Exception:  # noqa: BLE001 - keep monitoring the other hosts
                    log.exception("refresh of %s failed", host.name)
            await asyncio.sleep(REFRESH_S)

    async def start_vm(self, ref: str) -> VMOut:
        vm = self.inventory.get_vm(ref)
        return await self.inventory.start_vm(ref, evc_mode=self.clusters.evc_for_host(vm.host))

    # -- migrations -------------------------------------------------------------------------
    async def validate_migration(self, vm: str, req: MigrateRequest) -> list[Finding]:
        await self.inventory.refresh_host(self.inventory.get_host(req.host).name)
        return (await compat.validate(self.inventory, self.sessions, vm, req.host))[1]

    async def migrate(self, vm: str, req: MigrateRequest) -> TaskOut:
        """Precheck synchronously (nothing is created on failure), then run the task in the background."""
        if len(self.running) >= MAX_RUNNING:
            raise ConflictError(f"{MAX_RUNNING} migrations are already running", remedy="retry when some finish")
        await self.inventory.refresh_host(self.inventory.get_host(req.host).name)
        ctx, findings = await compat.validate(self.inventory, self.sessions, vm, req.host)
        compat.raise_on_errors(ctx.spec.name, req.host, findings)
        spec, source = ctx.spec, ctx.source.name
        journal = TaskJournal.create(self.sessions, "vmotion", spec.uuid, spec.name, source, req.host,
                                     req.model_dump() | {"findings": compat.findings_json(findings)})
        engine = VMotion(self.inventory, journal, spec, source, req.host, req)
        task = asyncio.create_task(engine.run(), name=f"vmotion-{spec.name}")
        self.running[journal.id] = task
        self.engines[journal.id] = engine
        task.add_done_callback(lambda _t, tid=journal.id: (self.running.pop(tid, None), self.engines.pop(tid, None)))
        return journal.read()

    def cancel(self, task_id: str) -> TaskOut:
        """Ask a running migration to stop; before the switchover the VM stays on the source."""
        task = task_store.get_task(self.sessions, task_id)
        engine = self.engines.get(task.id)
        if engine is None or task.state not in ("queued", "running"):
            raise ConflictError(f"task {task.id[:8]} is {task.state}; only a running migration can be cancelled",
                                remedy="nothing to do")
        engine.request_cancel()
        return task

    async def reconcile(self) -> list[dict[str, Any]]:
        """A restarted controller finishes what its journal says was in flight.

        The rule: the VM is wherever it really runs. If it runs on the destination, the move happened:
        release the source and update the inventory. Otherwise it runs on the source: remove the shadow.
        """
        outcomes = []
        for t in task_store.unfinished(self.sessions):
            journal = TaskJournal(self.sessions, t.id)
            outcome: dict[str, Any] = {"task": t.id, "phase": t.phase}
            try:
                dst_state = await self._runtime_state(t.destination, t.vm_uuid)
                if dst_state == "running":
                    src = self.inventory.agent(t.source)
                    try:
                        await src.finalize_source(t.vm_uuid)
                    except KvmotionError as exc:
                        outcome["finalize_error"] = exc.message
                    self.inventory.set_vm(t.vm_uuid, host=t.destination)
                    outcome["resolution"] = "completed on the destination"
                    journal.finish("success", {"reconciled": outcome})
                else:
                    try:
                        await self.inventory.agent(t.destination).abort_incoming(t.vm_uuid)
                    except KvmotionError as exc:
                        outcome["abort_error"] = exc.message
                    try:
                        await self.inventory.agent(t.source).cancel_outgoing(t.vm_uuid)
                    except KvmotionError:
                        pass
                    outcome["resolution"] = "rolled back: the VM stays on the source"
                    journal.finish("error", error={
                        "code": "CONTROLLER_RESTARTED", "phase": t.phase,
                        "message": f"the controller restarted during {t.phase}; the VM stays on {t.source}",
                        "remedy": "start the migration again", "rollback": outcome})
            except KvmotionError as exc:
                outcome["error"] = exc.message
            outcomes.append(outcome)
        return outcomes

    async def _runtime_state(self, host: str, uuid: str) -> str | None:
        try:
            return (await self.inventory.agent(host).status(uuid)).qemu_status
        except KvmotionError:
            return None

"""The controller (vCenter role): inventory, migration tasks, host monitoring, reconciliation."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from typing import Any

from kvmotion.common.errors import ForbiddenError, InvalidInputError, KvmotionError
from kvmotion.common.private import private_dir
from kvmotion.controller import compat, policy
from kvmotion.controller.agenttls import AgentTls
from kvmotion.controller.moveview import recovery
from kvmotion.migration import kinds, predict, registry
from kvmotion.controller import tasks as task_store
from kvmotion.controller.auth import Audit, Peer, Tokens
from kvmotion.controller.db import make_engine, make_sessionmaker
from kvmotion.controller.certs import HostCertificates
from kvmotion.controller.clusters import Clusters
from kvmotion.controller.config import DEFAULT_PKI, require_pki_dir
from kvmotion.controller import crossmove
from kvmotion.controller.crossmove import CrossMoves
from kvmotion.controller.domain import Domain
from kvmotion.controller.incoming import IncomingMoves
from kvmotion.controller.guest import GuestControl
from kvmotion.controller.keys import KeyProvider
from kvmotion.controller.pki import CertificateAuthority
from kvmotion.controller.images import ImageLibrary
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.leader import Leadership
from kvmotion.checks.rules import encryption_plan
from kvmotion.models.api import Finding, HostOut, MigratePlan, MigrateRequest, TaskOut, VMOut
from kvmotion.controller.tasks import TaskJournal
from kvmotion.models.moves import TaskKind
from kvmotion.controller.drs.service import Drs
from kvmotion.controller.maintenance import Maintenance
from kvmotion.controller.onboarding import Onboarding
from kvmotion.controller.retention import TaskRetention
from kvmotion.controller.scheduler import Scheduler

log = logging.getLogger(__name__)

REFRESH_S = 5.0
REFRESH_PARALLEL = 32     # hosts refreshed at once (controller.toml: refresh_parallel)
RECONCILE_S = 10.0        # unknown migrations are re-checked this often


class Controller:
    def __init__(self, db_url: str, vm_ip_pool: str | None = None, admission_enabled: bool = True,
                 pki_dir: Path | None = None, token_dir: Path | None = None,
                 host_networks: list[str] | None = None, refresh_parallel: int = REFRESH_PARALLEL,
                 name: str | None = None, advertised_url: str = "") -> None:
        require_pki_dir(db_url, pki_dir)
        self.engine = make_engine(db_url)
        self.sessions = make_sessionmaker(self.engine)
        pki = private_dir(pki_dir or DEFAULT_PKI)      # the CA key and the master key: 0700
        self.pki_dir = pki
        self.inventory = Inventory(self.sessions, vm_ip_pool, KeyProvider.load_or_create(pki), host_networks)
        self.clusters = Clusters(self.sessions, self.inventory)
        self.images = ImageLibrary(self.sessions, self.inventory)
        self.scheduler = Scheduler(self.sessions, self.inventory, admission_enabled, self._policy_layers)
        self.drs = Drs(self.sessions, self.inventory, self.scheduler)
        self.maintenance = Maintenance(self.sessions, self.inventory, self.scheduler, self.drs.placement)
        self.certs = HostCertificates(self.inventory, CertificateAuthority.load_or_create(pki))
        self.inventory.agent_tls = AgentTls(self.sessions, self.certs.ca, pki)
        self.tokens = Tokens(self.sessions)
        self.onboarding = Onboarding(self.sessions, self.inventory, self.certs)
        self.audit = Audit(self.sessions)
        self.guest = GuestControl(self.inventory)
        self.domain = Domain(self.sessions, self.certs.ca, pki)
        self.cross = CrossMoves(self.sessions, self.inventory, self.domain)
        self.incoming = IncomingMoves(self.sessions, self.inventory, self.domain.my_name, self.domain.member_cas,
                                      self.domain.client)
        self.scheduler.cross_context = self.cross.context
        self.token_dir = token_dir or pki.parent
        self.refresh_parallel = refresh_parallel          # hosts the monitor refreshes at once
        # one controller of those sharing the database leads: it reconciles, then schedules and monitors
        self.leadership = Leadership(db_url, self.sessions, name or socket.gethostname(), advertised_url,
                                     on_elected=self.reconcile)
        self.leadership.run_while_leader("scheduler", self.scheduler.run)   # queued tasks survive a restart
        self.leadership.run_while_leader("host-monitor", self._monitor_hosts)
        self.leadership.run_while_leader("drs", self.drs.loop)            # DRS acts from the leader only
        self.leadership.on_step_down(self._abandon_requested_work)
        self.retention = TaskRetention(self.sessions)     # finished tasks pruned (controller.toml: task_retention_*)

    async def startup(self) -> None:
        made = self.tokens.bootstrap_admin(self.token_dir)
        if made:
            log.info("first start: the admin token is in %s (mode 0600)", made)
        await self.leadership.start()       # a lone controller (SQLite: always) leads before it serves

    async def shutdown(self) -> None:
        await self.leadership.stop()
        self.engine.dispose()

    def _abandon_requested_work(self) -> None:
        """No longer the leader: evacuations and image imports started here stop (the next leader's
        reconciliation ends their tasks)."""
        for task in [*self.maintenance.running.values(), *self.images.running_tasks()]:
            task.cancel()

    async def _monitor_hosts(self) -> None:
        last_reconcile = time.monotonic()
        while True:
            if time.monotonic() - last_reconcile >= RECONCILE_S:
                last_reconcile = time.monotonic()
                try:
                    await self.reconcile(("unknown",))
                    await self.incoming.reconcile()       # reservations for other controllers' moves
                except Exception:  # noqa: BLE001 - keep monitoring
                    log.exception("periodic reconciliation failed")
            await self.refresh_hosts()
            await self.retention.tick()                   # at most once a minute, in bounded batches
            await asyncio.sleep(REFRESH_S)

    async def refresh_hosts(self) -> None:
        """One round of the monitor: every host's facts asked for and stored (or the host marked disconnected),
        ``refresh_parallel`` hosts at a time: a silent host costs its deadline once, beside the others."""
        slots = asyncio.Semaphore(self.refresh_parallel)

        async def refresh(name: str) -> None:
            async with slots:
                try:
                    await self.inventory.refresh_host(name)
                except Exception:  # noqa: BLE001 - keep monitoring the other hosts
                    log.exception("refresh of %s failed", name)

        await asyncio.gather(*(refresh(name) for name in await asyncio.to_thread(self.inventory.host_names)))

    async def add_host(self, address: str, secret: str, name: str | None = None, replace: bool = True) -> HostOut:
        """Enrol or re-register a host; it gets its migration certificates if it has none."""
        host = await self.inventory.add_host(address, secret, name, replace)
        try:
            await self.certs.ensure(host.name)
        except KvmotionError as exc:
            log.warning("could not issue certificates to %s: %s", host.name, exc)
        return self.inventory.get_host(host.name)

    async def start_vm(self, ref: str) -> VMOut:
        vm = self.inventory.get_vm(ref)
        return await self.inventory.start_vm(ref, evc_mode=self.clusters.evc_for_host(vm.host))

    # -- migrations -------------------------------------------------------------------------
    async def _refresh_for(self, vm: str, req: MigrateRequest) -> None:
        for host in {self.inventory.get_vm(vm).host, *([req.host] if req.host else [])}:
            await self.inventory.refresh_host(self.inventory.get_host(host).name)

    async def validate_migration(self, vm: str, req: MigrateRequest) -> list[Finding]:
        return (await self.plan_migration(vm, req)).findings

    async def plan_migration(self, vm: str, req: MigrateRequest) -> MigratePlan:
        """Every finding of the move, its kind, the prediction and the encryption it would use; nothing held."""
        self._check_request(req)
        if req.controller:
            verdict, found = await self.cross.check(vm, req)
            return MigratePlan(kind=verdict.kind, source=self.inventory.get_vm(vm).host, findings=found,
                               destination=crossmove.destination_label(req), prediction=None,
                               encryption={"mode": "tls", "reason": "always TLS between controllers"})
        req, _ = policy.effective(req, *self._policy_layers(vm))    # the prediction uses the policy's budget
        await self._refresh_for(vm, req)
        reloc, ctx, findings = await compat.validate_move(self.inventory, self.sessions, vm, req)
        pred = None
        if kinds.kind(reloc.kind).moves_memory and not compat.blockers(findings):
            link = predict.link_mbps(ctx.source.facts, ctx.destination.facts)
            if req.max_bandwidth_mbps:
                link = min(link, float(req.max_bandwidth_mbps))
            pred = await compat.predict_move(self.inventory, self.sessions, ctx.spec, ctx.source.name,
                                             ctx.destination.name, req.downtime_ms, link=link)
            if pred is not None:
                findings.append(predict.finding_for(ctx.spec.name, pred))
        use_tls, why, _ = encryption_plan(ctx.spec.encrypted_vmotion, ctx.source.facts, ctx.destination.facts,
                                          any(d.encrypted for d in ctx.spec.disks))
        return MigratePlan(kind=str(reloc.kind), source=ctx.source.name, destination=reloc.host, findings=findings,
                           prediction=pred.as_dict() if pred else None,
                           encryption={"mode": "tls" if use_tls else "plain", "reason": why})

    async def migrate(self, vm: str, req: MigrateRequest) -> TaskOut:
        """Check at once (nothing is created on errors), then queue; admission control starts it.

        The kind follows from the request and the VM: vMotion, Storage vMotion, shared-nothing, or cold.
        """
        self._check_request(req)
        if req.controller:
            return await self._migrate_across(vm, req)
        await self._refresh_for(vm, req)
        reloc, ctx, findings = await compat.validate_move(self.inventory, self.sessions, vm, req)
        compat.raise_on_errors(ctx.spec.name, reloc.host, findings)
        return await self.scheduler.submit(ctx.spec, ctx.source.name, req, compat.findings_json(findings),
                                           kind=reloc.kind, destination=reloc.host)   # the policy is filled in there

    async def _migrate_across(self, vm: str, req: MigrateRequest) -> TaskOut:
        """To a host of another controller of the domain: both checkers first (nothing is held), then queued."""
        verdict, findings = await self.cross.check(vm, req)
        spec = self.inventory.spec(vm)
        compat.raise_on_errors(spec.name, crossmove.destination_label(req), findings)
        return await self.scheduler.submit(spec, self.inventory.get_vm(vm).host, req, compat.findings_json(findings),
                                           kind=verdict.kind, destination=crossmove.destination_label(req),
                                           extra={"remote_link_mbps": crossmove.link_mbps(verdict.facts)})

    def _policy_layers(self, vm: str) -> tuple[dict[str, Any], dict[str, Any]]:
        out = self.inventory.get_vm(vm)
        return self.clusters.policy_for_host(out.host), out.migration_policy



    @staticmethod
    def _check_request(req: MigrateRequest) -> None:
        if not (req.host or req.datastore or req.disks or req.disk_format):
            raise InvalidInputError("a migration needs a destination", remedy="pass --host HOST and/or --datastore DS "
                                    "(or --disk N=DS, --disk-format FMT)")

    def cancel(self, task_id: str) -> TaskOut:
        return self.scheduler.cancel(task_id)

    async def cancel_any(self, task_id: str) -> TaskOut:
        """A task of this controller, or (an incoming one) the move it belongs to, asked of its source controller."""
        task = task_store.get_task(self.sessions, task_id)
        if task.kind == TaskKind.INCOMING:
            await self.incoming.cancel(task)
            return task_store.get_task(self.sessions, task.id)
        return self.scheduler.cancel(task.id)

    def outgoing(self, peer: Peer, task_id: str) -> TaskOut:
        """This controller's move to ``peer`` (any other task is none of its business)."""
        task = task_store.get_task(self.sessions, task_id)
        if task.id != task_id or task.options.get("controller") != peer.name:
            raise ForbiddenError(f"task {task_id[:8]} is no move to controller {peer.name}", remedy="nothing to do")
        return task

    def cancel_outgoing(self, peer: Peer, task_id: str) -> TaskOut:
        """The destination controller's admin cancelled the move there: the same as a cancel here."""
        return self.scheduler.cancel(self.outgoing(peer, task_id).id)

    async def reconcile(self, states: tuple[str, ...] = ("running", "unknown")) -> list[dict[str, Any]]:
        """Finish what the journal says was in flight, by what the hosts really run (``migration.recover.decide``, one reconciler per kind).

        At start-up every unfinished move; afterwards, periodically, the ``unknown`` ones (a host did not
        answer): they stay unknown, and nothing destructive happens, until both hosts answer.
        """
        outcomes = []
        for state in states:
            for t in task_store.unfinished(self.sessions, state):
                try:
                    outcomes.append(await self.cross.reconcile(t) if t.options.get("controller")
                                    else await registry.reconcile(recovery(self.scheduler.view, t)))
                except KvmotionError as exc:
                    log.warning("reconciling task %s: %s", t.id, exc)
                    outcomes.append({"task": t.id, "error": exc.message})
        if "running" not in states:
            return outcomes
        for t in task_store.unfinished(self.sessions, kind=TaskKind.MAINTENANCE):
            TaskJournal(self.sessions, t.id).finish("error", error={
                "code": "CONTROLLER_RESTARTED", "phase": t.phase, "remedy": "enter maintenance mode again",
                "message": f"the controller restarted while evacuating {t.source}; the host stays in service"})
            self.inventory.set_maintenance(t.source, 0)
        self.images.abandon_unfinished()
        return outcomes

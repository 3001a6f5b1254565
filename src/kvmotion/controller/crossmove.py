"""The source controller's side of a cross-controller move (docs/cross-controller.md).

The move runs on the same engine as any vMotion (``migration.live``): only what it is injected with differs.
Its destination host is a ``PeerHostClient`` (the destination controller relays each call to its own agent,
for that VM only), and its inventory view is a ``CrossView``: the destination host's facts and address come
from the destination controller's verdict, its precheck reserves the place there, and the owner changes in two
phases (the destination commits, then this inventory lets the VM go).
"""
from __future__ import annotations

import asyncio
import uuid as uuidlib
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from kvmotion.checks import HostView, MigrationContext, run_all
from kvmotion.common.errors import ConflictError, ErrorCode, InvalidInputError, KvmotionError
from kvmotion.controller import compat
from kvmotion.controller.domain import Domain
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.moveview import ControllerView
from kvmotion.controller.peerhost import PeerHostClient
from kvmotion.controller.pki import client_identity
from kvmotion.controller.tasks import TaskJournal
from kvmotion.migration import kinds
from kvmotion.migration.engine import MoveContext
from kvmotion.migration.recover import Recovery, reconcile_live
from kvmotion.migration.relocate import DiskMove, Relocation
from kvmotion.models.agent import HostFacts, VMSpec
from kvmotion.models.api import MigrateRequest, TaskOut
from kvmotion.models.crossmove import CrossOffer, CrossVerdict, IncomingOut
from kvmotion.models.findings import Finding

VALIDATE_DEADLINE_S = 60.0       # the destination refreshes its host's facts first


def destination_label(req: MigrateRequest) -> str:
    """The task's destination: HOST@CONTROLLER."""
    return f"{req.host}@{req.controller}"


def link_mbps(facts: HostFacts) -> int:
    """The destination host's fastest migration link, as its controller reported it (admission shares it)."""
    return max((i.speed_mbps or 0 for i in facts.migration_interfaces if i.enabled), default=0) or 1000


def check_request(req: MigrateRequest) -> None:
    if not req.host:
        raise InvalidInputError("a cross-controller move needs the destination host", remedy="add --host HOST (a "
                                "host of that controller)")
    if req.networks and not req.controller:
        raise InvalidInputError("--network maps port groups of a cross-controller move only",
                                remedy="add --controller NAME, or leave --network out")


class CrossMoves:
    """Validate, reserve, commit and abort against the destination controller; the service and the engine's
    ``CrossView`` share them."""

    def __init__(self, sessions: sessionmaker[Session], inv: Inventory, domain: Domain) -> None:
        self.sessions, self.inv, self.domain = sessions, inv, domain

    async def offer(self, vm_ref: str, req: MigrateRequest, move_id: str, with_keys: bool = False) -> CrossOffer:
        """What the destination controller judges; ``with_keys`` (the reservation): the encrypted disks' keys."""
        vm = self.inv.owned_vm(vm_ref)
        if vm.power_state != "poweredOn":
            raise ConflictError(f"VM {vm.name} is {vm.power_state}; a move to another controller is live",
                                remedy=f"start it first (kvmotion vm start {vm.name})")
        spec = VMSpec.model_validate(vm.spec)
        try:
            await self.inv.refresh_host(vm.host)
        except KvmotionError:
            pass                      # its last facts; the checks say if the host is not connected
        features = await compat.vm_cpu_features(self.inv, vm.host, spec)
        try:
            measured = await self.inv.agent(vm.host).measure(
                spec, {d.id: req.disk_format or d.format for d in spec.disks if d.kind == "file"}, preallocate=False)
        except KvmotionError:
            measured = {}             # the specs' sizes: the worst case
        facts = self.inv.host_facts(vm.host)
        if facts is None:
            raise ConflictError(f"host {vm.host} has not reported its facts yet", remedy="retry in a few seconds")
        return CrossOffer(move_id=move_id, spec=spec, power_state=vm.power_state, source_host=vm.host,
                          source_facts=facts, source_identity=client_identity(vm.host),
                          vm_cpu_features=sorted(features) if features is not None else None, host=str(req.host),
                          datastore=req.datastore, disks=req.disks, disk_format=req.disk_format,
                          networks=req.networks, measured_mb=measured,
                          disk_keys=self.inv.disk_keys(spec) if with_keys else {})

    async def check(self, vm_ref: str, req: MigrateRequest, move_id: str | None = None,
                    reserve: bool = False) -> tuple[CrossVerdict, list[Finding]]:
        """Both sides' findings at once, each marked with its side (the destination's first)."""
        check_request(req)
        client = self.domain.client(str(req.controller))      # refused unless a member of this domain
        offer = await self.offer(vm_ref, req, move_id or str(uuidlib.uuid4()), with_keys=reserve)
        verdict = await client.call("POST", "/peer/moves" if reserve else "/peer/moves/validate", CrossVerdict,
                                    offer, deadline_s=VALIDATE_DEADLINE_S)
        return verdict, verdict.findings + self._source_findings(offer, verdict)

    def _source_findings(self, offer: CrossOffer, verdict: CrossVerdict) -> list[Finding]:
        """This side's checker, on what it knows better: the VM and its host (the destination's findings
        already say everything about the destination)."""
        src = self.inv.get_host(offer.source_host)
        per_host, per_ds, migrating = compat.in_flight(self.inv, self.sessions, offer.spec.uuid,
                                                       exclude_task=offer.move_id)
        ctx = MigrationContext(spec=offer.spec, power_state=offer.power_state,
                               source=compat.host_view(self.inv, src, per_host.get(src.name, 0)),
                               destination=HostView(verdict.host, "connected", False, verdict.facts),
                               vm_migrating=migrating, datastore_migrations=per_ds,
                               datastore_limit=compat.datastore_limit(), kind=verdict.kind)
        theirs = {f.code for f in verdict.findings}
        mine = {f"vm:{offer.spec.name}", f"host:{src.name}"}
        return [f.model_copy(update={"side": "source"}) for f in run_all(ctx)
                if f.subject in mine and f.code not in theirs]

    async def trust_peers(self, host: str) -> None:
        """The source host trusts the domain's CAs for this move's stream (the destination's host does the
        same on its side when it prepares)."""
        await self.inv.agent(host).tls_peer_cas(self.domain.member_cas())

    async def commit(self, controller: str, move_id: str) -> IncomingOut:
        return await self.domain.client(controller).call("POST", f"/peer/moves/{move_id}/commit", IncomingOut)

    async def abort(self, controller: str, move_id: str) -> IncomingOut | None:
        """Release the place held there; None: it holds nothing for this move (never reserved)."""
        try:
            return await self.domain.client(controller).call("POST", f"/peer/moves/{move_id}/abort", IncomingOut)
        except KvmotionError as exc:
            if exc.code == ErrorCode.NOT_FOUND:
                return None
            raise


    def request_of(self, t: TaskOut) -> MigrateRequest:
        return MigrateRequest.model_validate({k: v for k, v in t.options.items() if k in MigrateRequest.model_fields})

    def _ends(self, t: TaskOut) -> tuple[CrossView, PeerHostClient]:
        req = self.request_of(t)
        view = CrossView(self.inv, self.sessions, self, req, t.id)
        return view, PeerHostClient(self.domain.client(view.controller), t.id, view.host)

    def context(self, t: TaskOut, spec: VMSpec, req: MigrateRequest, bandwidth_mbps: int) -> MoveContext:
        """The engine's context of a cross-controller task (the scheduler launches it like any move)."""
        view, dst = self._ends(t)
        return MoveContext(kind=kinds.kind(t.kind), journal=TaskJournal(self.sessions, t.id), inventory=view,
                           src=self.inv.agent(t.source), dst=dst, spec=spec, source=t.source, destination=view.host,
                           req=req, bandwidth_mbps=bandwidth_mbps, cross=True)

    async def reconcile(self, t: TaskOut) -> dict[str, Any]:
        """What both hosts run decides (``migration.recover``), as for any vMotion; the destination host is seen
        through its controller (unreachable: the task stays unknown). Rolled back: the place there is released."""
        view, dst = self._ends(t)
        journal = TaskJournal(self.sessions, t.id)
        out = await reconcile_live(Recovery(task=t, journal=journal, inv=view, src=self.inv.agent(t.source), dst=dst))
        if (await asyncio.to_thread(journal.read)).state == "error":
            try:
                out["reservation"] = await view.release()
            except KvmotionError as exc:
                out["reservation_error"] = exc.message
        return out


class CrossView(ControllerView):
    """The engine's inventory view for one cross-controller move (``migration.ports.InventoryView``)."""

    def __init__(self, inv: Inventory, sessions: sessionmaker[Session], moves: CrossMoves, req: MigrateRequest,
                 move_id: str) -> None:
        super().__init__(inv, sessions)
        self.moves, self.req, self.move_id = moves, req, move_id
        self.controller, self.host = str(req.controller), str(req.host)
        self.verdict: CrossVerdict | None = None

    def _is_dst(self, host: str | None) -> bool:
        return host in (self.host, destination_label(self.req))

    def host_facts(self, host: str) -> Any:
        if self._is_dst(host):
            return self.verdict.facts if self.verdict is not None else None
        return super().host_facts(host)

    def migration_address(self, host: str) -> str:
        if self._is_dst(host):
            if self.verdict is None or not self.verdict.migration_address:
                raise ConflictError(f"host {host} of {self.controller} has no migration address",
                                    remedy=f"configure its migration interface on {self.controller}")
            return self.verdict.migration_address
        return super().migration_address(host)

    def disk_keys(self, spec: VMSpec) -> dict[str, str]:
        return {}          # the destination controller has the keys since the reservation, under its own master key

    async def precheck(self, uuid: str, req: MigrateRequest, task_id: str) -> tuple[Relocation, list[Finding]]:
        """Both sides checked again, and the place reserved on the destination controller."""
        verdict, findings = await self.moves.check(uuid, req, task_id, reserve=True)
        self.verdict = verdict
        vm = self.inv.get_vm(uuid)
        before = VMSpec.model_validate(vm.spec)
        after = {d.id: d for d in verdict.target.disks}
        moves = [DiskMove(d.id, d, after[d.id]) for d in before.disks if d.id in verdict.moved_disks]
        reloc = Relocation(kind=verdict.kind, source_host=vm.host, host=self.host, before=before,
                           after=verdict.target, moves=moves)
        # a blocker of this side after the reservation: the task's rollback releases it (CrossLiveMove)
        compat.raise_on_errors(before.name, f"{self.host} of {self.controller}", findings)
        await self.moves.trust_peers(vm.host)
        return reloc, findings

    async def release(self) -> dict[str, Any]:
        out = await self.moves.abort(self.controller, self.move_id)
        return {"released": out is not None and out.state == "aborted", "held": out is not None}

    def set_owner(self, uuid: str, spec: VMSpec | None, host: str | None = None) -> None:
        """Owner last, in two phases: the destination controller commits (the VM runs there), then this inventory
        lets the VM go. Runs in a worker thread (the engine's ``to_thread``): the commit gets its own loop."""
        if not self._is_dst(host):
            super().set_owner(uuid, spec, host)
            return
        asyncio.run(self.moves.commit(self.controller, self.move_id))
        self.inv.forget_vm(uuid)

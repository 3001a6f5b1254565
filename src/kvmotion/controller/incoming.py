"""The destination controller's side of a cross-controller move (docs/cross-controller.md).

Another controller of the domain asks (``/api/v1/peer/moves…``, authenticated by its pinned client certificate):
- ``judge``: its VM, checked against one of this controller's hosts by this controller's own checker; with
  ``reserve`` and no blocker, a place is held: an ``incoming`` task (the source's task id) and the VM in this
  inventory as ``incoming`` (same UUID), which no power, device or migration operation here accepts;
- ``host_call``: the few calls a move makes on the destination host's agent, for that VM only, with what this
  controller decides itself (the VM's spec, the peer host's TLS identity, the listening address);
- ``commit``: switchover confirmed (the VM runs here) → the VM becomes this controller's;
- ``abort``: the move failed before that → the shadow and the reservation go (refused once the VM runs here).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.checks import HostView, MigrationContext, blockers, cross, run_all
from kvmotion.common.errors import ConflictError, ForbiddenError, InvalidInputError, KvmotionError, NotFoundError
from kvmotion.controller import compat
from kvmotion.controller import tasks as task_store
from kvmotion.controller.auth import Peer
from kvmotion.controller.db import VM, Task
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.peerclient import PeerClient
from kvmotion.controller.tasks import TaskJournal
from kvmotion.migration import relocate
from kvmotion.migration.engine import crash_point
from kvmotion.models.agent import VMSpec
from kvmotion.models.api import TaskOut
from kvmotion.models.crossmove import CrossOffer, CrossVerdict, IncomingOut, IncomingState, PeerHostCall
from kvmotion.models.guest import CLOCK_STEP_MS
from kvmotion.models.health import HealthCheckRequest
from kvmotion.models.moves import TaskKind
from kvmotion.models.nbd import NbdPsk

log = logging.getLogger(__name__)

INCOMING = "incoming"          # the power state of a VM held for a move from another controller
STATE_OF_TASK = {"running": IncomingState.RESERVED, "success": IncomingState.COMMITTED, "error": IncomingState.ABORTED}
# what the source may still call once the VM is this controller's (its guest check, its clock, its status)
STALE_S = 60.0                 # a reservation untouched this long is checked against its source controller
AFTER_COMMIT = frozenset({"status", "locks", "migration", "health_check", "guest_clock_sync", "announce"})


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


class IncomingMoves:
    def __init__(self, sessions: sessionmaker[Session], inv: Inventory, me: Callable[[], str],
                 peer_cas: Callable[[], dict[str, str]], peers: Callable[[str], PeerClient]) -> None:
        self.sessions, self.inv, self.me, self.peer_cas, self.peers = sessions, inv, me, peer_cas, peers

    # -- judge and reserve -------------------------------------------------------------------------------------
    async def judge(self, peer: Peer, offer: CrossOffer, reserve: bool) -> CrossVerdict:
        held = self._find(offer.move_id)
        if held is not None:
            self._check_peer(peer, held)
            if reserve and STATE_OF_TASK.get(held.state) == IncomingState.RESERVED:
                return CrossVerdict.model_validate(held.options["verdict"])      # asked again: the same answer
        host = self.inv.get_host(offer.host)
        try:
            await self.inv.refresh_host(host.name)
        except KvmotionError as exc:
            log.info("refresh of %s for an incoming move: %s", host.name, exc.message)
        host = self.inv.get_host(host.name)
        facts = self.inv.host_facts(host.name)
        if facts is None:
            raise ConflictError(f"host {host.name} has not reported its facts yet", remedy="retry in a few seconds")
        spec = cross.remap(offer.spec, offer.networks)
        readable = {d.name for d in facts.datastores if d.readable}
        reloc = relocate.plan(spec, offer.power_state, offer.source_host, host.name, offer.datastore, offer.disks,
                              offer.disk_format, readable)
        per_host, per_ds, _ = compat.in_flight(self.inv, self.sessions, spec.uuid, exclude_task=offer.move_id)
        src_facts = cross.remap_facts(offer.source_facts, offer.networks)
        features = frozenset(offer.vm_cpu_features) if offer.vm_cpu_features is not None else None
        ctx = MigrationContext(spec=spec, power_state=offer.power_state,
                               source=HostView(offer.source_host, "connected", False, src_facts),
                               destination=compat.host_view(self.inv, host, per_host.get(host.name, 0)),
                               vm_cpu_features=features, datastore_migrations=per_ds,
                               datastore_limit=compat.datastore_limit(), kind=reloc.kind, target_spec=reloc.after,
                               required_mb=relocate.required_mb(reloc, offer.measured_mb), moved_disks=reloc.moved_ids)
        found = run_all(ctx) + cross.run(spec, offer.source_host, offer.networks, self._known(offer.move_id),
                                         src_facts, facts, set(offer.disk_keys) if reserve else None)
        verdict = CrossVerdict(controller=self.me(), findings=[f.model_copy(update={"side": "destination"})
                                                               for f in found],
                               kind=reloc.kind, host=host.name, target=reloc.after, facts=facts,
                               moved_disks=list(reloc.moved_ids), home_moves=reloc.home_moves,
                               migration_address=self._address(host.name))
        if reserve and not blockers(verdict.findings):
            verdict.reserved = True
            verdict.target = self._rewrap(verdict.target, offer.disk_keys)
            self._reserve(peer, offer, verdict)
        return verdict

    def _known(self, move_id: str) -> cross.Known:
        """This inventory, without the VM this very move holds (asked again after a lost answer)."""
        with self.sessions() as s:
            held = s.get(Task, move_id)
            skip = held.vm_uuid if held is not None else None
            rows = [v for v in s.scalars(select(VM)).all() if v.uuid != skip]
        macs = {}
        for v in rows:
            for nic in json.loads(v.spec_json).get("nics", []):
                macs[str(nic.get("mac", "")).lower()] = v.name
        names = frozenset(h.name for h in self.inv.list_hosts())
        return cross.Known(frozenset(v.uuid for v in rows), frozenset(v.name for v in rows), macs, names)

    def _address(self, host: str) -> str | None:
        facts = self.inv.host_facts(host)
        return next((i.address for i in (facts.migration_interfaces if facts else []) if i.enabled and i.address),
                    None)

    def _rewrap(self, target: VMSpec, keys: dict[str, str]) -> VMSpec:
        """The encrypted disks' keys under this controller's master key (the source's wrapping means nothing here)."""
        if not any(d.encrypted for d in target.disks):
            return target
        if self.inv.keys is None:
            raise ConflictError("this controller has no key provider for encrypted disks",
                                remedy="start it with its pki folder (the master key lives there)")
        disks = [d.model_copy(update={"key_wrapped": self.inv.keys.wrap(keys[d.node], f"{target.uuid}/{d.node}")})
                 if d.encrypted else d for d in target.disks]
        return target.model_copy(update={"disks": disks})

    def _reserve(self, peer: Peer, offer: CrossOffer, verdict: CrossVerdict) -> None:
        now = time.time()
        options = {"source_controller": peer.name, "source_host": offer.source_host,
                   "source_identity": offer.source_identity, "moved": list(verdict.moved_disks),
                   "verdict": verdict.model_dump(mode="json")}
        spec = verdict.target
        with self.sessions.begin() as s:
            if s.get(VM, spec.uuid) is not None or s.scalars(select(VM).where(VM.name == spec.name)).first():
                raise ConflictError(f"VM {spec.name} is already in this inventory", remedy="nothing to do")
            s.add(Task(id=offer.move_id, kind=str(TaskKind.INCOMING), vm_uuid=spec.uuid, vm_name=spec.name,
                       source=f"{peer.name}:{offer.source_host}"[:64], destination=verdict.host, state="running",
                       phase="", options_json=json.dumps(options), created_at=now, updated_at=now, started_at=now))
            s.add(VM(uuid=spec.uuid, name=spec.name, host=verdict.host, power_state=INCOMING,
                     spec_json=spec.model_dump_json(), created_at=now, updated_at=now))
        TaskJournal(self.sessions, offer.move_id).begin_phase("reserved", 0, detail={
            "from": f"{peer.name}:{offer.source_host}", "kind": str(verdict.kind)})
        crash_point("incoming.reserved")         # held, and the source never heard so
        log.info("holding %s for a move from %s (%s)", spec.name, peer.name, offer.move_id)

    # -- the move's calls on the destination host ---------------------------------------------------------------
    async def host_call(self, peer: Peer, move_id: str, call: PeerHostCall) -> Any:
        t = self._get(peer, move_id)
        state = STATE_OF_TASK.get(t.state, IncomingState.ABORTED)
        if state == IncomingState.ABORTED or (state == IncomingState.COMMITTED and call.op not in AFTER_COMMIT):
            raise ConflictError(f"the move {move_id[:8]} of {t.vm_name} is {state}: {call.op} is not taken",
                                remedy="nothing to do")
        target = VMSpec.model_validate(t.options["verdict"]["target"])
        if call.op in ("prepare_incoming", "resume"):
            await self._phase(t, "shadow" if call.op == "prepare_incoming" else "resume", call.op)
        try:
            return _dump(await self._dispatch(t, target, call))
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"{call.op}: bad arguments ({type(exc).__name__})",
                                    remedy="run the same kvmotion version on both controllers") from exc

    async def _dispatch(self, t: Any, target: VMSpec, call: PeerHostCall) -> Any:
        agent, uuid, a = self.inv.agent(t.destination), target.uuid, call.args
        if call.op == "status":
            return await agent.status(uuid)
        if call.op == "prepare_incoming":
            return await self._prepare(t, agent, target, a)
        if call.op == "abort_incoming":
            return await agent.abort_incoming(uuid)
        if call.op == "resume":
            return await agent.resume(uuid, announce=bool(a.get("announce")))
        if call.op == "announce":
            return await agent.announce(uuid)
        if call.op == "take_lease":
            return await agent.take_lease(uuid, t.options["source_host"])
        if call.op == "locks":
            return await agent.locks(uuid)
        if call.op == "put_home":
            return await agent.put_home(target, {str(k): str(v) for k, v in dict(a["files"]).items()})
        if call.op == "remove_files":
            ids = [str(d) for d in a.get("disk_ids", [])]
            if not set(ids) <= set(t.options.get("moved") or []):
                raise ForbiddenError("only the disks this move created may be removed", remedy="nothing to do")
            return await agent.remove_files(target, ids, home=bool(a.get("home")))
        if call.op == "migration":
            return await agent.migration(uuid, float(a.get("wait_s", 0.0)), a.get("since"))
        if call.op == "health_check":
            return await agent.health_check(uuid, HealthCheckRequest.model_validate(a))
        return await agent.guest_clock_sync(uuid, float(a.get("deadline_s", 2.0)),
                                            float(a.get("set_allowance_s", 3.0)), float(a.get("step_ms", CLOCK_STEP_MS)))

    async def _prepare(self, t: Any, agent: Any, target: VMSpec, a: dict[str, Any]) -> Any:
        address = self._address(t.destination)
        if a.get("listen_address") != address:
            raise ForbiddenError(f"the destination host listens on its migration address {address}, not "
                                 f"{a.get('listen_address')}", remedy="use the address the verdict gave")
        new = [str(d) for d in a.get("new_disks") or []]
        if not set(new) <= {d.id for d in target.disks}:
            raise InvalidInputError("new_disks names disks the VM does not have", remedy="internal error")
        psk = NbdPsk.model_validate(a["nbd_psk"]) if a.get("nbd_psk") else None
        await agent.tls_peer_cas(self.peer_cas())     # the source host's certificate: its controller's CA
        return await agent.prepare_incoming(target, address, t.options["source_identity"], self.inv.disk_keys(target),
                                            new or None,
                                            int(a.get("multifd_channels", 0)), False, psk)

    async def _phase(self, t: Any, name: str, op: str) -> None:
        if t.phase != name:
            journal = TaskJournal(self.sessions, t.id)
            await asyncio.to_thread(journal.end_phase, "ok")
            await asyncio.to_thread(journal.begin_phase, name, 50 if name == "shadow" else 90, None, {"call": op})

    # -- the end: commit or abort --------------------------------------------------------------------------------
    async def commit(self, peer: Peer, move_id: str) -> IncomingOut:
        """The source saw the switchover through: the VM (running here) becomes this controller's."""
        t = self._get(peer, move_id)
        state = STATE_OF_TASK.get(t.state)
        if state == IncomingState.ABORTED:
            raise ConflictError(f"the move {move_id[:8]} of {t.vm_name} was aborted here", remedy="nothing to do")
        if state == IncomingState.RESERVED:
            rt = await self.inv.agent(t.destination).status(t.vm_uuid)
            if rt.qemu_status != "running":
                raise ConflictError(f"{t.vm_name} does not run on {t.destination} ({rt.qemu_status}); it stays the "
                                    "source controller's", remedy="abort the move, or let reconciliation decide")
            crash_point("incoming.commit")       # the VM runs here, and is not this controller's yet
            with self.sessions.begin() as s:
                s.get(VM, t.vm_uuid).power_state = "poweredOn"          # type: ignore[union-attr]
            journal = TaskJournal(self.sessions, t.id)
            journal.end_phase("ok")
            journal.begin_phase("commit", 99, None, {"by": peer.name})
            journal.finish("success", {"committed_at": time.time(), "from": t.source})
            log.info("%s is this controller's now (moved from %s)", t.vm_name, t.source)
        return await self.status(peer, move_id)

    async def abort(self, peer: Peer, move_id: str, why: str = "") -> IncomingOut:
        """The move failed before its switchover: the shadow and the reservation go. Refused if the VM runs here."""
        t = self._get(peer, move_id)
        state = STATE_OF_TASK.get(t.state)
        if state == IncomingState.COMMITTED:
            raise ConflictError(f"{t.vm_name} is this controller's since the move {move_id[:8]} committed",
                                remedy="nothing to undo")
        if state == IncomingState.RESERVED:
            agent = self.inv.agent(t.destination)
            try:
                rt = await agent.status(t.vm_uuid)
            except NotFoundError:
                rt = None
            if rt is not None and rt.qemu_status == "running":
                raise ConflictError(f"{t.vm_name} runs on {t.destination}: the move cannot be aborted",
                                    remedy="commit it (reconciliation does)")
            if rt is not None:
                await agent.abort_incoming(t.vm_uuid)
            self._release(t, peer.name, why)
        return await self.status(peer, move_id)

    def _release(self, t: Any, by: str, why: str) -> None:
        with self.sessions.begin() as s:
            s.execute(delete(VM).where(VM.uuid == t.vm_uuid, VM.power_state == INCOMING))
        TaskJournal(self.sessions, t.id).finish("error", error={
            "code": "ABORTED", "phase": t.phase, "message": f"the move was aborted by {by}" + (f": {why}" if why else ""),
            "remedy": "nothing to do; the VM stays on its controller"})

    async def cancel(self, t: Any) -> None:
        """This controller's admin cancels an incoming move: the source controller runs it, so it is asked there
        (its engine rolls back before the switchover, then releases the reservation here)."""
        if STATE_OF_TASK.get(t.state) != IncomingState.RESERVED:
            raise ConflictError(f"the incoming move of {t.vm_name} is {STATE_OF_TASK.get(t.state)}",
                                remedy="nothing to cancel")
        source = t.options["source_controller"]
        await self.peers(source).call("POST", f"/peer/moves/{t.id}/cancel", TaskOut)

    async def reconcile(self, now: float | None = None) -> list[dict[str, Any]]:
        """Reservations nobody has touched for ``STALE_S``: the source controller's task says how the move ended
        (it may have failed to reach this controller, or died). Ended in error (or unknown there): released,
        unless the VM runs here; ended in success: committed, if it runs here. Unreachable: kept, asked again."""
        now = now or time.time()
        out = []
        for t in task_store.unfinished(self.sessions, "running", kind=str(TaskKind.INCOMING)):
            if now - t.updated_at < STALE_S:
                continue
            peer = Peer(t.options["source_controller"], "member")
            try:
                theirs: TaskOut | None = await self.peers(peer.name).call("GET", f"/peer/moves/{t.id}/outgoing",
                                                                          TaskOut)
            except NotFoundError:
                theirs = None
            except KvmotionError as exc:
                out.append({"task": t.id, "kept": exc.message})
                continue
            if theirs is not None and theirs.state not in ("success", "error"):
                continue                     # still running (or unknown) there: the source decides
            try:
                done = await (self.commit(peer, t.id) if theirs is not None and theirs.state == "success"
                              else self.abort(peer, t.id, "its source controller ended the move"))
                out.append({"task": t.id, "state": str(done.state)})
            except KvmotionError as exc:
                out.append({"task": t.id, "kept": exc.message})
        return out

    async def status(self, peer: Peer, move_id: str) -> IncomingOut:
        t = self._get(peer, move_id)
        try:
            qemu: str | None = (await self.inv.agent(t.destination).status(t.vm_uuid)).qemu_status
        except KvmotionError:
            qemu = None
        return IncomingOut(move_id=t.id, vm_uuid=t.vm_uuid, vm_name=t.vm_name, host=t.destination,
                           source_controller=t.options["source_controller"],
                           state=STATE_OF_TASK.get(t.state, IncomingState.RESERVED), qemu_status=qemu)

    # -- lookups ---------------------------------------------------------------------------------------------
    def _find(self, move_id: str) -> Any:
        try:
            t = task_store.get_task(self.sessions, move_id)
        except NotFoundError:
            return None
        return t if t.id == move_id and t.kind == TaskKind.INCOMING else None

    def _get(self, peer: Peer, move_id: str) -> Any:
        t = self._find(move_id)
        if t is None:
            raise NotFoundError(f"no incoming move {move_id}", remedy="reserve it first")
        self._check_peer(peer, t)
        return t

    @staticmethod
    def _check_peer(peer: Peer, t: Any) -> None:
        if t.options.get("source_controller") != peer.name:
            raise ForbiddenError(f"the move {t.id[:8]} belongs to another controller", remedy="nothing to do")

"""Gathers live facts for the compatibility checks (I/O here; the checks themselves are pure)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.checks import HostView, MigrationContext, run_all
from kvmotion.checks.context import DATASTORE_LIMIT
from kvmotion.checks.rules import encryption_plan
from kvmotion.models.findings import Finding, blockers
from kvmotion.common.errors import KvmotionError, PrecheckFailed
from kvmotion.models.agent import HOST_PASSTHROUGH, HostFacts, VMSpec
from kvmotion.migration import predict, relocate
from kvmotion.controller import tasks as task_store
from kvmotion.migration.relocate import Relocation
from kvmotion.models.api import MigrateRequest
from kvmotion.models.moves import MoveKind, TaskKind
from kvmotion.controller.db import Host
from kvmotion.controller.inventory import Inventory
from kvmotion.models.api import HostOut

log = logging.getLogger(__name__)


def datastore_limit() -> int:
    return int(os.environ.get("KVMOTION_DATASTORE_MIGRATION_LIMIT", DATASTORE_LIMIT))


def host_view(inv: Inventory, host: HostOut, running: int) -> HostView:
    return HostView(name=host.name, state=host.state, maintenance=bool(host.maintenance),
                    facts=inv.host_facts(host.name), running_migrations=running)


CpuKey = tuple[str, str, tuple[str, ...]]     # source host, CPU model, mask: every input of one cpu_expand call


async def vm_cpu_features(inv: Inventory, host: str, spec: VMSpec,
                          memo: dict[CpuKey, frozenset[str]] | None = None) -> frozenset[str] | None:
    """What the VM's CPU shows the guest, expanded by the source host's QEMU.

    ``memo`` (one planning's, read with its fleet) keeps each answer by host, model and mask: VMs alike on one host
    ask once. A failed call is not kept (the next VM asks again, as it would without it)."""
    if spec.cpu_model == HOST_PASSTHROUGH:
        return None
    key = (host, spec.cpu_model, tuple(spec.cpu_mask))
    if memo is not None and key in memo:
        return memo[key]
    try:
        features = frozenset(await inv.agent(host).cpu_expand(spec.cpu_model, spec.cpu_mask))
    except KvmotionError:
        return None
    if memo is not None:
        memo[key] = features
    return features


def in_flight(inv: Inventory, sessions: sessionmaker[Session], vm_uuid: str,
              exclude_task: str | None = None) -> tuple[dict[str, int], dict[str, int], bool]:
    """Moves in flight per host and per datastore (incoming ones from other controllers too), and whether the
    VM itself has one."""
    per_host: dict[str, int] = {}
    per_ds: dict[str, int] = {}
    migrating = False
    for t in task_store.unfinished(sessions, kind=(*task_store.MIGRATION_KINDS, str(TaskKind.INCOMING))):
        if t.id == exclude_task:
            continue
        if t.vm_uuid == vm_uuid:
            migrating = True
            continue
        for h in {t.source, t.destination}:
            per_host[h] = per_host.get(h, 0) + 1
        try:
            other = VMSpec.model_validate(inv.get_vm(t.vm_uuid).spec)
            for ds in {other.boot_datastore} | {d.datastore for d in other.disks if d.kind == "file"}:
                per_ds[ds] = per_ds.get(ds, 0) + 1
        except KvmotionError:
            pass
    return per_host, per_ds, migrating


async def gather(inv: Inventory, sessions: sessionmaker[Session], vm_ref: str, dst_name: str,
                 exclude_task: str | None = None,
                 reloc: Relocation | None = None, required: dict[str, int] | None = None) -> MigrationContext:
    vm = inv.get_vm(vm_ref)
    dst = inv.get_host(dst_name)
    src = inv.get_host(vm.host)
    spec = VMSpec.model_validate(vm.spec)
    per_host, per_ds, migrating = in_flight(inv, sessions, spec.uuid, exclude_task)
    return MigrationContext(
        spec=spec, power_state=vm.power_state, source=host_view(inv, src, per_host.get(src.name, 0)),
        destination=host_view(inv, dst, per_host.get(dst.name, 0)),
        vm_cpu_features=await vm_cpu_features(inv, src.name, spec), vm_migrating=migrating,
        datastore_migrations=per_ds,
        datastore_limit=datastore_limit(), kind=reloc.kind if reloc else MoveKind.VMOTION,
        target_spec=reloc.after if reloc else None, required_mb=required or {},
        moved_disks=reloc.moved_ids if reloc else ())


async def validate(inv: Inventory, sessions: sessionmaker[Session], vm_ref: str, dst_name: str,
                   exclude_task: str | None = None) -> tuple[MigrationContext, list[Finding]]:
    ctx = await gather(inv, sessions, vm_ref, dst_name, exclude_task=exclude_task)
    return ctx, run_all(ctx)


@dataclass(frozen=True)
class HostRow:
    """What the checks read of a host besides its facts."""
    name: str
    state: str
    maintenance: int


Destination = tuple[HostRow, HostFacts | None]     # a host and its facts, read once for many checks


def destinations(inv: Inventory) -> list[Destination]:
    """Every host with its facts parsed (by name, as ``Inventory.list_hosts``): one read of the inventory for
    checking many moves. Only the columns the checks read, and no ``HostOut`` built on the way."""
    with inv.sessions() as s:
        rows = s.execute(select(Host.name, Host.state, Host.maintenance, Host.facts_json).order_by(Host.name)).all()
    out: list[Destination] = []
    for name, state, maintenance, facts_json in rows:
        facts = json.loads(facts_json or "{}")
        out.append((HostRow(name, state, maintenance), HostFacts.model_validate(facts) if facts else None))
    return out


@dataclass(frozen=True)
class VmSide:
    """One VM's side of ``validate`` (the VM, its source host, its CPU, the moves in flight), read once; ``check``
    runs the pure checks against one destination."""
    spec: VMSpec
    power_state: str
    source: HostView
    features: frozenset[str] | None
    migrating: bool
    per_host: dict[str, int]
    per_ds: dict[str, int]
    limit: int

    def check(self, host: HostRow, facts: HostFacts | None) -> list[Finding]:
        return run_all(MigrationContext(
            spec=self.spec, power_state=self.power_state, source=self.source, vm_cpu_features=self.features,
            vm_migrating=self.migrating,
            destination=HostView(name=host.name, state=host.state, maintenance=bool(host.maintenance), facts=facts,
                                 running_migrations=self.per_host.get(host.name, 0)),
            datastore_migrations=self.per_ds, datastore_limit=self.limit))


async def vm_side(inv: Inventory, sessions: sessionmaker[Session], vm_ref: str,
                  cpu_memo: dict[CpuKey, frozenset[str]] | None = None,
                  hosts: dict[str, Destination] | None = None) -> VmSide:
    """The VM's side, read now; its source host (not its moves in flight) taken from ``hosts``, the fleet an
    evacuation read once, when there."""
    vm = inv.get_vm(vm_ref)
    spec = VMSpec.model_validate(vm.spec)
    per_host, per_ds, migrating = in_flight(inv, sessions, spec.uuid)
    running = per_host.get(vm.host, 0)
    if hosts is not None and vm.host in hosts:
        row, facts = hosts[vm.host]
        source = HostView(name=row.name, state=row.state, maintenance=bool(row.maintenance), facts=facts,
                          running_migrations=running)
    else:
        source = host_view(inv, inv.get_host(vm.host), running)
    features = await vm_cpu_features(inv, vm.host, spec, cpu_memo)
    return VmSide(spec, vm.power_state, source, features, migrating, per_host, per_ds, datastore_limit())


async def validate_many(inv: Inventory, sessions: sessionmaker[Session], vm_ref: str,
                        dests: list[Destination]) -> dict[str, list[Finding]]:
    """``validate`` of one VM against each of ``dests``: the VM, its source host, its CPU and the moves in flight
    read once, then only the (pure) checks per destination."""
    side = await vm_side(inv, sessions, vm_ref)
    return {h.name: side.check(h, facts) for h, facts in dests}


async def validate_move(inv: Inventory, sessions: sessionmaker[Session], vm_ref: str, req: MigrateRequest,
                        exclude_task: str | None = None) -> tuple[Relocation, MigrationContext, list[Finding]]:
    """Plan any kind of move (host, datastores, format; live or cold) and check it; nothing changes."""
    vm = inv.owned_vm(vm_ref)
    spec = VMSpec.model_validate(vm.spec)
    dst_name = inv.get_host(req.host).name if req.host else vm.host
    dst_facts = inv.host_facts(dst_name)
    readable = {d.name for d in dst_facts.datastores if d.readable} if dst_facts else set()
    reloc = relocate.plan(spec, vm.power_state, vm.host, dst_name, req.datastore, req.disks, req.disk_format, readable)
    required: dict[str, int] = {}
    if reloc.moves or reloc.home_moves:
        try:
            measured = await inv.agent(vm.host).measure(spec, {m.disk_id: m.target.format for m in reloc.moves},
                                                        preallocate=any(m.target.format == "raw" for m in reloc.moves))
            required = relocate.required_mb(reloc, measured)
        except KvmotionError:
            required = relocate.required_mb(reloc, {})     # sizes from the specs: the worst case
    ctx = await gather(inv, sessions, vm.uuid, dst_name, exclude_task=exclude_task, reloc=reloc, required=required)
    return reloc, ctx, run_all(ctx)


def raise_on_errors(vm_name: str, dst: str, findings: list[Finding]) -> None:
    errors = blockers(findings)
    if errors:
        raise PrecheckFailed(
            f"cannot migrate {vm_name} to {dst}: {len(errors)} blocker(s): " + "; ".join(f.message for f in errors),
            remedy="; ".join(dict.fromkeys(f.remedy for f in errors)), details={"findings": findings_json(findings)})


def findings_json(findings: list[Finding]) -> list[dict[str, Any]]:
    return [f.model_dump(mode="json") for f in findings]


async def predict_move(inv: Inventory, sessions: sessionmaker[Session], spec: VMSpec, source: str, dst: str,
                       budget_ms: int, link: float | None = None, tls: bool | None = None,
                       max_age_s: float = 10.0, measure: bool = True) -> predict.Prediction | None:
    """The convergence prediction for a live move (None when the VM's dirty rate cannot be sampled).

    ``measure=False`` uses only the agent's background sample (a migration about to start must not wait)."""
    try:
        sample = await inv.agent(source).dirty_sample(spec.uuid, max_age_s=max_age_s, measure=measure)
    except KvmotionError as exc:
        log.info("no dirty-rate sample for %s: %s", spec.name, exc.message)
        return None
    budget = link if link is not None else predict.link_mbps(inv.host_facts(source), inv.host_facts(dst))
    if tls is None:
        tls = encryption_plan(spec.encrypted_vmotion, inv.host_facts(source), inv.host_facts(dst),
                              any(d.encrypted for d in spec.disks))[0]
    history = task_store.achieved(sessions, (source, dst), "tls" if tls else "plain")
    rate, overhead, scale = predict.learned(budget, history, vm=spec.uuid)
    return predict.predict(sample.memory_mb, sample.ram_touched_mb, sample.dirty_mb_s, rate, budget_ms, overhead,
                           scale)

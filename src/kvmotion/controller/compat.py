"""Gathers live facts for the compatibility checks (I/O here; the checks themselves are pure)."""
from __future__ import annotations

import os
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from kvmotion.checks import HostView, MigrationContext, run_all
from kvmotion.checks.context import DATASTORE_LIMIT
from kvmotion.checks.findings import Finding, blockers
from kvmotion.common.errors import KvmotionError, PrecheckFailed
from kvmotion.common.types import HOST_PASSTHROUGH, VMSpec
from kvmotion.controller import tasks as task_store
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.schemas import HostOut


def datastore_limit() -> int:
    return int(os.environ.get("KVMOTION_DATASTORE_MIGRATION_LIMIT", DATASTORE_LIMIT))


def _view(inv: Inventory, host: HostOut, running: int) -> HostView:
    return HostView(name=host.name, state=host.state, maintenance=bool(host.maintenance),
                    facts=inv.host_facts(host.name), running_migrations=running)


async def vm_cpu_features(inv: Inventory, host: str, spec: VMSpec) -> frozenset[str] | None:
    """What the VM's CPU shows the guest, expanded by the source host's QEMU."""
    if spec.cpu_model == HOST_PASSTHROUGH:
        return None
    try:
        return frozenset(await inv.agent(host).cpu_expand(spec.cpu_model, spec.cpu_mask))
    except KvmotionError:
        return None


async def gather(inv: Inventory, sessions: sessionmaker[Session], vm_ref: str, dst_name: str,
                 moves_storage: bool = False, exclude_task: str | None = None) -> MigrationContext:
    vm = inv.get_vm(vm_ref)
    dst = inv.get_host(dst_name)
    src = inv.get_host(vm.host)
    spec = VMSpec.model_validate(vm.spec)
    per_host: dict[str, int] = {}
    per_ds: dict[str, int] = {}
    migrating = False
    for t in task_store.unfinished(sessions):
        if t.id == exclude_task:
            continue
        if t.vm_uuid == spec.uuid:
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
    return MigrationContext(
        spec=spec, power_state=vm.power_state, source=_view(inv, src, per_host.get(src.name, 0)),
        destination=_view(inv, dst, per_host.get(dst.name, 0)),
        vm_cpu_features=await vm_cpu_features(inv, src.name, spec), vm_migrating=migrating,
        moves_storage=moves_storage, datastore_migrations=per_ds, datastore_limit=datastore_limit())


async def validate(inv: Inventory, sessions: sessionmaker[Session], vm_ref: str, dst_name: str,
                   exclude_task: str | None = None) -> tuple[MigrationContext, list[Finding]]:
    ctx = await gather(inv, sessions, vm_ref, dst_name, exclude_task=exclude_task)
    return ctx, run_all(ctx)


def raise_on_errors(vm_name: str, dst: str, findings: list[Finding]) -> None:
    errors = blockers(findings)
    if errors:
        raise PrecheckFailed(
            f"cannot migrate {vm_name} to {dst}: {len(errors)} blocker(s): " + "; ".join(f.message for f in errors),
            remedy="; ".join(dict.fromkeys(f.remedy for f in errors)), details={"findings": findings_json(findings)})


def findings_json(findings: list[Finding]) -> list[dict[str, Any]]:
    return [f.model_dump(mode="json") for f in findings]

"""The controller's side of the migration wing's ports: its inventory, prechecks and predictions as an
``InventoryView``, and a ``MoveContext`` for a task."""
from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common.errors import MigrationFailed
from kvmotion.controller import compat
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.pki import client_identity
from kvmotion.controller.tasks import TaskJournal
from kvmotion.migration import kinds
from kvmotion.migration.engine import MoveContext
from kvmotion.migration.predict import Prediction
from kvmotion.migration.recover import Recovery
from kvmotion.migration.relocate import Relocation
from kvmotion.models.agent import HostFacts, VMSpec
from kvmotion.models.api import MigrateRequest, TaskOut
from kvmotion.models.findings import Finding


class ControllerView:
    """``migration.ports.InventoryView`` over this controller's inventory."""

    def __init__(self, inv: Inventory, sessions: sessionmaker[Session]) -> None:
        self.inv, self.sessions = inv, sessions

    def host_facts(self, host: str) -> HostFacts | None:
        return self.inv.host_facts(host)

    def disk_keys(self, spec: VMSpec) -> dict[str, str]:
        return self.inv.disk_keys(spec)

    def migration_address(self, host: str) -> str:
        facts = self.inv.host_facts(host)
        for iface in facts.migration_interfaces if facts else []:
            if iface.enabled and iface.address:
                return iface.address
        raise MigrationFailed(f"host {host} has no migration interface address",
                              remedy="configure its migration interface")

    def tls_identity(self, host: str) -> str:
        return client_identity(host)

    def set_owner(self, uuid: str, spec: VMSpec | None, host: str | None = None) -> None:
        fields: dict[str, str] = {}
        if host is not None:
            fields["host"] = host
        if spec is not None:
            fields["spec_json"] = spec.model_dump_json()
        if fields:
            self.inv.set_vm(uuid, **fields)

    def owner(self, uuid: str) -> tuple[str, VMSpec]:
        vm = self.inv.get_vm(uuid)
        return vm.host, VMSpec.model_validate(vm.spec)

    async def precheck(self, uuid: str, req: MigrateRequest, task_id: str) -> tuple[Relocation, list[Finding]]:
        reloc, _, findings = await compat.validate_move(self.inv, self.sessions, uuid, req, exclude_task=task_id)
        compat.raise_on_errors(reloc.before.name, reloc.host, findings)
        return reloc, findings

    async def predict(self, spec: VMSpec, source: str, destination: str, downtime_ms: int, link_mbps: float,
                      tls: bool) -> Prediction | None:
        return await compat.predict_move(self.inv, self.sessions, spec, source, destination, downtime_ms,
                                         link=link_mbps, tls=tls, max_age_s=86400, measure=False)


def move_context(view: ControllerView, t: TaskOut, spec: VMSpec, req: MigrateRequest,
                 bandwidth_mbps: int) -> MoveContext:
    return MoveContext(kind=kinds.kind(t.kind), journal=TaskJournal(view.sessions, t.id), inventory=view,
                       src=view.inv.agent(t.source), dst=view.inv.agent(t.destination), spec=spec, source=t.source,
                       destination=t.destination, req=req, bandwidth_mbps=bandwidth_mbps)


def recovery(view: ControllerView, t: TaskOut) -> Recovery:
    return Recovery(task=t, journal=TaskJournal(view.sessions, t.id), inv=view, src=view.inv.agent(t.source),
                    dst=view.inv.agent(t.destination))

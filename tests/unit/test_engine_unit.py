"""The migration wing without hosts: declared phase tables, the engine's one place for begin/end/crash points,
undo order, the commit point, and reconciliation of file moves, with in-memory ports (no QEMU, no root)."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kvmotion.common.errors import ConflictError, KvmotionError
from kvmotion.migration import engine as engine_mod
from kvmotion.migration import kinds, registry
from kvmotion.migration.engine import MoveContext, MoveEngine, Outcome, Step
from kvmotion.common.errors import Failure
from kvmotion.migration.recover import Recovery
from kvmotion.migration.relocate import plan
from kvmotion.models.agent import (GuestHealth, MirrorReport, PivotReport, VMRunState, VMRuntime)
from kvmotion.models.api import MigrateRequest, PhaseRecord, TaskOut
from kvmotion.models.moves import MoveKind, Phase
from test_relocate_unit import vm


class FakeJournal:
    def __init__(self) -> None:
        self.id = "t1"
        self.phases: list[dict[str, Any]] = []
        self.state, self.result, self.error, self.unknown = "running", None, None, None
        self.lives: list[dict[str, Any]] = []

    def read(self) -> Any:
        return None

    def begin_phase(self, name: str, progress: float, started_at: float | None = None,
                    detail: dict[str, Any] | None = None) -> None:
        self.phases.append({"name": name, "status": "running", "detail": dict(detail or {})})

    def end_phase(self, status: str = "ok", detail: dict[str, Any] | None = None, ended_at: float | None = None) -> None:
        if self.phases and self.phases[-1]["status"] == "running":
            self.phases[-1]["status"] = status
            self.phases[-1]["detail"].update(detail or {})

    def live(self, data: dict[str, Any], progress: float | None = None) -> None:
        self.lives.append(data)

    def mark_unknown(self, why: dict[str, Any]) -> None:
        self.state, self.unknown = "unknown", why

    def finish(self, state: str, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> None:
        self.state, self.result, self.error = state, result, error

    def names(self) -> list[tuple[str, str]]:
        return [(p["name"], p["status"]) for p in self.phases]


class FakeHost:
    """Records every call; answers like an agent whose mirror is ready at once."""

    def __init__(self, host: str, fail: str | None = None) -> None:
        self.host, self.fail, self.calls = host, fail, []
        self.spec: Any = None

    def _note(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name == self.fail:
            raise KvmotionError(f"{name} failed on {self.host}", remedy="test")

    async def mirror_start(self, uuid: str, req: Any) -> MirrorReport:
        self._note("mirror_start", [t.disk_id for t in req.targets])
        return MirrorReport(state="mirroring")

    async def mirror_status(self, uuid: str) -> MirrorReport:
        self._note("mirror_status")
        return MirrorReport(state="ready", done=10, total=10)

    async def mirror_cancel(self, uuid: str) -> MirrorReport:
        self._note("mirror_cancel")
        return MirrorReport(state="cancelled")

    async def mirror_pivot(self, uuid: str) -> PivotReport:
        self._note("mirror_pivot")
        return PivotReport(pivoted_at=time.time(), write_stall_ms=1.0, old_files=["a"], new_files=["b"],
                           old_files_closed=True, spec=self.spec)

    async def check_images(self, spec: Any, ids: list[str]) -> dict[str, dict[str, Any]]:
        self._note("check_images", ids)
        return {i: {"ok": True} for i in ids}

    async def status(self, uuid: str) -> VMRuntime:
        self._note("status")
        return VMRuntime(uuid=uuid, name="vm1", state=VMRunState.RUNNING, qemu_status="running", spec=self.spec)

    async def remove_files(self, spec: Any, ids: list[str], home: bool) -> list[str]:
        self._note("remove_files", spec.disks[0].datastore, list(ids), home)
        return [f"{spec.disks[0].datastore}:{i}" for i in ids]

    async def health_check(self, uuid: str, req: Any) -> GuestHealth:
        return GuestHealth(verdict="healthy", host=self.host)


class FakeView:
    def __init__(self, reloc: Any) -> None:
        self.reloc, self.owner_sets = reloc, []

    def disk_keys(self, spec: Any) -> dict[str, str]:
        return {}

    def set_owner(self, uuid: str, spec: Any, host: str | None = None) -> None:
        self.owner_sets.append((spec, host))

    async def precheck(self, uuid: str, req: Any, task_id: str) -> Any:
        return self.reloc, []


def svmotion(fail: str | None = None) -> tuple[MoveEngine, FakeJournal, FakeHost, FakeView]:
    reloc = plan(vm(), "poweredOn", "h1", None, "shared", {}, None, {"shared"})
    host = FakeHost("h1", fail)
    host.spec = reloc.after
    view = FakeView(reloc)
    journal = FakeJournal()
    ctx = MoveContext(kind=kinds.kind(MoveKind.SVMOTION), journal=journal, inventory=view,  # type: ignore[arg-type]
                      src=host, dst=host, spec=reloc.before, source="h1", destination="h1",  # type: ignore[arg-type]
                      req=MigrateRequest(datastore="shared"))
    return registry.engine(ctx), journal, host, view


def test_every_kind_declares_a_connected_table_with_progress() -> None:
    for k in kinds.KINDS.values():
        seen, todo = set(), [k.first]
        while todo:
            p = todo.pop()
            seen.add(p)
            todo += [n for n in k.transitions[p] if n not in seen]
        assert seen == set(k.phases), k.name                 # every declared phase is reachable
        assert any(not k.transitions[p] for p in k.phases)   # and the move can end
        assert set(k.progress_at) >= set(k.phases)
        assert k.allows(None, k.first) and not k.allows(None, k.phases[1])
        assert all(not k.allows(p, Phase.ROLLBACK) for p in k.commit)
        assert all(k.allows(p, Phase.RECONCILE) for p in k.phases)


def test_the_registry_replaces_kind_strings() -> None:
    assert kinds.kind("cold").is_local("h1", "h1") and not kinds.kind("cold").is_local("h1", "h2")
    assert kinds.kind("svmotion").is_local("h1", "h1") and not kinds.kind("vmotion").is_local("h1", "h2")
    assert set(registry.ENGINES) == set(registry.RECONCILERS) == set(kinds.KINDS)
    with pytest.raises(KvmotionError) as e:
        kinds.kind("teleport")
    assert "vmotion" in e.value.remedy


def test_storage_vmotion_persists_each_phase_in_its_declared_order() -> None:
    eng, journal, host, view = svmotion()
    asyncio.run(eng.run())
    assert journal.state == "success", journal.error
    assert journal.names() == [("precheck", "ok"), ("mirror", "ok"), ("pivot", "ok"), ("verify", "ok"),
                               ("cleanup", "ok")]
    rel = journal.phases[0]["detail"]["relocation"]
    assert rel["moved_ids"] == ["disk0"] and rel["home_moves"]          # what reconciliation needs, persisted
    assert view.owner_sets and view.owner_sets[0][0] == host.spec       # the inventory follows the pivot
    assert ("remove_files", "h1-local", ["disk0"], True) in host.calls  # the old set goes last
    assert journal.result["guest_health"]["verdict"] == "healthy"


def test_a_failed_mirror_runs_its_undo_and_the_vm_keeps_its_disks() -> None:
    eng, journal, host, view = svmotion(fail="mirror_status")
    asyncio.run(eng.run())
    assert journal.state == "error" and journal.error["phase"] == "mirror"
    assert journal.names()[-2:] == [("mirror", "failed"), ("rollback", "ok")]
    names = [c[0] for c in host.calls]
    assert names.index("mirror_cancel") < names.index("remove_files")
    assert ("remove_files", "shared", ["disk0"], True) in host.calls    # the partial targets' folder
    assert not view.owner_sets and "mirror_pivot" not in names


def test_a_cancel_is_refused_once_the_vm_runs_on_the_new_files() -> None:
    eng, journal, host, view = svmotion()
    eng.entered, eng.phase = [Phase.PRECHECK, Phase.MIRROR], Phase.PIVOT
    with pytest.raises(ConflictError):
        eng.request_cancel()


class Skipper(MoveEngine):
    """Declares a handler that jumps over a phase its kind requires."""

    def steps(self) -> dict[Phase, Step]:
        async def precheck() -> Outcome:
            return Outcome(next=Phase.PIVOT)
        return {Phase.PRECHECK: Step(precheck)}


def test_a_transition_the_table_does_not_declare_stops_the_move_before_acting() -> None:
    _, journal, host, view = svmotion()
    ctx = MoveContext(kind=kinds.kind(MoveKind.SVMOTION), journal=journal, inventory=view,  # type: ignore[arg-type]
                      src=host, dst=host, spec=view.reloc.before, source="h1", destination="h1",  # type: ignore
                      req=MigrateRequest(datastore="shared"))
    asyncio.run(Skipper(ctx).run())
    assert journal.state == "error" and "pivot" not in [n for n, _ in journal.names()]
    assert journal.error["code"] == "INTERNAL" and "may not go from precheck to pivot" in journal.error["message"]


def test_the_crash_point_fires_after_the_phase_is_persisted_and_mid_phase(monkeypatch) -> None:
    fired: list[str] = []

    def exit_(code: int) -> None:
        fired.append(f"exit {code}")
        raise SystemExit(code)
    monkeypatch.setattr(engine_mod.os, "_exit", exit_)
    for at, last in (("mirror", ("mirror", "running")), ("mirror.progress", ("mirror", "running"))):
        monkeypatch.setenv(engine_mod.CRASH_AT_ENV, at)
        eng, journal, host, _ = svmotion()
        with pytest.raises(SystemExit):
            asyncio.run(eng.run())
        assert journal.names()[-1] == last and journal.state == "running"
        assert ("mirror_start" in [c[0] for c in host.calls]) == at.endswith(".progress")


def test_live_moves_undo_disks_then_shadow_then_the_outgoing_stream() -> None:
    from kvmotion.migration.live import LiveMove
    order = LiveMove.rollback_order(None, [Phase.PRECHECK, Phase.SHADOW, Phase.DISKS, Phase.PRECOPY])  # type: ignore
    assert order == [Phase.DISKS, Phase.SHADOW, Phase.PRECOPY]


def test_decisions_carry_a_failure_not_a_message_to_match() -> None:
    from kvmotion.migration import decisions
    from kvmotion.common.errors import LinkStalled, migration_failure
    from kvmotion.models.agent import MigrationReport
    w = decisions.ProgressWatch(started=0.0)
    w.downtime_ms, w.step_at, w.sent_at, w.best_at = 500, 0.0, 1.0, 1.0
    r = MigrationReport(role="source", status="active", ram_total=100, ram_remaining=50, ram_transferred=50)
    d = decisions.decide(r, True, w, 1000.0, 256, 10.0, 60.0, 500)
    assert d.action == decisions.Action.ABORT and d.failure == Failure.LINK_STALLED
    err = migration_failure(d.failure, d.reason)
    assert isinstance(err, LinkStalled) and err.to_dict()["details"]["failure"] == "link-stalled"


def _task(kind: str, phase: str, reloc: Any) -> TaskOut:
    from kvmotion.migration.live import relocation_record
    return TaskOut(id="t1", kind=kind, vm_uuid="u1", vm_name="vm1", source="h1", destination="h1", state="running",
                   phase=phase, progress=50, phases=[PhaseRecord(name="precheck", status="ok", started_at=0.0,
                                                                 detail={"relocation": relocation_record(reloc)})],
                   live={}, options={}, result={}, error=None, created_at=0.0, updated_at=0.0, started_at=0.0,
                   finished_at=0.0)


@pytest.mark.parametrize("pivoted", [False, True])
def test_storage_vmotion_reconciles_to_the_files_qemu_has_open(pivoted: bool) -> None:
    reloc = plan(vm(), "poweredOn", "h1", None, "shared", {}, None, {"shared"})
    host, journal, view = FakeHost("h1"), FakeJournal(), FakeView(reloc)
    host.spec = reloc.after if pivoted else reloc.before
    r = Recovery(task=_task("svmotion", "mirror", reloc), journal=journal, inv=view, src=host, dst=host)  # type: ignore
    out = asyncio.run(registry.reconcile(r))
    assert journal.state == ("success" if pivoted else "error")
    assert out["vm_runs_on_files"] == ("new" if pivoted else "original")
    gone = "h1-local" if pivoted else "shared"            # the other set, whichever it is
    assert ("remove_files", gone, ["disk0"], True) in host.calls
    assert view.owner_sets[-1][0] == host.spec


class ColdView(FakeView):
    def __init__(self, reloc: Any, registered: bool) -> None:
        super().__init__(reloc)
        self.registered = registered

    def owner(self, uuid: str) -> tuple[str, Any]:
        return ("h2", self.reloc.after) if self.registered else ("h1", self.reloc.before)


class CopyHost(FakeHost):
    async def copy_status(self, job: str) -> Any:
        from kvmotion.models.agent import DiskCopyStatus
        self._note("copy_status", job)
        return DiskCopyStatus(job=job, state="copying", started_at=0.0)

    async def copy_cancel(self, job: str) -> Any:
        from kvmotion.models.agent import DiskCopyStatus
        self._note("copy_cancel", job)
        return DiskCopyStatus(job=job, state="cancelled", started_at=0.0)

    async def disk_export_stop(self, export_id: str) -> bool:
        self._note("disk_export_stop", export_id)
        return True


@pytest.mark.parametrize("registered", [False, True])
def test_cold_migration_reconciles_to_one_set(registered: bool) -> None:
    reloc = plan(vm(), "poweredOff", "h1", "h2", "h2-local", {}, None, {"shared", "h2-local"})
    src, dst, journal, view = CopyHost("h1"), CopyHost("h2"), FakeJournal(), ColdView(reloc, registered)
    t = _task("cold", "cleanup" if registered else "copy", reloc).model_copy(
        update={"destination": "h2", "live": {"job": "j1", "export": "e1"}})
    out = asyncio.run(registry.reconcile(Recovery(task=t, journal=journal, inv=view, src=src, dst=dst)))  # type: ignore
    assert journal.state == ("success" if registered else "error"), out
    if registered:          # only the cleanup was left: the source set goes, the copies stay
        assert [c[0] for c in dst.calls] == [] and src.calls[-1][:2] == ("remove_files", "h1-local")
    else:                   # the running copy stops, its export too, and every copy goes
        assert ("copy_cancel", "j1") in dst.calls and ("disk_export_stop", "e1") in src.calls
        assert dst.calls[-1][:2] == ("remove_files", "h2-local") and not any(c[0] == "remove_files" for c in src.calls)

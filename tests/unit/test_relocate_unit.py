"""Planning a move (pure): its kind, where every file goes, what it needs, and what the checks say."""
from __future__ import annotations

import pytest

from kvmotion.checks import HostView, MigrationContext, run_all
from kvmotion.common.errors import InvalidInputError
from kvmotion.models.agent import DiskSpec, VMSpec
from kvmotion.migration import relocate
from test_checks_unit import facts


def vm(**kw: object) -> VMSpec:
    base: dict[str, object] = dict(uuid="u1", name="vm1", boot_datastore="h1-local", folder="vm1", disks=[
        DiskSpec(datastore="h1-local", path="vm1/vm1.qcow2", size_mb=1024),
        DiskSpec(id="disk1", node="d1", datastore="shared", path="vm1/vm1-data.qcow2", size_mb=64)])
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def plan(host: str | None = None, ds: str | None = None, disks: dict[str, str] | None = None,
         fmt: str | None = None, power: str = "poweredOn", readable=("shared", "h2-local")) -> relocate.Relocation:
    return relocate.plan(vm(), power, "h1", host, ds, disks or {}, fmt, set(readable))


def test_kinds() -> None:
    assert plan(host="h2").kind == "vmotion"
    assert plan(ds="shared").kind == "svmotion"
    assert plan(host="h2", ds="h2-local").kind == "xvmotion"
    assert plan(host="h2", ds="h2-local", power="poweredOff").kind == "cold"
    assert plan(ds="shared", power="poweredOff").kind == "cold"


def test_whole_vm_to_a_datastore_moves_every_file_disk_and_the_folder() -> None:
    r = plan(host="h2", ds="h2-local")
    assert [m.disk_id for m in r.moves] == ["disk0", "disk1"]
    assert r.home_moves and r.after.boot_datastore == "h2-local"
    assert {d.datastore for d in r.after.disks} == {"h2-local"}


def test_per_disk_placement_by_index_or_id_keeps_the_folder() -> None:
    r = plan(disks={"0": "shared", "disk1": "h1-local"})
    assert {m.disk_id: m.target.datastore for m in r.moves} == {"disk0": "shared", "disk1": "h1-local"}
    assert not r.home_moves
    with pytest.raises(InvalidInputError, match="no disk '7'"):
        plan(disks={"7": "shared"})


def test_format_change_renames_the_image_and_can_stay_on_the_datastore() -> None:
    r = plan(disks={"0": "shared"}, fmt="raw")
    assert {m.disk_id: (m.target.format, m.target.path) for m in r.moves} == {
        "disk0": ("raw", "vm1/vm1.raw"), "disk1": ("raw", "vm1/vm1-data.raw")}
    assert plan(fmt="raw").kind == "svmotion"


def test_required_space_is_summed_per_target_datastore() -> None:
    r = plan(host="h2", ds="h2-local")
    assert relocate.required_mb(r, {"disk0": 10, "disk1": 3, "home": 20}) == {"h2-local": 33}
    assert relocate.required_mb(r, {}) == {"h2-local": 1024 + 64}      # no measurement: the full sizes


def test_the_checks_follow_the_kind() -> None:
    r = plan(host="h2", ds="h2-local")
    src, dst = facts("h1", datastores=("shared", "h1-local")), facts("h2", datastores=("shared", "h2-local"))
    ctx = MigrationContext(spec=r.before, power_state="poweredOn", source=HostView("h1", "connected", False, src),
                           destination=HostView("h2", "connected", False, dst), kind=r.kind, target_spec=r.after,
                           required_mb={"h2-local": 10**6}, moved_disks=r.moved_ids)
    found = {f.code for f in run_all(ctx)}
    assert "DATASTORE_SPACE" in found and "DATASTORE_NOT_ACCESSIBLE" not in found
    # only --host: h1-local is not readable on h2, and the checker says how to fix it
    v = plan(host="h2")
    ctx2 = MigrationContext(spec=v.before, power_state="poweredOn", source=HostView("h1", "connected", False, src),
                            destination=HostView("h2", "connected", False, dst), kind=v.kind, target_spec=v.after)
    msgs = [f for f in run_all(ctx2) if f.code == "DATASTORE_NOT_ACCESSIBLE"]
    assert msgs and "--datastore" in msgs[0].remedy

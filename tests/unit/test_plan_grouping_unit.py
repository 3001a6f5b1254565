"""The evacuation plan's shortcuts change no result: hosts checked best first (the first with no error wins) and
``cpu_expand`` asked once per source host, CPU model and mask give, for every VM of a mixed fleet, the plan that
checking every host with a fresh ``compat.validate`` (a fresh CPU expansion each time) and ranking the hosts
without errors gives; VMs differing in exactly one field that matters get their own answers."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kvmotion.controller import compat
from kvmotion.controller.db import VM, Host
from kvmotion.controller.maintenance import rank
from kvmotion.controller.service import Controller
from kvmotion.models.agent import DiskSpec, NicSpec
from kvmotion.models.findings import blockers

from test_checks_unit import facts, spec

NO_AVX = ("sse2", "sse4.2")
HOSTS = {"src": facts("src"),
         "a-big-noavx": facts("a-big-noavx", free_mb=9000, features=NO_AVX),   # the roomiest, but no avx2
         "b-mid": facts("b-mid", free_mb=6000), "c-mid": facts("c-mid", free_mb=6000),   # a tie: load decides
         "d-small": facts("d-small", free_mb=1200),                                     # too small for 2 GiB
         "e-nolocal": facts("e-nolocal", free_mb=5000, datastores=("shared", "other")),
         "f-vlan": facts("f-vlan", free_mb=5500, groups=("Other",)),
         "g-off": facts("g-off", free_mb=9999), "h-maint": facts("h-maint", free_mb=9999)}
EXPANDED = {"Haswell": ["sse2", "avx2"], "qemu64": ["sse2"]}


class CpuAgents:
    """Every host's agent: ``cpu_expand`` answers by host (src expands one more feature), model and mask, and
    counts its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[str, ...]]] = []

    def __call__(self, host: str) -> "CpuAgents":
        self.host = host
        return self

    async def cpu_expand(self, model: str, mask: list[str]) -> list[str]:
        self.calls.append((self.host, model, tuple(mask)))
        extra = ["sse4.2"] if self.host == "src" else []
        return [f for f in EXPANDED[model] + extra if f not in mask]


VMS = {   # name -> spec changes; pairs differ in exactly one field that matters
    "has": {}, "has-masked": {"cpu_mask": ["avx2"]}, "q64": {"cpu_model": "qemu64"},
    "big": {"cpu_model": "qemu64", "memory_mb": 5500}, "big-has": {"memory_mb": 5500},
    "nic-other": {"cpu_model": "qemu64", "nics": [NicSpec(mac="52:54:00:00:00:09", portgroup="Other")]},
    "disk-other": {"cpu_model": "qemu64", "disks": [DiskSpec(datastore="other", path="x/x.qcow2", cache="none")]},
    "nowhere": {"disks": [DiskSpec(datastore="nowhere", path="x/x.qcow2", cache="none")]},
    "huge": {"cpu_model": "qemu64", "memory_mb": 60000}, "has-2": {}}


@pytest.fixture
def ctl(db_url: str, tmp_path: Path) -> Any:
    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    with ctl.sessions.begin() as s:
        s.add_all(Host(name=n, address="https://198.18.0.9:8770") for n in HOSTS)
        for i, (name, changes) in enumerate(VMS.items()):
            s.add(VM(uuid=f"u{i}", name=name, host="src", power_state="poweredOn",
                     spec_json=spec(uuid=f"u{i}", name=name, **({"cpu_model": "Haswell"} | changes)).model_dump_json()))
        s.add(VM(uuid="busy", name="busy", host="b-mid", power_state="poweredOn",
                 spec_json=spec(uuid="busy", name="busy").model_dump_json()))
    for n, f in HOSTS.items():
        ctl.inventory.store_facts(n, f)
    ctl.inventory.mark_disconnected("g-off", "gone")
    ctl.inventory.set_maintenance("h-maint", 1)
    ctl.inventory.agent = CpuAgents()                     # type: ignore[method-assign]
    yield ctl
    ctl.engine.dispose()


async def every_host_checked(ctl: Any, vm: Any, host: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The plan as it was: every host in service checked with a fresh ``compat.validate``, the best of those
    without errors, else the first host with the fewest errors."""
    fleet = ctl.maintenance.fleet()
    options, closest = [], None
    for h, f in fleet.hosts:
        if h.name == host or h.state != "connected" or h.maintenance:
            continue
        _, found = await compat.validate(ctl.inventory, ctl.sessions, vm.uuid, h.name)
        errors = blockers(found)
        if not errors:
            options.append((h.name, f.mem_free_mb if f else 0, fleet.running.get(h.name, 0)))
        elif closest is None or len(errors) < len(closest[1]):
            closest = (h.name, errors)
    if options:
        return rank(options)[0], []
    return None, [f.model_dump(mode="json") | {"host": closest[0]} for f in closest[1]] if closest else []


def test_the_plan_of_every_vm_is_the_plan_every_host_checked_gives(ctl: Any) -> None:
    vms = [v for v in ctl.inventory.list_vms() if v.host == "src"]
    fleet = ctl.maintenance.fleet()                       # one fleet (and one CPU memo) for every VM, as evacuating
    planned = {v.name: asyncio.run(ctl.maintenance.plan_vm(v, "src", fleet)) for v in vms}
    expected = {v.name: asyncio.run(every_host_checked(ctl, v, "src")) for v in vms}
    assert planned == expected
    # the cases the fleet is built for, so that the comparison above means something
    assert planned["has"][0] == "c-mid" and planned["has-masked"][0] == "a-big-noavx"     # mask: one field
    assert planned["q64"][0] == "a-big-noavx" and planned["has"] == planned["has-2"]
    assert planned["big"][0] == "a-big-noavx" and planned["big-has"][0] == "c-mid"
    assert planned["nic-other"][0] == "f-vlan" and planned["disk-other"][0] == "e-nolocal"
    assert planned["nowhere"][0] is None and {f["code"] for f in planned["nowhere"][1]} == {"DATASTORE_NOT_ACCESSIBLE"}
    assert planned["huge"][0] is None and planned["huge"][1][0]["host"] == "a-big-noavx"   # first of the fewest
    assert fleet.running["b-mid"] == 1 and "c-mid" not in fleet.running    # the tie on memory: the lighter load


def test_the_cpu_memo_asks_once_per_host_model_and_mask_and_keeps_them_apart(ctl: Any) -> None:
    agents: CpuAgents = ctl.inventory.agent
    fleet = ctl.maintenance.fleet()
    for v in ctl.inventory.list_vms():
        if v.host == "src":
            asyncio.run(ctl.maintenance.plan_vm(v, "src", fleet))
    assert sorted(agents.calls) == sorted(set(agents.calls))                  # each key asked once
    assert set(fleet.cpu) == {("src", "Haswell", ()), ("src", "Haswell", ("avx2",)), ("src", "qemu64", ())}
    assert fleet.cpu[("src", "Haswell", ())] == {"sse2", "avx2", "sse4.2"}
    assert fleet.cpu[("src", "Haswell", ("avx2",))] == {"sse2", "sse4.2"}
    memo = dict(fleet.cpu)                                                    # another host: its own answer
    other = asyncio.run(compat.vm_cpu_features(ctl.inventory, "b-mid", spec(cpu_model="Haswell"), memo))
    assert other == {"sse2", "avx2"} and memo[("b-mid", "Haswell", ())] == other


def test_a_failed_expansion_is_not_kept(ctl: Any) -> None:
    from kvmotion.common.errors import AgentUnreachable

    class Silent:
        async def cpu_expand(self, model: str, mask: list[str]) -> list[str]:
            raise AgentUnreachable("no answer", remedy="none")

    ctl.inventory.agent = lambda _host: Silent()          # type: ignore[method-assign]
    memo: dict[Any, frozenset[str]] = {}
    assert asyncio.run(compat.vm_cpu_features(ctl.inventory, "src", spec(cpu_model="Haswell"), memo)) is None
    assert memo == {}

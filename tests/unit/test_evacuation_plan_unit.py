"""Evacuation planning reads the fleet once (``Maintenance.fleet``) and checks a VM against every host at once
(``compat.validate_many``): the same findings as one ``compat.validate`` per host, the same choice as before."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kvmotion.controller import compat
from kvmotion.controller.db import VM, Host
from kvmotion.controller.service import Controller

from test_checks_unit import facts, spec

HOSTS = {"hA": facts("hA"), "hB": facts("hB", free_mb=2000), "hC": facts("hC", free_mb=8000),
         "hD": facts("hD", datastores=("local",)), "hE": facts("hE", groups=("Other",)),
         "hF": facts("hF", free_mb=9000), "hG": facts("hG", free_mb=9000)}


class CpuAgent:
    async def cpu_expand(self, model: str, mask: list[str]) -> list[str]:
        return ["sse2"]


@pytest.fixture
def ctl(db_url: str, tmp_path: Path) -> Any:
    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    with ctl.sessions.begin() as s:
        s.add_all(Host(name=n, address="https://198.18.0.9:8770") for n in HOSTS)
        s.add(VM(uuid="u1", name="vm1", host="hA", power_state="poweredOn", spec_json=spec().model_dump_json()))
        s.add(VM(uuid="u2", name="vm2", host="hA", power_state="poweredOff",
                 spec_json=spec(uuid="u2", name="vm2").model_dump_json()))
    for n, f in HOSTS.items():
        ctl.inventory.store_facts(n, f)
    ctl.inventory.mark_disconnected("hF", "gone")
    ctl.inventory.set_maintenance("hG", 1)
    ctl.inventory.agent = lambda _host: CpuAgent()         # type: ignore[method-assign]
    yield ctl
    ctl.engine.dispose()


def test_checking_every_host_at_once_finds_what_one_check_per_host_finds(ctl: Any) -> None:
    many = asyncio.run(compat.validate_many(ctl.inventory, ctl.sessions, "vm1", compat.destinations(ctl.inventory)))
    assert set(many) == set(HOSTS)
    for host in HOSTS:
        _, one = asyncio.run(compat.validate(ctl.inventory, ctl.sessions, "vm1", host))
        assert compat.findings_json(many[host]) == compat.findings_json(one), host
    assert compat.blockers(many["hD"]) and compat.blockers(many["hE"]) and not compat.blockers(many["hC"])


def test_a_running_vm_goes_to_the_roomiest_host_the_checks_allow_a_stopped_one_where_its_files_are(ctl: Any) -> None:
    fleet = ctl.maintenance.fleet()
    vm1, vm2 = ctl.inventory.get_vm("vm1"), ctl.inventory.get_vm("vm2")
    assert asyncio.run(ctl.maintenance.plan_vm(vm1, "hA", fleet)) == ("hC", [])   # hF, hG: not in service
    assert asyncio.run(ctl.maintenance.plan_vm(vm2, "hA", fleet)) == ("hB", [])   # the first that sees "shared"
    assert fleet.running == {"hA": 1}


def test_with_no_host_allowed_the_closest_hosts_findings_are_named(ctl: Any) -> None:
    for host in ("hB", "hC"):
        ctl.inventory.set_maintenance(host, 1)
    target, findings = asyncio.run(ctl.maintenance.plan_vm(ctl.inventory.get_vm("vm1"), "hA", ctl.maintenance.fleet()))
    assert target is None and findings and {f["host"] for f in findings} <= {"hD", "hE"}
    assert all(f["severity"] == "error" for f in findings)

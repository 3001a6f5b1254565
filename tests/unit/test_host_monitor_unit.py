"""The monitor's round over the hosts (``Controller.refresh_hosts``): hosts asked at once, up to
``refresh_parallel``; a silent host marked disconnected beside the others, whose facts are stored."""
from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from kvmotion.common.errors import AgentUnreachable
from kvmotion.controller import agents
from kvmotion.controller.config import ControllerConfig
from kvmotion.controller.db import Host
from kvmotion.controller.service import Controller
from kvmotion.models.agent import HostFacts

from test_checks_unit import facts

HOSTS, SILENT, PARALLEL = 40, {"h07", "h23"}, 8


class Agents:
    """Fake agents: each answer takes a while; the most answers pending at once is written down."""

    def __init__(self) -> None:
        self.pending, self.most, self.asked = 0, 0, []

    def agent(self, host: str) -> "Agents.One":
        return Agents.One(self, host)

    class One:
        def __init__(self, fleet: "Agents", host: str) -> None:
            self.fleet, self.host = fleet, host

        async def facts(self) -> HostFacts:
            fleet = self.fleet
            fleet.asked.append(self.host)
            fleet.pending += 1
            fleet.most = max(fleet.most, fleet.pending)
            try:
                await asyncio.sleep(0.05)
                if self.host in SILENT:
                    raise AgentUnreachable(f"agent of host {self.host} did not answer", remedy="start it")
                return facts(self.host, free_mb=1234)
            finally:
                fleet.pending -= 1


def test_a_round_asks_hosts_at_once_up_to_its_bound_and_stores_what_each_says(db_url: str, tmp_path: Path) -> None:
    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path, refresh_parallel=PARALLEL)
    names = [f"h{i:02d}" for i in range(HOSTS)]
    with ctl.sessions.begin() as s:
        s.add_all(Host(name=n, address="https://198.18.0.9:8770") for n in names)
    for n in names:
        ctl.inventory.store_facts(n, facts(n, free_mb=1))
    fleet = Agents()
    ctl.inventory.agent = fleet.agent          # type: ignore[method-assign]
    asyncio.run(ctl.refresh_hosts())
    assert sorted(fleet.asked) == names                     # every host once
    assert fleet.most == PARALLEL                           # at once, and never more than the bound
    hosts = {h.name: h for h in ctl.inventory.list_hosts()}
    for n in names:
        if n in SILENT:
            assert hosts[n].state == "disconnected" and "did not answer" in hosts[n].last_error
        else:
            assert hosts[n].state == "connected" and hosts[n].facts["mem_free_mb"] == 1234
    ctl.engine.dispose()


def test_the_bound_defaults_to_the_documented_value(db_url: str, tmp_path: Path) -> None:
    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    assert ctl.refresh_parallel == ControllerConfig().refresh_parallel == 32
    ctl.engine.dispose()


def test_a_facts_call_gives_up_connecting_sooner_than_answering(monkeypatch) -> None:
    """A host that is off or cut off costs the monitor FACTS_CONNECT_S, not the facts call's whole deadline."""
    seen: list[httpx.Timeout] = []

    class Silent(httpx.AsyncClient):
        def __init__(self, **kw) -> None:
            seen.append(kw["timeout"])
            super().__init__(**kw)

        async def request(self, *a, **kw) -> httpx.Response:
            raise httpx.ConnectTimeout("no answer")

    monkeypatch.setattr(agents.httpx, "AsyncClient", Silent)
    with pytest.raises(AgentUnreachable):
        asyncio.run(agents.AgentClient("h1", "https://198.18.0.9:8770", "s" * 32).facts())
    assert seen[0].connect == agents.FACTS_CONNECT_S < seen[0].read == 10

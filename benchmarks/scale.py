"""The control plane at fleet scale (issue 22): 1,000 hosts and 20,000 VMs, fake agents, no QEMU.

Seeds a controller database through the controller's own layer (``metrics_scrape.fill``, then every host's facts
stored as an enrolment stores them), replaces the agents with fakes that answer from memory (every 20th host does not
answer: it costs ``--unreachable-s``, the facts call's connect deadline by default), and measures with the controller's
real code paths:
  (a) validate of one VM against every host (``compat.validate_move`` per host, as the API's validate does, and
      ``compat.validate_many`` at once, as the evacuation planning does),
  (b) evacuation planning of a host holding ``--evac-vms`` VMs (``Maintenance.plan_vm`` per VM; no moves),
  (c) a full facts round of every host (``Controller.refresh_hosts``, the monitor's round),
  (d) API latency under ``--clients`` concurrent clients, each asking for the first page of each list in turn, as
      a client that pages does (the real app under uvicorn in a subprocess on 127.0.0.1, plain HTTP, a viewer
      token; its monitor runs with the fake agents meanwhile); and one client alone reading every page of the VMs,
  (e) that controller's memory (peak RSS).
Prints one table: figure, measured, target, met/gap. It never fails on a figure; it does fail when a round leaves a
host in the wrong state (a host that answered must be connected, one that did not, disconnected).

Run:  python benchmarks/scale.py [--db sqlite|pg|URL] [--hosts 1000] [--vms 20000]
(pg: a fresh schema in $KVMOTION_TEST_PG_URL, which scripts/pg.sh prints; a URL: an empty database). Results and
how to read them: docs/scale.md. Control plane only: nothing here is an e2e test.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kvmotion.common.errors import AgentUnreachable
from kvmotion.controller import compat
from kvmotion.controller.agents import FACTS_CONNECT_S
from kvmotion.controller.auth import Role, TokenCreate
from kvmotion.models.agent import (CdromSpec, CpuFact, DatastoreFact, DiskSpec, HostFacts, MigrationInterface,
                                   NicSpec, PortGroupFact, TlsFact, VMSpec)
from kvmotion.models.api import MigrateRequest
from kvmotion.models.sampling import DirtySample

HERE = Path(__file__).resolve().parent
UNREACHABLE_EVERY = 20                    # 5 % of the hosts do not answer
FEATURES = [f"feat{i}" for i in range(60)] + ["sse2", "sse4.2", "avx2"]
# the load: the first page of each list, as a client that pages asks for it (the default limit: 500 hosts or VMs,
# 50 tasks); the lists' light view (no facts, no specs: GET /hosts/{name} and /vms/{ref} have them)
PATHS = ("/api/v1/hosts?view=summary", "/api/v1/vms?view=summary", "/api/v1/tasks?view=summary")
FULL_PAGES = ("/api/v1/hosts", "/api/v1/vms", "/api/v1/tasks")       # the first page of the full view, asked alone


# -- the fleet: facts, specs, fake agents ---------------------------------------------------------------------------
def unreachable(host: str) -> bool:
    return int(host[1:]) % UNREACHABLE_EVERY == UNREACHABLE_EVERY - 1


def host_facts(name: str, vms: list[str]) -> HostFacts:
    """What an agent of a typical host reports: a shared and a local datastore, three port groups, two migration
    links, its CPU, the VMs it runs."""
    n = int(name[1:])
    return HostFacts(
        name=name, agent_version="1.0", qemu_version="7.2.0", accelerator="kvm", cpu_model="host",
        cpu_features=FEATURES, cpu_count=64, mem_total_mb=512 * 1024, mem_free_mb=256 * 1024 - 7 * n % 4096,
        mgmt_address=f"10.{n // 250}.{n % 250}.1", mgmt_family="ipv4",
        datastores=[DatastoreFact(uuid="ds-san", name="san", path="/srv/san", kind="nfs", shared=True,
                                  readable=True, free_mb=50 << 20),
                    DatastoreFact(uuid=f"ds-local-{name}", name=f"local-{name}", path="/srv/local",
                                  readable=True, free_mb=2 << 20)],
        portgroups=[PortGroupFact(name="VM Network", bridge="vmnet"),
                    *(PortGroupFact(name=f"VLAN {v}", bridge="vmnet", vlan=v) for v in (100, 200))],
        migration_interfaces=[MigrationInterface(ifname=f"mig{i}", address=f"10.{100 + i}.{n // 250}.{n % 250}",
                                                 family="ipv4", speed_mbps=25000) for i in range(2)],
        vms=vms, cpu=CpuFact(host_model="host", host_features=FEATURES, usable_models=["qemu64", "Haswell"]),
        tls=TlsFact(supported=True), machine_types=["pc-q35-7.2", "pc-i440fx-7.2"])


def vm_spec(uuid: str, name: str) -> VMSpec:
    return VMSpec(uuid=uuid, name=name, memory_mb=4096, vcpus=2, cpu_model="Haswell", boot_datastore="san",
                  folder=name, disks=[DiskSpec(datastore="san", path=f"{name}/{name}.qcow2", size_mb=20480)],
                  nics=[NicSpec(mac=f"52:54:00:{int(name[2:]) >> 16 & 255:02x}:{int(name[2:]) >> 8 & 255:02x}:"
                                    f"{int(name[2:]) & 255:02x}")], cdroms=[CdromSpec()])


class FakeAgents:
    """Stands in for every host's agent: answers from memory after ``latency_s``; an unreachable host's call fails
    with AgentUnreachable after ``timeout_s``, as a call to a silent host does at its deadline."""

    def __init__(self, facts: dict[str, HostFacts], latency_s: float, timeout_s: float) -> None:
        self.facts, self.latency_s, self.timeout_s = facts, latency_s, timeout_s
        self.calls = 0

    def agent(self, host: str) -> "FakeAgent":
        return FakeAgent(host, self)


class FakeAgent:
    def __init__(self, host: str, fleet: FakeAgents) -> None:
        self.host, self.fleet = host, fleet

    async def _answer(self) -> None:
        self.fleet.calls += 1
        if unreachable(self.host):
            await asyncio.sleep(self.fleet.timeout_s)
            raise AgentUnreachable(f"agent of host {self.host} did not answer (fake)", remedy="none: a benchmark",
                                   details={"host": self.host})
        await asyncio.sleep(self.fleet.latency_s)

    async def facts(self) -> HostFacts:
        await self._answer()
        return self.fleet.facts[self.host]

    async def cpu_expand(self, model: str, mask: list[str]) -> list[str]:
        await self._answer()
        return [f for f in FEATURES[:40] if f not in mask]

    async def measure(self, spec: VMSpec, formats: dict[str, str], preallocate: bool) -> dict[str, int]:
        await self._answer()
        return {d.id: d.size_mb for d in spec.disks}

    async def dirty_sample(self, uuid: str, max_age_s: float = 60.0, measure: bool = True) -> DirtySample:
        await self._answer()
        return DirtySample(dirty_mb_s=20.0, sampled_at=time.time(), memory_mb=4096, ram_touched_mb=2048)


# -- seeding --------------------------------------------------------------------------------------------------------
def seed(ctl: Any, hosts: int, vms: int, evac: int, tasks: int) -> dict[str, HostFacts]:
    """``evac`` VMs on h0, the others spread over the other hosts, every fifth powered off; ``tasks`` finished
    vMotions; every host's facts stored. Returns the facts each fake agent answers with."""
    sys.path.insert(0, str(HERE))
    from metrics_scrape import fill        # one way to fill a controller database at scale

    by_host: dict[str, list[str]] = {f"h{i}": [] for i in range(hosts)}

    def row(i: int, r: dict[str, Any]) -> dict[str, Any]:
        r["host"] = "h0" if i < evac else f"h{1 + (i - evac) % (hosts - 1)}"
        r["power_state"] = "poweredOff" if i % 5 == 4 else "poweredOn"
        r["spec_json"] = vm_spec(r["uuid"], r["name"]).model_dump_json()
        if r["power_state"] == "poweredOn":
            by_host[r["host"]].append(r["uuid"])
        return r

    fill(ctl.engine, tasks, hosts, vms, row)
    facts = {h: host_facts(h, uuids) for h, uuids in by_host.items()}
    for h, f in facts.items():
        ctl.inventory.store_facts(h, f)
    return facts


# -- the figures ----------------------------------------------------------------------------------------------------
@dataclass
class Row:
    figure: str
    measured: str
    target: str = "-"
    met: bool | None = None


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def validate_everywhere(ctl: Any, vm: str) -> list[Row]:
    """(a) one VM checked against every other host, one host after the other."""
    one: list[float] = []
    for h in ctl.inventory.list_hosts():
        if h.name == ctl.inventory.get_vm(vm).host:
            continue
        t0 = time.perf_counter()
        await compat.validate_move(ctl.inventory, ctl.sessions, vm, MigrateRequest(host=h.name))
        one.append(time.perf_counter() - t0)
    total = sum(one)
    t0 = time.perf_counter()
    await compat.validate_many(ctl.inventory, ctl.sessions, vm, compat.destinations(ctl.inventory))
    many = time.perf_counter() - t0
    return [Row("validate: one VM, one host (median)", ms(statistics.median(one))),
            Row(f"validate: one VM, every host ({len(one)}), one by one", ms(total), "< 200 ms", total < 0.2),
            Row("validate: one VM, every host, at once (validate_many)", ms(many), "< 200 ms", many < 0.2)]


async def plan_evacuation(ctl: Any, host: str, budget_s: float) -> list[Row]:
    """(b) where each VM of ``host`` would go; VMs one after the other until ``budget_s`` is spent, the rest
    extrapolated from the mean."""
    vms = [v for v in ctl.inventory.list_vms() if v.host == host]
    spent, planned, placed = 0.0, 0, 0
    t0 = time.perf_counter()
    fleet = ctl.maintenance.fleet()
    for vm in vms:
        left = budget_s - (time.perf_counter() - t0)
        if left <= 0:
            break
        try:
            target, _ = await asyncio.wait_for(ctl.maintenance.plan_vm(vm, host, fleet), left)
        except asyncio.TimeoutError:
            break
        planned, placed = planned + 1, placed + (target is not None)
    spent = time.perf_counter() - t0
    figure = f"evacuation plan: {len(vms)} VMs of {host}"
    if planned == len(vms):
        return [Row(figure, f"{spent:.2f} s ({placed} placed)", "< 1 s", spent < 1.0)]
    if planned == 0:
        return [Row(figure, f"> {budget_s:.0f} s (not one VM planned in the budget)", "< 1 s", False)]
    guess = spent / planned * len(vms)
    return [Row(figure, f"~{guess:.0f} s ({planned} planned in {spent:.0f} s, extrapolated)", "< 1 s", False)]


async def facts_round(ctl: Any, fleet: FakeAgents, budget_s: float) -> list[Row]:
    """(c) the monitor's round over every host; then every host must be in the state its agent's answer says."""
    hosts = ctl.inventory.list_hosts()
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(ctl.refresh_hosts(), budget_s)
    except asyncio.TimeoutError:
        return [Row(f"facts round: {len(hosts)} hosts, 5 % silent", f"> {budget_s:.0f} s (stopped)", "< 10 s",
                    False)]
    spent = time.perf_counter() - t0
    wrong = [h.name for h in ctl.inventory.list_hosts() if (h.state == "connected") == unreachable(h.name)]
    if wrong:
        raise SystemExit(f"the facts round left {len(wrong)} hosts in the wrong state: {', '.join(wrong[:10])}")
    silent = sum(unreachable(h.name) for h in hosts)
    return [Row(f"facts round: {len(hosts)} hosts, {silent} silent ({fleet.timeout_s:g} s each)", f"{spent:.2f} s",
                "< 10 s", spent < 10.0)]


# -- the API under load ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def serving(db_url: str, scratch: Path, port: int, args: argparse.Namespace) -> Iterator[subprocess.Popen[bytes]]:
    """The controller's app under uvicorn in a process of its own (this file's ``serve``), until the block ends."""
    cmd = [sys.executable, __file__, "serve", "--db-url", db_url, "--scratch", str(scratch), "--port", str(port),
           "--latency-ms", str(args.latency_ms), "--unreachable-s", str(args.unreachable_s)]
    proc = subprocess.Popen(cmd + (["--quiet-monitor"] if args.quiet_monitor else []))
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2)
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the controller under test did not start (exit {proc.poll()})")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def load(port: int, token: str, clients: int, seconds: float,
               paths: tuple[str, ...] = PATHS) -> dict[str, list[float]]:
    """``clients`` clients, each with its own connection, asking for each of ``paths`` in turn for ``seconds``."""
    times: dict[str, list[float]] = {p: [] for p in paths}
    errors: list[str] = []
    stop = time.monotonic() + seconds

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                     headers={"Authorization": f"Bearer {token}"}) as c:
            i = n
            while time.monotonic() < stop:
                path = paths[i % len(paths)]
                t0 = time.perf_counter()
                r = await c.get(path)
                times[path].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{path}: {r.status_code}")
                i += 1

    await asyncio.gather(*(client(n) for n in range(clients)))
    if errors:
        raise SystemExit(f"{len(errors)} API calls failed, e.g. {errors[0]}")
    return times


def alone_call(port: int, token: str, path: str) -> tuple[float, int]:
    """One call with nothing else asking: its time and the size of its answer."""
    t0 = time.perf_counter()
    r = httpx.get(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=120)
    r.raise_for_status()
    return time.perf_counter() - t0, len(r.content)


def every_page(port: int, token: str, path: str) -> tuple[float, int, int, int]:
    """One client alone reading a list to its end, following X-Next-Cursor: time, pages, items, bytes."""
    pages = items = size = 0
    url = httpx.URL(f"http://127.0.0.1:{port}{path}")
    t0 = time.perf_counter()
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
        r = c.get(url)
        while True:
            r.raise_for_status()
            pages, items, size = pages + 1, items + len(r.json()), size + len(r.content)
            if "X-Next-Cursor" not in r.headers:
                return time.perf_counter() - t0, pages, items, size
            r = c.get(url.copy_merge_params({"cursor": r.headers["X-Next-Cursor"]}))


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


def rss_kb(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def api_rows(ctl: Any, db_url: str, scratch: Path, args: argparse.Namespace) -> list[Row]:
    """(d) and (e): latencies under load, then the serving controller's memory."""
    token = ctl.tokens.create(TokenCreate(name="scale-bench", role=Role.VIEWER)).token
    port = args.port
    with serving(db_url, scratch, port, args) as proc:
        idle = rss_kb(proc.pid)["VmRSS"]
        alone = [(p, *alone_call(port, token, p)) for p in (*PATHS, *FULL_PAGES)]
        walks = [(p, *every_page(port, token, p)) for p in ("/api/v1/vms?view=summary", "/api/v1/vms")]
        times = asyncio.run(load(port, token, args.clients, args.api_s))
        mem = rss_kb(proc.pid)
        floor = asyncio.run(load(port, token, args.clients, max(2.0, args.api_s / 4), ("/api/v1/health",)))
    health = floor["/api/v1/health"]
    every = [t for ts in times.values() for t in ts]
    rows = [Row(f"  GET {p.removeprefix('/api/v1')}, one client alone, first page", f"{ms(t)}, {size / 1e6:.2f} MB")
            for p, t, size in alone]
    rows += [Row(f"  GET {p.removeprefix('/api/v1')}, every page, one client alone",
                 f"{t:.2f} s, {pages} pages, {items} VMs, {size / 1e6:.1f} MB") for p, t, pages, items, size in walks]
    rows += [Row(f"API p99, {args.clients} clients, {len(every)} calls ({len(every) / args.api_s:.0f}/s)",
                 ms(p99(every)), "< 100 ms", p99(every) < 0.1)]
    rows += [Row(f"  GET {p.removeprefix('/api/v1')} p50 / p99 ({len(ts)} calls)",
                 f"{ms(statistics.median(ts))} / {ms(p99(ts))}") for p, ts in times.items() if ts]
    rows += [Row(f"  floor: GET /health p50 / p99, {args.clients} clients ({len(health) / max(2.0, args.api_s / 4):.0f}/s)",
                 f"{ms(statistics.median(health))} / {ms(p99(health))}")]
    rows += [Row("controller RSS: idle / after the load / peak",
                 f"{idle // 1024} / {mem['VmRSS'] // 1024} / {mem['VmHWM'] // 1024} MiB", "reported")]
    return rows


def serve(args: argparse.Namespace) -> None:
    """The controller under test: its real app; its agents the fakes, answering with the facts stored."""
    import uvicorn

    from kvmotion.controller.api import create_app
    from kvmotion.controller.service import Controller

    ctl = Controller(args.db_url, pki_dir=args.scratch / "pki", token_dir=args.scratch)
    facts = {h.name: ctl.inventory.host_facts(h.name) for h in ctl.inventory.list_hosts()}
    ctl.inventory.agent = FakeAgents({h: f for h, f in facts.items() if f}, args.latency_ms / 1000,
                                     args.unreachable_s).agent
    if args.quiet_monitor:            # a diagnosis: the API without the monitor's facts rounds beside it

        async def no_round() -> None:
            return None
        ctl.refresh_hosts = no_round  # type: ignore[method-assign]
    uvicorn.run(create_app(ctl), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# -- the run --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def database(choice: str, scratch: Path) -> Iterator[str]:
    if choice == "sqlite":
        yield f"sqlite:///{scratch / 'controller.db'}"
    elif choice == "pg":
        sys.path.insert(0, str(HERE.parent / "tests" / "unit"))
        from dbtools import pg_base, pg_schema        # a schema of its own, dropped afterwards

        base = pg_base()
        if base is None:
            raise SystemExit("--db pg needs $KVMOTION_TEST_PG_URL: run scripts/pg.sh (as root) and export its URL")
        with pg_schema(base) as url:
            yield url
    else:
        yield choice


def measure(args: argparse.Namespace, scratch: Path, db_url: str) -> list[Row]:
    from kvmotion.controller.service import Controller

    ctl = Controller(db_url, pki_dir=scratch / "pki", token_dir=scratch)
    t0 = time.perf_counter()
    facts = seed(ctl, args.hosts, args.vms, min(args.evac_vms, args.vms // 2), args.tasks)
    rows = [Row(f"seeded: {args.hosts} hosts, {args.vms} VMs, {args.tasks} tasks", f"{time.perf_counter() - t0:.1f} s")]
    fleet = FakeAgents(facts, args.latency_ms / 1000, args.unreachable_s)
    ctl.inventory.agent = fleet.agent        # the benchmark's only change to the controller: no real agents

    async def control_plane() -> list[Row]:
        vm = next(v for v in ctl.inventory.list_vms() if v.host == "h1" and v.power_state == "poweredOn")
        return [*await validate_everywhere(ctl, vm.name), *await plan_evacuation(ctl, "h0", args.budget_s),
                *await facts_round(ctl, fleet, args.budget_s)]

    rows += asyncio.run(control_plane())
    rows += api_rows(ctl, db_url, scratch, args)
    ctl.engine.dispose()
    return rows


def table(rows: list[Row], title: str) -> str:
    width = max(len(r.figure) for r in rows)
    mwidth = max(len(r.measured) for r in rows)
    lines = [title, f"{'figure':<{width}}  {'measured':<{mwidth}}  {'target':<9}  met/gap",
             f"{'-' * width}  {'-' * mwidth}  {'-' * 9}  -------"]
    for r in rows:
        verdict = "" if r.met is None else ("met" if r.met else "GAP")
        lines.append(f"{r.figure:<{width}}  {r.measured:<{mwidth}}  {r.target:<9}  {verdict}")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "serve"], help="serve: internal")
    ap.add_argument("--db", default="sqlite", help="sqlite, pg ($KVMOTION_TEST_PG_URL) or an empty database's URL")
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--vms", type=int, default=20000)
    ap.add_argument("--tasks", type=int, default=1000, help="finished vMotions in the journal")
    ap.add_argument("--evac-vms", type=int, default=500, help="VMs on the host evacuated (h0)")
    ap.add_argument("--latency-ms", type=float, default=5.0, help="a fake agent's answer time")
    ap.add_argument("--unreachable-s", type=float, default=FACTS_CONNECT_S,
                    help="what a silent host costs (default: the facts call's connect deadline; one that connects "
                         "but never answers costs 10 s)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="the longest a planning or a round may take")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--api-s", type=float, default=20.0, help="how long the clients keep asking")
    ap.add_argument("--port", type=int, default=18760)
    ap.add_argument("--quiet-monitor", action="store_true",
                    help="the serving controller's monitor asks no host (to tell the API's own cost from the rounds')")
    ap.add_argument("--db-url", default="", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode == "run" and (args.hosts < 2 or args.vms < 2):
        ap.error("--hosts and --vms: at least 2 each")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.mode == "serve":
        serve(args)
        return
    with tempfile.TemporaryDirectory() as tmp, database(args.db, Path(tmp)) as db_url:
        rows = measure(args, Path(tmp), db_url)
    backend = "PostgreSQL" if db_url.startswith("postgresql") else "SQLite"
    quiet = "; API served without the monitor's rounds" if args.quiet_monitor else ""
    print(table(rows, f"kvmotion control plane at scale ({backend}; fake agents, {args.latency_ms:g} ms per call"
                      f"{quiet})"))


if __name__ == "__main__":
    main()

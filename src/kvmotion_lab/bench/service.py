"""`kvmotion bench service`: a real service under load, moved live, kvmotion against a plain QEMU migration.

The guest is the Debian 12 disk image (``kvmotion image build --debian``), booting from its own disk under BIOS
or UEFI, with its bank: a SQLite database on the guest's disk (WAL, ``synchronous=FULL``) that commits one transfer
per request (:mod:`kvmotion_lab.image.debian_guest`). From the client namespace, ``clients`` transaction clients
(:mod:`kvmotion_lab.bench.loadgen`) drive it as fast as it answers and a probe pings it every 5 ms on a fixed
timetable. Two guests of the same size run side by side, made the same way from the same image:

- ``kvmotion``: the VM as kvmotion runs it, moved with its defaults (opportunistic encryption: TLS in the lab,
  which has certificates);
- ``kvmotion-plain``: the same VM, its ``encrypted_vmotion`` set to ``disabled`` for the move;
- ``qemu-defaults``: a second VM with kvmotion's exact argv started by QEMU alone (``bench.rawqemu``) and moved by a
  plain ``migrate`` with QEMU's defaults, then ``cont``.

Each run moves each side once to the other host; the order rotates from run to run. Per move: the total, QEMU's
downtime, the client's longest silence (ping), the longest stretch without a committed transaction, throughput in
the 5 s before, during and after the move, failed attempts, and after the move whether every acknowledged
transaction is in the ledger, the balances still add up and SQLite's ``quick_check`` passes. A guest that did not
survive (other boot, hung, no network) is a failed run, out of every figure. A benchmark: it asserts nothing.
"""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from kvmotion.cli.client import Client
from kvmotion.models.agent import VMSpec
from kvmotion_lab import lab, scenario
from kvmotion_lab.bench import rawqemu, report, service_report
from kvmotion_lab.bench.loadgen import windows
from kvmotion_lab.bench.migrate import TIMEOUTS, baseline_figures, baseline_recipe, client_view, kvmotion_figures
from kvmotion_lab.bench.survival import Guest, survived
from kvmotion_lab.image.build import build_image
from kvmotion_lab.image.debian import build_debian_image
from kvmotion_lab.netns import netns_exec_argv
from kvmotion_lab.probe import ClientProbe

ROOT = Path("/tmp/kvmotion-bench-service")
PREFIX = "kvbs"
BASELINE = report.BASELINE
VARIANTS = ("kvmotion", "kvmotion-plain", BASELINE)
SETTLE_S = 5.0
BOOT_DEADLINE_S = 300.0
PROBE_MS = 5
Log = Callable[[str], None]


@dataclass(frozen=True)
class ServiceSweep:
    memory_mb: int = 1024
    runs: int = 3
    clients: int = 4
    firmware: str = "bios"
    link: str = "unshaped"
    variants: tuple[str, ...] = VARIANTS

    def check(self) -> None:
        if self.runs < 3:
            raise ValueError("runs must be at least 3 (a median and a spread need 3 runs)")
        if not 1 <= self.clients <= 32:
            raise ValueError("clients must be 1..32")
        if self.firmware not in ("bios", "uefi"):
            raise ValueError("firmware must be bios or uefi")
        if self.link != "unshaped" and self.link not in lab.LINK_RATES:
            raise ValueError(f"unknown link {self.link!r}: use unshaped or one of {', '.join(lab.LINK_RATES)}")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown or not self.variants:
            raise ValueError(f"unknown variant(s) {sorted(unknown)}: use {', '.join(VARIANTS)}")


def rotate(variants: tuple[str, ...], run: int) -> list[str]:
    """Run ``run`` (0-based) starts with the ``run``-th variant, so every side goes first equally often."""
    k = run % len(variants)
    return list(variants[k:] + variants[:k])


def ledger_verdict(check: dict[str, Any], acked: dict[str, int]) -> dict[str, Any]:
    """Whether the bank kept every acknowledged transaction, its total and its integrity."""
    missing = 0
    for client, last in acked.items():
        have = set(check.get("seqs", {}).get(client, []))
        missing += sum(1 for s in range(1, int(last) + 1) if s not in have)
    return {"tx_acked": sum(int(v) for v in acked.values()), "tx_missing": missing,
            "balance_ok": check.get("total") == check.get("expected_total"),
            "quick_check": check.get("quick_check"),
            "data_intact": missing == 0 and check.get("total") == check.get("expected_total")
            and check.get("quick_check") == "ok"}


class ServiceRunner:
    def __init__(self, info: lab.LabInfo, sweep: ServiceSweep, work: Path, log: Log) -> None:
        self.info, self.sweep, self.work, self.log = info, sweep, work, log
        self.client = Client(info.controller_url, token=info.admin_token(), timeout=120)
        self.root = Path(info.root)
        self.netns = info.net.client_netns
        facts = self.client.host("h1").get("facts") or {}
        self.accel = facts.get("accelerator", "tcg")
        self.link_mbps = float(max((i.get("speed_mbps") or 0 for i in facts.get("migration_interfaces", [])),
                                   default=0))
        self.recipe = baseline_recipe(self.accel)
        self.sides: dict[str, Guest] = {}
        self.starts = 0

    # -- guests ---------------------------------------------------------------------------------------
    def _create(self, name: str) -> Guest:
        vm = self.client.create_vm(name=name, host="h1", memory_mb=self.sweep.memory_mb,
                                   image=lab.SHARED_IMAGE, clone="full", firmware=self.sweep.firmware,
                                   datastore="shared")
        return Guest(name, vm["spec"]["guest_ip"], vm["uuid"])

    async def _boot(self, side: str) -> Guest:
        g = await asyncio.to_thread(self._create, f"svc-{'q' if side == 'raw' else 'k'}{self.sweep.memory_mb}")
        if side == "raw":
            spec = VMSpec(**(await asyncio.to_thread(self.client.vm, g.name))["spec"])
            ctx = rawqemu.lab_context(self.root, "h1", self.accel)
            g.raw = await rawqemu.start(spec, ctx, self.info.host_netns("h1"), self._run_dir(g), False, self.recipe)
        else:
            await asyncio.to_thread(self.client.start_vm, g.name)
        hb = await asyncio.to_thread(scenario.wait_guest, self.netns, g.ip, BOOT_DEADLINE_S)
        g.boot_id, g.seq = str(hb["boot_id"]), int(hb["seq"])
        return g

    def _run_dir(self, g: Guest) -> Path:
        self.starts += 1
        return self.root / "raw" / f"{g.name}-{self.starts}"

    async def _remove(self, g: Guest) -> None:
        if g.raw is not None:
            await rawqemu.stop(g.raw)
        elif (await asyncio.to_thread(self.client.vm, g.name)).get("power_state") == "poweredOn":
            await asyncio.to_thread(self.client.stop_vm, g.name)
        await asyncio.to_thread(self.client.delete_vm, g.name)

    # -- load -----------------------------------------------------------------------------------------
    def _start_load(self, g: Guest, out: Path) -> subprocess.Popen[bytes]:
        argv = netns_exec_argv(self.netns, [sys.executable, "-m", "kvmotion_lab.bench.loadgen",
                                            f"http://{g.ip.split('/')[0]}", "--clients", str(self.sweep.clients),
                                            "--out", str(out)])
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def _stop_load(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)          # our own child, by PID
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _bank(self, g: Guest, clients: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"seqs": {}}
        for c in clients:
            status, got = scenario.guest_http(self.netns, g.ip, f"/bank/check?client={c}", timeout_s=20)
            if status != 200 or not isinstance(got, dict):
                return {"error": f"HTTP {status}: {got}"}
            out["seqs"][c] = got.pop("seqs")
            out.update(got)
        return out

    # -- moves ----------------------------------------------------------------------------------------
    async def _move(self, variant: str, g: Guest, dest: str) -> dict[str, Any]:
        case = {"link_mbps": self.link_mbps, "memory_mb": self.sweep.memory_mb}
        if g.raw is not None:
            h = self.info.net.host(dest)
            ctx = rawqemu.lab_context(self.root, dest, self.accel)
            t0 = time.monotonic()
            g.raw, fig = await rawqemu.migrate(g.raw, ctx, h.netns, h.mig_ip, self._run_dir(g), self.recipe)
            g.host = dest
            return baseline_figures(case, fig, time.monotonic() - t0)
        task = await asyncio.to_thread(self.client.migrate, g.name, dest, **TIMEOUTS)
        task = await asyncio.to_thread(scenario.follow_task, self.client, task["id"])
        g.host = (await asyncio.to_thread(self.client.vm, g.name))["host"]
        modes = [p["detail"]["encryption"] for p in task.get("phases") or [] if "encryption" in (p.get("detail") or {})]
        return kvmotion_figures(case, task) | {"encryption": modes[-1] if modes else None}

    async def move(self, variant: str, run: int) -> dict[str, Any]:
        side = "raw" if variant == BASELINE else "kvmotion"
        g = self.sides[side]
        dest = "h2" if g.host == "h1" else "h1"
        if side == "kvmotion":
            enc = "disabled" if variant == "kvmotion-plain" else "opportunistic"
            await asyncio.to_thread(self.client.call, "PATCH", f"/vms/{g.name}", {"encrypted_vmotion": enc})
            await asyncio.to_thread(self.client.validate, g.name, dest)     # a fresh sample for the prediction
        stem = self.work / f"{g.name}-r{run}-{variant}"
        probe = ClientProbe(self.netns, g.ip.split("/")[0], scenario.heartbeat_url(g.ip), interval_ms=PROBE_MS,
                            out=stem.with_suffix(".probe.jsonl"))
        load = self._start_load(g, stem.with_suffix(".tx.jsonl"))
        await asyncio.to_thread(probe.start)
        t0 = t1 = time.time()
        try:
            await asyncio.sleep(SETTLE_S)
            t0 = time.time()
            try:
                fig = await self._move(variant, g, dest)
            except Exception as exc:      # noqa: BLE001 - a refused or broken move is a result
                fig = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "total_s": None, "pass_log": []}
            t1 = time.time()
            await asyncio.sleep(SETTLE_S)
        finally:
            seen = await asyncio.to_thread(probe.stop)
            await asyncio.to_thread(self._stop_load, load)
        tx = windows(stem.with_suffix(".tx.jsonl"), t0, t1, SETTLE_S)
        broken = (await survived(self.client, self.root, self.netns, g))[0]
        bank = await asyncio.to_thread(self._bank, g, sorted(tx["acked"])) if broken is None else {}
        rec = {"memory_mb": self.sweep.memory_mb, "link": self.sweep.link, "variant": variant, "side": side,
               "run": run, **fig, **client_view(stem.with_suffix(".probe.jsonl"), seen), **tx,
               **ledger_verdict(bank, tx.pop("acked")), "guest_survived": broken is None, "broken": broken,
               "bank_error": bank.get("error")}
        return rec

    async def run(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            for side in ("kvmotion", "raw"):
                if side == "kvmotion" and not set(self.sweep.variants) - {BASELINE} or \
                        side == "raw" and BASELINE not in self.sweep.variants:
                    continue
                self.sides[side] = await self._boot(side)
                self.log(f"  {side} guest {self.sides[side].name} answers")
            for run in range(self.sweep.runs):
                for variant in rotate(self.sweep.variants, run):
                    rec = await self.move(variant, run + 1)
                    out.append(rec)
                    self.log(service_report.one_line(rec))
                    if not rec["guest_survived"]:
                        side = rec["side"]
                        await self._remove(self.sides[side])
                        self.sides[side] = await self._boot(side)
        finally:
            for s in self.sides.values():
                try:
                    await self._remove(s)
                except Exception as exc:      # noqa: BLE001 - the lab goes down next anyway
                    self.log(f"  could not remove {s.name}: {exc}")
        return out


def run(sweep: ServiceSweep, out_dir: Path, log: Log = print, root: Path = ROOT,
        prefix: str = PREFIX) -> dict[str, Any]:
    sweep.check()
    image = build_image(log=lambda m: None)
    debian = build_debian_image(log=log)
    started = time.time()
    work = out_dir / "runs"
    work.mkdir(parents=True, exist_ok=True)
    info = lab.up(2, root, prefix=prefix, image_dir=image.kernel.parent.parent,
                  link=None if sweep.link == "unshaped" else sweep.link, log=lambda m: None)
    try:
        lab.stage_image(root, debian.disk)
        runner = ServiceRunner(info, sweep, work, log)
        records = asyncio.run(runner.run())
        accel = runner.accel
    finally:
        lab.down(root)
    result = {"command": "kvmotion bench service", "schema": 1, "sweep": asdict(sweep), "started_at": started,
              "finished_at": time.time(), "machine": report.machine(), "accelerator": accel,
              "guest": {"image": str(debian.disk), "recipe": debian.recipe_hash[:16]}, "records": records}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-service.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench-service.md").write_text(service_report.markdown(result))
    return result

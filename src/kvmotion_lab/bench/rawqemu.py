"""Plain QEMU migrations of a VM with kvmotion's exact argv, in the lab, with no agent and no controller.

The control arms of the benchmarks: the same guest, the same QEMU command line (``agent.hv.qemu.argv.build_argv``), the
same taps, bridges and migration network as kvmotion uses; only the QMP sequence differs, as a ``Recipe`` says.
``Recipe()`` is QEMU's defaults (a plain ``migrate``, then ``cont`` on the destination); ``KVMOTION_RECIPE`` is
kvmotion's sequence without kvmotion (``agent.hv.qemu.migration``'s capabilities and parameters).
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from kvmotion.agent.hv.qemu.migration import ANNOUNCE, AUTO_CONVERGE
from kvmotion.agent.context import HostContext
from kvmotion.agent.hv.qemu.argv import build_argv, tap_name
from kvmotion.models.agent import VMSpec
from kvmotion_lab import net
from kvmotion_lab.netns import netns_exec_argv

QMP_DEADLINE_S = 10.0
MIGRATION_DEADLINE_S = 300.0
_PORTS = itertools.count(0)


@dataclass(frozen=True)
class Recipe:
    """One QMP sequence. Every field off / None is QEMU's defaults."""

    return_path: bool = False
    pause_before_switchover: bool = False
    late_block_activate: bool = False
    auto_converge: bool = False
    max_bandwidth: int | None = None          # bytes/s; None: QEMU's 128 MiB/s
    downtime_ms: int | None = None            # None: QEMU's 300 ms
    announce_params: bool = False             # kvmotion's announce timing on the destination
    announce_self: bool = False               # one more RARP/GARP series after cont
    xbzrle: bool = False
    sample_dirty_rate: bool = False           # calc-dirty-rate (1 s) shortly before the move
    tcg_multi_thread: bool = False            # -accel tcg,thread=multi instead of kvmotion's thread=single
    ram_pad_kib: int = 0                      # guest RAM this much above its MiB size (kvmotion under TCG: 8)

    def without(self, field: str) -> "Recipe":
        default = Recipe.__dataclass_fields__[field].default
        return dataclasses.replace(self, **{field: default})

    def with_(self, field: str, value: Any = True) -> "Recipe":
        return dataclasses.replace(self, **{field: value})


LINK_10G_BYTES = 10_000 * 1_000_000 // 8
KVMOTION_RECIPE = Recipe(return_path=True, pause_before_switchover=True, late_block_activate=True,
                         auto_converge=True, max_bandwidth=LINK_10G_BYTES, downtime_ms=50, announce_params=True,
                         announce_self=True)


def lab_context(root: Path, host: str, accelerator: str) -> HostContext:
    """What ``build_argv`` needs about a lab host: its datastores (which is shared) and its VM Network bridge."""
    stores = {"shared": root / "ds" / "shared", f"{host}-local": root / "ds" / f"{host}-local"}
    return HostContext(host, accelerator, stores, {"VM Network": net.VM_BRIDGE},
                       shared_datastores=frozenset({"shared"}))     # its marker says so: disks open cache=none


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)


@dataclass
class RawVM:
    spec: VMSpec
    host: str
    netns: str
    run_dir: Path
    proc: subprocess.Popen[bytes]
    qmp: QMPClient
    taps: list[str]
    max_throttle_pct: int = 0

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    def console(self, lines: int = 60) -> list[str]:
        try:
            return self.serial_log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = QMP_DEADLINE_S) -> Any:
        try:
            return await asyncio.wait_for(self.qmp.execute(cmd, args), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"QMP {cmd} on {self.spec.name} ({self.host}) did not answer within {timeout:.0f}s") from None


async def start(spec: VMSpec, ctx: HostContext, netns: str, run_dir: Path, incoming: bool,
                recipe: Recipe) -> RawVM:
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("qmp.sock", "serial.log"):
        (run_dir / stale).unlink(missing_ok=True)
    argv = build_argv(spec, ctx, run_dir, incoming)
    if recipe.tcg_multi_thread:
        argv = [a.replace("tcg,thread=single", "tcg,thread=multi") for a in argv]
    argv[argv.index("-m") + 1] = f"{spec.memory_mb * 1024 + recipe.ram_pad_kib}k"   # the arm decides, not the host
    taps = []
    for i, _nic in enumerate(spec.nics):
        tap = tap_name(spec.uuid, i)
        _run(netns_exec_argv(netns, ["ip", "link", "del", tap]))
        for cmd in (["ip", "tuntap", "add", "dev", tap, "mode", "tap"],
                    ["ip", "link", "set", tap, "master", net.VM_BRIDGE, "up"]):
            res = _run(netns_exec_argv(netns, cmd))
            if res.returncode != 0:
                raise RuntimeError(f"tap {tap} in {netns}: {res.stderr.strip()}")
        taps.append(tap)
    log = open(run_dir / "qemu.log", "ab")
    proc = subprocess.Popen(netns_exec_argv(netns, argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    qmp = QMPClient(spec.name)
    end = time.monotonic() + QMP_DEADLINE_S
    while True:
        try:
            await asyncio.wait_for(qmp.connect(str(run_dir / "qmp.sock")), 2)
            break
        except Exception:      # noqa: BLE001 - not listening yet (or QEMU died: checked below)
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"QEMU for {spec.name} did not start: {(run_dir / 'qemu.log').read_text()[-500:]}")
            qmp = QMPClient(spec.name)
            await asyncio.sleep(0.05)
    return RawVM(spec, ctx.host_name, netns, run_dir, proc, qmp, taps)


async def stop(vm: RawVM) -> None:
    try:
        await vm.execute("quit", timeout=5)
    except Exception:      # noqa: BLE001 - already gone
        pass
    try:
        await asyncio.wait_for(vm.qmp.disconnect(), 5)
    except Exception:      # noqa: BLE001
        pass
    try:
        vm.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        vm.proc.kill()
        vm.proc.wait(timeout=10)
    for tap in vm.taps:
        _run(netns_exec_argv(vm.netns, ["ip", "link", "del", tap]))


def _caps(d: dict[str, bool]) -> dict[str, Any]:
    return {"capabilities": [{"capability": k, "state": v} for k, v in d.items()]}


async def _prepare(src: RawVM, dst: RawVM, r: Recipe, uri: str) -> None:
    dcaps = {"events": True, "late-block-activate": r.late_block_activate, "return-path": r.return_path}
    await dst.execute("migrate-set-capabilities", _caps(dcaps))
    if r.announce_params:
        await dst.execute("migrate-set-parameters", ANNOUNCE)
    await dst.execute("migrate-incoming", {"uri": uri})
    if r.sample_dirty_rate:
        await src.execute("calc-dirty-rate", {"calc-time": 1})
        await asyncio.sleep(1.2)
    scaps = {"events": True, "return-path": r.return_path, "pause-before-switchover": r.pause_before_switchover,
             "auto-converge": r.auto_converge, "xbzrle": r.xbzrle}
    await src.execute("migrate-set-capabilities", _caps(scaps))
    params: dict[str, Any] = {}
    if r.max_bandwidth is not None:
        params["max-bandwidth"] = r.max_bandwidth
    if r.downtime_ms is not None:
        params["downtime-limit"] = r.downtime_ms
    if r.auto_converge:
        params |= AUTO_CONVERGE
    if params:
        await src.execute("migrate-set-parameters", params)


async def _final_info(src: RawVM) -> dict[str, Any]:
    """``query-migrate`` once QEMU 7.2 has computed total-time and downtime (0 right after "completed")."""
    info = await src.execute("query-migrate")
    for _ in range(50):
        if info.get("total-time"):
            break
        await asyncio.sleep(0.02)
        info = await src.execute("query-migrate")
    return info


async def _wait_status(vm: RawVM, wanted: set[str], deadline: float) -> str:
    while True:
        info = await vm.execute("query-migrate")
        status = info.get("status", "none")
        vm.max_throttle_pct = max(vm.max_throttle_pct, int(info.get("cpu-throttle-percentage", 0)))
        if status in wanted or status in ("failed", "cancelled"):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"{vm.spec.name}: migration still {status}")
        await asyncio.sleep(0.01)


async def ram_differences(src: RawVM, dst: RawVM, run_dir: Path) -> dict[str, Any]:
    """Compare the guest RAM of a source parked in postmigrate with its destination before it ever ran: every
    4 KiB page that differs is a page the migration lost (the first MiB, ROMs and VGA, is left out)."""
    size = src.spec.memory_mb << 20
    files = [run_dir / "ram-src.bin", run_dir / "ram-dst.bin"]
    for vm, f in zip((src, dst), files):
        await vm.execute("pmemsave", {"val": 0, "size": size, "filename": str(f)}, timeout=60)
    differ: list[int] = []
    with files[0].open("rb") as a, files[1].open("rb") as b:
        a.seek(1 << 20)
        b.seek(1 << 20)
        page = (1 << 20) // 4096
        while True:
            x, y = a.read(1 << 20), b.read(1 << 20)
            if not x:
                break
            if x != y:
                differ += [page + i for i in range(len(x) // 4096) if x[i * 4096:(i + 1) * 4096] != y[i * 4096:(i + 1) * 4096]]
            page += len(x) // 4096
    for f in files:
        f.unlink(missing_ok=True)
    return {"pages_differ": len(differ), "first_pages": [hex(p * 4096) for p in differ[:8]]}


async def migrate(src: RawVM, ctx: HostContext, netns: str, mig_ip: str, run_dir: Path, r: Recipe,
                  verify_ram: bool = False) -> tuple[RawVM, dict[str, Any]]:
    """Move ``src`` to a new QEMU on the host of ``ctx``; returns the destination VM and the figures.
    On failure the destination is removed and the source keeps running."""
    dst = await start(src.spec, ctx, netns, run_dir, incoming=True, recipe=r)
    uri = f"tcp:{mig_ip}:{49500 + next(_PORTS) % 400}"
    t0 = time.monotonic()
    deadline = t0 + MIGRATION_DEADLINE_S
    try:
        await _prepare(src, dst, r, uri)
        await src.execute("migrate", {"uri": uri})
        if r.pause_before_switchover:
            status = await _wait_status(src, {"pre-switchover"}, deadline)
            if status != "pre-switchover":
                raise RuntimeError(f"source migration {status}")
            await src.execute("migrate-continue", {"state": "pre-switchover"})
        status = await _wait_status(src, {"completed"}, deadline)
        if status != "completed":
            raise RuntimeError(f"source migration {status}")
        while (await dst.execute("query-status"))["status"] == "inmigrate":
            if time.monotonic() > deadline:
                raise TimeoutError("destination still inmigrate")
            await asyncio.sleep(0.005)
        ram_check = await ram_differences(src, dst, run_dir) if verify_ram else {}
        await dst.execute("cont")
        if r.announce_self:
            await dst.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100})
    except BaseException:
        await stop(dst)
        try:
            await src.execute("migrate_cancel")
            if (await src.execute("query-status"))["status"] != "running":
                await src.execute("cont")
        except Exception:      # noqa: BLE001
            pass
        raise
    total = time.monotonic() - t0
    info = await _final_info(src)         # after the clock stopped: QEMU computes its figures after "completed"
    await stop(src)
    ram = info.get("ram", {})
    return dst, {"total_s": round(total, 3), "downtime_ms": info.get("downtime"),
                 "ram_transferred": ram.get("transferred"), "passes": ram.get("dirty-sync-count"),
                 "max_cpu_throttle_pct": src.max_throttle_pct, **ram_check}

"""`kvmotion bench migrate`: live migration figures in the lab, kvmotion against a plain QEMU migration.

For every link (unshaped, or shaped with tc), guest RAM and dirty rate, two guests of that size and dirty rate are
created through the controller and booted the same way: one is run by kvmotion (controller + agents), the other
by QEMU alone, with kvmotion's exact command line and no agent (``bench.rawqemu``). Sides:

- ``kvmotion``: a kvmotion task, precheck to release, with its tuning;
- ``qemu-defaults``: a plain ``migrate`` with QEMU's defaults (128 MiB/s, 300 ms, one stream), then ``cont`` on the
  destination; its time runs from ``migrate`` to ``cont`` (starting the destination QEMU and stopping the source are
  not counted: the baseline is favoured). Under TCG its guest gets the 8 KiB of extra RAM kvmotion's guests get
  (``agent.hv.qemu.argv.guest_ram``), so both sides move the same RAM size;
- optional kvmotion variants that isolate one choice (``one-stream``, ``multifd-N``, ``xbzrle``, ``no-xbzrle``,
  ``equal-cpu``: the stream's threads not yielding the CPU to the vCPUs).

Every run moves each side's guest once to the other host; the order alternates (run 1 as given, run 2 reversed,
...), ``repeat`` runs per case (at least 3). A client pings the moving guest every 10 ms on a fixed timetable: the
client gap is the longest wall-clock silence between two replies. After every move the guest must answer over
HTTP from the client namespace with the same boot and a higher heartbeat; a guest that does not is a failed run,
left out of every figure, and is replaced. A benchmark, not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kvmotion.agent.hv.qemu.argv import TCG_RAM_PAD_KIB
from kvmotion_lab.bench import rawqemu, report
from kvmotion_lab.bench.rawqemu import Recipe
from kvmotion_lab.bench.survival import Guest, survived
from kvmotion.cli.client import Client
from kvmotion.models.agent import VMSpec
from kvmotion_lab.image.build import build_image
from kvmotion_lab import lab, scenario
from kvmotion_lab.probe import ClientProbe, ProbeReport

ROOT = Path("/tmp/kvmotion-bench-migrate")
PREFIX = "kvbm"
BASELINE = report.BASELINE               # "qemu-defaults": the plain QEMU side
MIN_REPEAT = 3
TIMEOUTS = {"progress_timeout_s": 30.0, "completion_timeout_s_per_gib": 30.0}   # a non-converging run ends
SETTLE_S = 1.0                           # probe running before and after each move
BEAT_WAIT_S = 45.0                       # a starved host is slow, not a dead guest
Log = Callable[[str], None]


def variant_options(name: str) -> dict[str, Any] | None:
    """The migrate request options of a kvmotion variant; None for the plain QEMU baseline (no kvmotion request)."""
    if name == BASELINE:
        return None
    if name == "kvmotion":
        return {}
    if name == "one-stream":
        return {"multifd_channels": 0}
    if name.startswith("multifd-") and name[8:].isdigit():
        return {"multifd_channels": int(name[8:])}
    if name in ("xbzrle", "no-xbzrle"):
        return {"xbzrle": name == "xbzrle"}
    if name == "equal-cpu":
        return {"guest_first": False}
    raise ValueError(f"unknown variant {name!r}: use kvmotion, qemu-defaults, one-stream, multifd-N, "
                     "xbzrle, no-xbzrle or equal-cpu")


def side_order(variants: list[str], run: int) -> list[str]:
    """The order of the moves in run ``run`` (0-based): as given, then reversed, and so on; with two sides each
    goes first in every other run."""
    return list(variants) if run % 2 == 0 else list(reversed(variants))


def baseline_recipe(accelerator: str) -> Recipe:
    """QEMU's defaults; under TCG with kvmotion's RAM pad, so both sides migrate the same guest RAM."""
    return Recipe() if accelerator == "kvm" else Recipe(ram_pad_kib=TCG_RAM_PAD_KIB)


@dataclass(frozen=True)
class Sweep:
    sizes: list[int]
    dirty: list[float]
    links: list[str]              # "unshaped" or a key of lab.LINK_RATES
    variants: list[str]
    repeat: int = MIN_REPEAT

    def check(self) -> None:
        for v in self.variants:
            variant_options(v)
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("a variant is listed twice")
        for link in self.links:
            if link != "unshaped" and link not in lab.LINK_RATES:
                raise ValueError(f"unknown link {link!r}: use unshaped or one of {', '.join(lab.LINK_RATES)}")
        if self.repeat < MIN_REPEAT:
            raise ValueError(f"repeat must be at least {MIN_REPEAT} (a median and a spread need 3 runs)")


def _phase_ms(task: dict[str, Any]) -> dict[str, float]:
    """Where kvmotion's time goes: every phase's duration, and the wait before the first one."""
    out: dict[str, float] = {}
    phases = task.get("phases") or []
    if phases:
        out["queued"] = round((phases[0]["started_at"] - task["created_at"]) * 1000, 1)
    for p in phases:
        if p.get("ended_at"):
            out[p["name"]] = round(out.get(p["name"], 0.0) + (p["ended_at"] - p["started_at"]) * 1000, 1)
    return out


def kvmotion_figures(case: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """One kvmotion move's figures, from its task."""
    r = task.get("result") or {}
    err = task.get("error") or {}
    ok = task.get("state") == "success"
    passes = r.get("pass_log") or []
    link = case["link_mbps"]
    qemu_ms = r.get("qemu_total_time_ms")
    sent = r.get("bytes_sent") or 0
    pred = r.get("predicted_vs_actual") or {}
    total_s = r.get("total_time_s") if ok else None
    peak = max((p.get("mbps", 0.0) for p in passes), default=0.0)
    mean = sent * 8 / 1e6 / (qemu_ms / 1000) if qemu_ms else None
    touched = (r.get("prediction") or {}).get("touched_mb")
    return {"ok": ok, "error": (err.get("message") or task.get("state")) if not ok else None,
            "total_s": total_s, "qemu_total_ms": qemu_ms, "downtime_ms": r.get("downtime_ms"),
            "guest_pause_ms": r.get("guest_pause_ms"), "parked_ms": r.get("parked_ms"),
            "bytes_sent": sent, "sent_ratio": r.get("sent_ratio"), "passes": r.get("passes"),
            "peak_mbps": round(peak, 1), "mean_mbps": round(mean, 1) if mean else None,
            "peak_vs_link": round(peak / link, 3) if link and peak else None,
            "touched_mb": touched, "lower_bound_s": round(touched * 8 / link, 3) if touched and link else None,
            "overhead_ms": round(total_s * 1000 - qemu_ms, 1) if total_s and qemu_ms else None,
            "phases_ms": _phase_ms(task), "stream": r.get("stream"),
            "guest_verdict": (r.get("guest_health") or {}).get("verdict"),
            "predicted_total_s": (pred.get("total_s") or [None])[0],
            "prediction_error_pct": pred.get("total_error_pct"),
            "pass_log": [{"t": round(p["t"] - passes[0]["t"], 3), "remaining": p["remaining"]} for p in passes]}


def baseline_figures(case: dict[str, Any], fig: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """One plain QEMU move's figures, from ``rawqemu.migrate``."""
    sent = fig.get("ram_transferred") or 0
    total = fig.get("total_s")
    ram = case["memory_mb"] * 1024 * 1024
    return {"ok": True, "error": None, "total_s": total, "wall_s": round(wall_s, 3),
            "downtime_ms": fig.get("downtime_ms"), "bytes_sent": sent,
            "sent_ratio": round(sent / ram, 3) if ram else None, "passes": fig.get("passes"),
            "mean_mbps": round(sent * 8 / 1e6 / total, 1) if total and sent else None,
            "max_cpu_throttle_pct": fig.get("max_cpu_throttle_pct"), "pass_log": []}


def client_view(path: Path, probe: ProbeReport) -> dict[str, Any]:
    """What the pinging client saw: the longest wall-clock silence between two replies in time order (a silence
    still running when the probe stopped counts up to its last send), lost pings, and the probe's own longest
    pause between two sends (a stall of the probe, not of the guest)."""
    sends: list[float] = []
    replies: list[float] = []
    max_rtt = 0.0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("k") == "ping":
            sends.append(float(rec["t"]))
            if rec.get("rtt_ms") is not None:
                replies.append(float(rec["t"]) + float(rec["rtt_ms"]) / 1000)
                max_rtt = max(max_rtt, float(rec["rtt_ms"]))
    sends.sort()
    replies.sort()
    marks = replies + ([sends[-1]] if sends and (not replies or sends[-1] > replies[-1]) else [])
    if not replies and sends:
        marks = [sends[0], sends[-1]]
    gaps = [(b - a, a) for a, b in zip(marks, marks[1:])]
    silence, since = max(gaps, default=(0.0, None))
    stall = max((b - a for a, b in zip(sends, sends[1:])), default=0.0) * 1000
    return {"gap_ms": round(silence * 1000, 1), "gap_from": since, "pings": probe.sent, "lost_pings": probe.lost,
            "lost_run_ms": probe.max_gap_ms, "probe_stall_ms": round(stall, 1), "max_rtt_ms": round(max_rtt, 1)}


@dataclass
class _Lab:
    info: lab.LabInfo
    client: Client
    accel: str
    recipe: Recipe
    work: Path

    @property
    def root(self) -> Path:
        return Path(self.info.root)


class CaseRunner:
    """One case (link, RAM, dirty rate) in one lab: a kvmotion guest, a plain QEMU guest, their moves."""

    def __init__(self, lb: _Lab, case: dict[str, Any], log: Log) -> None:
        self.lb, self.case, self.log = lb, case, log
        self.guests: dict[str, Guest] = {}
        self.counter = 0
        self.at: dict[str, Any] = {"variant": "kvmotion", "run": 1}     # what a failure would belong to

    # -- guests ---------------------------------------------------------------------------------------
    async def _boot(self, side: str) -> Guest:
        c = self.lb.client
        self.at["variant"] = "kvmotion" if side == "kvmotion" else BASELINE
        self.counter += 1
        name = f"b{'k' if side == 'kvmotion' else 'q'}{self.case['memory_mb']}d{int(self.case['dirty_mb_s'])}" \
               f"n{self.counter}"
        vm = await asyncio.to_thread(c.create_vm, name=name, host="h1", memory_mb=self.case["memory_mb"],
                                     dirty_mb_s=self.case["dirty_mb_s"], encrypted_vmotion="disabled")
        g = Guest(name, vm["spec"]["guest_ip"], vm["uuid"])
        if side == "kvmotion":
            await asyncio.to_thread(c.start_vm, name)
        else:
            spec = VMSpec(**(await asyncio.to_thread(c.vm, name))["spec"])
            ctx = rawqemu.lab_context(self.lb.root, "h1", self.lb.accel)
            g.raw = await rawqemu.start(spec, ctx, self.lb.info.host_netns("h1"), self._run_dir(g), False,
                                        self.lb.recipe)
        hb = await asyncio.to_thread(scenario.wait_guest, self.lb.info.net.client_netns, g.ip)
        g.boot_id, g.seq = str(hb["boot_id"]), int(hb["seq"])
        await asyncio.sleep(2.0)                 # the dirtier is at its rate
        return g

    def _run_dir(self, g: Guest) -> Path:
        self.counter += 1
        return self.lb.root / "raw" / f"{g.name}-{self.counter}"

    async def _remove(self, g: Guest) -> None:
        c = self.lb.client
        if g.raw is not None:
            await rawqemu.stop(g.raw)
        elif (await asyncio.to_thread(c.vm, g.name)).get("power_state") == "poweredOn":
            await asyncio.to_thread(c.stop_vm, g.name)
        await asyncio.to_thread(c.delete_vm, g.name)

    # -- survival -------------------------------------------------------------------------------------
    async def _check(self, g: Guest) -> str | None:
        """None when the guest survived (same boot, higher heartbeat); else the kind of break."""
        kind, _beat, _console = await survived(self.lb.client, self.lb.root, self.lb.info.net.client_netns, g)
        return kind

    # -- moves ----------------------------------------------------------------------------------------
    async def _move_kvmotion(self, g: Guest, variant: str, dest: str) -> dict[str, Any]:
        c = self.lb.client
        task = await asyncio.to_thread(c.migrate, g.name, dest, **TIMEOUTS, **(variant_options(variant) or {}))
        task = await asyncio.to_thread(scenario.follow_task, c, task["id"])
        g.host = (await asyncio.to_thread(c.vm, g.name))["host"]
        return kvmotion_figures(self.case, task)

    async def _move_raw(self, g: Guest, dest: str) -> dict[str, Any]:
        assert g.raw is not None
        h = self.lb.info.net.host(dest)
        ctx = rawqemu.lab_context(self.lb.root, dest, self.lb.accel)
        t0 = time.monotonic()
        try:
            g.raw, fig = await rawqemu.migrate(g.raw, ctx, h.netns, h.mig_ip, self._run_dir(g), self.lb.recipe)
        except Exception as exc:      # noqa: BLE001 - a failed move is a result (the source keeps running)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "total_s": None, "pass_log": []}
        g.host = dest
        return baseline_figures(self.case, fig, time.monotonic() - t0)

    async def move(self, variant: str, run: int, position: int) -> dict[str, Any]:
        """One move of one side, with the client probe around it and the survival check after it."""
        side = "raw" if variant == BASELINE else "kvmotion"
        self.at = {"variant": variant, "run": run}
        g = self.guests[side]
        dest = "h2" if g.host == "h1" else "h1"
        path = self.lb.work / f"{self.case['link']}-{g.name}-r{run}-{variant}.jsonl"
        if side == "kvmotion":      # a fresh dirty-rate sample for the prediction, before the probe's window
            await asyncio.to_thread(self.lb.client.validate, g.name, dest)
        probe = ClientProbe(self.lb.info.net.client_netns, g.ip.split("/")[0], scenario.heartbeat_url(g.ip),
                            interval_ms=10, out=path)
        await asyncio.to_thread(probe.start)
        try:
            await asyncio.sleep(SETTLE_S)
            try:
                fig = await (self._move_raw(g, dest) if side == "raw" else self._move_kvmotion(g, variant, dest))
            except Exception as exc:      # noqa: BLE001 - a refused or broken request is a failed move
                fig = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "total_s": None, "pass_log": []}
                if side == "kvmotion":
                    g.host = (await asyncio.to_thread(self.lb.client.vm, g.name))["host"]
            await asyncio.sleep(SETTLE_S)
        finally:
            seen = await asyncio.to_thread(probe.stop)
        broken = await self._check(g)
        rec = {**self.case, "variant": variant, "side": side, "run": run, "first": position == 0, **fig,
               **client_view(path, seen), "guest": g.name, "guest_survived": broken is None, "broken": broken}
        if broken is not None:
            self.log(f"  guest {g.name} did not survive ({broken}); replacing it")
            await self._remove(g)
            self.guests[side] = await self._boot(side)
        return rec

    async def run(self, variants: list[str], repeat: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            for side in ("kvmotion", "raw"):
                if side == "kvmotion" or BASELINE in variants:
                    self.guests[side] = await self._boot(side)
            for run in range(repeat):
                for position, variant in enumerate(side_order(variants, run)):
                    rec = await self.move(variant, run + 1, position)
                    out.append(rec)
                    self.log(report.one_line(rec))
        except Exception as exc:      # noqa: BLE001 - the case ends here, as a failed run; the sweep goes on
            self.log(f"  case aborted: {type(exc).__name__}: {exc}")
            side = "raw" if self.at["variant"] == BASELINE else "kvmotion"
            out.append({**self.case, **self.at, "side": side, "ok": False, "total_s": None, "pass_log": [],
                        "error": f"case aborted: {type(exc).__name__}: {exc}"})
        finally:
            for g in self.guests.values():
                try:
                    await self._remove(g)
                except Exception as exc:      # noqa: BLE001 - the lab goes down next anyway
                    self.log(f"  could not remove {g.name}: {exc}")
        return out


async def _run_link(info: lab.LabInfo, link: str, sweep: Sweep, work: Path, log: Log,
                    meta: dict[str, Any]) -> list[dict[str, Any]]:
    client = Client(info.controller_url, token=info.admin_token(), timeout=60)
    facts = (await asyncio.to_thread(client.host, "h1")).get("facts") or {}
    accel = facts.get("accelerator", "tcg")
    lb = _Lab(info, client, accel, baseline_recipe(accel), work)
    meta.update(accelerator=accel, baseline_recipe=dataclasses.asdict(lb.recipe))
    link_mbps = float(max((i.get("speed_mbps") or 0 for i in facts.get("migration_interfaces", [])), default=0))
    records: list[dict[str, Any]] = []
    for size in sweep.sizes:
        for dirty in sweep.dirty:
            case = {"link": link, "link_mbps": link_mbps, "memory_mb": size, "dirty_mb_s": dirty}
            log(f"{link} ({link_mbps:.0f} Mbit/s), {size} MiB, dirty {dirty:g} MB/s")
            records.extend(await CaseRunner(lb, case, log).run(sweep.variants, sweep.repeat))
    return records


def run(sweep: Sweep, out_dir: Path, log: Log = print, root: Path = ROOT, prefix: str = PREFIX) -> dict[str, Any]:
    sweep.check()
    image = build_image(log=lambda m: None)
    started = time.time()
    records: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    probes = out_dir / "probes"            # every run's client probe log, kept as the evidence of its figures
    probes.mkdir(parents=True, exist_ok=True)
    for link in sweep.links:
        info = lab.up(2, root, prefix=prefix, image_dir=image.kernel.parent.parent,
                      link=None if link == "unshaped" else link, log=lambda m: None)
        try:
            records.extend(asyncio.run(_run_link(info, link, sweep, probes, log, meta)))
        finally:
            lab.down(root)
    result = {"command": "kvmotion bench migrate", "schema": 2, "sweep": dataclasses.asdict(sweep),
              "started_at": started, "finished_at": time.time(), "machine": report.machine(),
              "baseline": {"recipe": meta.get("baseline_recipe"), "accelerator": meta.get("accelerator")},
              "records": records}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-migrate.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench-migrate.md").write_text(report.markdown(result))
    report.plots(result, out_dir)
    return result

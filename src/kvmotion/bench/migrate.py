"""`kvmotion bench migrate`: live migration figures in the lab, kvmotion against QEMU's defaults.

For every link (unshaped, or shaped with tc), guest RAM and dirty rate, one real guest is migrated back and
forth, once per variant: ``kvmotion`` (its tuning) and ``qemu-defaults`` (a plain QEMU migration: 128 MiB/s,
300 ms, one stream), plus optional variants that isolate one choice (``one-stream``, ``multifd-N``,
``xbzrle``). A client pings the guest every 10 ms. A benchmark, not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kvmotion.bench import report
from kvmotion.cli.client import Client
from kvmotion.image.build import build_image
from kvmotion.lab import lab, scenario

ROOT = Path("/tmp/kvmotion-bench-migrate")
TIMEOUTS = {"progress_timeout_s": 30.0, "completion_timeout_s_per_gib": 30.0}   # a non-converging run ends


def variant_options(name: str) -> dict[str, Any]:
    """The migrate request options of a variant."""
    if name == "kvmotion":
        return {}
    if name == "qemu-defaults":
        return {"tuning": "qemu-defaults"}
    if name == "one-stream":
        return {"multifd_channels": 0}
    if name.startswith("multifd-") and name[8:].isdigit():
        return {"multifd_channels": int(name[8:])}
    if name in ("xbzrle", "no-xbzrle"):
        return {"xbzrle": name == "xbzrle"}
    raise ValueError(f"unknown variant {name!r}: use kvmotion, qemu-defaults, one-stream, multifd-N, "
                     "xbzrle or no-xbzrle")


@dataclass(frozen=True)
class Sweep:
    sizes: list[int]
    dirty: list[float]
    links: list[str]              # "unshaped" or a key of lab.LINK_RATES
    variants: list[str]
    repeat: int = 1


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


def record(case: dict[str, Any], variant: str, run: int, move: scenario.MoveResult) -> dict[str, Any]:
    """One migration's figures, from its task and the client probe."""
    r = move.task.get("result") or {}
    err = move.task.get("error") or {}
    passes = r.get("pass_log") or []
    link = case["link_mbps"]
    qemu_ms = r.get("qemu_total_time_ms")
    sent = r.get("bytes_sent") or 0
    pred = (r.get("predicted_vs_actual") or {})
    total_s = r.get("total_time_s") if move.ok else None
    peak = max((p.get("mbps", 0.0) for p in passes), default=0.0)
    mean = sent * 8 / 1e6 / (qemu_ms / 1000) if qemu_ms else None
    touched = ((r.get("prediction") or {}).get("touched_mb"))
    return {**case, "variant": variant, "run": run, "ok": move.ok,
            "error": err.get("message") if err else None,
            "total_s": total_s, "qemu_total_ms": qemu_ms, "downtime_ms": r.get("downtime_ms"),
            "guest_pause_ms": r.get("guest_pause_ms"), "parked_ms": r.get("parked_ms"),
            "gap_ms": move.probe.max_gap_ms, "lost_pings": move.probe.lost,
            "guest_survived": move.after is not None,
            "bytes_sent": sent, "sent_ratio": r.get("sent_ratio"), "passes": r.get("passes"),
            "peak_mbps": round(peak, 1), "mean_mbps": round(mean, 1) if mean else None,
            "peak_vs_link": round(peak / link, 3) if link else None,
            "touched_mb": touched,
            "lower_bound_s": round(touched * 8 / link, 3) if touched and link else None,
            "overhead_ms": round(total_s * 1000 - qemu_ms, 1) if total_s and qemu_ms else None,
            "phases_ms": _phase_ms(move.task), "stream": r.get("stream"),
            "predicted_total_s": (pred.get("total_s") or [None])[0],
            "prediction_error_pct": pred.get("total_error_pct"),
            "pass_log": [{"t": round(p["t"] - passes[0]["t"], 3), "remaining": p["remaining"]} for p in passes]}


def _link_mbps(client: Client, host: str) -> float:
    facts = client.call("GET", f"/hosts/{host}").get("facts") or {}
    return float(max((i.get("speed_mbps") or 0 for i in facts.get("migration_interfaces", [])), default=0))


class _Guest:
    """The benchmark's VM: created, booted and (after a guest crash) replaced."""

    def __init__(self, client: Client, info: lab.LabInfo, name: str, memory_mb: int, dirty: float) -> None:
        self.client, self.info, self.name, self.memory_mb, self.dirty = client, info, name, memory_mb, dirty
        self.host = "h1"
        self.ip = ""

    def boot(self) -> None:
        vm = self.client.create_vm(name=self.name, host="h1", memory_mb=self.memory_mb, dirty_mb_s=self.dirty,
                                   encrypted_vmotion="disabled")
        self.ip, self.host = vm["spec"]["guest_ip"], "h1"
        self.client.start_vm(self.name)
        scenario.wait_guest(self.info.net.client_netns, self.ip)
        time.sleep(2.0)                 # the dirtier is at its rate

    def remove(self) -> None:
        vm = self.client.vm(self.name)
        if vm.get("power_state") == "poweredOn":
            self.client.stop_vm(self.name)
        self.client.delete_vm(self.name)


def run_case(client: Client, info: lab.LabInfo, case: dict[str, Any], variants: list[str], repeat: int,
             log: Callable[[str], None]) -> list[dict[str, Any]]:
    guest = _Guest(client, info, f"bm{case['memory_mb']}d{int(case['dirty_mb_s'])}", case["memory_mb"],
                   case["dirty_mb_s"])
    guest.boot()
    out: list[dict[str, Any]] = []
    try:
        for run in range(repeat):
            for variant in variants:
                dest = "h2" if guest.host == "h1" else "h1"
                client.validate(guest.name, dest)      # a fresh dirty-rate sample for the prediction
                with tempfile.TemporaryDirectory() as tmp:
                    move = scenario.migrate_with_probe(client, info.net, guest.name, guest.ip, dest,
                                                       Path(tmp) / "probe.jsonl", settle_s=1.0,
                                                       **TIMEOUTS, **variant_options(variant))
                rec = record(case, variant, run + 1, move)
                out.append(rec)
                log(report.one_line(rec))
                guest.host = client.vm(guest.name)["host"]
                if move.after is None:          # the guest died (QEMU TCG issue, see README): a new one
                    log(f"  guest {guest.name} stopped answering; replacing it")
                    guest.remove()
                    guest.boot()
    finally:
        guest.remove()
    return out


def run(sweep: Sweep, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    for v in sweep.variants:
        variant_options(v)
    for link in sweep.links:
        if link != "unshaped" and link not in lab.LINK_RATES:
            raise ValueError(f"unknown link {link!r}: use unshaped or one of {', '.join(lab.LINK_RATES)}")
    image = build_image(log=lambda m: None)
    started = time.time()
    records: list[dict[str, Any]] = []
    for link in sweep.links:
        info = lab.up(2, ROOT, prefix="kvbm", image_dir=image.kernel.parent.parent,
                      link=None if link == "unshaped" else link, log=lambda m: None)
        try:
            client = Client(info.controller_url, token=info.admin_token(), timeout=60)
            link_mbps = _link_mbps(client, "h1")
            for size in sweep.sizes:
                for dirty in sweep.dirty:
                    case = {"link": link, "link_mbps": link_mbps, "memory_mb": size, "dirty_mb_s": dirty}
                    log(f"{link} ({link_mbps:.0f} Mbit/s), {size} MiB, dirty {dirty:g} MB/s")
                    records.extend(run_case(client, info, case, sweep.variants, sweep.repeat, log))
        finally:
            lab.down(ROOT)
    result = {"command": "kvmotion bench migrate", "sweep": sweep.__dict__, "started_at": started,
              "finished_at": time.time(), "machine": report.machine(), "records": records}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-migrate.json").write_text(json.dumps(result, indent=1))
    (out_dir / "bench-migrate.md").write_text(report.markdown(result))
    report.plots(result, out_dir)
    return result

"""Turn `kvmotion bench migrate` records into ratios, a Markdown table and matplotlib plots (pure but plots)."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    try:
        qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        qemu = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "qemu": qemu,
            "python": platform.python_version(), "accelerator": os.environ.get("KVMOTION_ACCEL", "auto")}


def _f(v: Any, fmt: str = "{:.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def one_line(r: Record) -> str:
    if not r["ok"]:
        return f"  {r['variant']:<14} FAILED: {r['error']}"
    return (f"  {r['variant']:<14} total {_f(r['total_s'], '{:.2f}')} s (QEMU {_f(r['qemu_total_ms'])} ms), "
            f"downtime {_f(r['downtime_ms'])} ms, gap {_f(r['gap_ms'])} ms, sent {_f(r['sent_ratio'], '{:.2f}')}× RAM, "
            f"{r['passes']} passes, peak {_f(r['peak_mbps'])} Mbit/s, predicted {_f(r['predicted_total_s'], '{:.2f}')} s")


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def percentile(values: list[float | None], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of the values that exist."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    k = max(0, min(len(vals) - 1, -(-int(q * len(vals)) // 100) - 1))
    return vals[k]


def groups(records: list[Record]) -> dict[tuple[str, int, float, str], list[Record]]:
    out: dict[tuple[str, int, float, str], list[Record]] = {}
    for r in records:
        out.setdefault((r["link"], r["memory_mb"], r["dirty_mb_s"], r["variant"]), []).append(r)
    return out


def baseline_seconds(r: Record) -> float | None:
    """What a plain QEMU migration takes: QEMU's own total time (no orchestration around it)."""
    return r["qemu_total_ms"] / 1000 if r["ok"] and r["qemu_total_ms"] else None


def ratios(records: list[Record]) -> list[Record]:
    """Per case: kvmotion's total time (end to end) ÷ QEMU defaults' (QEMU's own total), and the figures around it."""
    g = groups(records)
    rows = []
    for (link, mem, dirty, variant), runs in g.items():
        if variant != "kvmotion":
            continue
        base = g.get((link, mem, dirty, "qemu-defaults"), [])
        ours_s = median([r["total_s"] for r in runs])
        base_s = median([baseline_seconds(r) for r in base])
        rows.append({"link": link, "memory_mb": mem, "dirty_mb_s": dirty, "kvmotion_s": ours_s,
                     "qemu_defaults_s": base_s,
                     "qemu_defaults_failed": sum(1 for r in base if not r["ok"]),
                     "ratio": round(ours_s / base_s, 3) if ours_s and base_s else None,
                     "downtime_ms": median([r["downtime_ms"] for r in runs]),
                     "baseline_downtime_ms": median([r["downtime_ms"] for r in base if r["ok"]]),
                     "gap_ms": median([r["gap_ms"] for r in runs]),
                     "lower_bound_s": median([r["lower_bound_s"] for r in runs]),
                     "peak_vs_link": median([r["peak_vs_link"] for r in runs])})
    return rows


def targets(records: list[Record]) -> list[Record]:
    """Each target of the performance issue, measured from these records (None: not in this sweep)."""
    ok = [r for r in records if r["ok"] and r["variant"] == "kvmotion"]
    rows = ratios(records)
    idle_1g = [r["ratio"] for r in rows if r["link"] == "unshaped" and r["memory_mb"] == 1024
               and not r["dirty_mb_s"] and r["ratio"] is not None]
    shaped = [r["peak_vs_link"] for r in ok if r["link"] == "1g"]
    d20 = [r for r in ok if r["link"] == "unshaped" and r["dirty_mb_s"] == 20]
    errs = [abs(r["prediction_error_pct"]) for r in ok if r["prediction_error_pct"] is not None]
    over = [r["overhead_ms"] for r in ok]

    def row(name: str, value: float | None, goal: str, met: bool | None, n: int) -> Record:
        return {"target": name, "measured": value, "goal": goal, "met": met, "samples": n}
    p50 = median([r["downtime_ms"] for r in d20])
    p99 = percentile([r["gap_ms"] for r in d20], 99)
    within = sum(1 for e in errs if e <= 30)
    return [
        row("total ÷ QEMU defaults, 1 GiB idle, unshaped", median(idle_1g), "≤ 0.5",
            None if not idle_1g else median(idle_1g) <= 0.5, len(idle_1g)),
        row("peak throughput ÷ link, shaped 1 GbE", median(shaped), "≥ 0.9",
            None if not shaped else median(shaped) >= 0.9, len(shaped)),
        row("QEMU downtime p50 ms, 20 MB/s, unshaped", p50, "≤ 50", None if p50 is None else p50 <= 50, len(d20)),
        row("client gap p99 ms, 20 MB/s, unshaped", p99, "≤ 200", None if p99 is None else p99 <= 200, len(d20)),
        row("runs within ±30 % of the prediction (%)", round(100 * within / len(errs), 1) if errs else None,
            "100", None if not errs else within == len(errs), len(errs)),
        row("orchestration overhead p50 ms", median(over), "≤ 300", None if not over else median(over) <= 300,
            len(over)),
    ]


def overhead(records: list[Record]) -> dict[str, float | None]:
    """Median time per phase outside QEMU's pre-copy, for kvmotion's runs."""
    ok = [r for r in records if r["ok"] and r["variant"] == "kvmotion"]
    names = ["queued", "precheck", "shadow", "resume", "announce", "release"]
    return {n: median([r["phases_ms"].get(n) for r in ok]) for n in names}


def markdown(result: dict[str, Any]) -> str:
    recs = result["records"]
    m = result["machine"]
    when = time.strftime("%Y-%m-%d", time.gmtime(result["started_at"]))
    lines = [f"`{result['command']}` on {when}: {m['cpu']}, {m['cores']} cores, {m['qemu']}, "
             f"accelerator {m['accelerator']}.", "",
             "| link | RAM MiB | dirty MB/s | kvmotion s | QEMU defaults s | ratio | downtime ms (kvm / defaults) "
             "| client gap ms | lower bound s | peak ÷ link |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ratios(recs):
        base = _f(r["qemu_defaults_s"], "{:.2f}") if r["qemu_defaults_s"] else (
            "did not converge" if r["qemu_defaults_failed"] else "–")
        lines.append(f"| {r['link']} | {r['memory_mb']} | {r['dirty_mb_s']:g} | {_f(r['kvmotion_s'], '{:.2f}')} | "
                     f"{base} | {_f(r['ratio'], '{:.2f}')} | {_f(r['downtime_ms'])} / "
                     f"{_f(r['baseline_downtime_ms'])} | {_f(r['gap_ms'])} | {_f(r['lower_bound_s'], '{:.2f}')} | "
                     f"{_f(r['peak_vs_link'], '{:.2f}')} |")
    lines += ["", "| target | measured | goal | met | samples |", "|---|---|---|---|---|"]
    for t in targets(recs):
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {_f(t['measured'], '{:.2f}')} | {t['goal']} | {met} | {t['samples']} |")
    oh = overhead(recs)
    lines += ["", "Orchestration (median ms): " + ", ".join(f"{k} {_f(v)}" for k, v in oh.items())]
    others = sorted({r["variant"] for r in recs} - {"kvmotion", "qemu-defaults"})
    if others:
        lines += ["", "| link | RAM MiB | dirty MB/s | variant | total s | QEMU ms | downtime ms | peak Mbit/s | passes |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (link, mem, dirty, variant), runs in sorted(groups(recs).items()):
            if variant == "qemu-defaults":
                continue
            lines.append(f"| {link} | {mem} | {dirty:g} | {variant} | {_f(median([r['total_s'] for r in runs]), '{:.2f}')} "
                         f"| {_f(median([r['qemu_total_ms'] for r in runs]))} | "
                         f"{_f(median([r['downtime_ms'] for r in runs]))} | "
                         f"{_f(median([r['peak_mbps'] for r in runs]))} | {_f(median([r['passes'] for r in runs]))} |")
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """remaining.png (remaining bytes per pass over time) and downtime.png (downtime distribution)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in result["records"] if r["ok"]]
    paths = []
    links = sorted({r["link"] for r in recs}) or ["none"]
    fig, axes = plt.subplots(1, len(links), figsize=(5 * len(links), 4.5), sharey=True, squeeze=False)
    cases = sorted({(r["memory_mb"], r["dirty_mb_s"]) for r in recs})
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(cases)}
    for ax, link in zip(axes[0], links):
        for (lk, mem, dirty, variant), runs in sorted(groups(recs).items()):
            log = runs[0]["pass_log"]
            if lk != link or not log:
                continue
            ax.plot([p["t"] for p in log], [max(p["remaining"] / 2 ** 20, 0.01) for p in log], marker="o", markersize=3,
                    color=colors[(mem, dirty)], linestyle="-" if variant == "kvmotion" else "--",
                    label=f"{mem} MiB, {dirty:g} MB/s, {variant}")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.01)                     # a completed migration's last point (nothing left)
        ax.set_title(f"link: {link}")
        ax.set_xlabel("seconds since the first pass")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("remaining MiB (log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("remaining memory per pass (solid: kvmotion, dashed: QEMU defaults or other variants)")
    paths.append(out_dir / "remaining.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    variants = sorted({r["variant"] for r in recs})
    data = [[r["downtime_ms"] for r in recs if r["variant"] == v and r["downtime_ms"] is not None] for v in variants]
    if any(data):
        ax.boxplot([d or [0] for d in data])
        ax.set_xticks(range(1, len(variants) + 1), variants)
    ax.set_ylabel("QEMU downtime, ms")
    ax.set_title("downtime distribution")
    paths.append(out_dir / "downtime.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths

"""Turn `kvmotion bench migrate` records into figures, targets, a Markdown table and matplotlib plots.

Every figure is the median of the runs that count, with their spread (min–max). A run counts when its move
succeeded and its guest survived it (same boot, higher heartbeat afterwards); a run that does not is listed as a
failure and left out of every figure, ratio, percentile and target. The ratio is per run: kvmotion's total time
÷ the baseline's in the same run, for the runs where both count. A target is met or missed only with enough
samples (``MIN_SAMPLES``); with fewer it says "no data". Pure but the plots.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

Record = dict[str, Any]
BASELINE = "qemu-defaults"
MIN_SAMPLES = {"ratio": 3, "peak": 3, "downtime": 3, "gap": 9, "prediction": 9, "overhead": 3}


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    try:
        qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        qemu = "?"
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "qemu": qemu,
            "python": platform.python_version(), "accelerator": os.environ.get("KVMOTION_ACCEL", "auto"),
            "loadavg_1m": load}


def _f(v: Any, fmt: str = "{:.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def counted(r: Record) -> bool:
    """The move succeeded and the guest survived it (records from before the survival check: no check)."""
    return bool(r.get("ok")) and r.get("guest_survived") is not False


def failure(r: Record) -> str | None:
    """What went wrong in a run that does not count; None for one that does."""
    if not r.get("ok"):
        return f"move failed: {r.get('error') or 'unknown error'}"
    if r.get("guest_survived") is False:
        return f"guest did not survive the move: {r.get('broken') or 'no heartbeat'}"
    return None


def one_line(r: Record) -> str:
    head = f"  run {r['run']} {r['variant']:<14}"
    if not counted(r):
        return f"{head} FAILED: {failure(r)}"
    pred = "" if r.get("side") == "raw" else f", predicted {_f(r.get('predicted_total_s'), '{:.2f}')} s"
    return (f"{head} total {_f(r.get('total_s'), '{:.2f}')} s, downtime {_f(r.get('downtime_ms'))} ms, "
            f"client gap {_f(r.get('gap_ms'))} ms (probe stall {_f(r.get('probe_stall_ms'))} ms), "
            f"sent {_f(r.get('sent_ratio'), '{:.2f}')}× RAM, {_f(r.get('passes'))} passes{pred}")


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


def spread(values: list[float | None]) -> tuple[float, float, float] | None:
    """(median, min, max) of the values that exist; None when there are none."""
    vals = [v for v in values if v is not None]
    return (statistics.median(vals), min(vals), max(vals)) if vals else None


def fmt_spread(values: list[float | None], fmt: str = "{:.0f}") -> str:
    """"median (min–max)", or the one value, or "–"."""
    s = spread(values)
    if s is None:
        return "–"
    med, lo, hi = (fmt.format(v) for v in s)
    return med if lo == hi else f"{med} ({lo}–{hi})"


def groups(records: list[Record]) -> dict[tuple[str, int, float, str], list[Record]]:
    out: dict[tuple[str, int, float, str], list[Record]] = {}
    for r in records:
        out.setdefault((r["link"], r["memory_mb"], r["dirty_mb_s"], r["variant"]), []).append(r)
    return out


def baseline_seconds(r: Record) -> float | None:
    """The baseline's time: a plain QEMU move's (``migrate`` to ``cont``); in results from before the plain QEMU
    baseline (no ``side``), QEMU's own total time of the move kvmotion ran with QEMU's defaults."""
    if not counted(r):
        return None
    if r.get("side") == "raw":
        return r.get("total_s")
    return r["qemu_total_ms"] / 1000 if r.get("qemu_total_ms") else None


def paired_ratios(ours: list[Record], base: list[Record]) -> list[float]:
    """kvmotion's total ÷ the baseline's, run by run, for the runs where both count."""
    by_run = {r["run"]: baseline_seconds(r) for r in base}
    out = []
    for r in ours:
        b = by_run.get(r["run"])
        if counted(r) and r.get("total_s") and b:
            out.append(round(r["total_s"] / b, 3))
    return out


def _vals(runs: list[Record], key: str, fn: Callable[[Record], Any] | None = None) -> list[Any]:
    return [(fn(r) if fn else r.get(key)) for r in runs if counted(r)]


def cases(records: list[Record]) -> list[Record]:
    """Per case (link, RAM, dirty rate): kvmotion's and the baseline's figures, every one a list over the runs that
    count, the per-run ratios, and how many runs counted of how many."""
    g = groups(records)
    keys = sorted({k[:3] for k in g})
    rows = []
    for link, mem, dirty in keys:
        ours = g.get((link, mem, dirty, "kvmotion"), [])
        base = g.get((link, mem, dirty, BASELINE), [])
        rows.append({"link": link, "memory_mb": mem, "dirty_mb_s": dirty,
                     "runs": [sum(map(counted, ours)), len(ours)],
                     "baseline_runs": [sum(map(counted, base)), len(base)],
                     "kvmotion_s": _vals(ours, "total_s"), "qemu_defaults_s": _vals(base, "", baseline_seconds),
                     "ratio": paired_ratios(ours, base),
                     "downtime_ms": _vals(ours, "downtime_ms"), "baseline_downtime_ms": _vals(base, "downtime_ms"),
                     "gap_ms": _vals(ours, "gap_ms"), "baseline_gap_ms": _vals(base, "gap_ms"),
                     "lower_bound_s": _vals(ours, "lower_bound_s"), "peak_vs_link": _vals(ours, "peak_vs_link")})
    return rows


def _target(name: str, measured: float | None, goal: str, test: Callable[[float], bool], samples: int,
            need: int) -> Record:
    met = None if measured is None or samples < need else bool(test(measured))
    return {"target": name, "measured": measured, "goal": goal, "met": met, "samples": samples, "needs": need}


def targets(records: list[Record]) -> list[Record]:
    """Each target of the performance issue, measured from the runs that count; ``met`` is None (no data) when
    the sweep has fewer samples than ``MIN_SAMPLES`` for it."""
    ours = [r for r in records if r["variant"] == "kvmotion" and counted(r)]
    idle = next((c["ratio"] for c in cases(records) if c["link"] == "unshaped" and c["memory_mb"] == 1024
                 and not c["dirty_mb_s"]), [])
    shaped = [r["peak_vs_link"] for r in ours if r["link"] == "1g" and r.get("peak_vs_link") is not None]
    d20 = [r for r in ours if r["link"] == "unshaped" and r["dirty_mb_s"] == 20]
    downs = [r["downtime_ms"] for r in d20 if r.get("downtime_ms") is not None]
    gaps = [r["gap_ms"] for r in d20 if r.get("gap_ms") is not None]
    errs = [abs(r["prediction_error_pct"]) for r in ours if r.get("prediction_error_pct") is not None]
    over = [r["overhead_ms"] for r in ours if r.get("overhead_ms") is not None]
    within = round(100 * sum(1 for e in errs if e <= 30) / len(errs), 1) if errs else None
    n = MIN_SAMPLES
    return [
        _target("total ÷ QEMU defaults, 1 GiB idle, unshaped", median(idle), "≤ 0.5", lambda v: v <= 0.5,
                len(idle), n["ratio"]),
        _target("peak throughput ÷ link, shaped 1 GbE", median(shaped), "≥ 0.9", lambda v: v >= 0.9,
                len(shaped), n["peak"]),
        _target("QEMU downtime p50 ms, 20 MB/s, unshaped", median(downs), "≤ 50", lambda v: v <= 50,
                len(downs), n["downtime"]),
        _target("client gap p99 ms, 20 MB/s, unshaped", percentile(gaps, 99), "≤ 200", lambda v: v <= 200,
                len(gaps), n["gap"]),
        _target("moves within ±30 % of the prediction (%)", within, "≥ 90", lambda v: v >= 90, len(errs),
                n["prediction"]),
        _target("orchestration overhead p50 ms", median(over), "≤ 300", lambda v: v <= 300, len(over),
                n["overhead"]),
    ]


def overhead(records: list[Record]) -> dict[str, float | None]:
    """Median time per phase outside QEMU's pre-copy, for kvmotion's runs that count."""
    ok = [r for r in records if r["variant"] == "kvmotion" and counted(r)]
    names = ["queued", "precheck", "shadow", "resume", "announce", "release"]
    return {n: median([(r.get("phases_ms") or {}).get(n) for r in ok]) for n in names}


def _header(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    base = result.get("baseline") or {}
    when = time.strftime("%Y-%m-%d", time.gmtime(result["started_at"]))
    load = f", load {m['loadavg_1m']:.1f}" if m.get("loadavg_1m") is not None else ""
    lines = [f"`{result['command']}` on {when}: {m['cpu']}, {m['cores']} cores{load}, {m['qemu']}, "
             f"accelerator {base.get('accelerator') or m['accelerator']}; "
             f"{(result.get('sweep') or {}).get('repeat', '?')} runs per case.", ""]
    if base.get("recipe") is not None:
        pad = base["recipe"].get("ram_pad_kib") or 0
        lines += ["QEMU defaults: a plain QEMU `migrate` (128 MiB/s, 300 ms, one stream) of a second guest with "
                  "kvmotion's exact argv, no agent; its time runs from `migrate` to `cont` on the destination. "
                  + (f"Its guest RAM is {pad} KiB above the MiB size, as kvmotion's under TCG, so both move the "
                     "same RAM. " if pad else "")
                  + "kvmotion's time is the whole task, precheck to release. The order alternates run by run. "
                  "Figures: median (min–max) of the runs that count (move succeeded, guest survived); ratio: per "
                  "run. Client gap: the longest wall-clock silence between two replies to 10 ms pings.", ""]
    else:
        lines += ["QEMU defaults in this older result: kvmotion's own pipeline with QEMU's default tuning, timed by "
                  "QEMU's own total time (not a plain QEMU migration); no survival check or timetable probe.", ""]
    return lines


def _case_table(records: list[Record]) -> list[str]:
    lines = ["| link | RAM MiB | dirty MB/s | runs ok (kvm / defaults) | kvmotion s | QEMU defaults s | ratio "
             "| downtime ms kvmotion | downtime ms defaults | client gap ms kvmotion | client gap ms defaults "
             "| lower bound s | peak ÷ link |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases(records):
        lines.append(f"| {c['link']} | {c['memory_mb']} | {c['dirty_mb_s']:g} | {c['runs'][0]}/{c['runs'][1]} / "
                     f"{c['baseline_runs'][0]}/{c['baseline_runs'][1]} | {fmt_spread(c['kvmotion_s'], '{:.2f}')} | "
                     f"{fmt_spread(c['qemu_defaults_s'], '{:.2f}')} | {fmt_spread(c['ratio'], '{:.2f}')} | "
                     f"{fmt_spread(c['downtime_ms'])} | {fmt_spread(c['baseline_downtime_ms'])} | "
                     f"{fmt_spread(c['gap_ms'])} | {fmt_spread(c['baseline_gap_ms'])} | "
                     f"{fmt_spread(c['lower_bound_s'], '{:.2f}')} | {fmt_spread(c['peak_vs_link'], '{:.2f}')} |")
    stalls = [r.get("probe_stall_ms") for r in records if counted(r)]
    if any(v is not None for v in stalls):
        lines += ["", f"The probe's own longest pause between two sends, per move: {fmt_spread(stalls)} ms; a "
                      "client gap near it is (partly) the probe stalling, not the guest."]
    return lines


def _failures(records: list[Record]) -> list[str]:
    bad = [r for r in records if not counted(r)]
    if not bad:
        return ["", "Failed runs: none."]
    lines = ["", "Failed runs (left out of every figure):", "",
             "| link | RAM MiB | dirty MB/s | variant | run | what happened |", "|---|---|---|---|---|---|"]
    for r in bad:
        what = str(failure(r)).replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {r['link']} | {r['memory_mb']} | {r['dirty_mb_s']:g} | {r['variant']} | {r['run']} | {what} |")
    return lines


def _targets_table(records: list[Record]) -> list[str]:
    lines = ["", "| target | measured | goal | met | samples |", "|---|---|---|---|---|"]
    for t in targets(records):
        if t["met"] is None:
            met = f"no data (needs ≥ {t['needs']})"
        else:
            met = "yes" if t["met"] else "**no**"
        lines.append(f"| {t['target']} | {_f(t['measured'], '{:.2f}')} | {t['goal']} | {met} | {t['samples']} |")
    return lines


def _variants_table(records: list[Record]) -> list[str]:
    others = sorted({r["variant"] for r in records} - {"kvmotion", BASELINE})
    if not others:
        return []
    lines = ["", "| link | RAM MiB | dirty MB/s | variant | runs ok | total s | QEMU ms | downtime ms | client gap ms "
             "| peak Mbit/s | passes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (link, mem, dirty, variant), runs in sorted(groups(records).items()):
        if variant == BASELINE:
            continue
        lines.append(f"| {link} | {mem} | {dirty:g} | {variant} | {sum(map(counted, runs))}/{len(runs)} | "
                     f"{fmt_spread(_vals(runs, 'total_s'), '{:.2f}')} | {fmt_spread(_vals(runs, 'qemu_total_ms'))} | "
                     f"{fmt_spread(_vals(runs, 'downtime_ms'))} | {fmt_spread(_vals(runs, 'gap_ms'))} | "
                     f"{fmt_spread(_vals(runs, 'peak_mbps'))} | {fmt_spread(_vals(runs, 'passes'))} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    recs = result["records"]
    oh = overhead(recs)
    lines = (_header(result) + _case_table(recs) + _failures(recs) + _targets_table(recs)
             + ["", "Orchestration (median ms): " + ", ".join(f"{k} {_f(v)}" for k, v in oh.items())]
             + _variants_table(recs))
    return "\n".join(lines) + "\n"


def _remaining_plot(recs: list[Record], out: Path) -> Path:
    import matplotlib.pyplot as plt

    links = sorted({r["link"] for r in recs}) or ["none"]
    fig, axes = plt.subplots(1, len(links), figsize=(5 * len(links), 4.5), sharey=True, squeeze=False)
    cases_ = sorted({(r["memory_mb"], r["dirty_mb_s"]) for r in recs})
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(cases_)}
    for ax, link in zip(axes[0], links):
        for (lk, mem, dirty, variant), runs in sorted(groups(recs).items()):
            log = next((r["pass_log"] for r in runs if r.get("pass_log")), None)
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
    if handles:
        fig.legend(handles, labels, fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("remaining memory per pass, kvmotion's first counted run per case (dashed: other kvmotion variants)")
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def _distribution_plot(recs: list[Record], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    variants = sorted({r["variant"] for r in recs})
    for ax, key, label in zip(axes, ("downtime_ms", "gap_ms"), ("QEMU downtime, ms", "client gap, ms")):
        data = [[r[key] for r in recs if r["variant"] == v and r.get(key) is not None] for v in variants]
        if any(data):
            ax.boxplot([d or [0] for d in data])
            ax.set_xticks(range(1, len(variants) + 1), variants)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("distribution over the runs that count")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """remaining.png (remaining bytes per pass over time) and downtime.png (downtime and client gap per side)."""
    import matplotlib
    matplotlib.use("Agg")

    recs = [r for r in result["records"] if counted(r)]
    return [_remaining_plot(recs, out_dir / "remaining.png"), _distribution_plot(recs, out_dir / "downtime.png")]

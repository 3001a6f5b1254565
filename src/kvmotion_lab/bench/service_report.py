"""The report of `kvmotion bench service`: one line per move while it runs, a markdown table per variant at the end."""
from __future__ import annotations

import time
from typing import Any

from kvmotion_lab.bench.report import BASELINE, _f, counted, failure, fmt_spread, median, percentile

Record = dict[str, Any]


def one_line(r: Record) -> str:
    head = f"  run {r['run']} {r['variant']:<15}"
    if not counted(r):
        return f"{head} FAILED: {failure(r)}"
    intact = "data intact" if r.get("data_intact") else \
        f"DATA NOT INTACT (missing {r.get('tx_missing')}, balance ok {r.get('balance_ok')}, {r.get('quick_check')})"
    return (f"{head} total {_f(r.get('total_s'), '{:.2f}')} s, downtime {_f(r.get('downtime_ms'))} ms, "
            f"client gap {_f(r.get('gap_ms'))} ms, tx/s {_f(r.get('tx_per_s_before'), '{:.1f}')} before, "
            f"{_f(r.get('tx_during_pct'))} % during, no commit for {_f(r.get('tx_stall_ms'))} ms, "
            f"{r.get('tx_errors', 0)} failed attempts, {intact}")


def _ratio(runs: list[Record], base: list[Record]) -> str:
    ours, theirs = median([r.get("total_s") for r in runs]), median([r.get("total_s") for r in base])
    return f"{ours / theirs:.2f}" if ours and theirs else "–"


def _row(variant: str, runs: list[Record], base: list[Record]) -> str:
    ok = [r for r in runs if counted(r)]
    enc = sorted({str(r.get("encryption")) for r in ok if r.get("encryption")})
    return (f"| {variant}{' (' + ', '.join(enc) + ')' if enc else ''} | {len(ok)}/{len(runs)} "
            f"| {fmt_spread([r.get('total_s') for r in ok], '{:.2f}')} | {_ratio(ok, base)} "
            f"| {fmt_spread([r.get('downtime_ms') for r in ok])} | {fmt_spread([r.get('gap_ms') for r in ok])} "
            f"| {fmt_spread([r.get('tx_per_s_before') for r in ok], '{:.1f}')} "
            f"| {fmt_spread([r.get('tx_during_pct') for r in ok])} | {fmt_spread([r.get('tx_stall_ms') for r in ok])} "
            f"| {sum(int(r.get('tx_errors') or 0) for r in ok)} "
            f"| {sum(1 for r in ok if r.get('data_intact'))}/{len(ok)} |")


def figures(records: list[Record]) -> dict[str, dict[str, float | None]]:
    """Per variant: median total, downtime, gap (and its p99 over the runs), throughput kept during the move."""
    out: dict[str, dict[str, float | None]] = {}
    for variant in sorted({r["variant"] for r in records}):
        ok = [r for r in records if r["variant"] == variant and counted(r)]
        out[variant] = {"runs": len(ok), "total_s": median([r.get("total_s") for r in ok]),
                        "downtime_ms": median([r.get("downtime_ms") for r in ok]),
                        "gap_ms": median([r.get("gap_ms") for r in ok]),
                        "gap_p99_ms": percentile([r.get("gap_ms") for r in ok], 99),
                        "tx_during_pct": median([r.get("tx_during_pct") for r in ok]),
                        "data_intact": sum(1 for r in ok if r.get("data_intact"))}
    return out


def markdown(result: dict[str, Any]) -> str:
    m, sweep, recs = result["machine"], result["sweep"], result["records"]
    when = time.strftime("%Y-%m-%d", time.gmtime(result["started_at"]))
    load = f", load {m['loadavg_1m']:.1f}" if m.get("loadavg_1m") is not None else ""
    lines = [f"# `{result['command']}`", "",
             f"{when}: {m['cpu']}, {m['cores']} cores{load}, {m['qemu']}, accelerator {result.get('accelerator')}; "
             f"Debian 12 guest ({sweep['firmware'].upper()}, {sweep['memory_mb']} MiB, image recipe "
             f"{result['guest']['recipe']}), {sweep['clients']} transaction clients, link {sweep['link']}, "
             f"{sweep['runs']} runs per side, order rotating.", "",
             "Each transaction is a committed SQLite transfer on the guest's disk (WAL, synchronous=FULL). "
             "Throughput before: the 5 s before the move; during: from the move's start to its end (kvmotion: the "
             "whole task; QEMU defaults: `migrate` to `cont`), as % of before. Client gap: the longest silence "
             "between two replies to 5 ms pings. No commit: the longest stretch without a committed transaction. "
             "Data intact: every acknowledged transaction in the ledger, balances adding up, `quick_check` ok.", "",
             "| side | counted | total s | ÷ QEMU defaults | downtime ms | client gap ms | tx/s before "
             "| tx during % of before | no commit ms | failed attempts | data intact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = [r for r in recs if r["variant"] == BASELINE and counted(r)]
    for variant in sweep["variants"]:
        lines.append(_row(variant, [r for r in recs if r["variant"] == variant], base))
    failed = [r for r in recs if not counted(r)]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- run {r['run']} {r['variant']}: {failure(r)}" for r in failed]
    lines += ["", "Every run:", ""] + [f"- {one_line(r).strip()}" for r in recs]
    return "\n".join(lines) + "\n"

"""`kvmotion bench migrate` without QEMU or root: run order, medians and spreads, dead runs, targets, the probe."""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvmotion_lab.bench import migrate, report
from kvmotion_lab.bench.migrate import Sweep, baseline_recipe, side_order, variant_options
from kvmotion_lab.bench.rawqemu import Recipe
from kvmotion_lab import pinger, probe

KVM, BASE = "kvmotion", "qemu-defaults"


# -- order and repeats ---------------------------------------------------------------------------------------------
def test_sides_alternate_which_goes_first() -> None:
    orders = [side_order([KVM, BASE], run) for run in range(4)]
    assert orders == [[KVM, BASE], [BASE, KVM], [KVM, BASE], [BASE, KVM]]
    three = [side_order([KVM, BASE, "multifd-4"], run) for run in range(2)]
    assert three == [[KVM, BASE, "multifd-4"], ["multifd-4", BASE, KVM]]


class _FakeRunner(migrate.CaseRunner):
    """The real run loop; boots, removals and moves only write down what happened."""

    def __init__(self) -> None:
        case = {"link": "unshaped", "memory_mb": 256, "dirty_mb_s": 20.0}
        super().__init__(None, case, lambda m: None)  # type: ignore[arg-type]
        self.events: list[Any] = []

    async def _boot(self, side: str) -> Any:
        self.events.append(("boot", side))
        return SimpleNamespace(name=side)

    async def _remove(self, g: Any) -> None:
        self.events.append(("remove", g.name))

    async def move(self, variant: str, run: int, position: int) -> dict[str, Any]:
        self.at = {"variant": variant, "run": run}
        if (variant, run) == self.fail_at:
            raise RuntimeError("probe did not start")
        return {**self.case, "variant": variant, "run": run, "first": position == 0, "ok": True}

    fail_at: tuple[str, int] | None = None


def test_the_run_loop_repeats_every_cell_and_alternates() -> None:
    r = _FakeRunner()
    recs = asyncio.run(r.run([KVM, BASE], 3))
    assert [(x["run"], x["variant"], x["first"]) for x in recs] == [
        (1, KVM, True), (1, BASE, False), (2, BASE, True), (2, KVM, False), (3, KVM, True), (3, BASE, False)]
    assert r.events == [("boot", "kvmotion"), ("boot", "raw"), ("remove", "kvmotion"), ("remove", "raw")]


def test_a_case_that_breaks_down_is_a_failed_run_and_cleans_up() -> None:
    r = _FakeRunner()
    r.fail_at = (KVM, 2)
    recs = asyncio.run(r.run([KVM, BASE], 3))
    assert [(x["run"], x["variant"], x["ok"]) for x in recs] == [(1, KVM, True), (1, BASE, True), (2, BASE, True),
                                                                 (2, KVM, False)]
    assert "case aborted: RuntimeError: probe did not start" in str(report.failure(recs[-1]))
    assert r.events[-2:] == [("remove", "kvmotion"), ("remove", "raw")]


def test_the_sweep_needs_three_runs_and_known_names() -> None:
    Sweep([256], [20.0], ["unshaped"], [KVM, BASE]).check()
    assert Sweep([256], [20.0], ["unshaped"], [KVM, BASE]).repeat == 3
    with pytest.raises(ValueError, match="at least 3"):
        Sweep([256], [20.0], ["unshaped"], [KVM, BASE], repeat=2).check()
    with pytest.raises(ValueError, match="unknown link"):
        Sweep([256], [20.0], ["40g"], [KVM, BASE]).check()
    with pytest.raises(ValueError, match="twice"):
        Sweep([256], [20.0], ["unshaped"], [KVM, KVM]).check()


def test_the_baseline_is_plain_qemu_not_a_kvmotion_request() -> None:
    assert variant_options(BASE) is None
    assert variant_options(KVM) == {} and variant_options("multifd-4") == {"multifd_channels": 4}
    assert variant_options("xbzrle") == {"xbzrle": True} and variant_options("one-stream") == {"multifd_channels": 0}
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        variant_options("fast")
    assert baseline_recipe("kvm") == Recipe()
    assert baseline_recipe("tcg") == Recipe(ram_pad_kib=8)          # the same RAM as kvmotion's TCG guests


def test_figures_of_each_side() -> None:
    case = {"link": "unshaped", "link_mbps": 10_000.0, "memory_mb": 256, "dirty_mb_s": 20.0}
    raw = migrate.baseline_figures(case, {"total_s": 0.8, "downtime_ms": 30, "ram_transferred": 128 << 20,
                                          "passes": 3, "max_cpu_throttle_pct": 0}, 1.4)
    assert raw["ok"] and raw["total_s"] == 0.8 and raw["wall_s"] == 1.4 and raw["sent_ratio"] == 0.5
    failed = migrate.kvmotion_figures(case, {"state": "error", "error": {"message": "did not converge"},
                                             "phases": [], "created_at": 0.0})
    assert not failed["ok"] and failed["error"] == "did not converge" and failed["total_s"] is None


# -- medians, spreads, dead runs, targets --------------------------------------------------------------------------
def _rec(variant: str, run: int = 1, link: str = "unshaped", mem: int = 1024, dirty: float = 0.0,
         **kw: object) -> dict[str, Any]:
    side = "raw" if variant == BASE else "kvmotion"
    base = {"link": link, "link_mbps": 10_000.0 if link == "unshaped" else 1000.0, "memory_mb": mem,
            "dirty_mb_s": dirty, "variant": variant, "side": side, "run": run, "first": True, "ok": True,
            "error": None, "guest_survived": True, "broken": None, "total_s": 0.3, "qemu_total_ms": 100,
            "downtime_ms": 20, "gap_ms": 30.0, "peak_mbps": 900.0, "peak_vs_link": 0.9, "lower_bound_s": 0.1,
            "prediction_error_pct": 10.0, "overhead_ms": 200.0, "passes": 3,
            "phases_ms": {"precheck": 7.0, "shadow": 80.0, "release": 50.0},
            "pass_log": [{"t": 0.0, "remaining": 100 << 20}, {"t": 0.1, "remaining": 1 << 20}]}
    if side == "raw":
        for k in ("qemu_total_ms", "peak_mbps", "peak_vs_link", "lower_bound_s", "prediction_error_pct",
                  "overhead_ms", "phases_ms"):
            base.pop(k)
        base["pass_log"] = []
    return base | kw


def test_median_and_spread() -> None:
    assert report.spread([3.0, None, 1.0, 2.0]) == (2.0, 1.0, 3.0) and report.spread([None]) is None
    assert report.fmt_spread([0.5, 0.7, 0.61], "{:.2f}") == "0.61 (0.50–0.70)"
    assert report.fmt_spread([40.0]) == "40" and report.fmt_spread([]) == "–"
    vals = [float(v) for v in range(1, 101)]
    assert report.percentile(vals, 50) == 50.0 and report.percentile(vals, 99) == 99.0
    assert report.percentile([None, 3.0], 99) == 3.0 and report.percentile([], 50) is None


def test_every_figure_is_a_median_with_its_spread_and_the_ratio_is_per_run() -> None:
    recs = [_rec(KVM, 1, total_s=0.3, downtime_ms=20), _rec(KVM, 2, total_s=0.5, downtime_ms=40),
            _rec(KVM, 3, total_s=0.4, downtime_ms=30),
            _rec(BASE, 1, total_s=0.6, gap_ms=300.0), _rec(BASE, 2, total_s=1.0, gap_ms=100.0),
            _rec(BASE, 3, total_s=1.6, gap_ms=200.0)]
    (c,) = report.cases(recs)
    assert c["ratio"] == [0.5, 0.5, 0.25] and c["runs"] == [3, 3] and c["baseline_runs"] == [3, 3]
    md = report.markdown({"command": "kvmotion bench migrate", "started_at": 1.8e9, "records": recs,
                          "sweep": {"repeat": 3}, "machine": {"cpu": "c", "cores": 2, "qemu": "QEMU 7.2",
                                                              "accelerator": "tcg"}})
    row = next(line for line in md.splitlines() if line.startswith("| unshaped | 1024 |"))
    assert row == ("| unshaped | 1024 | 0 | 3/3 / 3/3 | 0.40 (0.30–0.50) | 1.00 (0.60–1.60) | 0.50 (0.25–0.50) "
                   "| 30 (20–40) | 20 | 30 | 200 (100–300) | 0.10 | 0.90 |")
    assert "Failed runs: none." in md


def test_dead_guests_are_failures_and_left_out_of_ratios_and_targets() -> None:
    recs = [_rec(KVM, 1, total_s=0.3), _rec(KVM, 2, total_s=0.4),
            _rec(KVM, 3, total_s=9.0, guest_survived=False, broken="hung", downtime_ms=9999),
            _rec(BASE, 1, total_s=0.8), _rec(BASE, 2, total_s=1.0, guest_survived=False, broken="rebooted"),
            _rec(BASE, 3, total_s=0.9),
            _rec(KVM, 1, dirty=20.0, gap_ms=50.0), _rec(KVM, 2, dirty=20.0, gap_ms=16_000.0, guest_survived=False,
                                                        broken="oops"),
            _rec(KVM, 3, dirty=20.0, ok=False, error="no progress for 30s", total_s=None)]
    c = report.cases(recs)[0]
    assert c["ratio"] == [0.375]                          # run 2: baseline died; run 3: kvmotion's guest died
    assert c["kvmotion_s"] == [0.3, 0.4] and c["qemu_defaults_s"] == [0.8, 0.9] and c["runs"] == [2, 3]
    t = {x["target"].split(",")[0]: x for x in report.targets(recs)}
    assert t["total ÷ QEMU defaults"]["measured"] == 0.375 and t["total ÷ QEMU defaults"]["samples"] == 1
    assert t["client gap p99 ms"]["measured"] == 50.0 and t["client gap p99 ms"]["samples"] == 1
    assert t["QEMU downtime p50 ms"]["measured"] == 20.0
    md = report.markdown({"command": "kvmotion bench migrate", "started_at": 1.8e9, "records": recs,
                          "machine": {"cpu": "c", "cores": 2, "qemu": "QEMU 7.2", "accelerator": "tcg"}})
    assert "did not survive the move: hung" in md and "did not survive the move: rebooted" in md
    assert "move failed: no progress for 30s" in md and "9999" not in md and "16000" not in md


def test_a_target_needs_its_samples_before_it_is_met_or_missed() -> None:
    gaps = [_rec(KVM, i, dirty=20.0, gap_ms=100.0 + i) for i in range(1, 9)]           # 8 moves: no data
    t = {x["target"].split(",")[0]: x for x in report.targets(gaps)}
    assert t["client gap p99 ms"]["measured"] == 108.0 and t["client gap p99 ms"]["met"] is None
    assert t["total ÷ QEMU defaults"]["met"] is None and t["total ÷ QEMU defaults"]["samples"] == 0
    assert t["peak throughput ÷ link"]["met"] is None and t["QEMU downtime p50 ms"]["met"] is True
    t = {x["target"].split(",")[0]: x for x in report.targets(gaps + [_rec(KVM, 9, dirty=20.0, gap_ms=250.0)])}
    assert t["client gap p99 ms"]["met"] is False and t["client gap p99 ms"]["samples"] == 9
    t = {x["target"].split(",")[0]: x for x in report.targets(gaps + [_rec(KVM, 9, dirty=20.0, gap_ms=150.0)])}
    assert t["client gap p99 ms"]["met"] is True
    # the prediction: at least 90 % of the moves within ±30 %, over at least 9 moves
    pred = [_rec(KVM, i, prediction_error_pct=10.0) for i in range(9)] + [_rec(KVM, 9, prediction_error_pct=-45.0)]
    t = {x["target"]: x for x in report.targets(pred)}
    assert t["moves within ±30 % of the prediction (%)"]["measured"] == 90.0
    assert t["moves within ±30 % of the prediction (%)"]["met"] is True
    t = {x["target"]: x for x in report.targets(pred[1:])}
    assert t["moves within ±30 % of the prediction (%)"]["met"] is False       # 8 of 9
    ratios = [_rec(KVM, i, total_s=0.3) for i in (1, 2, 3)] + [_rec(BASE, i, total_s=0.5) for i in (1, 2, 3)]
    t = {x["target"].split(",")[0]: x for x in report.targets(ratios)}
    assert t["total ÷ QEMU defaults"]["measured"] == 0.6 and t["total ÷ QEMU defaults"]["met"] is False
    md = "\n".join(report._targets_table(gaps))
    assert "no data (needs ≥ 9)" in md and "no data (needs ≥ 3)" in md


def test_markdown_and_plots(tmp_path: Path) -> None:
    recs = [_rec(KVM, r) for r in (1, 2, 3)] + [_rec(BASE, r, total_s=0.8) for r in (1, 2, 3)]
    recs += [_rec("multifd-4", r, total_s=0.25) for r in (1, 2, 3)]
    result = {"command": "kvmotion bench migrate", "started_at": 1.8e9, "records": recs, "sweep": {"repeat": 3},
              "baseline": {"recipe": {"ram_pad_kib": 8}, "accelerator": "tcg"},
              "machine": {"cpu": "test cpu", "cores": 2, "qemu": "QEMU 7.2", "accelerator": "tcg", "loadavg_1m": 3.5}}
    md = report.markdown(result)
    assert "| unshaped | 1024 | 0 | 3/3 / 3/3 | 0.30 | 0.80 | 0.38 |" in md
    assert "multifd-4" in md and "2027-01-15" in md and "8 KiB above" in md and "load 3.5" in md
    json.dumps(result)
    for p in report.plots(result, tmp_path):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_results_from_before_the_plain_qemu_baseline_still_render() -> None:
    old = [{k: v for k, v in _rec(KVM).items() if k != "side"},          # BASE: kvmotion with QEMU's tuning
           {**{k: v for k, v in _rec(KVM, total_s=0.9, qemu_total_ms=600).items() if k != "side"}, "variant": BASE}]
    (c,) = report.cases(old)
    assert c["qemu_defaults_s"] == [0.6] and c["ratio"] == [0.5]


# -- the client's view and the probe's timetable -------------------------------------------------------------------
def _probe_file(path: Path, pings: list[tuple[float, float | None]]) -> Path:
    lines = [{"k": "start", "t": 0.0, "interval_ms": 10}]
    lines += [{"k": "ping", "n": n, "t": t, "rtt_ms": rtt} for n, (t, rtt) in enumerate(pings)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_client_gap_is_wall_clock_silence_between_replies(tmp_path: Path) -> None:
    ok = [(i / 100, 1.0) for i in range(3)]
    pings = ok + [(i / 100, None) for i in range(3, 21)] + [(0.21, 50.0), (0.22, 1.0)]
    p = _probe_file(tmp_path / "a.jsonl", pings + [(0.23 + i / 100, 1.0) for i in range(5)])
    view = migrate.client_view(p, probe.parse_probe_file(p))
    assert view["gap_ms"] == pytest.approx(200.0, abs=0.5)           # replies in time order: 0.021 → 0.221
    assert view["lost_pings"] == 18 and view["probe_stall_ms"] == pytest.approx(10.0, abs=0.1)
    tail = _probe_file(tmp_path / "b.jsonl", ok + [(i / 100, None) for i in range(3, 60)])
    assert migrate.client_view(tail, probe.parse_probe_file(tail))["gap_ms"] == pytest.approx(569.0, abs=0.5)
    stalled = _probe_file(tmp_path / "c.jsonl", ok + [(0.52, 1.0)])
    assert migrate.client_view(stalled, probe.parse_probe_file(stalled))["probe_stall_ms"] == pytest.approx(500.0)


def test_due_sends_catch_up_and_never_skip() -> None:
    assert pinger.due_sends(0.0, 0.01, 0, 0.0) == 1
    assert pinger.due_sends(0.0, 0.01, 1, 0.005) == 0
    assert pinger.due_sends(0.0, 0.01, 5, 0.54) == 50                 # 500 ms stalled: all 50 overdue pings
    assert pinger.due_sends(100.0, 0.01, 55, 100.0 + 55 * 0.01) == 1   # exactly on time (no float slip)


def test_the_probe_sends_on_its_timetable_after_a_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 100.0}
    sends: list[float] = []

    class Sock:
        def sendto(self, pkt: bytes, dest: Any) -> None:
            sends.append(clock["now"])
            if len(sends) == 5:
                clock["now"] += 0.5               # the probe itself stalls for 500 ms after its 5th ping

        def close(self) -> None:
            pass

    class Stop:
        def is_set(self) -> bool:
            return len(sends) >= 120

        def wait(self, delay: float) -> None:
            clock["now"] += delay

    p = object.__new__(pinger._Pinger)
    p.target, p.v6, p.interval_s, p.reply_timeout_s = "198.18.1.100", False, 0.01, 0.0
    p.stop, p.sock, p.lock, p.outstanding = Stop(), Sock(), threading.Lock(), {}
    p.sent = p.received = p.lost = 0
    p.ident, p.req_type = 1, 8
    p.rx_thread, p.rx_stop = SimpleNamespace(start=lambda: None, join=lambda timeout=None: None), threading.Event()
    monkeypatch.setattr(p, "_expire", lambda now, force=False: None)
    monkeypatch.setattr(pinger, "time", SimpleNamespace(monotonic=lambda: clock["now"], time=lambda: clock["now"],
                                                       sleep=lambda s: None))
    p.run()
    assert p.sent == len(sends) >= 120
    assert all(t >= 100.0 + k * 0.01 - 1e-9 for k, t in enumerate(sends))       # never early
    assert sends[5:55] == [pytest.approx(100.54)] * 50                          # the overdue ones at once
    assert all(t == pytest.approx(100.0 + k * 0.01) for k, t in enumerate(sends[55:], 55))   # back on schedule

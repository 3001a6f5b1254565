"""The pure parts of `kvmotion bench service`: throughput windows, the ledger verdict, the rotation, the report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmotion_lab.bench import service, service_report
from kvmotion_lab.bench.loadgen import windows

pytestmark = pytest.mark.unit


def _write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_windows_count_throughput_before_during_after_and_the_longest_stall(tmp_path: Path) -> None:
    recs = [{"t": 100 + i * 0.1, "c": "c0", "s": i + 1, "ms": 5.0} for i in range(50)]          # 10/s before
    recs += [{"t": 105.0 + i * 0.5, "c": "c0", "s": 51 + i, "ms": 40.0} for i in range(4)]     # 2/s during
    recs += [{"t": 107.0, "c": "c0", "s": 55, "err": "TimeoutError: timed out"}]
    recs += [{"t": 108.0 + i * 0.1, "c": "c0", "s": 55 + i, "ms": 900.0 if i == 0 else 5.0} for i in range(50)]
    recs += [{"summary": {"acked": {"c0": 104}}}]
    w = windows(_write(tmp_path / "tx.jsonl", recs), 105.0, 107.0, 5.0)
    assert w["tx_per_s_before"] == 10.0
    assert w["tx_per_s_during"] == 2.0
    assert w["tx_during_pct"] == 20.0
    assert w["tx_stall_ms"] == 1500                  # 106.5 -> 108.0
    assert w["tx_slowest_ms"] == 900.0
    assert w["tx_errors"] == 1 and w["acked"] == {"c0": 104}


def test_the_ledger_verdict_needs_every_acked_transaction_the_total_and_quick_check() -> None:
    good = {"seqs": {"c0": [1, 2, 3], "c1": [1, 2]}, "total": 100000, "expected_total": 100000, "quick_check": "ok"}
    assert service.ledger_verdict(good, {"c0": 3, "c1": 2})["data_intact"]
    lost = service.ledger_verdict(good, {"c0": 4, "c1": 2})
    assert lost["tx_missing"] == 1 and not lost["data_intact"]
    torn = service.ledger_verdict(good | {"total": 99990}, {"c0": 3})
    assert not torn["balance_ok"] and not torn["data_intact"]
    assert not service.ledger_verdict({"error": "no answer"}, {"c0": 1})["data_intact"]


def test_every_side_goes_first_equally_often() -> None:
    firsts = [service.rotate(service.VARIANTS, r)[0] for r in range(6)]
    assert sorted(firsts) == sorted(list(service.VARIANTS) * 2)


def test_bad_sweeps_are_refused() -> None:
    for bad in (service.ServiceSweep(runs=2), service.ServiceSweep(firmware="coreboot"),
                service.ServiceSweep(variants=("kvmotion", "fast")), service.ServiceSweep(link="100g")):
        with pytest.raises(ValueError):
            bad.check()


def test_a_dead_guest_is_a_failed_run_out_of_the_figures() -> None:
    ok = {"run": 1, "variant": "kvmotion", "ok": True, "guest_survived": True, "total_s": 2.0, "gap_ms": 100,
          "downtime_ms": 20, "tx_during_pct": 50.0, "data_intact": True}
    dead = ok | {"run": 2, "guest_survived": False, "broken": "hung", "total_s": 0.5}
    fig = service_report.figures([ok, dead])["kvmotion"]
    assert fig["runs"] == 1 and fig["total_s"] == 2.0
    assert "FAILED" in service_report.one_line(dead)

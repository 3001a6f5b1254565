"""The convergence predictor: pure functions, no lab."""
from __future__ import annotations

import pytest

from types import SimpleNamespace
from typing import cast

from kvmotion.models.findings import CODES
from kvmotion.models.agent import HostFacts
from kvmotion.migration import predict


def test_an_idle_guest_converges_in_two_passes_at_the_link_rate() -> None:
    p = predict.predict(1024, 512, 0.0, 1000, overhead_s=0.5)
    rate = 1000 * predict.LINK_EFFICIENCY / 8
    assert p.converges and p.passes == 2 and p.strategy == "pre-copy"
    assert p.downtime_ms == predict.DEVICE_STATE_MS
    assert abs(p.total_s - (512 / rate + 512 / predict.ZERO_SCAN_MB_S + 0.5)) < 0.01


def test_a_dirtying_guest_needs_more_passes_and_a_higher_downtime_target() -> None:
    quiet = predict.predict(1024, 300, 5.0, 1000)
    busy = predict.predict(1024, 300, 100.0, 1000)
    assert quiet.converges and busy.converges
    assert busy.passes > quiet.passes and busy.total_s > quiet.total_s
    assert "raised to" in busy.strategy and busy.downtime_ms <= 500 + predict.DEVICE_STATE_MS + 10


def test_dirtying_faster_than_the_link_does_not_converge_and_says_why() -> None:
    p = predict.predict(1024, 300, 300.0, 1000)
    assert not p.converges and p.total_s is None
    assert "300 MB/s" in p.strategy and "112 MB/s" in p.strategy


def test_more_dirtying_never_predicts_a_faster_migration() -> None:
    totals = [predict.predict(2048, 800, d, 10000).total_s for d in (0, 10, 50, 100, 300, 600)]
    assert all(t is not None for t in totals)
    assert totals == sorted(totals)


def test_history_lowers_the_rate_to_what_was_achieved_and_learns_the_overhead() -> None:
    A = predict.Achieved
    assert predict.learned(10000, []) == (10000, predict.ORCHESTRATION_S, 1.0)
    rate, overhead, scale = predict.learned(10000, [A(2000.0, 0.7), A(2400.0, 0.9), A(1800.0, 0.8)])
    assert rate == 2000.0 / predict.LINK_EFFICIENCY and overhead == 0.8 and scale == 1.0
    assert predict.learned(500, [A(2000.0, 0.7)])[0] == 500          # never above the link budget


def test_history_scales_the_model_to_what_qemu_really_took() -> None:
    A = predict.Achieved
    hist = [A(2000.0, 0.2, 0.30, 0.60), A(2000.0, 0.2, 0.25, 0.50), A(2000.0, 0.2, 0.35, 0.50),
            A(2000.0, 0.2, 9.0, None)]                                # no model figure: not counted
    rate, overhead, scale = predict.learned(10000, hist)
    assert scale == 0.5
    raw = predict.predict(1024, 300, 5.0, rate, overhead_s=overhead)
    fitted = predict.predict(1024, 300, 5.0, rate, overhead_s=overhead, scale=scale)
    assert raw.qemu_s_model == fitted.qemu_s_model and fitted.scale == 0.5
    assert fitted.total_s == pytest.approx(raw.qemu_s_model * 0.5 + overhead, abs=1e-3)
    assert predict.learned(10000, [A(1.0, 0.1, 100.0, 1.0)])[2] == predict.MAX_SCALE   # bounded


def test_compare_reports_the_error_of_the_total() -> None:
    out = predict.compare({"total_s": 2.0, "downtime_ms": 30.0, "passes": 3}, 2.5, 40, 4)
    assert out["total_error_pct"] == 25.0 and out["passes"] == [3, 4]


def test_link_is_the_slower_sides_fastest_interface() -> None:
    def facts(*speeds: int) -> HostFacts:          # only the migration interfaces matter here
        nics = [SimpleNamespace(speed_mbps=s, enabled=True) for s in speeds] + [SimpleNamespace(speed_mbps=99999,
                                                                                               enabled=False)]
        return cast(HostFacts, SimpleNamespace(migration_interfaces=nics))
    assert predict.link_mbps(facts(1000, 10000), facts(1000)) == 1000
    assert predict.link_mbps(None, facts(1000)) == 0


def test_the_prediction_becomes_a_finding_with_its_catalog_severity() -> None:
    ok = predict.finding_for("vm1", predict.predict(1024, 300, 5.0, 1000))
    bad = predict.finding_for("vm1", predict.predict(1024, 300, 300.0, 1000))
    assert ok.code == "CONVERGENCE_PREDICTED" and ok.severity == CODES[ok.code][0] and "passes" in ok.message
    assert bad.code == "CONVERGENCE_UNLIKELY" and bad.severity == CODES[bad.code][0] and bad.remedy


def test_the_scale_comes_from_the_vms_own_moves_first() -> None:
    hosts = [predict.Achieved(2000.0, 0.2, 1.0, 0.5, vm="idle"), predict.Achieved(2000.0, 0.2, 1.0, 0.5, vm="idle"),
             predict.Achieved(2000.0, 0.2, 1.2, 1.0, vm="busy")]
    assert predict.learned(10000, hosts, vm="busy")[2] == 1.2          # its own move, not the hosts' median (2.0)
    assert predict.learned(10000, hosts, vm="new")[2] == 2.0           # no move of its own: the hosts'
    assert predict.learned(10000, hosts)[2] == 2.0

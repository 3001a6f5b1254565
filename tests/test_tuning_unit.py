"""The migration stream plan (pure) and the benchmark's report (ratios, targets, Markdown, PNG plots)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmotion.agent.migration import stream_caps, stream_params
from kvmotion.bench import report
from kvmotion.bench.migrate import variant_options
from kvmotion.controller import tuning


def test_qemu_defaults_is_what_a_plain_migrate_gets() -> None:
    p = tuning.plan("qemu-defaults", 10_000, 500, 1024, False, 50.0)
    assert p.max_bandwidth_bytes == 128 * 1024 * 1024
    assert p.downtime_steps == [300]
    assert (p.multifd_channels, p.xbzrle_cache_bytes) == (0, 0)


def test_auto_lifts_the_cap_to_the_link_and_steps_the_downtime() -> None:
    p = tuning.plan("auto", 1000, 500, 1024, True, 0.0)
    assert p.max_bandwidth_bytes == 1000 * 125_000
    assert p.downtime_steps[0] < p.downtime_steps[-1] == 500
    assert p.multifd_channels == 0 and "one stream" in p.why[1]


@pytest.mark.parametrize("link,channels", [(1000, 0), (tuning.ONE_STREAM_MBPS, 0), (10_000, 0), (25_000, 3),
                                           (40_000, 4), (200_000, tuning.MAX_CHANNELS)])
def test_channels_scale_with_the_link(link: int, channels: int) -> None:
    assert tuning.channels_for(link) == channels
    assert tuning.plan("auto", link, 500, 1024, True, 0.0).multifd_channels == channels


def test_xbzrle_only_when_plain_precopy_will_not_converge_on_one_stream() -> None:
    assert tuning.plan("auto", 1000, 500, 1024, True, 10.0).xbzrle_cache_bytes == 0
    assert tuning.plan("auto", 1000, 500, 1024, None, 10.0).xbzrle_cache_bytes == 0
    p = tuning.plan("auto", 1000, 500, 1024, False, 300.0)
    assert p.xbzrle_cache_bytes == 256 * 1024 * 1024 and "not to converge" in p.why[2]
    assert tuning.plan("auto", 40_000, 500, 1024, False, 300.0).xbzrle_cache_bytes == 0   # multifd: never


def test_overrides_win_but_xbzrle_never_rides_multifd() -> None:
    assert tuning.plan("auto", 40_000, 500, 1024, True, 0.0, multifd=0).multifd_channels == 0
    assert tuning.plan("auto", 1000, 500, 1024, True, 0.0, multifd=4).multifd_channels == 4
    assert tuning.plan("auto", 1000, 500, 1024, True, 5.0, xbzrle=True).xbzrle_cache_bytes > 0
    p = tuning.plan("auto", 1000, 500, 1024, True, 5.0, multifd=2, xbzrle=True)
    assert p.xbzrle_cache_bytes == 0 and "not with multifd" in p.why[2]


@pytest.mark.parametrize("memory_mb,dirty,size", [(256, 0.0, 64), (1024, 300.0, 256), (8192, 300.0, 512),
                                                   (8192, 5000.0, 1024)])
def test_xbzrle_cache_is_a_bounded_power_of_two(memory_mb: int, dirty: float, size: int) -> None:
    got = tuning.xbzrle_cache_for(memory_mb, dirty)
    assert got == size * 1024 * 1024 and got & (got - 1) == 0


def test_stream_capabilities_are_always_explicit() -> None:
    # A VM that arrived over multifd must leave without it when the plan says one stream.
    assert stream_caps(0) == {"multifd": False, "xbzrle": False, "postcopy-ram": False}
    assert stream_caps(4, xbzrle=True) == {"multifd": True, "xbzrle": False, "postcopy-ram": False}
    assert stream_caps(0, xbzrle=True) == {"multifd": False, "xbzrle": True, "postcopy-ram": False}
    # post-copy on both sides, never with multifd (QEMU 7.2 cannot combine them)
    assert stream_caps(0, postcopy=True)["postcopy-ram"] is True
    assert stream_caps(2, postcopy=True)["postcopy-ram"] is False


def test_postcopy_in_the_plan() -> None:
    assert not tuning.plan("auto", 1000, 500, 1024, None, 0).postcopy          # not allowed: not mentioned
    ok = tuning.plan("auto", 1000, 500, 1024, None, 0, postcopy="")
    assert ok.postcopy and any(w.startswith("post-copy: the last escalation step") for w in ok.why)
    fast = tuning.plan("auto", 40_000, 500, 1024, None, 0, postcopy="")       # multifd would be used: not now
    assert fast.postcopy and fast.multifd_channels == 0 and "cannot combine" in fast.why[1]
    asked = tuning.plan("auto", 40_000, 500, 1024, None, 0, multifd=4, postcopy="")   # requested multifd wins
    assert not asked.postcopy and asked.multifd_channels == 4 and "no post-copy: not with multifd" in asked.why[-1]
    blocked = tuning.plan("auto", 1000, 500, 1024, None, 0, postcopy="host h2 cannot do post-copy")
    assert not blocked.postcopy and blocked.why[-1] == "no post-copy: host h2 cannot do post-copy"
    assert not tuning.plan("qemu-defaults", 1000, 500, 1024, None, 0, postcopy="").postcopy
    assert stream_params(0) == {} and stream_params(3) == {"multifd-channels": 3}


def test_bench_variants() -> None:
    assert variant_options("kvmotion") == {}
    assert variant_options("qemu-defaults") == {"tuning": "qemu-defaults"}
    assert variant_options("multifd-4") == {"multifd_channels": 4}
    assert variant_options("xbzrle") == {"xbzrle": True}
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        variant_options("fast")


def _rec(variant: str, link: str = "unshaped", mem: int = 1024, dirty: float = 0.0, **kw: object) -> dict:
    base = {"link": link, "link_mbps": 10_000.0 if link == "unshaped" else 1000.0, "memory_mb": mem,
            "dirty_mb_s": dirty, "variant": variant, "run": 1, "ok": True, "error": None, "total_s": 0.3,
            "qemu_total_ms": 100, "downtime_ms": 20, "gap_ms": 30.0, "peak_mbps": 900.0, "peak_vs_link": 0.9,
            "lower_bound_s": 0.1, "prediction_error_pct": 10.0, "overhead_ms": 200.0, "passes": 3,
            "phases_ms": {"precheck": 7.0, "shadow": 80.0, "release": 50.0},
            "pass_log": [{"t": 0.0, "remaining": 100 << 20}, {"t": 0.1, "remaining": 1 << 20}]}
    return base | kw


def test_ratios_and_targets_from_records() -> None:
    recs = [_rec("kvmotion", total_s=0.3), _rec("qemu-defaults", total_s=0.9, qemu_total_ms=800),
            _rec("kvmotion", link="1g", peak_vs_link=0.95), _rec("qemu-defaults", link="1g", ok=False,
                                                                 error="no progress", qemu_total_ms=None),
            _rec("kvmotion", dirty=20.0, downtime_ms=40, gap_ms=60.0),
            _rec("kvmotion", dirty=20.0, downtime_ms=70, gap_ms=250.0, prediction_error_pct=-45.0)]
    rows = {(r["link"], r["dirty_mb_s"]): r for r in report.ratios(recs)}
    assert rows[("unshaped", 0.0)]["ratio"] == pytest.approx(0.3 / 0.8, abs=1e-3)   # vs QEMU's own total time
    assert rows[("1g", 0.0)]["ratio"] is None and rows[("1g", 0.0)]["qemu_defaults_failed"] == 1
    t = {x["target"].split(",")[0]: x for x in report.targets(recs)}
    assert t["total ÷ QEMU defaults"]["met"] is True
    assert t["peak throughput ÷ link"]["measured"] == pytest.approx(0.95)
    assert t["QEMU downtime p50 ms"]["measured"] == 55.0 and t["QEMU downtime p50 ms"]["met"] is False
    assert t["client gap p99 ms"]["measured"] == 250.0 and t["client gap p99 ms"]["met"] is False
    assert t["runs within ±30 % of the prediction (%)"]["measured"] == 75.0


def test_percentile_is_nearest_rank() -> None:
    vals = [float(v) for v in range(1, 101)]
    assert report.percentile(vals, 50) == 50.0 and report.percentile(vals, 99) == 99.0
    assert report.percentile([None, 3.0], 99) == 3.0 and report.percentile([], 50) is None


def test_markdown_and_plots(tmp_path: Path) -> None:
    recs = [_rec("kvmotion"), _rec("qemu-defaults", qemu_total_ms=800), _rec("multifd-4", total_s=0.25),
            _rec("qemu-defaults", dirty=100.0, ok=False, error="no progress for 30s", qemu_total_ms=None)]
    result = {"command": "kvmotion bench migrate", "started_at": 1.8e9, "records": recs,
              "machine": {"cpu": "test cpu", "cores": 2, "qemu": "QEMU 7.2", "accelerator": "tcg"}}
    md = report.markdown(result)
    assert "| unshaped | 1024 | 0 | 0.30 | 0.80 | 0.38 |" in md
    assert "multifd-4" in md and "2027-01-15" in md
    json.dumps(result)
    paths = report.plots(result, tmp_path)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_watch_absorbs_passes_throttle_multifd_and_xbzrle() -> None:
    from kvmotion.agent.migration import MigrationWatch
    w = MigrationWatch(None, "source")  # type: ignore[arg-type]   # absorb never touches the VM

    def info(sync: int, remaining: int, **extra: object) -> dict:
        return {"status": "active", "ram": {"total": 1000, "transferred": 5000 - remaining, "remaining": remaining,
                                            "dirty-pages-rate": 10, "mbps": 80.0, "dirty-sync-count": sync,
                                            "multifd-bytes": 700}, **extra}
    w.absorb(info(1, 900))
    w.absorb(info(1, 500))
    w.absorb(info(2, 300, **{"cpu-throttle-percentage": 20}))
    w.absorb(info(3, 200, **{"cpu-throttle-percentage": 30, "xbzrle-cache": {
        "pages": 5, "bytes": 100, "cache-miss": 2, "overflow": 1}}))
    w.absorb(info(3, 100))                                  # throttling over: the maximum stays
    snap = w.snapshot()
    assert [p.pass_no for p in snap.passes] == [1, 2, 3] and snap.passes[0].remaining == 500
    assert snap.passes[-1].remaining == 100
    assert snap.extra["max_cpu_throttle_pct"] == 30 and snap.extra["multifd_bytes"] == 700
    assert snap.extra["xbzrle"] == {"pages": 5, "bytes": 100, "cache_miss": 2, "overflow": 1}


def test_soak_tally_catches_reboots_and_heartbeats_going_back() -> None:
    from kvmotion.bench.soak import Tally, check_beat
    t = Tally()
    assert not check_beat(t, {"seq": 10, "boot_id": "a"}, "start")
    t.migrations, t.downtime_ms, t.total_s = 2, [20.0, 40.0], [0.5, 0.7]
    assert not check_beat(t, {"seq": 12, "boot_id": "a"}, "after #1")
    assert t.ok and t.as_dict()["heartbeat_seq"] == [10, 12] and t.as_dict()["downtime_ms_p50"] == 30.0
    assert check_beat(t, {"seq": 11, "boot_id": "a"}, "after #2")
    assert check_beat(t, {"seq": 1, "boot_id": "b"}, "after #3")
    assert check_beat(t, None, "after #4")
    assert check_beat(t, {"seq": 12, "boot_id": "a"}, "after #5")     # answers, but the counter stands still
    assert not t.ok and len(t.heartbeat_breaks) == 4
    assert "went back" in t.heartbeat_breaks[0] and "rebooted" in t.heartbeat_breaks[1]
    assert "does not answer" in t.heartbeat_breaks[2] and "stopped at 12" in t.heartbeat_breaks[3]
    t3 = Tally(migrations=1)
    check_beat(t3, {"seq": 5, "boot_id": "a"}, "start")
    assert check_beat(t3, {"seq": 2, "boot_id": "b"}, "after #1", tcg_guest_fault=True)   # the known QEMU bug
    assert t3.ok and t3.tcg_crashes and not t3.heartbeat_breaks
    assert check_beat(t3, None, "after #2", tcg_guest_fault=False) and not t3.ok            # KVM: ours
    t2 = Tally(migrations=1, failures=["#1 h1→h2: did not converge"])
    assert not t2.ok and t2.as_dict()["failures"] == 1

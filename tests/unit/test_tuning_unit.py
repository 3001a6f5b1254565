"""The migration stream plan (pure), and what the predictor learns from (only kvmotion's own tuning).

The bench's own tests: tests/unit/test_bench_unit.py."""
from __future__ import annotations

import json

import pytest

from kvmotion.agent.hv.qemu.migration import stream_caps, stream_params
from kvmotion.migration import predict, tuning


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


def _result(profile: str | None, peak: float = 2000.0, total: float = 1.0, qemu_ms: int = 700) -> dict:
    r = {"total_time_s": total, "qemu_total_time_ms": qemu_ms, "pass_log": [{"mbps": peak}, {"mbps": peak / 2}],
         "prediction": {"qemu_s_model": 0.35}}
    return r | ({"stream": {"profile": profile}} if profile else {})


def test_the_predictor_learns_only_from_kvmotions_own_tuning() -> None:
    a = predict.achieved_from(_result("auto"))
    assert a is not None and (a.peak_mbps, a.qemu_s, a.qemu_s_model, a.profile) == (2000.0, 0.7, 0.35, "auto")
    assert a.overhead_s == pytest.approx(0.3)
    assert predict.achieved_from(_result(None)) == a                     # results from before stream plans
    assert predict.achieved_from(_result("qemu-defaults", peak=900.0, qemu_ms=1500)) is None
    assert predict.achieved_from(_result("auto", peak=0.0)) is None
    # a qemu-defaults move in the history changes nothing: not the rate, the overhead or the scale
    ours = [predict.Achieved(2000.0, 0.3, 0.7, 0.35)] * 3
    theirs = predict.Achieved(900.0, 0.1, 1.5, 0.35, "qemu-defaults")
    assert predict.learned(10_000, [theirs, *ours]) == predict.learned(10_000, ours)
    assert predict.learned(10_000, [theirs]) == (10_000, predict.ORCHESTRATION_S, 1.0)


def test_the_task_history_leaves_out_qemu_defaults_moves(db_url: str) -> None:
    from kvmotion.controller import db, tasks
    sessions = db.make_sessionmaker(db.make_engine(db_url))
    with sessions() as s:
        for i, profile in enumerate(("auto", "qemu-defaults")):
            s.add(db.Task(id=f"t{i}", kind="vmotion", vm_uuid="u", vm_name="vm", source="h1", destination="h2",
                          state="success", finished_at=float(i), result_json=json.dumps(_result(profile))))
        s.commit()
    assert [a.peak_mbps for a in tasks.achieved(sessions, ("h1", "h2"), None)] == [2000.0]


def test_watch_absorbs_passes_throttle_multifd_and_xbzrle() -> None:
    from kvmotion.agent.hv.qemu.migration import MigrationWatch
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
    from kvmotion_lab.bench.soak import Tally, check_beat
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
    t3 = Tally(migrations=1, guests=[{"guest": 1, "ended": "still running"}])
    check_beat(t3, {"seq": 5, "boot_id": "a"}, "start")
    assert check_beat(t3, {"seq": 2, "boot_id": "b"}, "after #1")      # any break fails, whatever the accelerator
    assert not t3.ok and t3.heartbeat_breaks and "rebooted" in t3.guests[0]["ended"]
    t4 = Tally(migrations=1, guests=[{"guest": 1}, {"guest": 2}])         # a replaced guest alone fails the soak
    assert not t4.ok
    t2 = Tally(migrations=1, failures=["#1 h1→h2: did not converge"])
    assert not t2.ok and t2.as_dict()["failures"] == 1


def test_the_stream_yields_the_cpu_to_the_guest_unless_asked_not_to() -> None:
    first = tuning.plan("auto", 10_000, 500, 1024, None, 0)
    assert first.stream_nice == tuning.STREAM_NICE > 0 and any(w.startswith("guest first") for w in first.why)
    equal = tuning.plan("auto", 10_000, 500, 1024, None, 0, guest_first=False)
    assert equal.stream_nice == 0 and any("equally" in w for w in equal.why)
    assert tuning.plan("qemu-defaults", 10_000, 500, 1024, None, 0).stream_nice == 0

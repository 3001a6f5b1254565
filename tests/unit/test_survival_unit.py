"""The guest-survival benchmark's pure parts: arms, intervals, the break classifier, the probe's view."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from kvmotion_lab.bench import rawqemu, survival
from kvmotion_lab.bench.survival import Guest, classify, probe_beat, recipe_for, wilson


def test_arms_are_the_recipes_they_name() -> None:
    assert recipe_for("A") == rawqemu.Recipe() and recipe_for("B") == rawqemu.KVMOTION_RECIPE
    assert recipe_for("C") is None and recipe_for("C-plain") is None
    assert recipe_for("D-no-auto-converge") == rawqemu.KVMOTION_RECIPE.without("auto_converge")
    assert not recipe_for("D-no-auto-converge").auto_converge and recipe_for("D-no-auto-converge").return_path
    assert recipe_for("D-ram-pad").ram_pad_kib == 8 and recipe_for("A-ram-pad") == rawqemu.Recipe(ram_pad_kib=8)
    assert recipe_for("D-qemu-bandwidth").max_bandwidth is None
    assert recipe_for("A+auto-converge").auto_converge and recipe_for("A+downtime-ms").downtime_ms == 50
    with pytest.raises(ValueError, match="unknown arm"):
        recipe_for("E")


def test_wilson_interval() -> None:
    lo, hi = wilson(0, 200)
    assert lo == 0.0 and 0.015 < hi < 0.02            # 0 of 200: at most ~1.9 %
    lo, hi = wilson(22, 200)
    assert lo < 0.11 < hi and 0.07 < lo and hi < 0.17
    assert wilson(0, 0) == (0.0, 1.0)


def _guest(seq: int = 100, boot: str = "b1") -> Guest:
    return Guest(name="g", ip="198.18.1.100/24", uuid="u", boot_id=boot, seq=seq)


def test_classify_every_kind() -> None:
    g = _guest()
    beat = lambda seq, boot="b1": {"seq": seq, "boot_id": boot}        # noqa: E731
    assert classify(g, beat(120), [], []) is None
    assert classify(g, beat(5, "b2"), [], []) == "rebooted"
    assert classify(g, beat(100), [], []) == "heartbeat-stalled"
    assert classify(g, beat(120), ["[  1.0] BUG: unable to handle page fault"], []) == "oops"
    hb = lambda n: f"KVMOTION-HEARTBEAT seq={n} uptime=1.0 boot_id=b1"    # noqa: E731
    assert classify(g, None, [hb(10)], [hb(10)]) == "hung"
    assert classify(g, None, [hb(10)], [hb(10), hb(20)]) == "network-dead"
    assert classify(g, None, [], ["Kernel panic - not syncing"]) == "oops"


def test_probe_beat_reads_the_client_probe_after_the_move(tmp_path: Path) -> None:
    out = tmp_path / "probe.jsonl"
    lines = [{"k": "hb", "t": 10.0, "data": {"seq": 150, "boot_id": "b1"}},      # before the move ended
             {"k": "ping", "t": 11.0, "n": 1, "rtt_ms": 0.1},
             {"k": "hb", "t": 12.0, "data": {"seq": 160, "boot_id": "b1"}}]
    out.write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines) + '{"k":"hb","t":13')
    g = _guest(seq=140)
    g.probe = types.SimpleNamespace(out=out)            # type: ignore[assignment]
    g.moved_at = 11.5
    assert probe_beat(g) == {"seq": 160, "boot_id": "b1"}
    g.moved_at = 12.5
    assert probe_beat(g) is None                      # nothing fetched since the move ended
    g.moved_at, g.seq = 11.5, 160
    assert probe_beat(g) is None                      # not newer than what the check already saw
    g.probe = None
    assert probe_beat(g) is None


def test_markdown_lists_every_arm_and_trace(tmp_path: Path) -> None:
    moves = [{"round": 1, "guest": "sv1", "move": {"ok": True, "pages_differ": 3}, "broken": None},
             {"round": 1, "guest": "sv2", "move": {"ok": True, "pages_differ": 0}, "broken": None}]
    (tmp_path / "B-moves.jsonl").write_text("".join(json.dumps(m) + "\n" for m in moves))
    broken = {"arm": "B", "guest": "sv1", "kind": "oops", "host": "h2", "move": {"downtime_ms": 50},
              "console": ["x", "[ 10.6] BUG: unable to handle page fault", "RIP: 0010:0x8010000e"]}
    runs = [{"summary": {"arm": "B", "moves": 2, "broken": 1, "rate": 0.5, "ci95": [0.09, 0.91],
                         "kinds": {"oops": 1}, "move_failures": 0}, "broken": [broken]}]
    md = survival.markdown(runs, tmp_path)
    assert "| B | kvmotion's QMP sequence, no kvmotion | 2 | 1 | 50.0 % |" in md
    assert "1 of 2" in md and "RIP: 0010:0x8010000e" in md and "\n  x\n" not in md


def test_tcg_guest_ram_takes_qemus_slow_bitmap_path_kvm_keeps_the_exact_size(tmp_path: Path) -> None:
    from kvmotion.agent.context import HostContext
    from kvmotion.agent.hv.qemu.argv import build_argv, guest_ram
    from kvmotion.models.agent import VMSpec
    spec = VMSpec(uuid="6b1f3c0e-9f5a-4d4e-8a55-1c2b3d4e5f60", name="vm1", memory_mb=256, boot_datastore="ds",
                  folder="vm1")
    tcg = HostContext("h1", "tcg", {"ds": tmp_path}, {})
    kvm = HostContext("h1", "kvm", {"ds": tmp_path}, {})
    # QEMU 7.2 syncs a RAM block whose length is a multiple of 64 pages on its fast path, which loses TCG writes
    assert guest_ram(spec, tcg) == "262152k" and (262152 * 1024) % (64 * 4096) != 0
    assert guest_ram(spec, tcg, backend=True) == "262152K"
    assert guest_ram(spec, kvm) == "256" and guest_ram(spec, kvm, backend=True) == "256M"
    for ctx, want in ((tcg, "262152k"), (kvm, "256")):
        src = build_argv(spec, ctx, tmp_path / "run", incoming=False)
        shadow = build_argv(spec, ctx, tmp_path / "run", incoming=True)
        assert src[src.index("-m") + 1] == want
        assert shadow[:len(src)] == src and shadow[len(src):] == ["-incoming", "defer", "-S"]

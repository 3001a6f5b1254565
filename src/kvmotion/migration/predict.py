"""Convergence prediction before a migration starts: pure functions over a dirty-rate sample and a link budget.

Pre-copy, pass by pass: the first pass sends the touched RAM (zero pages cost only a scan); each later pass
sends what the guest dirtied during the previous one; the switchover happens once the rest fits the current
downtime target, which the engine raises step by step (``decisions.downtime_steps``). If the guest dirties
at least as fast as the link carries, the remainder never shrinks: plain pre-copy does not converge.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvmotion.models.findings import Finding, finding
from kvmotion.models.agent import HostFacts
from kvmotion.migration import decisions

LINK_EFFICIENCY = 0.9           # payload share of the link (TCP/IP and migration-stream framing)
ZERO_SCAN_MB_S = 4000.0         # untouched (zero) RAM: scanned and sent as markers, not as pages
DEVICE_STATE_MS = 20.0          # switchover: device state, the last bitmap sync and the handshake
ORCHESTRATION_S = 0.2           # kvmotion's own time around QEMU's (bench: median 0.19 s): checks, shadow, release
MAX_PASSES = 60
MIN_SCALE, MAX_SCALE = 0.2, 5.0


@dataclass(frozen=True)
class Prediction:
    converges: bool
    total_s: float | None           # the task, precheck to release (None if it does not converge)
    downtime_ms: float | None
    passes: int | None
    strategy: str
    dirty_mb_s: float
    link_mbps: float
    touched_mb: float
    memory_mb: int
    qemu_s_model: float | None = None   # QEMU's part as the model computes it, before the learned scale
    scale: float = 1.0                  # learned: QEMU's actual time ÷ the model's, recent moves on this link

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def predict(memory_mb: int, touched_mb: float | None, dirty_mb_s: float, link_mbps: float,
            budget_ms: int = 500, overhead_s: float = ORCHESTRATION_S, scale: float = 1.0) -> Prediction:
    touched = float(min(memory_mb, touched_mb if touched_mb is not None else memory_mb))
    rate = link_mbps * LINK_EFFICIENCY / 8.0                      # MB/s of payload
    steps = decisions.downtime_steps(budget_ms)
    common = {"dirty_mb_s": dirty_mb_s, "link_mbps": link_mbps, "touched_mb": touched, "memory_mb": memory_mb}
    if rate <= 0:
        return Prediction(False, None, None, None, "no link budget", **common)
    t = touched / rate + (memory_mb - touched) / ZERO_SCAN_MB_S    # first pass
    elapsed, passes, step, step_pass, step_at = t, 1, 0, 1, 0.0
    remaining = min(dirty_mb_s * t, touched)
    while passes < MAX_PASSES:
        if remaining / rate * 1000.0 <= steps[step]:
            downtime = remaining / rate * 1000.0 + DEVICE_STATE_MS
            how = "pre-copy" if step == 0 else f"pre-copy; downtime target raised to {steps[step]} ms"
            model = elapsed + remaining / rate
            return Prediction(True, round(model * scale + overhead_s, 3), round(downtime, 1),
                              passes + 1, how, **common, qemu_s_model=round(model, 4), scale=round(scale, 3))
        if dirty_mb_s >= rate and step == len(steps) - 1:
            break
        t = remaining / rate
        elapsed += t
        passes += 1
        remaining = min(dirty_mb_s * t, touched)
        if step < len(steps) - 1 and (passes - step_pass >= decisions.PASSES_PER_STEP
                                      or elapsed - step_at >= decisions.SECONDS_PER_STEP):
            step, step_pass, step_at = step + 1, passes, elapsed
    return Prediction(False, None, None, None,
                      f"plain pre-copy does not converge: the guest dirties {dirty_mb_s:.0f} MB/s, the link "
                      f"carries {rate:.0f} MB/s; strategy: xbzrle (delta-encoded rewritten pages, one stream) and "
                      f"the downtime target raised to {steps[-1]} ms; if that is not enough the migration is "
                      "cancelled at its progress timeout", **common)


def compare(pred: dict[str, Any], total_s: float, downtime_ms: float | None, passes: int | None) -> dict[str, Any]:
    """Predicted against actual, with the total time's error in percent."""
    out: dict[str, Any] = {"total_s": [pred.get("total_s"), round(total_s, 3)],
                           "downtime_ms": [pred.get("downtime_ms"), downtime_ms],
                           "passes": [pred.get("passes"), passes]}
    if pred.get("total_s"):
        out["total_error_pct"] = round(100.0 * (total_s - pred["total_s"]) / pred["total_s"], 1)
    return out


LEARNS_FROM = "auto"             # the predictor learns only from moves with kvmotion's own tuning


@dataclass(frozen=True)
class Achieved:
    """One recent successful move between the same hosts (same encryption)."""
    peak_mbps: float
    overhead_s: float                  # the task's total time minus QEMU's
    qemu_s: float | None = None        # QEMU's total time
    qemu_s_model: float | None = None  # what the model said QEMU would take (unscaled)
    profile: str = LEARNS_FROM         # the move's tuning (``tuning.StreamPlan.profile``)
    vm: str | None = None              # the VM moved (its own moves teach its scale first)


def achieved_from(result: dict[str, Any], vm: str | None = None) -> Achieved | None:
    """What a successful live move's task result teaches the predictor; None when it has nothing to teach: no
    pass log or times, or not kvmotion's own tuning (``tuning=qemu-defaults``, a plain QEMU migration's 128 MiB/s
    cap and 300 ms limit, would teach a slower rate and a wrong scale)."""
    profile = (result.get("stream") or {}).get("profile") or LEARNS_FROM
    peak = max((p.get("mbps") or 0 for p in result.get("pass_log") or []), default=0)
    if profile != LEARNS_FROM or peak <= 0 or not result.get("total_time_s") or not result.get("qemu_total_time_ms"):
        return None
    qemu_s = result["qemu_total_time_ms"] / 1000.0
    return Achieved(float(peak), max(0.0, result["total_time_s"] - qemu_s), qemu_s,
                    (result.get("prediction") or {}).get("qemu_s_model"), profile, vm)


def _median(values: list[float]) -> float:
    vals = sorted(values)
    return vals[len(vals) // 2]


def learned(link_mbps: float, history: list[Achieved], recent: int = 5,
            vm: str | None = None) -> tuple[float, float, float]:
    """What a migration will really get, from the most recent moves between the same hosts: the link budget or
    the lower median peak rate (a CPU-bound or TLS stream); kvmotion's median time around QEMU's; and the median
    of QEMU's actual time ÷ the model's (the model's blind spots: touched pages that hold zeros, scan speed), from
    the VM's own recent moves when it has any (the blind spots are the guest's), else from the hosts'.
    Only moves with kvmotion's own tuning count. Without such history: the link budget, ``ORCHESTRATION_S`` and 1."""
    ours = [h for h in history if h.profile == LEARNS_FROM]
    seen = ours[:recent]
    if not seen:
        return link_mbps, ORCHESTRATION_S, 1.0
    rate = min(link_mbps, _median([h.peak_mbps for h in seen]) / LINK_EFFICIENCY)
    own = [h for h in ours if vm is not None and h.vm == vm][:recent]
    ratios = [h.qemu_s / h.qemu_s_model for h in (own or seen) if h.qemu_s and h.qemu_s_model]
    scale = min(MAX_SCALE, max(MIN_SCALE, _median(ratios))) if ratios else 1.0
    return rate, _median([h.overhead_s for h in seen]), scale


def link_mbps(src: HostFacts | None, dst: HostFacts | None) -> float:
    """The migration link's speed: the slower side's fastest enabled migration interface."""
    def best(f: HostFacts | None) -> float:
        return float(max((i.speed_mbps or 0 for i in (f.migration_interfaces if f else []) if i.enabled), default=0))
    return min(best(src), best(dst))


def finding_for(vm_name: str, pred: Prediction) -> Finding:
    if pred.converges:
        return finding("CONVERGENCE_PREDICTED", f"vm:{vm_name}",
                       f"predicted {pred.total_s:.1f} s, downtime ~{pred.downtime_ms:.0f} ms, {pred.passes} passes "
                       f"({pred.strategy}; dirty {pred.dirty_mb_s:.1f} MB/s, {pred.touched_mb:.0f} of "
                       f"{pred.memory_mb} MiB touched, link {pred.link_mbps:.0f} Mbit/s)", "none needed")
    return finding("CONVERGENCE_UNLIKELY", f"vm:{vm_name}", pred.strategy,
                   "migrate when the guest is quieter, give it a faster link, or raise --downtime-ms")

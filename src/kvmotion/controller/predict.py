"""Convergence prediction before a migration starts: pure functions over a dirty-rate sample and a link budget.

Pre-copy, pass by pass: the first pass sends the touched RAM (zero pages cost only a scan); each later pass
sends what the guest dirtied during the previous one; the switchover happens once the rest fits the current
downtime target, which the engine raises step by step (``decisions.downtime_steps``). If the guest dirties
at least as fast as the link carries, the remainder never shrinks: plain pre-copy does not converge.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvmotion.checks.findings import Finding, finding
from kvmotion.common.types import HostFacts
from kvmotion.controller import decisions

LINK_EFFICIENCY = 0.9           # payload share of the link (TCP/IP and migration-stream framing)
ZERO_SCAN_MB_S = 4000.0         # untouched (zero) RAM: scanned and sent as markers, not as pages
DEVICE_STATE_MS = 20.0          # switchover: device state, the last bitmap sync and the handshake
ORCHESTRATION_S = 0.45          # kvmotion's own time around QEMU's: checks, shadow start, resume, release
MAX_PASSES = 60


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

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def predict(memory_mb: int, touched_mb: float | None, dirty_mb_s: float, link_mbps: float,
            budget_ms: int = 500, overhead_s: float = ORCHESTRATION_S) -> Prediction:
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
            return Prediction(True, round(elapsed + remaining / rate + overhead_s, 3), round(downtime, 1),
                              passes + 1, how, **common)
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
                      f"does not converge: the guest dirties {dirty_mb_s:.0f} MB/s, the link carries "
                      f"{rate:.0f} MB/s; the migration would end at its progress timeout", **common)


def compare(pred: dict[str, Any], total_s: float, downtime_ms: float | None, passes: int | None) -> dict[str, Any]:
    """Predicted against actual, with the total time's error in percent."""
    out: dict[str, Any] = {"total_s": [pred.get("total_s"), round(total_s, 3)],
                           "downtime_ms": [pred.get("downtime_ms"), downtime_ms],
                           "passes": [pred.get("passes"), passes]}
    if pred.get("total_s"):
        out["total_error_pct"] = round(100.0 * (total_s - pred["total_s"]) / pred["total_s"], 1)
    return out


def learned(link_mbps: float, history: list[tuple[float, float]], recent: int = 5) -> tuple[float, float]:
    """What a migration will really get, from recent migrations between the same hosts (same encryption):
    the link budget or the lower median peak rate (a CPU-bound or TLS stream), and kvmotion's median time
    around QEMU's. Without history: the link budget and ``ORCHESTRATION_S``."""
    if not history:
        return link_mbps, ORCHESTRATION_S
    seen = history[:recent]
    rates = sorted(r for r, _ in seen)
    overheads = sorted(o for _, o in seen)
    return min(link_mbps, rates[len(rates) // 2] / LINK_EFFICIENCY), overheads[len(overheads) // 2]


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

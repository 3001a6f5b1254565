"""How one migration's stream is set up: a pure function of the link, the prediction and the request.

``auto`` (kvmotion's tuning, each choice measured by ``kvmotion bench migrate``):
- bandwidth: the migration's share of the link (admission), not QEMU's 128 MiB/s default;
- downtime: a low first target raised step by step to the budget (``decisions.downtime_steps``);
- multifd: parallel streams on fast links only; one stream fills a link up to ``ONE_STREAM_MBPS``;
- xbzrle: only when plain pre-copy is predicted not to converge and the stream is single (QEMU ignores
  xbzrle under multifd): delta-encoding rewritten pages costs source CPU and helps only sparse rewrites.

``qemu-defaults`` is the baseline a user gets from a plain ``migrate``: 128 MiB/s, 300 ms, one stream.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kvmotion.migration import decisions

MBIT = 125_000                       # bytes/s per Mbit/s
QEMU_DEFAULT_BANDWIDTH = 128 * 1024 * 1024
QEMU_DEFAULT_DOWNTIME_MS = 300
# Multifd only above 10 GbE: on the bench machine (2 cores, TCG, a 10 GbE lab link) one stream gave a median
# QEMU downtime of 31 ms against 56 ms with 2 channels and 86 ms with 4, for the same total time (0.63 / 0.64 /
# 0.58 s, 12 moves each); the extra threads compete with the vCPU for the switchover.
ONE_STREAM_MBPS = 10_000
MBPS_PER_CHANNEL = 10_000
MAX_CHANNELS = 8
XBZRLE_MIN_CACHE = 64 * 1024 * 1024
XBZRLE_MAX_CACHE = 1024 * 1024 * 1024
STREAM_NICE = 10          # the stream's threads against the vCPUs' 0: CFS gives the vCPUs ~90 % of a shared core


@dataclass(frozen=True)
class StreamPlan:
    profile: str
    max_bandwidth_bytes: int
    downtime_steps: list[int]
    multifd_channels: int
    xbzrle_cache_bytes: int
    auto_converge: bool = False
    why: list[str] = field(default_factory=list)
    postcopy: bool = False            # post-copy capable on both sides: the last step of the escalation ladder
    stream_nice: int = 0              # >0: the stream's threads yield the host CPU to the guest's vCPUs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def channels_for(link_mbps: float) -> int:
    """Parallel streams for a link: none up to what one stream carries, then one per ``MBPS_PER_CHANNEL``."""
    if link_mbps <= ONE_STREAM_MBPS:
        return 0
    return min(MAX_CHANNELS, max(2, -(-int(link_mbps) // MBPS_PER_CHANNEL)))


def xbzrle_cache_for(memory_mb: int, dirty_mb_s: float) -> int:
    """A power of two holding about two seconds of rewritten pages, within [64 MiB, min(1 GiB, RAM/4)]."""
    want = max(XBZRLE_MIN_CACHE, int(dirty_mb_s * 2 * 1024 * 1024))
    cap = max(XBZRLE_MIN_CACHE, min(XBZRLE_MAX_CACHE, memory_mb * 1024 * 1024 // 4))
    size = XBZRLE_MIN_CACHE
    while size * 2 <= min(want, cap):
        size *= 2
    return size


def plan(profile: str, bandwidth_mbps: int, budget_ms: int, memory_mb: int, converges: bool | None,
         dirty_mb_s: float, multifd: int | None = None, xbzrle: bool | None = None,
         auto_converge: bool = True, postcopy: str | None = None, guest_first: bool = True) -> StreamPlan:
    """``multifd``/``xbzrle`` override the automatic choice (None: automatic); ``auto_converge`` is the
    policy's permission to throttle the guest when pre-copy stops converging. ``postcopy`` is "" when the policy
    allows post-copy and both hosts can do it, the reason it cannot be used otherwise, None when not allowed."""
    if profile == "qemu-defaults":
        return StreamPlan(profile, QEMU_DEFAULT_BANDWIDTH, [QEMU_DEFAULT_DOWNTIME_MS], 0, 0, False,
                          ["QEMU's defaults: 128 MiB/s, 300 ms downtime limit, one stream"])
    why = [f"bandwidth: this migration's share of the link, {bandwidth_mbps} Mbit/s"]
    channels = channels_for(bandwidth_mbps) if multifd is None else multifd
    postcopy_note = postcopy == "" and multifd is None and channels > 0
    if postcopy_note:
        channels = 0
    why.append("one stream (post-copy allowed: QEMU 7.2 cannot combine it with multifd)" if postcopy_note else
               f"multifd: {channels} channels" + (" (requested)" if multifd is not None else
                                                  f" (link {bandwidth_mbps} Mbit/s; one stream carries "
                                                  f"{ONE_STREAM_MBPS})") if channels else
               "one stream" + (" (requested)" if multifd is not None else
                               f" (link {bandwidth_mbps} Mbit/s ≤ {ONE_STREAM_MBPS})"))
    if xbzrle is None:
        use_x = converges is False and channels == 0
        reason = ("xbzrle: plain pre-copy predicted not to converge" if use_x else
                  "no xbzrle: " + ("multifd streams" if channels else
                                   "predicted to converge without it" if converges else "no prediction"))
    else:
        use_x = xbzrle and channels == 0
        reason = f"xbzrle {'on' if use_x else 'off'} (requested" + (", not with multifd)" if xbzrle and channels
                                                                      else ")")
    why.append(reason)
    cache = xbzrle_cache_for(memory_mb, dirty_mb_s) if use_x else 0
    why.append("auto-converge armed: QEMU throttles the vCPUs if two passes in a row dirty more than half of "
               "what they send" if auto_converge else "no auto-converge (policy)")
    why.append(f"guest first: the stream's threads run at nice {STREAM_NICE}, so the vCPUs get the host CPU first "
               "and the stream takes what is left" if guest_first else "stream and vCPUs share the host CPU equally "
               "(requested)")
    use_postcopy = postcopy == "" and channels == 0
    if postcopy is not None:
        why.append("post-copy: the last escalation step, when pre-copy stalls at the downtime ceiling"
                   if use_postcopy else f"no post-copy: {postcopy or 'not with multifd streams'}")
    return StreamPlan(profile, bandwidth_mbps * MBIT, decisions.downtime_steps(budget_ms), channels, cache,
                      auto_converge, why, use_postcopy, STREAM_NICE if guest_first else 0)

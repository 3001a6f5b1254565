"""What each running VM costs its host: the QEMU process's CPU time (from /proc/PID/stat) and resident guest RAM.

The CPU figure is a rate between two readings (one per facts call, which the controller's monitor makes every few
seconds), smoothed with an exponential moving average whose time constant is ``SMOOTH_S``: DRS acts on a load
that lasts, not on a spike. State is kept per PID and dropped when the PID is gone (bounded by the VMs run here).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from kvmotion.agent.hv.qemu.sampling import ram_touched_mb
from kvmotion.models.agent import VMLoad

SMOOTH_S = 30.0
MIN_WINDOW_S = 1.0          # readings closer than this keep the previous rate
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """The process's user + system CPU time, all threads, in seconds (None: gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()     # after "pid (comm) ": field 3 (state) is index 0
    try:
        return (int(fields[11]) + int(fields[12])) / TICKS    # utime (14), stime (15)
    except (IndexError, ValueError):
        return None


@dataclass
class _Meter:
    t: float
    cpu_s: float
    now_pct: float | None = None
    avg_pct: float | None = None


class LoadMeter:
    def __init__(self) -> None:
        self._meters: dict[int, _Meter] = {}

    def cpu(self, pid: int, now: float | None = None) -> tuple[float, float] | None:
        """(smoothed, last window) percent of one CPU, or None until two readings are ``MIN_WINDOW_S`` apart."""
        used = cpu_seconds(pid)
        if used is None:
            self._meters.pop(pid, None)
            return None
        now = time.monotonic() if now is None else now
        m = self._meters.get(pid)
        if m is None:
            self._meters[pid] = _Meter(now, used)
            return None
        window = now - m.t
        if window >= MIN_WINDOW_S:
            rate = max(0.0, (used - m.cpu_s) / window * 100.0)
            alpha = 1.0 - math.exp(-window / SMOOTH_S)
            m.avg_pct = rate if m.avg_pct is None else m.avg_pct + alpha * (rate - m.avg_pct)
            m.t, m.cpu_s, m.now_pct = now, used, rate
        return (m.avg_pct, m.now_pct) if m.avg_pct is not None and m.now_pct is not None else None

    def loads(self, running: dict[str, tuple[int, int]]) -> list[VMLoad]:
        """``running``: uuid → (pid, memory MB) of the VMs running here."""
        for pid in set(self._meters) - {pid for pid, _ in running.values()}:
            del self._meters[pid]
        out = []
        for uuid, (pid, memory_mb) in sorted(running.items()):
            cpu = self.cpu(pid)
            if cpu is not None:
                out.append(VMLoad(uuid=uuid, cpu_pct=round(cpu[0], 2), cpu_pct_now=round(cpu[1], 2),
                                  mem_mb=ram_touched_mb(pid, memory_mb)))
        return out

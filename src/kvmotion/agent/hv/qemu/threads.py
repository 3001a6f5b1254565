"""The migration stream's threads yield the host CPU to the guest's vCPUs.

On a host with few cores, a stream lifted to the link speed takes the CPU the vCPU threads need: the guest answers
late during pre-copy (on a 2-core TCG host a client saw 117–231 ms of silence, see README "Performance"). QEMU 7.2
has no knob for it, but its threads have names (``-name ...,debug-threads=on``), so the agent lowers the priority
of the stream's own threads (``nice``): when the host has spare CPU nothing changes, when it has not the vCPUs run
first and the stream takes what is left. The stream's speed is then paced by the guest's own demand for CPU.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

STREAM_THREADS = ("live_migration", "multifdsend", "multifd-tls")     # QEMU 7.2's names (comm: 15 chars)


def stream_threads(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """The thread ids of QEMU process ``pid`` that carry the outgoing migration stream."""
    out = []
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return []
    for t in tasks:
        try:
            comm = (t / "comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(STREAM_THREADS) and t.name.isdigit():
            out.append(int(t.name))
    return sorted(out)


def lower_stream_threads(pid: int | None, nice: int, done: set[int]) -> list[int]:
    """Set ``nice`` on the stream's threads not yet in ``done`` (added there); returns the ones changed now."""
    if not pid or nice <= 0:
        return []
    changed = []
    for tid in stream_threads(pid):
        if tid in done:
            continue
        done.add(tid)
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            changed.append(tid)
        except OSError as exc:        # the thread ended, or no permission: the stream just keeps its priority
            log.debug("could not renice migration thread %d: %s", tid, exc)
    return changed

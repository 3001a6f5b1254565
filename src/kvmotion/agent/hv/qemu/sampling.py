"""What a VM costs to migrate, measured before it moves: its dirty rate and how much of its RAM is touched.

The dirty rate comes from QEMU (`calc-dirty-rate`, page sampling, 1 s). The touched RAM is the resident size of
the guest-RAM mapping of the QEMU process (`/proc/PID/smaps`): pages never written are zero and cost almost
nothing to migrate. The agent refreshes both for every running VM in the background (every ``SAMPLE_EVERY_S``), so a
migration's prediction costs no time; a missing or stale sample is measured on demand.
"""
from __future__ import annotations

import asyncio
import time

from kvmotion.agent.hv.qemu.process import QemuVM
from kvmotion.common.errors import ConflictError, DeadlineExceeded
from kvmotion.models.agent import DirtySample, VMRunState

SAMPLE_EVERY_S = 30.0           # a sample older than this is refreshed
TICK_S = 5.0                    # so a new VM has its first sample a few seconds after it runs
CALC_TIME_S = 1


def ram_touched_mb(pid: int, memory_mb: int) -> int | None:
    """Resident MiB of the guest-RAM mapping: the smallest mapping at least the guest's size (TCG's larger
    code buffer is skipped), or None."""
    best: tuple[int, int] | None = None          # (size kB, rss kB)
    size_kb = 0
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            for line in fh:
                if line.startswith("Size:"):
                    size_kb = int(line.split()[1])
                elif line.startswith("Rss:") and size_kb >= memory_mb * 1024:
                    if best is None or size_kb < best[0]:
                        best = (size_kb, int(line.split()[1]))
    except (OSError, ValueError, IndexError):
        return None
    return best[1] // 1024 if best else None


async def measure(vm: QemuVM, deadline_s: float = 5.0) -> DirtySample:
    assert vm.qmp is not None
    await vm.qmp.execute("calc-dirty-rate", {"calc-time": CALC_TIME_S}, timeout=5)
    end = time.monotonic() + deadline_s
    while True:
        await asyncio.sleep(0.2)
        r = await vm.qmp.execute("query-dirty-rate", timeout=5)
        if r.get("status") == "measured":
            break
        if time.monotonic() > end:
            raise DeadlineExceeded(f"the dirty rate of {vm.spec.name} was not measured within {deadline_s:.0f}s",
                                   remedy="retry; the VM may be paused or migrating")
    return DirtySample(dirty_mb_s=float(r.get("dirty-rate", 0)), sampled_at=time.time(),
                       ram_touched_mb=ram_touched_mb(vm.pid or 0, vm.spec.memory_mb) if vm.pid else None,
                       memory_mb=vm.spec.memory_mb)


def sampleable(vm: QemuVM) -> bool:
    """Running, and in no migration (an incoming one that has finished is fine)."""
    busy = vm.migration is not None and not vm.migration.done.is_set()
    return vm.state is VMRunState.RUNNING and vm.qmp is not None and not busy


class DirtySampler:
    """The newest sample per VM (bounded by the VMs the agent runs)."""

    def __init__(self) -> None:
        self.samples: dict[str, DirtySample] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def lock_for(self, uuid: str) -> asyncio.Lock:
        """Held while the VM is measured; a migration start takes it too, so the two never overlap."""
        return self._locks.setdefault(uuid, asyncio.Lock())

    async def get(self, vm: QemuVM, max_age_s: float, refresh: bool = True) -> DirtySample:
        """The newest sample (measured again when older than ``max_age_s``, if ``refresh`` and the VM allows);
        its touched RAM is always read fresh."""
        uuid = vm.spec.uuid
        async with self.lock_for(uuid):                   # one calc-dirty-rate per VM at a time
            s = self.samples.get(uuid)
            if (s is None or time.time() - s.sampled_at > max_age_s) and refresh and sampleable(vm):
                s = self.samples[uuid] = await measure(vm)
            elif s is None:
                raise ConflictError(f"no dirty-rate sample of VM {vm.spec.name} yet ({vm.state})",
                                    remedy="the agent samples running VMs every few seconds; retry shortly")
            elif vm.pid:                                  # the touched RAM only grows: always read it fresh
                s = s.model_copy(update={"ram_touched_mb": ram_touched_mb(vm.pid, vm.spec.memory_mb)})
            return s

    def forget(self, alive: set[str]) -> None:
        for uuid in set(self.samples) - alive:
            self.samples.pop(uuid, None)
            self._locks.pop(uuid, None)

    async def loop(self, vms: dict[str, QemuVM]) -> None:
        while True:
            self.forget(set(vms))
            for vm in list(vms.values()):
                if sampleable(vm):
                    try:
                        await self.get(vm, SAMPLE_EVERY_S)
                    except Exception:  # noqa: BLE001 - a VM stopping mid-sample; try again next round
                        pass
            await asyncio.sleep(TICK_S)

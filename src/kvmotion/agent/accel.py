"""Accelerator probe: KVM only if a test VM really executes within a deadline, otherwise TCG.

"Really executes" means guest code produced output: SeaBIOS writes its log to the debug port, and
when a guest kernel is at hand it must print its banner on the serial line.  A ``/dev/kvm`` that
opens but hangs fails this within the deadline, and the QEMU it started is killed by PID.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AccelResult:
    accelerator: str    # "kvm" | "tcg"
    reason: str


async def _run_until(argv: list[str], out: Path, marker: bytes, deadline_s: float) -> bool:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if out.exists() and marker in out.read_bytes():
                return True
            if proc.poll() is not None:
                return False
            await asyncio.sleep(0.05)
        return False
    finally:
        proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


async def probe_kvm(deadline_s: float = 8.0, kernel: Path | None = None,
                    binary: str = "qemu-system-x86_64") -> AccelResult:
    forced = os.environ.get("KVMOTION_ACCEL")
    if forced in ("kvm", "tcg"):
        return AccelResult(forced, f"forced by KVMOTION_ACCEL={forced}")
    if not os.path.exists("/dev/kvm"):
        return AccelResult("tcg", "/dev/kvm does not exist")
    if shutil.which(binary) is None:
        return AccelResult("tcg", f"{binary} not installed")
    tmp = Path(tempfile.mkdtemp(prefix="kvmotion-kvmprobe-"))
    try:
        base = [binary, "-accel", "kvm", "-machine", "pc-q35-7.2", "-nodefaults", "-display", "none", "-m", "128"]
        bios_log = tmp / "bios.log"
        ok = await _run_until(base + ["-chardev", f"file,id=dbg,path={bios_log}",
                                      "-device", "isa-debugcon,iobase=0x402,chardev=dbg"],
                              bios_log, b"Running on KVM", deadline_s / 2)
        if not ok:
            return AccelResult("tcg", f"KVM test VM printed nothing within {deadline_s / 2:.0f}s; using TCG")
        if kernel is not None and kernel.exists():
            serial = tmp / "serial.log"
            ok = await _run_until(base + ["-kernel", str(kernel), "-append", "console=ttyS0 earlyprintk=ttyS0",
                                          "-serial", f"file:{serial}"], serial, b"Linux version", deadline_s / 2)
            if not ok:
                return AccelResult("tcg", f"a Linux guest under KVM printed nothing within {deadline_s / 2:.0f}s; "
                                          "using TCG")
        return AccelResult("kvm", "a test VM ran under KVM")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

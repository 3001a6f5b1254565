"""The guest record writer (kvmotion.records=DEV) in a real TCG guest: records acked before a SIGKILL of QEMU are
on its disk, intact (the format and the verifier alone: tests/unit/test_records.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from kvmotion_lab.image import BASE_CMDLINE, GuestImage
from kvmotion_lab.records import HEADER_BYTES, parse_acks, verify

QEMU = "qemu-system-x86_64"
ACK_RE = re.compile(r"^KVMOTION-RECORD-ACK seq=(\d+) run=([0-9a-f-]{36})$")


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_real_guest_records_survive_sigkill(guest_image: GuestImage) -> None:
    """Boot the test guest with the record writer on its only disk, SIGKILL QEMU, verify the disk."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (apt-get install qemu-system-x86)")
    want = 30
    with tempfile.TemporaryDirectory(prefix="kvrec-", dir="/tmp") as tmp:
        work = Path(tmp)
        disk, serial = work / "disk.raw", work / "serial.log"
        with disk.open("wb") as fh:
            fh.truncate(64 << 20)
        node = {"node-name": "d0", "driver": "raw", "file": {"driver": "file", "filename": str(disk)}}
        argv = [QEMU, "-machine", "pc-q35-7.2", "-accel", "tcg,thread=single", "-m", "256", "-nodefaults",
                "-display", "none", "-kernel", str(guest_image.kernel), "-initrd", str(guest_image.initrd),
                "-append", f"{BASE_CMDLINE} kvmotion.records=vda kvmotion.records_rate=50",
                "-serial", f"file:{serial}", "-blockdev", json.dumps(node),
                "-device", "virtio-blk-pci,drive=d0"]
        with (work / "qemu.out").open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        started = time.monotonic()
        lines: list[str] = []
        try:
            deadline = started + 60
            while True:
                text = serial.read_bytes().decode(errors="replace") if serial.exists() else ""
                lines = [ln.rstrip("\r") for ln in text.split("\n")[:-1]]
                acks = [m for ln in lines if (m := ACK_RE.match(ln))]
                if len(acks) >= want:
                    break
                if proc.poll() is not None:
                    pytest.fail(f"QEMU exited ({proc.returncode}); serial:\n" + "\n".join(lines[-40:]))
                if time.monotonic() > deadline:
                    pytest.fail(f"only {len(acks)} record acks after 60 s; serial:\n" + "\n".join(lines[-40:]))
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        # re-read: lines printed between the last poll and the kill count too
        lines = [ln.rstrip("\r") for ln in serial.read_bytes().decode(errors="replace").split("\n")[:-1]]
        print(f"{want} acks after {time.monotonic() - started:.1f}s")
        assert "KVMOTION-RECORDS dev=/dev/vda size_kb=4 rate=50" in lines
        assert not any(ln.startswith(("KVMOTION-RECORD-ERROR", "KVMOTION-WARN records")) for ln in lines)
        acks = parse_acks(lines)
        assert len(acks) == 1
        run_id, top = next(iter(acks.items()))
        seqs = [int(m.group(1)) for ln in lines if (m := ACK_RE.match(ln))]
        assert seqs == list(range(1, top + 1))  # in order, none skipped, none repeated

        verdict = verify(disk, "raw", acks, 4)
        assert verdict.ok, verdict.reason
        assert verdict.run_id == run_id and verdict.acked == top >= want
        assert verdict.found_valid >= top and verdict.missing == [] and verdict.torn == []

        flip_byte(disk, 10 * 4096 + HEADER_BYTES + 100)  # corrupt an acked record
        bad = verify(disk, "raw", acks, 4)
        assert not bad.ok and bad.torn == [10] and bad.missing == [] and bad.torn_count == 1

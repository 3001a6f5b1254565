"""Host-side verifier for the guest's record writer (``kvmotion.records=DEV``).

The test guest (:mod:`kvmotion_lab.image.guest_init`) writes sequence-numbered,
checksummed records to consecutive slots of a raw virtio disk and prints
``KVMOTION-RECORD-ACK seq=N run=BOOT_ID`` on its serial console only after the
write (``dd conv=notrunc,fsync``, O_DIRECT when possible) returned.  After a
migration, crash or kill, this module checks that every acknowledged record is
really on the disk image, intact.

Record format (``size_kb`` KiB per record; record ``seq`` at byte offset
``seq * size_kb * 1024``, ``seq`` from 1, slot 0 unused)::

    bytes 0..127   header: "KVREC 1 seq=N run=RUN size_kb=S md5=HEX" left-justified,
                   padded with spaces to 127 bytes, then "\\n"
    bytes 128..    payload (size_kb * 1024 - 128 bytes); HEX = md5 of the payload

Typical use::

    acks = parse_acks(src_serial_lines + dst_serial_lines)     # {run: highest acked seq}
    verdict = verify(disk_path, "qcow2", acks, record_kb=4)
    assert verdict.ok, verdict.reason
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kvmotion.common.errors import DeadlineExceeded, InvalidInputError, NotFoundError

__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "AckLog",
    "RecordScan",
    "RecordSlot",
    "RecordVerdict",
    "encode_record",
    "parse_ack_log",
    "parse_acks",
    "read_records",
    "verify",
]

MAGIC = b"KVREC"
FORMAT_VERSION = 1
HEADER_BYTES = 128
MIN_RECORD_KB = 4
MAX_RECORD_KB = 1024
LIST_LIMIT = 20
"""Lists in a :class:`RecordVerdict` keep at most this many entries (counts are exact)."""
QEMU_IMG_TIMEOUT = 300.0

ACK_RE = re.compile(r"KVMOTION-RECORD-ACK seq=(\d+) run=([0-9A-Za-z-]+)\s*$")
ERROR_RE = re.compile(r"KVMOTION-RECORD-ERROR seq=(\d+)\s*$")
FULL_RE = re.compile(r"KVMOTION-RECORDS-FULL seq=(\d+)\s*$")
START_RE = re.compile(r"KVMOTION-RECORDS dev=(\S+) size_kb=(\d+) rate=(\d+)\s*$")
_HEADER_RE = re.compile(
    rb"KVREC (\d+) seq=(\d+) run=([0-9A-Za-z-]{1,64}) size_kb=(\d+) md5=([0-9a-f]{32}) *\n")
_FMT_RE = re.compile(r"[a-z0-9]{1,16}")
_CHUNK = 4 << 20

SlotStatus = Literal["valid", "torn", "garbage"]


# --------------------------------------------------------------------------- serial log


@dataclass
class AckLog:
    """What the serial console(s) said about the record writer."""

    acked: dict[str, set[int]] = field(default_factory=dict)  # run id -> acked seqs
    errors: list[int] = field(default_factory=list)  # seqs of KVMOTION-RECORD-ERROR lines (retried)
    full_at: int | None = None  # seq of a KVMOTION-RECORDS-FULL line
    record_kb: int | None = None  # size_kb of the last KVMOTION-RECORDS line

    def highest(self) -> dict[str, int]:
        """Highest acked seq per run id."""
        return {run: max(seqs) for run, seqs in self.acked.items() if seqs}


def parse_ack_log(lines: Iterable[str]) -> AckLog:
    """Parse serial console lines (any number of logs, concatenated, any order).

    Lines may carry ``\\r`` or leading noise (another process' partial output);
    only the ``KVMOTION-RECORD*`` part at the end of a line is used.
    """
    log = AckLog()
    for raw in lines:
        line = raw.rstrip("\r\n")
        if "KVMOTION-RECORD" not in line:
            continue
        if m := ACK_RE.search(line):
            log.acked.setdefault(m.group(2), set()).add(int(m.group(1)))
        elif m := ERROR_RE.search(line):
            log.errors.append(int(m.group(1)))
        elif m := FULL_RE.search(line):
            log.full_at = int(m.group(1))
        elif m := START_RE.search(line):
            log.record_kb = int(m.group(2))
    return log


def parse_acks(lines: Iterable[str]) -> dict[str, int]:
    """Highest acknowledged seq per run id (the guest's boot id) in serial console lines.

    Pass the lines of every serial log of the VM (e.g. source and destination host
    of a migration); the writer acks strictly in order and never skips a seq, so an
    ack of N means 1..N were all acked.  Use :func:`parse_ack_log` for the sets.
    """
    return parse_ack_log(lines).highest()


# --------------------------------------------------------------------------- record format


def _check_record_kb(record_kb: int) -> int:
    if (isinstance(record_kb, bool) or not isinstance(record_kb, int)
            or not MIN_RECORD_KB <= record_kb <= MAX_RECORD_KB or record_kb % 4):
        raise InvalidInputError(
            f"record size {record_kb!r} KiB is invalid",
            remedy=f"use a multiple of 4 in {MIN_RECORD_KB}..{MAX_RECORD_KB}, the size_kb= of the guest's "
                   f"KVMOTION-RECORDS line")
    return record_kb


def encode_record(seq: int, run: str, record_kb: int, payload: bytes | None = None) -> bytes:
    """One record exactly as the guest writes it (for tests and tools).

    *payload* defaults to bytes derived from *seq* and *run*; it must be
    ``record_kb * 1024 - 128`` bytes long.
    """
    _check_record_kb(record_kb)
    if seq < 1:
        raise InvalidInputError(f"seq must be >= 1, got {seq}", remedy="records start at seq 1")
    if not re.fullmatch(r"[0-9A-Za-z-]{1,64}", run):
        raise InvalidInputError(f"bad run id {run!r}", remedy="use the guest's boot id (a UUID)")
    plen = record_kb * 1024 - HEADER_BYTES
    if payload is None:
        seed = hashlib.sha256(f"{run}/{seq}".encode()).digest()
        payload = (seed * (plen // len(seed) + 1))[:plen]
    if len(payload) != plen:
        raise InvalidInputError(f"payload is {len(payload)} bytes, a {record_kb} KiB record needs {plen}",
                                remedy="pass a payload of record_kb * 1024 - 128 bytes")
    text = f"KVREC {FORMAT_VERSION} seq={seq} run={run} size_kb={record_kb} md5={hashlib.md5(payload).hexdigest()}"
    return text.encode().ljust(HEADER_BYTES - 1, b" ") + b"\n" + payload


@dataclass(frozen=True)
class RecordSlot:
    """A non-empty record slot of the disk (slot *index* at byte ``index * record size``)."""

    index: int
    status: SlotStatus  # valid; torn = header present but invalid; garbage = no header, not all zero
    seq: int | None = None  # from the header (None if unreadable)
    run: str | None = None
    size_kb: int | None = None
    problem: str = ""


def _decode_slot(index: int, data: bytes, record_kb: int) -> RecordSlot | None:
    if not data.startswith(MAGIC):
        if not data.strip(b"\0"):
            return None
        return RecordSlot(index, "garbage", problem="no KVREC header, data not zero")
    m = _HEADER_RE.fullmatch(data[:HEADER_BYTES])
    if m is None:
        return RecordSlot(index, "torn", problem="KVREC header garbled")
    version, seq, run, size_kb = int(m.group(1)), int(m.group(2)), m.group(3).decode(), int(m.group(4))
    problem = ""
    if version != FORMAT_VERSION:
        problem = f"unknown record format {version}"
    elif size_kb != record_kb:
        problem = f"header says size_kb={size_kb}, expected {record_kb}"
    elif seq != index:
        problem = f"header says seq={seq} at the slot of seq {index}"
    elif hashlib.md5(data[HEADER_BYTES:]).hexdigest() != m.group(5).decode():
        problem = "payload md5 mismatch"
    return RecordSlot(index, "torn" if problem else "valid", seq, run, size_kb, problem)


# --------------------------------------------------------------------------- reading images


@dataclass(frozen=True)
class RecordScan:
    """The non-empty record slots of a disk (slot 0 is ignored)."""

    record_kb: int
    capacity: int  # number of usable slots (seq 1..capacity fit on the disk)
    slots: dict[int, RecordSlot]  # index -> slot, only for non-empty slots


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) byte ranges that may hold data: skips holes of sparse files."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            yield pos, size  # SEEK_DATA unsupported (block device, old fs): read everything
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        pos = end


def _scan_raw(path: Path, record_kb: int, max_seq: int | None) -> RecordScan:
    rb = record_kb * 1024
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise NotFoundError(f"disk image {path} does not exist", remedy="pass the path of the VM's disk",
                            cause=exc) from exc
    except OSError as exc:
        raise InvalidInputError(f"cannot open {path}: {exc}", remedy="run as root or check the path",
                                cause=exc) from exc
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        capacity = max(size // rb - 1, 0)
        limit = capacity if max_seq is None else min(capacity, max(max_seq, 0))
        end_byte = (limit + 1) * rb
        slots: dict[int, RecordSlot] = {}
        chunk = max(_CHUNK // rb, 1) * rb
        for start, end in _data_ranges(fd, end_byte):
            first = max(start // rb, 1)
            stop = min((end + rb - 1) // rb, limit + 1)  # exclusive slot bound
            index = first
            while index < stop:
                n = min(chunk // rb, stop - index)
                buf = os.pread(fd, n * rb, index * rb)
                for j in range(len(buf) // rb):
                    slot = _decode_slot(index + j, buf[j * rb:(j + 1) * rb], record_kb)
                    if slot is not None:
                        slots[index + j] = slot
                if len(buf) < n * rb:
                    break
                index += n
        return RecordScan(record_kb, capacity, slots)
    finally:
        os.close(fd)


def _qemu_img_to_raw(path: Path, fmt: str, out: Path) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise NotFoundError("qemu-img is not installed", remedy="apt-get install qemu-utils")
    argv = [qemu_img, "convert", "-U", "-q", "-f", fmt, "-O", "raw", str(path), str(out)]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DeadlineExceeded(f"qemu-img convert of {path} took more than {QEMU_IMG_TIMEOUT:.0f}s",
                               remedy="use a smaller disk or read it as raw from a block device",
                               cause=exc) from exc
    if res.returncode != 0:
        raise InvalidInputError(f"qemu-img cannot read {path} as {fmt}: {res.stderr.strip()[-500:]}",
                                remedy="check the image path and its format (qemu-img info)",
                                details={"argv": argv, "returncode": res.returncode})


def read_records(path_or_device: Path, record_kb: int, *, fmt: str = "raw",
                 max_seq: int | None = None, workdir: Path | None = None) -> RecordScan:
    """The guest-visible record slots of a disk image or block device.

    ``fmt="raw"`` reads the file/device directly (holes of sparse files are skipped);
    any other format (``qcow2``, ...) is converted first with
    ``qemu-img convert -U -O raw`` into a sparse temporary file under *workdir*
    (default: the system temp dir); ``-U`` allows reading an image that a running
    QEMU holds open.  *max_seq* stops the scan after that slot.
    """
    _check_record_kb(record_kb)
    path = Path(path_or_device)
    if not _FMT_RE.fullmatch(fmt):
        raise InvalidInputError(f"bad image format {fmt!r}", remedy="use raw, qcow2 or another qemu-img format")
    if not path.exists():
        raise NotFoundError(f"disk image {path} does not exist", remedy="pass the path of the VM's disk")
    if fmt == "raw":
        return _scan_raw(path, record_kb, max_seq)
    if stat.S_ISDIR(path.stat().st_mode):
        raise InvalidInputError(f"{path} is a directory", remedy="pass the disk image file")
    with tempfile.TemporaryDirectory(prefix="kvmotion-records-", dir=workdir) as tmp:
        raw = Path(tmp) / "disk.raw"
        _qemu_img_to_raw(path, fmt, raw)
        return _scan_raw(raw, record_kb, max_seq)


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class RecordVerdict:
    """Result of :func:`verify`.  Lists hold at most :data:`LIST_LIMIT` seqs; ``*_count`` are exact."""

    ok: bool
    run_id: str
    acked: int  # highest acked seq: records 1..acked must be on disk, valid
    found_valid: int  # valid records of this run anywhere on the disk
    missing: list[int]  # acked, but no record of this run at its slot (empty, other run, no header)
    missing_count: int
    torn: list[int]  # must be valid but the header is there and invalid (checksum, size, seq)
    torn_count: int
    beyond_ack_valid: int  # valid records of this run past the last ack (written, ack not seen)
    torn_beyond_ack: list[int]  # torn slots past the last ack and past every valid record: in flight, allowed
    torn_beyond_ack_count: int
    reason: str
    problems: list[str] = field(default_factory=list)  # "seq N: what is wrong", bounded


def _pick_run(acks: Mapping[str, int | Iterable[int]], run: str | None) -> tuple[str, int]:
    highest: dict[str, int] = {}
    for r, v in acks.items():
        if isinstance(v, int):
            highest[r] = v
        else:
            seqs = list(v)
            highest[r] = max(seqs) if seqs else 0
    if run is not None:
        return run, highest.get(run, 0)
    if not highest:
        raise InvalidInputError(
            "no KVMOTION-RECORD-ACK lines: nothing to verify",
            remedy="boot the guest with kvmotion.records=DEV and pass every serial log of the VM to parse_acks")
    if len(highest) > 1:
        raise InvalidInputError(
            f"acks from {len(highest)} runs (guest boots): {', '.join(sorted(highest))}",
            remedy="pass run= with the boot id of the run to verify (a later boot overwrites earlier records)",
            details={"runs": highest})
    return next(iter(highest.items()))


def _keep(items: list[int], item: int) -> int:
    """Append while the list is under LIST_LIMIT; returns 1 to add to the exact count."""
    if len(items) < LIST_LIMIT:
        items.append(item)
    return 1


def verify(image: Path, fmt: str, acks: Mapping[str, int | Iterable[int]], record_kb: int, *,
           run: str | None = None, workdir: Path | None = None) -> RecordVerdict:
    """Check that every acknowledged record of one run is on *image*, intact.

    *acks* maps run id -> highest acked seq (:func:`parse_acks`) or -> acked seqs;
    with more than one run, *run* chooses.  Records 1..acked must be present and
    valid (else they are listed in ``missing`` or ``torn``).  Past the last ack,
    records may exist (written, ack not yet printed); they must be valid when they
    are complete, i.e. when a later valid record of the run exists (the writer only
    moves on after a successful write).  Torn slots after the last valid record are
    writes in flight: listed in ``torn_beyond_ack``, not a failure.  Slots of other
    runs or with no header past the last ack are ignored.
    """
    run_id, acked = _pick_run(acks, run)
    scan = read_records(image, record_kb, fmt=fmt, workdir=workdir)
    t = _Tally()
    if acked > scan.capacity:
        t.note(acked, f"acked but the disk holds only {scan.capacity} records of {record_kb} KiB")
    _check_acked(scan, run_id, acked, t)
    ours = [i for i, s in scan.slots.items() if s.status == "valid" and s.run == run_id]
    beyond_valid = sum(1 for i in ours if i > acked)
    _check_beyond_ack(scan, run_id, acked, max(ours, default=0), t)
    ok = t.n_missing == 0 and t.n_torn == 0 and acked <= scan.capacity
    if ok:
        reason = f"all {acked} acked records of run {run_id} are on disk and valid"
        if beyond_valid:
            reason += f"; {beyond_valid} more valid past the last ack"
        if t.n_torn_beyond:
            reason += f"; {t.n_torn_beyond} torn past the last ack (in flight, allowed)"
    else:
        reason = (f"run {run_id}: {t.n_missing} of {acked} acked records missing, {t.n_torn} torn"
                  + (f"; first problem: {t.problems[0]}" if t.problems else ""))
    return RecordVerdict(ok=ok, run_id=run_id, acked=acked, found_valid=len(ours), missing=t.missing,
                         missing_count=t.n_missing, torn=t.torn, torn_count=t.n_torn,
                         beyond_ack_valid=beyond_valid, torn_beyond_ack=t.torn_beyond,
                         torn_beyond_ack_count=t.n_torn_beyond, reason=reason, problems=t.problems)


@dataclass
class _Tally:
    """What :func:`verify` found wrong: exact counts, and lists cut at LIST_LIMIT."""

    missing: list[int] = field(default_factory=list)
    torn: list[int] = field(default_factory=list)
    torn_beyond: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    n_missing: int = 0
    n_torn: int = 0
    n_torn_beyond: int = 0

    def note(self, seq: int, what: str) -> None:
        if len(self.problems) < LIST_LIMIT:
            self.problems.append(f"seq {seq}: {what}")


def _check_acked(scan: RecordScan, run_id: str, acked: int, t: _Tally) -> None:
    """Records 1..acked must be valid records of the run."""
    for seq in range(1, acked + 1):
        slot = scan.slots.get(seq)
        if slot is not None and slot.status == "valid" and slot.run == run_id:
            continue
        if slot is not None and slot.status == "torn":
            t.n_torn += _keep(t.torn, seq)
            t.note(seq, f"torn ({slot.problem})")
        else:
            t.n_missing += _keep(t.missing, seq)
            if slot is None:
                t.note(seq, "slot is empty")
            elif slot.status == "garbage":
                t.note(seq, slot.problem)
            else:
                t.note(seq, f"holds a record of run {slot.run}")


def _check_beyond_ack(scan: RecordScan, run_id: str, acked: int, last_valid: int, t: _Tally) -> None:
    """Past the last ack a torn slot is a write in flight, unless a later record of the run was written."""
    for index in sorted(i for i, s in scan.slots.items() if i > acked and s.status == "torn"):
        slot = scan.slots[index]
        if slot.run not in (run_id, None):
            continue
        if index < last_valid:  # a later record was written, so this write had completed
            t.n_torn += _keep(t.torn, index)
            t.note(index, f"torn past the last ack although seq {last_valid} was written later ({slot.problem})")
        else:
            t.n_torn_beyond += _keep(t.torn_beyond, index)


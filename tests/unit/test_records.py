"""Tests for the guest record writer (kvmotion.records=DEV) and its host-side verifier."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmotion.common.errors import InvalidInputError, NotFoundError
from kvmotion_lab.records import (
    HEADER_BYTES,
    LIST_LIMIT,
    encode_record,
    parse_ack_log,
    parse_acks,
    read_records,
    verify,
)

RUN = "0b5c3d0e-5f7a-4c55-9d8e-2a1f6c0d9e11"
OTHER_RUN = "77777777-8888-4999-aaaa-bbbbbbbbbbbb"


# --------------------------------------------------------------------------- synthetic images


def make_record(seq: int, run: str, record_kb: int, payload: bytes | None = None) -> bytes:
    """The record format, built independently of kvmotion_lab.records (as the guest script does)."""
    if payload is None:
        payload = os.urandom(record_kb * 1024 - 128)
    header = f"KVREC 1 seq={seq} run={run} size_kb={record_kb} md5={hashlib.md5(payload).hexdigest()}"
    assert len(header) <= 127
    return f"{header:<127}\n".encode() + payload


def make_disk(path: Path, count: int, *, run: str = RUN, record_kb: int = 4, slots: int = 256,
              start: int = 1) -> Path:
    """A sparse raw disk with records start..count of *run* (slot 0 untouched)."""
    rb = record_kb * 1024
    with path.open("wb") as fh:
        fh.truncate(slots * rb)
        for seq in range(start, count + 1):
            fh.seek(seq * rb)
            fh.write(make_record(seq, run, record_kb))
    return path


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_encode_record_matches_format() -> None:
    payload = bytes(range(256)) * 15 + bytes(range(128))
    rec = encode_record(7, RUN, 4, payload)
    assert rec == make_record(7, RUN, 4, payload)
    assert len(rec) == 4096 and rec[HEADER_BYTES - 1:HEADER_BYTES] == b"\n"
    assert rec.startswith(f"KVREC 1 seq=7 run={RUN} size_kb=4 md5=".encode())
    assert len(encode_record(1, RUN, 1024)) == 1024 * 1024
    with pytest.raises(InvalidInputError):
        encode_record(1, RUN, 4, b"short")
    with pytest.raises(InvalidInputError):
        encode_record(0, RUN, 4)


def test_all_good(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 50)
    v = verify(disk, "raw", {RUN: 50}, 4)
    assert v.ok, v.reason
    assert (v.acked, v.found_valid, v.run_id) == (50, 50, RUN)
    assert v.missing == [] and v.torn == [] and v.torn_beyond_ack == [] and v.beyond_ack_valid == 0


def test_acked_record_zeroed_is_missing(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 50)
    patch(disk, 17 * 4096, bytes(4096))
    v = verify(disk, "raw", {RUN: 50}, 4)
    assert not v.ok
    assert v.missing == [17] and v.missing_count == 1 and v.torn == []
    assert v.found_valid == 49 and "missing" in v.reason


def test_acked_record_with_flipped_payload_byte_is_torn(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 50)
    flip_byte(disk, 23 * 4096 + 2000)
    v = verify(disk, "raw", {RUN: 50}, 4)
    assert not v.ok
    assert v.torn == [23] and v.torn_count == 1 and v.missing == []
    assert any("md5" in p for p in v.problems)


def test_record_at_wrong_slot_or_size_is_torn(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 20)
    patch(disk, 5 * 4096, make_record(6, RUN, 4))  # a record of seq 6 at seq 5's slot
    v = verify(disk, "raw", {RUN: 20}, 4)
    assert not v.ok and v.torn == [5] and "seq=6" in v.problems[0]
    v8 = verify(disk, "raw", {RUN: 10}, 8)  # wrong record size: nothing lines up
    assert not v8.ok and v8.missing_count + v8.torn_count == 10


def test_records_past_the_ack_are_fine(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 60)
    v = verify(disk, "raw", {RUN: 50}, 4)
    assert v.ok, v.reason
    assert v.acked == 50 and v.found_valid == 60 and v.beyond_ack_valid == 10


def test_torn_write_in_flight_past_the_ack_is_allowed(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 52)
    flip_byte(disk, 52 * 4096 + 3000)  # last record on disk, not acked: write in flight
    v = verify(disk, "raw", {RUN: 50}, 4)
    assert v.ok, v.reason
    assert v.torn_beyond_ack == [52] and v.torn_beyond_ack_count == 1 and v.beyond_ack_valid == 1


def test_torn_record_followed_by_later_records_fails(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 55)
    flip_byte(disk, 52 * 4096 + 3000)  # not acked, but 53..55 were written after it
    v = verify(disk, "raw", {RUN: 50}, 4)
    assert not v.ok and v.torn == [52] and v.torn_beyond_ack == []


def test_stale_records_of_an_earlier_boot_do_not_count(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 40, run=OTHER_RUN)  # earlier boot wrote 1..40
    with disk.open("r+b") as fh:  # this boot rewrote 1..30, then crashed
        for seq in range(1, 31):
            fh.seek(seq * 4096)
            fh.write(make_record(seq, RUN, 4))
    assert verify(disk, "raw", {RUN: 30}, 4).ok
    v = verify(disk, "raw", {RUN: 35}, 4)  # acks the disk does not have: stale content
    assert not v.ok and v.missing == [31, 32, 33, 34, 35]
    assert "holds a record of run" in v.problems[0]


def test_lists_are_bounded(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 10)
    v = verify(disk, "raw", {RUN: 100}, 4)
    assert not v.ok and v.missing_count == 90 and len(v.missing) == LIST_LIMIT
    assert len(v.problems) <= LIST_LIMIT


def test_acks_beyond_capacity(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 15, slots=16)
    assert verify(disk, "raw", {RUN: 15}, 4).ok
    assert not verify(disk, "raw", {RUN: 16}, 4).ok


def test_parse_acks_across_logs() -> None:
    src = ["KVMOTION-RECORDS dev=/dev/vdb size_kb=8 rate=20\r\n"] + [
        f"KVMOTION-RECORD-ACK seq={i} run={RUN}\r\n" for i in range(1, 40)] + ["KVMOTION-RECORD-ERROR seq=40"]
    dst = ["garbage KVMOTION-HEARTBEAT seq=3", f"xxKVMOTION-RECORD-ACK seq=40 run={RUN}",
           f"KVMOTION-RECORD-ACK seq=41 run={RUN}", "KVMOTION-RECORD-ACK seq=41 run=",
           f"KVMOTION-RECORD-ACK seq=9 run={OTHER_RUN}", "KVMOTION-RECORDS-FULL seq=42"]
    assert parse_acks(dst + src) == {RUN: 41, OTHER_RUN: 9}
    log = parse_ack_log(src + dst)
    assert log.acked[RUN] == set(range(1, 42)) and log.errors == [40]
    assert log.full_at == 42 and log.record_kb == 8
    assert parse_acks([]) == {}


def test_verify_run_selection(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 10)
    with pytest.raises(InvalidInputError) as exc:
        verify(disk, "raw", {RUN: 10, OTHER_RUN: 3}, 4)
    assert exc.value.remedy
    assert verify(disk, "raw", {RUN: 10, OTHER_RUN: 3}, 4, run=RUN).ok
    assert not verify(disk, "raw", {RUN: 10, OTHER_RUN: 3}, 4, run=OTHER_RUN).ok
    assert verify(disk, "raw", {RUN: set(range(1, 11))}, 4).acked == 10
    with pytest.raises(InvalidInputError):
        verify(disk, "raw", {}, 4)


def test_bad_input_raises_kvmotion_errors(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 3)
    with pytest.raises(NotFoundError) as nf:
        verify(tmp_path / "nope.raw", "raw", {RUN: 3}, 4)
    assert nf.value.remedy
    for kb in (0, 2, 6, 2048):
        with pytest.raises(InvalidInputError):
            read_records(disk, kb)
    with pytest.raises(InvalidInputError):
        read_records(disk, 4, fmt="raw; rm -rf /")


@pytest.fixture
def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        pytest.skip("qemu-img not installed (apt-get install qemu-utils)")
    return path


def test_qcow2_image(tmp_path: Path, qemu_img: str) -> None:
    raw = make_disk(tmp_path / "d.raw", 30, record_kb=16, slots=64)
    qcow = tmp_path / "d.qcow2"
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True, timeout=60)
    scan = read_records(qcow, 16, fmt="qcow2", workdir=tmp_path)
    assert scan.capacity == 63 and sorted(scan.slots) == list(range(1, 31))
    assert all(s.status == "valid" for s in scan.slots.values())
    v = verify(qcow, "qcow2", {RUN: 30}, 16, workdir=tmp_path)
    assert v.ok and v.found_valid == 30, v.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.qcow2", "d.raw"]  # temp raw removed
    with pytest.raises(InvalidInputError):
        read_records(raw, 16, fmt="qcow2")  # not a qcow2

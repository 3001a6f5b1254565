"""Raw LUN identity ("RDM"): a destination must see the SAME device, not just a device at the same path.

Identity of a block device node (symlinks followed, partitions as ``<disk identity>:part<N>``):

* loop device: ``loop-backing:<st_dev>:<st_ino>`` of its backing file (``:off=<n>`` appended for a
  non-zero offset), taken from ``LOOP_GET_STATUS64`` (what the kernel really holds open), else from
  ``/sys/block/loopN/loop/backing_file``;
* SCSI/NVMe/virtio disk: ``wwn:<wwid>`` from ``device/wwid`` or ``wwid``, else ``serial:<serial>``;
* anything else: ``None`` (no identity, so never "the same" as anything).
"""
from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from kvmotion.common.errors import ConflictError, DeadlineExceeded, InvalidInputError, KvmotionError

log = logging.getLogger(__name__)

SYS = Path("/sys")
LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")   # struct loop_info64, 232 bytes
LOSETUP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BlockDeviceFact:
    path: str                 # the path as presented (may be a symlink)
    identity: str | None
    size_bytes: int
    kind: str                 # "loop" | "disk" | "unknown"


def _read(p: Path) -> str | None:
    try:
        text = p.read_text(errors="replace").strip()
    except OSError:
        return None
    return text or None


def _sysfs_dir(path: Path) -> Path | None:
    """The sysfs directory of the block device node behind ``path`` (symlinks followed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    link = SYS / "dev" / "block" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    try:
        return link.resolve(strict=True)
    except OSError:
        return None


def _split_partition(sysdir: Path) -> tuple[Path, str | None]:
    """(whole-disk sysfs dir, partition number or None)."""
    part = _read(sysdir / "partition")
    return (sysdir.parent, part) if part else (sysdir, None)


def _norm_dev(dev: int) -> int:
    return os.makedev(os.major(dev), os.minor(dev))


def _loop_identity(disk: Path) -> str | None:
    dev_node = Path("/dev") / disk.name
    try:
        fd = os.open(dev_node, os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf = bytearray(_LOOP_INFO64.size)
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
        finally:
            os.close(fd)
        lo_device, lo_inode, _rdev, offset = _LOOP_INFO64.unpack(bytes(buf))[:4]
        dev, ino = _norm_dev(lo_device), lo_inode
    except OSError:   # not attached (ENXIO), no /dev node, or no permission: fall back to sysfs
        backing = _read(disk / "loop" / "backing_file")
        if backing is None or backing.endswith(" (deleted)"):
            return None
        try:
            st = os.stat(backing)
        except OSError:
            return None
        dev, ino, offset = st.st_dev, st.st_ino, int(_read(disk / "loop" / "offset") or 0)
    return f"loop-backing:{dev}:{ino}" + (f":off={offset}" if offset else "")


def _disk_identity(disk: Path) -> str | None:
    for name in ("device/wwid", "wwid"):
        wwid = _read(disk / name)
        if wwid:
            return f"wwn:{wwid}"
    for name in ("device/serial", "serial"):
        serial = _read(disk / name)
        if serial:
            return f"serial:{serial}"
    return None


def _kind(disk: Path) -> str:
    if disk.name.startswith("loop") and (disk / "loop").exists():
        return "loop"
    if (disk / "device").exists():
        return "disk"
    return "unknown"


def _identity_of(sysdir: Path) -> str | None:
    disk, part = _split_partition(sysdir)
    kind = _kind(disk)
    ident = _loop_identity(disk) if kind == "loop" else _disk_identity(disk) if kind == "disk" else None
    return f"{ident}:part{part}" if ident is not None and part is not None else ident


def device_identity(path: Path) -> str | None:
    """The identity of the LUN at ``path``, or None when it is not a block device or has no identity."""
    sysdir = _sysfs_dir(Path(path))
    return _identity_of(sysdir) if sysdir is not None else None


def presented_devices(paths: list[Path]) -> list[BlockDeviceFact]:
    """One fact per path, in order; a missing or non-block path is kind "unknown", size 0, no identity."""
    facts = []
    for p in paths:
        sysdir = _sysfs_dir(Path(p))
        if sysdir is None:
            facts.append(BlockDeviceFact(str(p), None, 0, "unknown"))
            continue
        sectors = _read(sysdir / "size")
        facts.append(BlockDeviceFact(
            path=str(p), identity=_identity_of(sysdir),
            size_bytes=int(sectors) * 512 if sectors and sectors.isdigit() else 0,
            kind=_kind(_split_partition(sysdir)[0]),
        ))
    return facts


def resolve_identity(identity: str, paths: list[Path]) -> Path | None:
    """Which of ``paths`` shows the LUN ``identity`` on this host (first match), if any."""
    for p in paths:
        if device_identity(Path(p)) == identity:
            return Path(p)
    return None


def _losetup(args: list[str], timeout_s: float) -> str:
    try:
        res = subprocess.run(["losetup", *args], capture_output=True, text=True, timeout=timeout_s,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise DeadlineExceeded(f"losetup {' '.join(args)} took longer than {timeout_s:.0f}s",
                               remedy="check for a hung loop device or storage (dmesg)", cause=exc) from exc
    except FileNotFoundError as exc:
        raise KvmotionError("losetup is not installed", remedy="install util-linux", cause=exc) from exc
    if res.returncode != 0:
        raise KvmotionError(f"losetup {' '.join(args)} failed: {res.stderr.strip()}",
                            remedy="run as root and check that free /dev/loopN nodes exist (losetup -f)")
    return res.stdout.strip()


class LoopDevice:
    """A loop device this process attached, detached again only by its own name (tests and the lab).

    ``with LoopDevice(file, 16) as loop: loop.device`` or ``with LoopDevice() as loop: loop.create(file, 16)``.
    """

    def __init__(self, backing_file: Path | None = None, size_mb: int | None = None,
                 timeout_s: float = LOSETUP_TIMEOUT_S) -> None:
        self._backing = Path(backing_file) if backing_file is not None else None
        self._size_mb = size_mb
        self.timeout_s = timeout_s
        self.device: Path | None = None
        self.identity: str | None = None

    def create(self, backing_file: Path, size_mb: int | None = None) -> Path:
        """Make ``backing_file`` at least ``size_mb`` MiB (sparse) and attach it; returns /dev/loopN."""
        if self.device is not None:
            raise ConflictError(f"this LoopDevice is already attached as {self.device}",
                                remedy="use one LoopDevice per attachment")
        backing = Path(backing_file)
        if size_mb is not None:
            if size_mb <= 0:
                raise InvalidInputError(f"size_mb must be positive, got {size_mb}", remedy="pass e.g. 16")
            with open(backing, "ab") as f:
                if f.tell() < size_mb * 1024 * 1024:
                    f.truncate(size_mb * 1024 * 1024)
        elif not backing.is_file():
            raise InvalidInputError(f"backing file {backing} does not exist", remedy="pass size_mb to create it")
        self.device = Path(_losetup(["--find", "--show", str(backing)], self.timeout_s))
        self.identity = device_identity(self.device)
        return self.device

    def detach(self) -> None:
        """Detach our device, unless it no longer holds our backing file (someone else's now)."""
        device, self.device = self.device, None
        if device is None:
            return
        current = device_identity(device)
        if current != self.identity:
            log.warning("not detaching %s: it now holds %s, not our %s", device, current, self.identity)
            return
        _losetup(["--detach", str(device)], self.timeout_s)

    def __enter__(self) -> "LoopDevice":
        if self._backing is not None:
            self.create(self._backing, self._size_mb)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.detach()

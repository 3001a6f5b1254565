"""Leases: which host may open a VM's files read-write. One lease per disk, plus one for the VM folder.

QEMU's own OFD locks protect the images only where the shared filesystem passes locks through, so kvmotion
keeps its own record on the datastore: a small lease file next to each disk (``.NAME.lease``) holding the
owner host and an epoch. It is read and written under an ``fcntl`` lock on the file itself; the epoch only
grows, so every hand-over is visible. A take succeeds when the lease is free, already ours, or held by the
host named as the expected previous holder (the compare-and-swap of a migration hand-over).

Lease files live next to the disks, on the shared datastore: each is opened from the datastore's root without
following a symbolic link (:mod:`kvmotion.common.confined`), so a planted ``.NAME.lease`` link is refused, never
written through.
"""
from __future__ import annotations

import fcntl
import os
import time

from kvmotion.common.confined import Place
from kvmotion.common.errors import ConflictError
from kvmotion.models.agent import LeaseInfo

LEASE_FILE = ".kvmotion.lease"      # the VM folder's lease


def disk_lease_path(disk_path: Place) -> Place:
    return disk_path.with_name(f".{disk_path.name}.lease")


def lease_paths(folder: Place, disk_paths: list[Place]) -> list[Place]:
    return [folder / LEASE_FILE] + [disk_lease_path(p) for p in disk_paths]


def _read(fd: int) -> LeaseInfo | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 4096)
    if not data.strip():
        return None
    try:
        return LeaseInfo.model_validate_json(data)
    except ValueError:
        return None


def _write(fd: int, lease: LeaseInfo) -> None:
    data = lease.model_dump_json().encode()
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, data)
    os.fsync(fd)


class _Locked:
    """The lease file, open and exclusively fcntl-locked."""

    def __init__(self, path: Place, create: bool) -> None:
        self.path, self.create, self.fd = path, create, -1

    def __enter__(self) -> int | None:
        flags = os.O_RDWR | (os.O_CREAT if self.create else 0)
        try:
            self.fd = self.path.open(flags, 0o600)
        except FileNotFoundError:
            return None
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        return self.fd

    def __exit__(self, *_: object) -> None:
        if self.fd >= 0:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def read_lease(path: Place) -> LeaseInfo | None:
    """The lease in one lease file (None when free or absent)."""
    with _Locked(path, create=False) as fd:
        lease = None if fd is None else _read(fd)
        return lease if lease is not None and lease.host else None


def take_one(path: Place, vm_uuid: str, host: str, expected_holder: str | None) -> tuple[LeaseInfo, bool]:
    """Take one lease; returns it and whether it was newly taken (False: this host held it already)."""
    path.parent.make_dirs()
    with _Locked(path, create=True) as fd:
        assert fd is not None
        current = _read(fd)
        holder = current.host if current else ""
        if holder and holder not in (host, expected_holder):
            raise ConflictError(
                f"{path.name.removesuffix('.lease').lstrip('.')} of VM {vm_uuid} is leased by host {holder}",
                remedy=f"the VM may still run on {holder}: stop it there first, or migrate it",
                details={"holder": holder, "epoch": current.epoch if current else 0, "lease": str(path)})
        if current is not None and holder == host and current.vm_uuid == vm_uuid:
            return current, False
        epoch = (current.epoch if current else 0) + 1
        lease = LeaseInfo(vm_uuid=vm_uuid, host=host, epoch=epoch, taken_at=time.time())
        _write(fd, lease)
        return lease, True


def release_one(path: Place, host: str) -> bool:
    """Free a lease this host holds (the epoch is kept). True if this host held it."""
    with _Locked(path, create=False) as fd:
        if fd is None:
            return False
        current = _read(fd)
        if current is None or current.host != host:
            return False
        _write(fd, current.model_copy(update={"host": "", "taken_at": time.time()}))
        return True


def take_all(paths: list[Place], vm_uuid: str, host: str, expected_holder: str | None) -> LeaseInfo:
    """Take every lease of a VM or none: on a conflict the ones newly taken here are freed again."""
    taken: list[Place] = []
    first: LeaseInfo | None = None
    try:
        for p in paths:
            lease, new = take_one(p, vm_uuid, host, expected_holder)
            if new:
                taken.append(p)
            first = first or lease
    except ConflictError:
        for p in taken:
            release_one(p, host)
        raise
    assert first is not None
    return first


def release_all(paths: list[Place], host: str) -> int:
    return sum(release_one(p, host) for p in paths)


def held_by(paths: list[Place], host: str) -> list[str]:
    """The lease files among ``paths`` this host holds."""
    out = []
    for p in paths:
        lease = read_lease(p)
        if lease is not None and lease.host == host:
            out.append(str(p))
    return out


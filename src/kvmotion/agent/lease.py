"""The VM's lease on its datastore folder: which host may write the VM's files.

QEMU's own OFD locks protect the images only where the shared filesystem passes locks through;
the lease is kvmotion's own record, handed over with compare-and-swap at the end of a migration.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from kvmotion.common.errors import ConflictError
from kvmotion.common.types import LeaseInfo

LEASE_FILE = ".kvmotion.lease"


def _lease_path(folder: Path) -> Path:
    return folder / LEASE_FILE


def read_lease(folder: Path) -> LeaseInfo | None:
    try:
        return LeaseInfo.model_validate_json(_lease_path(folder).read_text())
    except (OSError, ValueError):
        return None


def take_lease(folder: Path, vm_uuid: str, host: str, expected_holder: str | None) -> LeaseInfo:
    """Take the lease if it is free, ours, or held by ``expected_holder`` (a hand-over)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / (LEASE_FILE + ".lock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        current = read_lease(folder)
        if current is not None and current.host not in (host, expected_holder):
            raise ConflictError(
                f"the files of VM {vm_uuid} are leased by host {current.host}",
                remedy=f"the VM may still run on {current.host}: stop it there first, or migrate it",
                details={"holder": current.host, "epoch": current.epoch},
            )
        lease = LeaseInfo(vm_uuid=vm_uuid, host=host, epoch=(current.epoch + 1) if current else 1, taken_at=time.time())
        tmp = _lease_path(folder).with_suffix(".tmp")
        tmp.write_text(lease.model_dump_json())
        os.replace(tmp, _lease_path(folder))
        return lease


def release_lease(folder: Path, host: str) -> bool:
    """Drop the lease if this host holds it. True if this host held it."""
    with open(folder / (LEASE_FILE + ".lock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        current = read_lease(folder)
        if current is None or current.host != host:
            return False
        _lease_path(folder).unlink(missing_ok=True)
        return True

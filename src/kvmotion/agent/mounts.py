"""What is mounted where (``/proc/self/mountinfo``): a datastore of kind ``nfs`` must be an NFS mount itself.

The classic failure this catches: the export did not mount at boot, and the empty mount point on the host's own
disk would take the VMs' files. A datastore of kind ``nfs`` whose path is not the mount point of an NFS file system
is reported inaccessible, so nothing is placed on it, and its error says what is mounted there instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
NFS_TYPES = ("nfs", "nfs4")


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse(text: str) -> list[Mount]:
    """Lines of mountinfo(5): ``ID PARENT MAJ:MIN ROOT POINT OPTS [TAGS...] - FSTYPE SOURCE SUPEROPTS``."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(Mount(point=_unescape(fields[4]), fstype=tail[0], source=_unescape(tail[1])))
    return mounts


def mount_at(path: Path, text: str | None = None) -> Mount | None:
    """The file system mounted exactly at ``path`` (the last one, when mounts are stacked), or None."""
    point = os.path.realpath(path)
    found = None
    for m in parse(text if text is not None else MOUNTINFO.read_text()):
        if m.point == point:
            found = m
    return found


def nfs_problem(path: Path, text: str | None = None) -> tuple[str | None, str | None]:
    """(the export, None) for an NFS mount at ``path``; (None, why not) otherwise."""
    m = mount_at(path, text)
    if m is None:
        return None, f"{path} is not a mount point: the NFS export is not mounted there"
    if m.fstype not in NFS_TYPES:
        return None, f"{path} is a {m.fstype} file system ({m.source}), not an NFS mount"
    return m.source, None

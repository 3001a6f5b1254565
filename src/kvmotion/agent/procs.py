"""What the agent reads about its QEMU processes from /proc: alive, which VM, image locks, memory."""
from __future__ import annotations

import os
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def pid_is_qemu_for(pid: int, uuid: str) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and cmd[0].endswith(QEMU_BINARY.encode()) and uuid.encode() in cmd


def image_locks(pid: int, paths: list[Path]) -> dict[str, list[str]]:
    """The file locks a process holds on the given images, read from /proc/PID/fdinfo."""
    wanted = {str(p) for p in paths}
    out: dict[str, list[str]] = {p: [] for p in wanted}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target not in wanted:
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        out[target] += [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("lock:")]
    return out


def rss_mb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0

"""The lab's processes and its state file (``lab.json``): start a service as its unit does, wait for it, stop
only a process the lab started (by the PID it recorded)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from kvmotion_lab import services
from kvmotion_lab.netns import LabError


def state_path(root: Path) -> Path:
    return root / "lab.json"


def write_state(root: Path, data: dict[str, Any]) -> None:
    tmp = root / "lab.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, state_path(root))


def read_state(root: Path) -> dict[str, Any] | None:
    """What ``up`` recorded; None when there is no (readable) record."""
    try:
        data = json.loads(state_path(root).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True,
                                env=services.service_env(env))
    return proc.pid


def wait_until(check: Callable[[], bool], deadline_s: float, what: str, log: Path | None = None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError, ValueError):
            pass
        time.sleep(0.2)
    tail = ""
    if log is not None and log.exists():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
    raise LabError(f"{what} did not come up within {deadline_s:.0f}s: {tail}")


def kill(pid: int, grace_s: float = 5.0) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break
        except (ProcessLookupError, OSError):
            break
        time.sleep(0.05)
    else:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


def pid_is_ours(pid: int) -> bool:
    """Only a kvmotion process we started (the PID may have been reused since)."""
    try:
        return b"kvmotion" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False

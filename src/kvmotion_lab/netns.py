"""Commands in network namespaces: running ``ip``/``sysctl``, listing namespaces and their processes.

The lab's building blocks (:mod:`kvmotion_lab.net` builds the topology, :mod:`kvmotion_lab.netdown` removes it).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

log = logging.getLogger(__name__)

CMD_TIMEOUT = 15.0  # seconds, deadline for every external command
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL in lab_down


class LabError(Exception):
    """A lab operation failed; the message names the problem and the fix."""



def netns_exec_argv(netns: str, argv: list[str]) -> list[str]:
    """argv that runs *argv* inside network namespace *netns*."""
    return ["ip", "netns", "exec", netns, *argv]


def run(argv: list[str], *, check: bool = True, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    log.debug("run: %s", " ".join(argv))
    try:
        cp = subprocess.run(argv, check=False, timeout=timeout, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise LabError(f"command not found: {argv[0]!r}; install it (iproute2/procps) and retry") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"command timed out after {timeout:.0f}s: {' '.join(argv)}") from e
    if check and cp.returncode != 0:
        msg = (cp.stderr or cp.stdout).strip()
        raise LabError(f"command failed (rc={cp.returncode}): {' '.join(argv)}: {msg}")
    return cp


def ip_cmd(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return run(argv, check=check)


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    cp = run(["ip", "netns", "list"])
    names = []
    for line in cp.stdout.splitlines():
        line = line.strip()
        if line:
            names.append(line.split()[0])
    return names


def netns_exists(netns: str) -> bool:
    return os.path.exists(f"/run/netns/{netns}") or netns in list_netns()


def netns_pids(netns: str) -> list[int]:
    """PIDs of processes in *netns* (``ip netns pids``); [] if it does not exist."""
    cp = run(["ip", "netns", "pids", netns], check=False)
    if cp.returncode != 0:
        if not netns_exists(netns):
            return []
        raise LabError(f"`ip netns pids {netns}` failed: {cp.stderr.strip()}")
    return sorted({int(x) for x in cp.stdout.split() if x.isdigit()})


def root_link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def link_speed_mbps(netns: str, ifname: str) -> int | None:
    """Link speed of *ifname* in *netns* in Mbit/s (veth: 10000); None if unknown/down."""
    cp = run(netns_exec_argv(netns, ["cat", f"/sys/class/net/{ifname}/speed"]), check=False)
    if cp.returncode != 0:
        return None
    try:
        speed = int(cp.stdout.strip())
    except ValueError:
        return None
    return speed if speed > 0 else None


def sysctl_get(netns: str | None, key: str) -> str | None:
    argv = ["sysctl", "-n", key]
    cp = run(netns_exec_argv(netns, argv) if netns else argv, check=False)
    if cp.returncode != 0:
        return None
    return cp.stdout.strip()


def sysctl_set(netns: str | None, key: str, value: str) -> None:
    argv = ["sysctl", "-q", "-w", f"{key}={value}"]
    run(netns_exec_argv(netns, argv) if netns else argv)


def kill_netns_processes(netns: str) -> list[int]:
    """SIGTERM the processes in *netns*, wait up to KILL_GRACE, then SIGKILL (by PID)."""
    me = os.getpid()
    pids = [p for p in netns_pids(netns) if p != me]
    if not pids:
        return []
    log.info("netns %s: terminating pids %s", netns, pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + KILL_GRACE
    remaining = set(pids)
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        # Only PIDs still *in this netns* count (a zombie has left it; a reused
        # PID is elsewhere), so we never signal an unrelated process.
        remaining &= set(netns_pids(netns))
    for pid in sorted(remaining):
        log.warning("netns %s: pid %d ignored SIGTERM; sending SIGKILL", netns, pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if remaining:
        deadline = time.monotonic() + 2.0
        while remaining and time.monotonic() < deadline:
            time.sleep(0.05)
            remaining &= set(netns_pids(netns))
    return pids

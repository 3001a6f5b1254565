"""Host facts, read from the host itself: nothing here is taken on trust from configuration."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from kvmotion import __version__
from kvmotion.agent.config import DATASTORE_ID_FILE, AgentConfig, VlanPortGroup
from kvmotion.agent import mounts
from kvmotion.agent.blockdev import presented_devices
from kvmotion.common import confined
from kvmotion.common.errors import KvmotionError
from kvmotion.models.boot import OVMF_FILES, FirmwareFact
from kvmotion.models.agent import (BlockDeviceFact, CpuFact, DatastoreFact, HostFacts, MigrationInterface,
                                   PortGroupFact)

MAX_ID_BYTES = 64 << 10       # a datastore's identity file is a few lines of JSON


def _cmd(argv: list[str], timeout: float = 5.0) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout if res.returncode == 0 else ""


def cpu_info() -> tuple[str, list[str], int]:
    model, flags = "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = sorted(value.split())
    except OSError:
        pass
    return model, flags, os.cpu_count() or 1


def memory_mb() -> tuple[int, int]:
    info: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key] = int(value.split()[0])
    return info["MemTotal"] // 1024, info.get("MemAvailable", info["MemFree"]) // 1024


def read_datastore(path: Path) -> DatastoreFact:
    """Accessible means: the identity file can be read right now (a regular file, not a link), and the folder
    listed."""
    try:
        ident = json.loads(confined.read_in(path, DATASTORE_ID_FILE, MAX_ID_BYTES))
        kind = ident.get("kind", "directory")
        export, problem = mounts.nfs_problem(path) if kind == "nfs" else (None, None)
        if problem is not None:        # an unmounted export's empty mount point must not take VMs' files
            return DatastoreFact(uuid=ident["uuid"], name=ident["name"], path=str(path), kind=kind,
                                 shared=bool(ident.get("shared", False)), readable=False,
                                 error=f"{problem}; mount it there (see /etc/fstab) and the agent finds it")
        os.listdir(path)
        st = os.statvfs(path)
        return DatastoreFact(uuid=ident["uuid"], name=ident["name"], path=str(path), kind=kind,
                             shared=bool(ident.get("shared", False)), readable=True, export=export,
                             free_mb=st.f_bavail * st.f_frsize // (1024 * 1024),
                             total_mb=st.f_blocks * st.f_frsize // (1024 * 1024))
    except (OSError, ValueError, KeyError, KvmotionError) as exc:
        return DatastoreFact(uuid="", name=path.name, path=str(path), readable=False,
                             error=f"{type(exc).__name__}: {exc}")


def portgroups(vlan_groups: list[VlanPortGroup] | None = None) -> list[PortGroupFact]:
    """Every bridge (named by its alias), and every configured VLAN port group whose bridge exists."""
    out = _cmd(["ip", "-j", "-d", "link", "show", "type", "bridge"])
    groups = []
    for link in json.loads(out or "[]"):
        name = link.get("ifalias") or link["ifname"]
        groups.append(PortGroupFact(name=name, bridge=link["ifname"]))
    bridges = {g.bridge for g in groups}
    taken = {g.name for g in groups}
    for v in vlan_groups or []:
        if v.bridge in bridges and v.name not in taken:
            groups.append(PortGroupFact(name=v.name, bridge=v.bridge, vlan=v.vlan, problem=vlan_problem(v.bridge)))
            taken.add(v.name)
    return groups


def vlan_problem(bridge: str) -> str | None:
    """Why ``bridge`` cannot carry VLANs here (None: it can): the kernel's bridge VLAN filtering is missing."""
    if Path(f"/sys/class/net/{bridge}/bridge/vlan_filtering").exists():
        return None
    return (f"the kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING): bridge {bridge} cannot put "
            "a tap on a VLAN")


_MACHINE_CACHE: dict[str, list[str]] = {}


def machine_types(binary: str = "qemu-system-x86_64") -> list[str]:
    """The machine types this host's QEMU offers (`-machine help`, asked once per agent run; [] if it fails)."""
    if binary not in _MACHINE_CACHE:
        lines = _cmd([binary, "-machine", "help"]).splitlines()
        found = [ln.split()[0] for ln in lines[1:] if ln.strip() and not ln.startswith(" ")]
        if not found:
            return []                 # not cached: asked again next time
        _MACHINE_CACHE[binary] = sorted(set(found))
    return _MACHINE_CACHE[binary]


def interface_info(ifname: str, declared_mbps: int | None = None) -> MigrationInterface:
    addrs = json.loads(_cmd(["ip", "-j", "addr", "show", "dev", ifname]) or "[]")
    address = family = None
    for link in addrs:
        for a in link.get("addr_info", []):
            if a.get("scope") != "global":
                continue
            if address is None or a["family"] == "inet":
                address, family = a["local"], "ipv4" if a["family"] == "inet" else "ipv6"
    speed: int | None
    try:
        speed = int(Path(f"/sys/class/net/{ifname}/speed").read_text().strip())
        speed = speed if speed > 0 else None
    except (OSError, ValueError):
        speed = None
    if declared_mbps is not None:
        return MigrationInterface(ifname=ifname, address=address, family=family, speed_mbps=declared_mbps,
                                  enabled=address is not None, speed_source="declared")
    return MigrationInterface(ifname=ifname, address=address, family=family, speed_mbps=speed,
                              enabled=address is not None)


SYS_USERFAULTFD_X86_64 = 323


def userfaultfd_works() -> bool:
    """Can this host give QEMU a userfaultfd (what post-copy's destination needs to fault pages in)?"""
    import ctypes
    import platform

    if platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(SYS_USERFAULTFD_X86_64, os.O_CLOEXEC | os.O_NONBLOCK)
    except (OSError, AttributeError):
        return False
    if fd < 0:
        return False
    os.close(fd)
    return True


def gather(cfg: AgentConfig, accelerator: str, accel_reason: str, vms: list[str], cpu: CpuFact | None) -> HostFacts:
    model, flags, ncpu = cpu_info()
    total, free = memory_mb()
    qemu_version = _cmd(["qemu-system-x86_64", "--version"]).splitlines()
    return HostFacts(
        name=cfg.name, agent_version=__version__, qemu_version=qemu_version[0] if qemu_version else "missing",
        accelerator=accelerator, accelerator_reason=accel_reason,
        cpu_model=model, cpu_features=flags, cpu_count=ncpu, mem_total_mb=total, mem_free_mb=free,
        loadavg=[round(x, 2) for x in os.getloadavg()],
        mgmt_address=cfg.mgmt_address,
        mgmt_family="ipv6" if ":" in cfg.mgmt_address else "ipv4",
        datastores=[read_datastore(p) for p in cfg.datastores],
        portgroups=portgroups(cfg.vlan_portgroups),
        machine_types=machine_types(),
        migration_interfaces=[interface_info(i, cfg.declared_link_mbps.get(i)) for i in cfg.migration_interfaces],
        vms=vms,
        cpu=cpu,
        block_devices=[BlockDeviceFact(path=b.path, identity=b.identity, size_bytes=b.size_bytes, kind=b.kind)
                       for b in presented_devices(cfg.block_devices)],
        swap_location=str(cfg.swap_dir) if cfg.swap_dir else "vm-folder",
        postcopy=cfg.swap_dir is None and userfaultfd_works(),   # a private file mapping cannot be faulted in
    )



_FIRMWARE_CACHE: dict[tuple[str, int, int], FirmwareFact] = {}


def firmware(directory: Path) -> list[FirmwareFact]:
    """The OVMF files this host has (the ones VMs use), each with its sha256 (cached by path, size and mtime)."""
    out = []
    for name in OVMF_FILES:
        path = directory / name
        try:
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key not in _FIRMWARE_CACHE:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                _FIRMWARE_CACHE[key] = FirmwareFact(name=name, sha256=digest, size_bytes=st.st_size)
            out.append(_FIRMWARE_CACHE[key])
        except OSError:
            continue
    return out

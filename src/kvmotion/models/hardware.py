"""Guest-visible hardware rules shared by every side: disk buses, NIC models, MACs, vCPU topology.

Pure constants and checks (no other kvmotion module is imported), so the VM spec, the API and the CLI agree.
"""
from __future__ import annotations

import re

DISK_BUSES = ("virtio-blk", "virtio-scsi", "sata")
DISK_BUS_PATTERN = "^(virtio-blk|virtio-scsi|sata)$"
HOTPLUG_BUSES = ("virtio-scsi",)          # the only bus whose disks are plugged into a running VM
NIC_MODELS = ("virtio", "e1000e")
NIC_MODEL_PATTERN = "^(virtio|e1000e)$"
NIC_DEVICE = {"virtio": "virtio-net-pci", "e1000e": "e1000e"}
SCSI_CONTROLLER = "scsi0"                  # virtio-scsi-pci: targets 0..255, one LUN each here
SATA_CONTROLLER = "sata0"                  # ich9-ahci: ports 0..5
BUS_UNITS = {"virtio-scsi": 256, "sata": 6}
# Generated MACs: QEMU's locally administered prefix 52:54:00 (bit 1 of the first octet set, bit 0 clear).
MAC_PREFIX = "52:54:00"
MACHINE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
VLAN_MIN, VLAN_MAX = 1, 4094
# Host cache modes of a disk, as QEMU's ``-drive cache=`` names them (argv.py maps each to blockdev options). A
# disk's spec holds one of them, or nothing: automatic, which is ``none`` (O_DIRECT) on a shared datastore and on
# a raw LUN, ``writeback`` (the host page cache) on a host-local datastore.
CACHE_MODES = ("none", "directsync", "writethrough", "writeback", "unsafe")
CACHE_MODE_PATTERN = "^(none|directsync|writethrough|writeback|unsafe)$"
CACHE_CHOICE_PATTERN = "^(auto|none|directsync|writethrough|writeback|unsafe)$"   # requests: "auto" clears it
MIGRATION_SAFE_CACHE = ("none", "directsync")   # no host page cache: both hosts may open the image at once


def normal_mac(mac: str) -> str:
    """The canonical spelling of a MAC (lower case): what uniqueness is decided on."""
    return mac.strip().lower()


def mac_problem(mac: str) -> str | None:
    """What is wrong with a MAC for a VM NIC (None: nothing)."""
    if not re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}", mac):
        return "is not six hex pairs separated by colons (like 52:54:00:12:34:56)"
    if int(mac[:2], 16) & 1:
        return "is a multicast address (the first octet is odd)"
    if mac.replace(":", "") in ("000000000000", "ffffffffffff"):
        return "is reserved"
    return None


def topology_problem(vcpus: int, sockets: int | None, cores: int | None, threads: int | None) -> str | None:
    """What is wrong with a vCPU topology (None: nothing; all three None: QEMU's default, one socket per vCPU)."""
    given = (sockets, cores, threads)
    if all(v is None for v in given):
        return None
    if any(v is None for v in given):
        return "needs sockets, cores and threads together (e.g. --sockets 2 --cores 2 --threads 1)"
    assert sockets is not None and cores is not None and threads is not None
    if sockets * cores * threads != vcpus:
        return (f"sockets x cores x threads = {sockets} x {cores} x {threads} = {sockets * cores * threads}, "
                f"not the {vcpus} vCPUs (make the product equal --cpus)")
    return None


def free_unit(bus: str, used: set[int]) -> int | None:
    """The lowest free unit (SCSI target, SATA port) of a bus; None when it is full or has no units."""
    limit = BUS_UNITS.get(bus)
    if limit is None:
        return None
    return next((u for u in range(limit) if u not in used), None)


def effective_cache(mode: str | None, shared: bool) -> str:
    """A disk's cache mode as QEMU opens it: its own, or (automatic) ``none`` on shared storage, else
    ``writeback``. ``shared``: a datastore marked shared, or a raw LUN."""
    return mode or ("none" if shared else "writeback")


def cache_choice(choice: str | None) -> str | None:
    """A request's cache choice as a disk spec holds it ("auto" and nothing: automatic, None)."""
    return None if choice in (None, "auto") else choice

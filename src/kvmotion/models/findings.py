"""The finding shape and the catalog of codes (stable: callers and tests branch on them)."""
from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Finding(BaseModel):
    code: str
    severity: Severity
    subject: str          # "vm:NAME", "host:NAME", "datastore:NAME", "network:NAME", "device:ID"
    message: str
    remedy: str
    side: str | None = None   # cross-controller moves: "source" or "destination" (which controller found it)


# code -> (severity, what it means). SPEC §3 requirement by requirement; the README lists these.
CODES: dict[str, tuple[Severity, str]] = {
    "SAME_HOST": (Severity.ERROR, "the destination is the VM's current host"),
    "VM_NOT_RUNNING": (Severity.ERROR, "vMotion needs a running VM (use cold migration)"),
    "VM_ALREADY_MIGRATING": (Severity.ERROR, "the VM has an unfinished migration task"),
    "HOST_NOT_CONNECTED": (Severity.ERROR, "the destination's agent is not connected"),
    "HOST_IN_MAINTENANCE": (Severity.ERROR, "the destination is in maintenance mode"),
    "DATASTORE_NOT_ACCESSIBLE": (Severity.ERROR, "a datastore of the VM is not readable on the destination"),
    "DATASTORE_CONCURRENCY_LIMIT": (Severity.WARNING, "the datastore already has its maximum (128) of migrations; "
                                                      "this one queues"),
    "FIRMWARE_MISSING": (Severity.ERROR, "a UEFI VM's OVMF code file is missing on the destination"),
    "FIRMWARE_MISMATCH": (Severity.WARNING, "the destination's OVMF code file is another build (used from the next "
                                            "boot on)"),
    "RDM_DEVICE_NOT_VISIBLE": (Severity.ERROR, "the destination does not see the VM's raw LUN (by identity)"),
    "DISK_CACHE_UNSAFE": (Severity.ERROR, "a disk both hosts open during a live move uses the host page cache "
                                          "(cache other than none or directsync)"),
    "LOCAL_MEDIA_CONNECTED": (Severity.ERROR, "a connected CD/DVD image the destination cannot open (host-local)"),
    "CLIENT_MEDIA_CONNECTED": (Severity.INFO, "client-connected media (NBD) moves with the VM"),
    "SWAP_LOCATION_DIFFERS": (Severity.WARNING, "the destination keeps VM memory-backing files elsewhere: slower"),
    "NO_MIGRATION_INTERFACE": (Severity.ERROR, "a host has no migration-enabled interface"),
    "MGMT_IP_FAMILY_MISMATCH": (Severity.ERROR, "the hosts' management IP families differ (IPv4 vs IPv6)"),
    "LINK_TOO_SLOW": (Severity.ERROR, "a migration link is below 250 Mbit/s"),
    "HOST_CONCURRENCY_LIMIT": (Severity.WARNING, "a host already runs its maximum of migrations (4 below 10 GbE, "
                                                 "8 at 10 GbE+); this one queues"),
    "SINGLE_MIGRATION_INTERFACE": (Severity.INFO, "two or more migration interfaces are recommended"),
    "CPU_FEATURES_MISSING": (Severity.ERROR, "the destination lacks CPU features the VM sees"),
    "CPU_PASSTHROUGH_MISMATCH": (Severity.ERROR, "a host-passthrough VM needs an identical CPU feature set"),
    "ENCRYPTION_UNSUPPORTED": (Severity.ERROR, "encrypted vMotion is required but a host has no valid certificate"),
    "ENCRYPTION_FALLBACK": (Severity.INFO, "opportunistic encryption: a host has no certificate, so the move is plain"),
    "PORTGROUP_MISSING": (Severity.ERROR, "a network (port group) of the VM does not exist on the destination"),
    "PORTGROUP_VLAN_MISSING": (Severity.ERROR, "a VLAN port group of the VM (on the source) does not exist on the "
                                               "destination"),
    "PORTGROUP_VLAN_MISMATCH": (Severity.ERROR, "the destination's port group of that name is on another VLAN"),
    "MACHINE_TYPE_UNSUPPORTED": (Severity.ERROR, "the destination's QEMU does not offer the VM's machine type"),
    "INSUFFICIENT_MEMORY": (Severity.ERROR, "the destination does not have the VM's memory free"),
    "VM_POWERED_ON": (Severity.ERROR, "cold migration needs a powered-off VM (use vMotion)"),
    "NOTHING_TO_MOVE": (Severity.ERROR, "the VM already is on that host and those datastores"),
    "CROSS_MAC_IN_USE": (Severity.ERROR, "a MAC of the VM is already used by a VM of the destination controller"),
    "CROSS_VM_EXISTS": (Severity.ERROR, "the destination controller already has a VM of that UUID or name"),
    "CROSS_NETWORK_UNMAPPED": (Severity.ERROR, "a network mapping names a port group the VM does not use"),
    "CROSS_HOST_NAME_CLASH": (Severity.ERROR, "the source and destination hosts have the same name (their TLS "
                                              "identities would be the same)"),
    "CROSS_ENCRYPTION_REQUIRED": (Severity.ERROR, "a cross-controller move is always encrypted: a host has no "
                                                  "valid certificate"),
    "CROSS_ENCRYPTED_DISK": (Severity.ERROR, "the key of an encrypted disk did not come with the reservation"),
    "DATASTORE_SPACE": (Severity.ERROR, "a target datastore lacks the free space the copied disks need"),
    "DISK_FORMAT_UNSUPPORTED": (Severity.ERROR, "an encrypted disk stays qcow2 (LUKS inside qcow2)"),
    "RDM_STAYS": (Severity.INFO, "a raw LUN is not copied; the VM keeps using the same LUN"),
    "CONVERGENCE_PREDICTED": (Severity.INFO, "pre-copy is predicted to converge (time, downtime, passes)"),
    "CONVERGENCE_UNLIKELY": (Severity.WARNING, "the guest dirties memory faster than the link carries it"),
    "GUEST_UNHEALTHY": (Severity.WARNING, "after the move the guest does not run, answer or take its network traffic"),
    "GUEST_HEALTH_UNKNOWN": (Severity.INFO, "the check after the move could not judge the guest"),
    "DRS_RULE": (Severity.ERROR, "the move breaks a must rule of the cluster's DRS (affinity, anti-affinity, "
                                 "VM–host)"),
}


def finding(code: str, subject: str, message: str, remedy: str) -> Finding:
    return Finding(code=code, severity=CODES[code][0], subject=subject, message=message, remedy=remedy)


def blockers(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == Severity.ERROR]

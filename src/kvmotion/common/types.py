"""Typed messages shared by the controller, the agent, the CLI and the tests."""
from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

DEFAULT_MACHINE = "pc-q35-7.2"   # pinned: never the alias "q35"
DEFAULT_CPU_MODEL = "qemu64"


HOST_PASSTHROUGH = "host-passthrough"   # -cpu host under KVM, -cpu max under TCG


class DiskSpec(BaseModel):
    id: str = "disk0"                 # QEMU device id
    node: str = "d0"                  # QEMU block node name
    kind: str = "file"                # "file" (an image on a datastore) | "rdm" (a raw host block device / LUN)
    datastore: str = ""               # file disks: datastore name
    path: str = ""                    # file disks: relative to the datastore root
    format: str = "qcow2"
    size_mb: int = 64
    identity: str | None = None       # rdm disks: the LUN's identity (WWN, serial, loop backing file)
    encrypted: bool = False           # LUKS-encrypted qcow2 (key from the controller's key provider)
    key_wrapped: str | None = None    # its passphrase, wrapped with the controller's master key


class CdromSpec(BaseModel):
    """A CD/DVD drive. Host-local media block vMotion; client media (an NBD export) does not."""

    id: str = "cd0"
    media: str = "none"               # "none" | "local" | "client"
    path: str | None = None           # local media: an ISO path on the host
    nbd: str | None = None            # client media: nbd://HOST:PORT/EXPORT


class NicSpec(BaseModel):
    id: str = "nic0"
    mac: str
    portgroup: str = "VM Network"


class VMSpec(BaseModel):
    """Everything needed to (re)create the VM's QEMU process identically on any host."""

    uuid: str
    name: str
    memory_mb: int = 256
    vcpus: int = 1
    machine: str = DEFAULT_MACHINE
    cpu_model: str = DEFAULT_CPU_MODEL
    cpu_mask: list[str] = Field(default_factory=list)    # per-VM compatibility mask: features hidden
    cpu_enforce: bool = False                             # refuse to start if the host lacks a feature
    disks: list[DiskSpec] = Field(default_factory=list)
    cdroms: list[CdromSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
    boot_datastore: str               # datastore holding the VM folder (kernel, initrd, config)
    folder: str                       # VM folder, relative to boot_datastore
    guest_ip: str | None = None       # e.g. "198.18.1.100/24"
    dirty_mb_s: float = 0.0
    extra_cmdline: str = ""
    encrypted_vmotion: str = "opportunistic"   # disabled | opportunistic | required (SPEC §4)


class VMRunState(StrEnum):
    """Lifecycle of one QEMU process as the agent sees it."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    INCOMING = "incoming"          # shadow VM waiting for migration state
    MIGRATING_OUT = "migrating-out"
    MIGRATED = "migrated"          # source after a completed migration (postmigrate)
    STOPPED = "stopped"


class DatastoreFact(BaseModel):
    uuid: str
    name: str
    path: str
    kind: str = "directory"
    shared: bool = False
    readable: bool
    free_mb: int = 0
    error: str | None = None


class PortGroupFact(BaseModel):
    name: str
    bridge: str


class MigrationInterface(BaseModel):
    ifname: str
    address: str | None
    family: str | None        # "ipv4" | "ipv6"
    speed_mbps: int | None
    enabled: bool = True
    speed_source: str = "link"  # "link" (read from the NIC) | "declared" (agent configuration)


class CpuFact(BaseModel):
    host_model: str                       # "host" (KVM) or "max" (TCG): what host-passthrough means here
    host_features: list[str]
    usable_models: list[str]
    masked: list[str] = Field(default_factory=list)   # lab setting: features this host pretends not to have


class TlsFact(BaseModel):
    supported: bool                       # certificates installed and valid: this host can migrate encrypted
    reason: str = ""
    directory: str | None = None
    client_subject: str | None = None
    not_after: str | None = None


class BlockDeviceFact(BaseModel):
    path: str
    identity: str | None
    size_bytes: int = 0
    kind: str = "unknown"


class HostFacts(BaseModel):
    name: str
    agent_version: str
    qemu_version: str
    accelerator: str                     # "kvm" | "tcg"
    accelerator_reason: str = ""
    cpu_model: str
    cpu_features: list[str]
    cpu_count: int
    mem_total_mb: int
    mem_free_mb: int
    mgmt_address: str
    mgmt_family: str
    datastores: list[DatastoreFact]
    portgroups: list[PortGroupFact]
    migration_interfaces: list[MigrationInterface]
    vms: list[str] = Field(default_factory=list)
    cpu: CpuFact | None = None
    block_devices: list[BlockDeviceFact] = Field(default_factory=list)
    swap_location: str = "vm-folder"      # where VM memory-backing files live: with the VM, or a host path
    tls: TlsFact | None = None


class VMRuntime(BaseModel):
    uuid: str
    name: str
    state: VMRunState
    pid: int | None = None
    qemu_status: str | None = None
    started_at: float | None = None
    spec: VMSpec | None = None        # what this QEMU runs now (disks move with Storage vMotion)


class MigrationPass(BaseModel):
    t: float
    pass_no: int                # dirty-sync-count
    transferred: int
    remaining: int
    total: int
    dirty_pages_rate: int
    mbps: float


class OutgoingRequest(BaseModel):
    uri: str
    max_bandwidth_bytes: int
    downtime_limit_ms: int = 500
    auto_continue: bool = True
    tls_hostname: str | None = None      # set: the stream is TLS, and the destination must present this name


class MigrationTuning(BaseModel):
    downtime_limit_ms: int | None = None
    max_bandwidth_bytes: int | None = None


class StartRequest(BaseModel):
    spec: VMSpec
    disk_keys: dict[str, str] = Field(default_factory=dict)   # disk node -> passphrase (encrypted disks only)


class IncomingRequest(BaseModel):
    spec: VMSpec
    listen_address: str
    disk_keys: dict[str, str] = Field(default_factory=dict)
    auto_resume: bool = True          # run the shadow as soon as its state is complete
    tls_authz_identity: str | None = None   # set: accept only a TLS client with exactly this identity
    new_disks: list[str] = Field(default_factory=list)   # shared-nothing: disk ids created empty here, NBD-exported


class IncomingReady(BaseModel):
    uri: str
    pid: int
    nbd_port: int | None = None       # shared-nothing: the NBD server for the disk streams
    exports: dict[str, str] = Field(default_factory=dict)   # disk id -> NBD export name


class DiskTarget(BaseModel):
    """Where one disk of a running VM is mirrored to: a new image on a datastore, or an NBD export."""

    disk_id: str
    kind: str = "file"                # "file" (Storage vMotion) | "nbd" (shared-nothing)
    datastore: str = ""
    path: str = ""
    format: str = "qcow2"
    preallocate: bool = False         # raw: allocate the whole image up front
    nbd_host: str = ""
    nbd_port: int = 0
    export: str = ""
    tls_hostname: str | None = None   # nbd: the stream is TLS and the server must present this name


class MirrorRequest(BaseModel):
    targets: list[DiskTarget]
    speed_bytes: int = 0              # 0: unlimited
    copy_mode: str = "background"     # background | write-blocking
    disk_keys: dict[str, str] = Field(default_factory=dict)   # encrypted disks: the new image gets the same key
    home_datastore: str | None = None  # the VM folder moves to this datastore at the pivot


class MirrorJob(BaseModel):
    disk_id: str
    job_id: str
    target: str                       # the target path or NBD export
    status: str                       # QEMU job status: created running ready concluded ...
    ready: bool = False
    offset: int = 0
    length: int = 0
    error: str | None = None


class MirrorReport(BaseModel):
    jobs: list[MirrorJob] = Field(default_factory=list)
    started_at: float = 0.0
    ready_at: float | None = None
    done: int = 0
    total: int = 0
    mbps: float = 0.0
    state: str = "none"               # none | mirroring | ready | failed | pivoted | cancelled
    error: str | None = None


class PivotReport(BaseModel):
    pivoted_at: float
    write_stall_ms: float             # how long block-job-complete + the pivot held the guest's I/O
    old_files: list[str]
    new_files: list[str]
    old_files_closed: bool
    spec: VMSpec


class DiskCopyRequest(BaseModel):
    """Cold migration: copy one disk image to this host, from a path it can read or an NBD export."""

    source_path: str | None = None    # local: absolute path on this host
    source_uri: str | None = None     # remote: nbd://HOST:PORT/EXPORT (guest-visible data)
    source_format: str = "qcow2"      # the format of source_path (NBD exports are raw data)
    datastore: str
    path: str
    format: str = "qcow2"
    preallocate: bool = False
    verbatim: bool = False            # copy the image file byte for byte (encrypted disks: ciphertext only)


class DiskCopyStatus(BaseModel):
    job: str
    state: str                        # copying | verifying | done | failed
    percent: float = 0.0
    bytes_total: int = 0
    started_at: float
    ended_at: float | None = None
    identical: bool | None = None     # qemu-img compare verdict
    error: str | None = None
    target: str = ""


class DiskExport(BaseModel):
    uri: str
    export_id: str
    pid: int


class MigrationReport(BaseModel):
    """What an agent knows about the migration of one VM, on its side."""

    role: str                    # "source" | "destination"
    status: str                  # QEMU migration status
    started_at: float | None = None
    pre_switchover_at: float | None = None
    continued_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    error: str | None = None
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    ram_total: int = 0
    ram_transferred: int = 0
    ram_remaining: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    passes: list[MigrationPass] = Field(default_factory=list)
    parked_ms: float | None = None        # time spent parked in pre-switchover (counts as downtime)
    extra: dict[str, Any] = Field(default_factory=dict)


class ReleaseReport(BaseModel):
    source_exited: bool
    source_pid: int | None
    lock_released: bool
    memory_freed_mb: int


class LeaseInfo(BaseModel):
    vm_uuid: str
    host: str
    epoch: int
    taken_at: float

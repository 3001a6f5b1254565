"""Typed messages shared by the controller, the agent, the CLI and the tests."""
from __future__ import annotations

from enum import StrEnum
from pathlib import PurePosixPath
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, BaseModel, Field, StringConstraints, model_validator

from kvmotion.models.boot import (BOOT_PATTERN, FIRMWARE_PATTERN, GATEWAY_PATTERN, IMAGE_FORMAT_PATTERN, FirmwareFact,
                                  ImageSource, boot_problem)
from kvmotion.models.hardware import CACHE_MODE_PATTERN, DISK_BUS_PATTERN, NIC_MODEL_PATTERN, topology_problem
from kvmotion.models.health import GuestHealth, HealthCheckRequest, NicHealth, VcpuHealth
from kvmotion.models.nbd import MAX_URL_CHARS, NbdPsk, NbdUrl
from kvmotion.models.sampling import DirtySample

__all__ = ["DirtySample", "FirmwareFact", "GuestHealth", "HealthCheckRequest", "ImageSource", "NicHealth", "VcpuHealth"]

DEFAULT_MACHINE = "pc-q35-7.2"   # pinned: never the alias "q35"
DEFAULT_CPU_MODEL = "qemu64"


HOST_PASSTHROUGH = "host-passthrough"   # -cpu host under KVM, -cpu max under TCG


# -- input rules, shared by the controller's requests and the agent's --------------------------------------------
# Names of VMs, hosts, clusters, datastores, tokens; CPU models and features; EVC modes. A name ends up in file
# names, QEMU arguments ("-name guest=NAME,...") and the guest kernel command line: no spaces, commas, slashes.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
NameOrEmpty = Annotated[str, StringConstraints(pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,62})?$")]
# Port groups (networks) may hold inner spaces, like "VM Network".
PORTGROUP_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9 ._-]{0,61}[A-Za-z0-9._-])?$"
PortGroupName = Annotated[str, StringConstraints(pattern=PORTGROUP_PATTERN)]
# QEMU device ids and block node names ("disk0", "d0", "nic0", "cd0"): QEMU wants a letter first.
DEVICE_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9._-]{0,31}$"
DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
# A disk named by index ("1") or id ("disk1").
DiskRef = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")]
# VM UUIDs (a run directory on the agent is named after it).
VmUuid = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")]
GUEST_IP_PATTERN = r"^[0-9A-Fa-f.:]{2,45}/[0-9]{1,3}$"
MAC_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
DISK_FORMAT_PATTERN = "^(qcow2|raw)$"
ENCRYPTED_VMOTION_PATTERN = "^(disabled|opportunistic|required)$"
NO_CONTROL_CHARS = r"^[^\x00-\x1f\x7f]*$"

MAX_PATH_CHARS = 1024          # a datastore-relative path
MAX_NAME_BYTES = 255           # one path component (NAME_MAX)
MAX_DISKS = 16
MAX_CDROMS = 4
MAX_NICS = 8
MAX_CPU_FEATURES = 128


def relative_path_problem(rel: object) -> str | None:
    """What is wrong with a datastore-relative path, lexically (None: nothing). Symlinks are the agent's job."""
    if not isinstance(rel, str) or not rel:
        return "is empty"
    if "\x00" in rel:
        return "contains a NUL byte"
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "contains a control character"
    if len(rel) > MAX_PATH_CHARS:
        return f"is longer than {MAX_PATH_CHARS} characters"
    if rel.startswith("/"):
        return "is absolute: it must be relative to its datastore"
    parts = PurePosixPath(rel).parts
    if ".." in parts:
        return "contains '..'"
    if not parts:
        return "names the datastore itself, not a file in it"
    if any(len(p.encode()) > MAX_NAME_BYTES for p in parts):
        return f"has a component longer than {MAX_NAME_BYTES} bytes"
    return None


def _checker(problem_of: Callable[[str], str | None], what: str, hint: str) -> Callable[[str], str]:
    """A pydantic validator from a ``*_problem`` function: the value, or a ValueError naming it and the fix."""
    def check(value: str) -> str:
        problem = problem_of(value)
        if problem is not None:
            raise ValueError(f"{what} {value!r} {problem} ({hint})")
        return value
    return check


DatastorePath = Annotated[str, StringConstraints(max_length=MAX_PATH_CHARS), AfterValidator(
    _checker(relative_path_problem, "path", "write it relative to the datastore, like VM/VM.iso"))]


class DiskSpec(BaseModel):
    id: DeviceId = "disk0"            # QEMU device id
    node: DeviceId = "d0"             # QEMU block node name
    kind: str = Field(default="file", pattern="^(file|rdm)$")   # "file" (an image on a datastore) | "rdm" (a LUN)
    datastore: NameOrEmpty = ""       # file disks: datastore name ("" for rdm disks)
    path: str = Field(default="", max_length=MAX_PATH_CHARS)    # file disks: relative to the datastore root
    format: str = Field(default="qcow2", pattern=DISK_FORMAT_PATTERN)
    size_mb: int = Field(default=64, ge=0, le=64 << 20)
    identity: str | None = Field(default=None, max_length=1024)  # rdm disks: the LUN's identity (WWN, serial, ...)
    encrypted: bool = False           # LUKS-encrypted qcow2 (key from the controller's key provider)
    key_wrapped: str | None = Field(default=None, max_length=8192)   # its passphrase, wrapped with the master key
    backing: DatastorePath | None = None   # linked clone: its base image, on the same datastore (flattened by moves)
    backing_format: str | None = Field(default=None, pattern=IMAGE_FORMAT_PATTERN)
    bus: str = Field(default="virtio-blk", pattern=DISK_BUS_PATTERN)   # models/hardware.py
    unit: int | None = Field(default=None, ge=0, le=255)   # virtio-scsi target / SATA port (fixed: same on every host)
    cache: str | None = Field(default=None, pattern=CACHE_MODE_PATTERN)   # None: automatic (models/hardware.py)


class CdromSpec(BaseModel):
    """A CD/DVD drive. Media the destination cannot open (host-local) block a move; shared or client do not."""

    id: DeviceId = "cd0"
    media: str = Field(default="none", pattern="^(none|local|client)$")
    # local media: an ISO image, relative to ``datastore`` (default: the VM's boot datastore). The agent refuses
    # anything else when it opens the image; a recorded spec is not refused here, so an old one still loads.
    path: str | None = Field(default=None, max_length=MAX_PATH_CHARS)
    datastore: Name | None = None
    nbd: str | None = Field(default=None, max_length=MAX_URL_CHARS)    # client media: nbd://HOST:PORT/EXPORT


class NicSpec(BaseModel):
    id: DeviceId = "nic0"
    mac: str = Field(pattern=MAC_PATTERN)
    portgroup: PortGroupName = "VM Network"
    model: str = Field(default="virtio", pattern=NIC_MODEL_PATTERN)


class VMSpec(BaseModel):
    """Everything needed to (re)create the VM's QEMU process identically on any host."""

    uuid: VmUuid
    name: Name
    memory_mb: int = Field(default=256, ge=16, le=16 << 20)
    vcpus: int = Field(default=1, ge=1, le=1024)
    sockets: int | None = Field(default=None, ge=1, le=1024)   # topology: all three or none (models/hardware.py)
    cores: int | None = Field(default=None, ge=1, le=1024)
    threads: int | None = Field(default=None, ge=1, le=1024)
    scsi_controller: bool = False     # a virtio-scsi controller even without SCSI disks (kept for hot-plug)
    machine: Name = DEFAULT_MACHINE
    cpu_model: Name = DEFAULT_CPU_MODEL
    cpu_mask: list[Name] = Field(default_factory=list, max_length=MAX_CPU_FEATURES)   # features hidden
    cpu_enforce: bool = False                             # refuse to start if the host lacks a feature
    disks: list[DiskSpec] = Field(default_factory=list, max_length=MAX_DISKS)
    cdroms: list[CdromSpec] = Field(default_factory=list, max_length=MAX_CDROMS)
    nics: list[NicSpec] = Field(default_factory=list, max_length=MAX_NICS)
    boot_datastore: Name              # datastore holding the VM folder (kernel, initrd, config)
    folder: str = Field(max_length=MAX_PATH_CHARS)   # VM folder, relative to boot_datastore (the agent checks it)
    guest_ip: str | None = Field(default=None, pattern=GUEST_IP_PATTERN)   # e.g. "198.18.1.100/24"
    dirty_mb_s: float = Field(default=0.0, ge=0, le=10000, allow_inf_nan=False)
    extra_cmdline: str = Field(default="", max_length=2048, pattern=NO_CONTROL_CHARS)
    encrypted_vmotion: str = Field(default="opportunistic", pattern=ENCRYPTED_VMOTION_PATTERN)   # SPEC §4
    boot: str = Field(default="kernel", pattern=BOOT_PATTERN)     # the test kernel, or the VM's first disk
    firmware: str = Field(default="bios", pattern=FIRMWARE_PATTERN)   # SeaBIOS, or OVMF with its own NVRAM
    secure_boot: bool = False
    gateway: str | None = Field(default=None, pattern=GATEWAY_PATTERN)   # disk-booted guests: SMBIOS OEM string
    source_image: Name | None = None      # the library image its boot disk was made from (blocks image delete)

    @model_validator(mode="after")
    def _boot_rules(self) -> VMSpec:
        problem = boot_problem(self.boot, self.firmware, self.secure_boot, self.machine) or \
            topology_problem(self.vcpus, self.sockets, self.cores, self.threads)
        if problem is not None:
            raise ValueError(problem)
        return self


# QEMU's migration states once post-copy started (either side): the guest's memory is split between the hosts.
POSTCOPY_STATES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})


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
    total_mb: int = 0                # the file system's size (0: unknown)
    error: str | None = None
    export: str | None = None        # kind nfs: the export mounted there (server:/path)


class PortGroupFact(BaseModel):
    name: str
    bridge: str
    vlan: int | None = None           # VLAN port group: the tap joins ``bridge`` with this VLAN (untagged, PVID)
    problem: str | None = None        # why this host cannot use it (a kernel without bridge VLAN filtering)


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


class VMLoad(BaseModel):
    """What one running VM costs its host now (DRS's input; ``agent.hv.qemu.load``)."""
    uuid: str
    cpu_pct: float            # the QEMU process's CPU time, percent of one host CPU, smoothed over about 30 s
    cpu_pct_now: float        # the same over the last window only (the time since the previous facts call)
    mem_mb: int | None        # resident guest RAM (the touched pages), None when it cannot be read


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
    loadavg: list[float] = Field(default_factory=list)   # the host's 1, 5 and 15 minute load averages ([]: unknown)
    mgmt_address: str
    mgmt_family: str
    datastores: list[DatastoreFact]
    portgroups: list[PortGroupFact]
    migration_interfaces: list[MigrationInterface]
    vms: list[str] = Field(default_factory=list)
    cpu: CpuFact | None = None
    block_devices: list[BlockDeviceFact] = Field(default_factory=list)
    swap_location: str = "vm-folder"      # where VM memory-backing files live: with the VM, or a host path
    postcopy: bool = False                # userfaultfd works and guest RAM is anonymous: post-copy possible
    tls: TlsFact | None = None
    keywrap_public: str | None = None     # X25519: the controller wraps disk keys to it (common.keywrap)
    api_cert_sha256: str | None = None    # the certificate the agent's HTTPS API serves (common.pinning)
    firmware: list[FirmwareFact] = Field(default_factory=list)   # the OVMF files this host has
    machine_types: list[str] = Field(default_factory=list)      # `qemu-system-x86_64 -machine help` ([]: unknown)
    vm_load: list[VMLoad] = Field(default_factory=list)      # running VMs' CPU and memory (DRS)
    vm_power_events: list[dict[str, Any]] = Field(default_factory=list)   # VMs that ended by themselves
    # (models.guest.VMPowerEvent: the guest powered off, or QEMU died), the last hour's


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


MAX_MULTIFD_CHANNELS = 16
MAX_XBZRLE_CACHE = 4 * 1024 ** 3


class OutgoingRequest(BaseModel):
    uri: str = Field(max_length=MAX_URL_CHARS)
    max_bandwidth_bytes: int = Field(ge=1, le=10 ** 12)
    downtime_limit_ms: int = Field(default=500, ge=1, le=2_000_000)
    auto_continue: bool = True
    tls_hostname: str | None = Field(default=None, max_length=255)  # set: TLS, the destination must present it
    multifd_channels: int = Field(default=0, ge=0, le=MAX_MULTIFD_CHANNELS)  # 0: one stream; same on both sides
    xbzrle_cache_bytes: int = Field(default=0, ge=0, le=MAX_XBZRLE_CACHE)    # 0: off (never with multifd)
    auto_converge: bool = False          # QEMU throttles the vCPUs once pre-copy stops converging
    postcopy: bool = False               # post-copy capable (both sides); started only on request
    postcopy_bandwidth_bytes: int = Field(default=0, ge=0, le=10 ** 12)   # 0: as fast as the link goes
    stream_nice: int = Field(default=0, ge=0, le=19)     # >0: the stream's threads yield the CPU to the vCPUs


class MigrationTuning(BaseModel):
    downtime_limit_ms: int | None = None
    max_bandwidth_bytes: int | None = None


class StartRequest(BaseModel):
    spec: VMSpec
    disk_keys: dict[DeviceId, str] = Field(default_factory=dict, max_length=MAX_DISKS)   # disk node -> passphrase


class ProvisionRequest(StartRequest):
    image: ImageSource | None = None   # the boot disk (disk0) is made from this image


class IncomingRequest(BaseModel):
    spec: VMSpec
    listen_address: str
    disk_keys: dict[DeviceId, str] = Field(default_factory=dict, max_length=MAX_DISKS)
    auto_resume: bool = True          # run the shadow as soon as its state is complete
    tls_authz_identity: str | None = None   # set: accept only a TLS client with exactly this identity
    new_disks: list[DeviceId] = Field(default_factory=list, max_length=MAX_DISKS)   # shared-nothing: created empty
    nbd_psk: NbdPsk | None = None     # shared-nothing without x509 (no tls_authz_identity): the disk streams' key
    multifd_channels: int = Field(default=0, ge=0, le=MAX_MULTIFD_CHANNELS)  # must match the source's
    postcopy: bool = False            # must match the source's


class PostcopyRecover(BaseModel):
    listen_address: str = Field(max_length=255)


class PostcopyResume(BaseModel):
    uri: str = Field(max_length=MAX_URL_CHARS)
    probe_address: str = Field(max_length=255)   # the destination's migration address, checked before QEMU dials


class IncomingReady(BaseModel):
    uri: str
    pid: int
    nbd_port: int | None = None       # shared-nothing: the NBD server for the disk streams
    exports: dict[str, str] = Field(default_factory=dict)   # disk id -> NBD export name


class DiskTarget(BaseModel):
    """Where one disk of a running VM is mirrored to: a new image on a datastore, or an NBD export."""

    disk_id: DeviceId
    kind: str = Field(default="file", pattern="^(file|nbd)$")   # "file" (Storage vMotion) | "nbd" (shared-nothing)
    datastore: NameOrEmpty = ""
    path: str = Field(default="", max_length=MAX_PATH_CHARS)     # file: relative to the datastore (the agent checks)
    format: str = Field(default="qcow2", pattern=DISK_FORMAT_PATTERN)
    preallocate: bool = False         # raw: allocate the whole image up front
    nbd_host: str = Field(default="", max_length=255)
    nbd_port: int = Field(default=0, ge=0, le=65535)
    export: str = Field(default="", max_length=255)
    tls_hostname: str | None = None   # nbd, x509: the server's certificate must name this
    psk: NbdPsk | None = None         # nbd, without x509: the move's key (an NBD target has one of the two)


class MirrorRequest(BaseModel):
    targets: list[DiskTarget] = Field(max_length=MAX_DISKS)
    speed_bytes: int = Field(default=0, ge=0)   # 0: unlimited
    copy_mode: str = Field(default="background", pattern="^(background|write-blocking)$")
    disk_keys: dict[DeviceId, str] = Field(default_factory=dict, max_length=MAX_DISKS)   # encrypted: the same key
    home_datastore: Name | None = None  # the VM folder moves to this datastore at the pivot


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

    source_path: str | None = Field(default=None, max_length=4096)   # local: absolute path inside a datastore here
    source_uri: NbdUrl | None = None  # remote: nbd://HOST:PORT/EXPORT (guest-visible data), always over TLS:
    source_tls_hostname: str | None = Field(default=None, max_length=255)  # x509: the name the server's cert carries
    source_psk: NbdPsk | None = None  # or the move's pre-shared key
    source_format: str = Field(default="qcow2", pattern=DISK_FORMAT_PATTERN)   # of source_path (NBD: raw data)
    datastore: Name
    path: str = Field(max_length=MAX_PATH_CHARS)    # relative to the datastore (the agent checks)
    format: str = Field(default="qcow2", pattern=DISK_FORMAT_PATTERN)
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
    tls: str = Field(pattern="^tls-(x509|psk)$")   # how the export is secured (never plain)


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

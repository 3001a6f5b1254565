"""Typed messages shared by the controller, the agent, the CLI and the tests."""
from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

DEFAULT_MACHINE = "pc-q35-7.2"   # pinned: never the alias "q35"
DEFAULT_CPU_MODEL = "qemu64"


class DiskSpec(BaseModel):
    id: str = "disk0"                 # QEMU device id
    node: str = "d0"                  # QEMU block node name
    datastore: str                    # datastore name
    path: str                         # relative to the datastore root
    format: str = "qcow2"
    size_mb: int = 64


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
    disks: list[DiskSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
    boot_datastore: str               # datastore holding the VM folder (kernel, initrd, config)
    folder: str                       # VM folder, relative to boot_datastore
    guest_ip: str | None = None       # e.g. "198.18.1.100/24"
    dirty_mb_s: float = 0.0
    extra_cmdline: str = ""


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


class VMRuntime(BaseModel):
    uuid: str
    name: str
    state: VMRunState
    pid: int | None = None
    qemu_status: str | None = None
    started_at: float | None = None


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


class MigrationTuning(BaseModel):
    downtime_limit_ms: int | None = None
    max_bandwidth_bytes: int | None = None


class IncomingRequest(BaseModel):
    spec: VMSpec
    listen_address: str
    auto_resume: bool = True          # run the shadow as soon as its state is complete


class IncomingReady(BaseModel):
    uri: str
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

"""The controller API's request and response models."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kvmotion.checks.findings import Finding, Severity  # noqa: F401  (re-exported for the API)


class Request(BaseModel):
    """Requests refuse unknown fields: a misspelt option is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class HostAdd(Request):
    address: str = Field(description="agent URL, e.g. http://198.18.0.11:8770")
    name: str | None = None


class HostOut(BaseModel):
    name: str
    address: str
    state: str
    maintenance: int = 0              # 0 in service, 1 in maintenance, 2 entering (evacuating)
    cluster: str | None = None
    last_seen: float
    last_error: str = ""
    facts: dict[str, Any] = Field(default_factory=dict)


class VMCreate(Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
    host: str
    memory_mb: int = Field(default=256, ge=64, le=65536)
    vcpus: int = Field(default=1, ge=1, le=64)
    datastore: str | None = None
    network: str = "VM Network"
    disk_mb: int = Field(default=64, ge=1, le=1024 * 1024)
    ip: str | None = Field(default=None, description="guest address with prefix, e.g. 198.18.1.100/24")
    dirty_mb_s: float = Field(default=0.0, ge=0, le=10000)
    cpu_model: str | None = Field(default=None, description="named model, or host-passthrough")
    cpu_mask: list[str] = Field(default_factory=list, description="CPU features hidden from the guest")
    rdm: str | None = Field(default=None, description="raw LUN: a block device path presented to the host")
    encrypted_vmotion: str = Field(default="opportunistic", pattern="^(disabled|opportunistic|required)$")
    encrypted_disk: bool = Field(default=False, description="LUKS-encrypted disk; the VM always migrates encrypted")
    marker: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$",
                               description="a string the guest keeps in RAM (to prove what crosses the wire)")
    disk_format: str = Field(default="qcow2", pattern="^(qcow2|raw)$")
    data_disk_mb: int | None = Field(default=None, ge=1, le=1024 * 1024, description="a second (data) disk, vdb")
    data_datastore: str | None = Field(default=None, description="datastore of the data disk (default: the VM's)")
    records_rate: int | None = Field(default=None, ge=0, le=10000,
                                     description="the guest writes checksummed records to the data disk (records/s)")
    records_kb: int = Field(default=4, ge=4, le=1024, description="size of each guest record (KiB)")


class VMUpdate(Request):
    encrypted_vmotion: str | None = Field(default=None, pattern="^(disabled|opportunistic|required)$")


class VMOut(BaseModel):
    uuid: str
    name: str
    host: str
    power_state: str
    spec: dict[str, Any]
    runtime: dict[str, Any] | None = None


class MigrateRequest(Request):
    host: str | None = Field(default=None, description="destination host; default: stay on the current host")
    datastore: str | None = Field(default=None, description="move the VM folder and every disk to this datastore")
    disks: dict[str, str] = Field(default_factory=dict, description="per-disk placement: disk index or id -> datastore")
    disk_format: str | None = Field(default=None, pattern="^(qcow2|raw)$",
                                    description="convert moved disks: thin qcow2 or preallocated raw")
    disk_mbps: int | None = Field(default=None, ge=1, le=1_000_000, description="cap for disk copies (Mbit/s)")
    downtime_ms: int = Field(default=500, ge=10, le=2_000_000)
    max_bandwidth_mbps: int | None = Field(default=None, ge=1, le=1_000_000,
                                           description="cap for this migration; default: the link speed")
    progress_timeout_s: float = Field(default=150.0, ge=1)
    completion_timeout_s_per_gib: float = Field(default=800.0, ge=1)
    priority: str = Field(default="normal", pattern="^(high|normal)$")


class PhaseRecord(BaseModel):
    name: str
    status: str                        # running | ok | failed | skipped
    started_at: float
    ended_at: float | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class TaskOut(BaseModel):
    id: str
    kind: str
    vm_uuid: str
    vm_name: str
    source: str
    destination: str
    state: str
    phase: str
    progress: float
    phases: list[PhaseRecord]
    live: dict[str, Any]
    options: dict[str, Any]
    result: dict[str, Any]
    error: dict[str, Any] | None
    created_at: float
    updated_at: float
    started_at: float = 0.0
    finished_at: float


class ClusterCreate(Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
    evc_mode: str | None = None


class ClusterOut(BaseModel):
    name: str
    evc_mode: str | None
    hosts: list[str]


class CdromChange(Request):
    drive: str = "cd0"
    media: str = Field(pattern="^(none|local|client)$")
    path: str | None = None
    nbd: str | None = None


class MaintenanceRequest(Request):
    enter: bool

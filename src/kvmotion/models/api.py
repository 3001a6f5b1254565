"""The controller API's request and response models."""
from __future__ import annotations

import hashlib
from typing import Annotated, Any

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StringConstraints, field_serializer,
                      model_validator)

from kvmotion.models.findings import Finding, Severity

__all__ = ["Finding", "Severity"]      # re-exported for the API; the models below are imported by name
from kvmotion.models.agent import (DISK_FORMAT_PATTERN, ENCRYPTED_VMOTION_PATTERN, GUEST_IP_PATTERN, MAC_PATTERN,
                                   MAX_CPU_FEATURES,
                                   MAX_DISKS, MAX_URL_CHARS, DatastorePath, DiskRef, Name, NbdUrl,
                                   PortGroupName, relative_path_problem)
from kvmotion.models.devices import CACHE_HELP, DiskRequest, NicRequest
from kvmotion.models.cloudinit import CloudInitRequest
from kvmotion.models.hardware import CACHE_CHOICE_PATTERN, topology_problem
from kvmotion.models.boot import (BOOT_PATTERN, CLONE_PATTERN, FIRMWARE_PATTERN, GATEWAY_PATTERN, IMAGE_PATTERN,
                                  ImageSource, parse_image_ref)

# Names (VMs, hosts, clusters, datastores, tokens, CPU models) are ``Name``: one rule everywhere (models.agent).
# An agent URL: scheme, host (an IPv6 address in brackets) and port; no user, path, query or spaces.
AGENT_URL_PATTERN = r"^https?://[^\s/?#@]{1,255}/?$"
# A raw LUN: an absolute device path on the host (checked against the LUNs the host presents).
DevicePath = Annotated[str, StringConstraints(pattern=r"^/[^\x00-\x1f\x7f]{1,4095}$")]
MAX_TIMEOUT_S = 7 * 86400.0
MAX_NICS_MAP = 32


class Request(BaseModel):
    """Requests refuse unknown fields: a misspelt option is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class HostAdd(Request):
    address: str = Field(pattern=AGENT_URL_PATTERN, max_length=MAX_URL_CHARS,
                         description="agent URL, e.g. https://198.18.0.11:8770")
    name: Name | None = None
    secret: str = Field(pattern=r"^[0-9a-f]{64}$", description="the agent's enrolment secret (its agent.secret file)")


class HostSummary(BaseModel):
    """A host in a list's ``view=summary``: its own columns, without its facts (``GET /hosts/{name}`` has them)."""
    name: str
    address: str
    state: str
    maintenance: int = 0              # 0 in service, 1 in maintenance, 2 entering (evacuating)
    cluster: str | None = None
    last_seen: float
    last_error: str = ""


class HostOut(HostSummary):
    facts: dict[str, Any] = Field(default_factory=dict)


class VMSummary(BaseModel):
    """A VM in a list's ``view=summary``: where it is and whether it runs, without its spec (``GET /vms/{ref}``)."""
    uuid: str
    name: str
    host: str
    power_state: str


class VMCreate(Request):
    name: Name
    host: Name
    memory_mb: int = Field(default=256, ge=64, le=65536)
    vcpus: int = Field(default=1, ge=1, le=64)
    datastore: Name | None = None
    network: PortGroupName = "VM Network"
    disk_mb: int = Field(default=64, ge=1, le=1024 * 1024)
    ip: str | None = Field(default=None, pattern=GUEST_IP_PATTERN,
                           description="guest address with prefix, e.g. 198.18.1.100/24")
    dirty_mb_s: float = Field(default=0.0, ge=0, le=10000, allow_inf_nan=False)
    dirty_region_mb: int | None = Field(default=None, ge=1, le=4096,
                                        description="RAM the dirtier rewrites, cyclically (default 64 MiB)")
    cpu_model: Name | None = Field(default=None, description="named model, or host-passthrough")
    cpu_mask: list[Name] = Field(default_factory=list, max_length=MAX_CPU_FEATURES,
                                 description="CPU features hidden from the guest")
    rdm: DevicePath | None = Field(default=None, description="raw LUN: a block device path presented to the host")
    encrypted_vmotion: str = Field(default="opportunistic", pattern=ENCRYPTED_VMOTION_PATTERN)
    encrypted_disk: bool = Field(default=False, description="LUKS-encrypted disk; the VM always migrates encrypted")
    marker: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$",
                               description="a string the guest keeps in RAM (to prove what crosses the wire)")
    disk_format: str = Field(default="qcow2", pattern=DISK_FORMAT_PATTERN)
    data_disk_mb: int | None = Field(default=None, ge=1, le=1024 * 1024, description="a second (data) disk, vdb")
    data_datastore: Name | None = Field(default=None, description="datastore of the data disk (default: the VM's)")
    disk_cache: str = Field(default="auto", pattern=CACHE_CHOICE_PATTERN,
                            description="the boot and data disks' " + CACHE_HELP)
    records_rate: int | None = Field(default=None, ge=0, le=10000,
                                     description="the guest writes checksummed records to the data disk (records/s)")
    records_kb: int = Field(default=4, ge=4, le=1024, description="size of each guest record (KiB)")
    image: str | None = Field(default=None, pattern=IMAGE_PATTERN,
                              description="a library image's name (kvmotion image list), or DATASTORE:path/to/file: "
                                          "the boot disk is made from this disk image")
    clone: str = Field(default="full", pattern=CLONE_PATTERN,
                       description="full: a converted copy; linked: a qcow2 overlay on the image (same datastore)")
    disk_size_gb: int | None = Field(default=None, ge=1, le=64 * 1024,
                                     description="the boot disk's size; an image is grown to it, never shrunk")
    boot: str | None = Field(default=None, pattern=BOOT_PATTERN,
                             description="kernel (the test kernel) or disk; default: disk with --image, else kernel")
    firmware: str = Field(default="bios", pattern=FIRMWARE_PATTERN)
    secure_boot: StrictBool = Field(default=False, description="OVMF with Microsoft's keys enrolled (UEFI only)")
    gateway: str | None = Field(default=None, pattern=GATEWAY_PATTERN,
                                description="disk-booted guests: the default gateway, passed as an SMBIOS OEM string")
    mac: str | None = Field(default=None, pattern=MAC_PATTERN, description="the NIC's MAC (default: from the UUID)")
    # devices (models/devices.py): more disks after the boot one, the NICs, machine type and vCPU topology
    disks: list[DiskRequest] = Field(default_factory=list, max_length=MAX_DISKS - 4,
                                     description="more disks (--disk size=GB,...), after the boot and data disks")
    nics: list[NicRequest] = Field(default_factory=list, max_length=8,
                                   description="the NICs (--nic PORTGROUP,...); default: one on --network")
    machine: Name | None = Field(default=None, description="QEMU machine type, e.g. pc-q35-7.2 or pc-i440fx-7.2")
    sockets: int | None = Field(default=None, ge=1, le=64, description="vCPU topology: sockets x cores x threads")
    cores: int | None = Field(default=None, ge=1, le=64)
    threads: int | None = Field(default=None, ge=1, le=64)
    cloud_init: CloudInitRequest | None = Field(
        default=None, description="cloud-init NoCloud seed: checked first, built as VM/cidata.iso on drive cd0")

    @model_validator(mode="after")
    def _device_rules(self) -> VMCreate:
        problem = topology_problem(self.vcpus, self.sockets, self.cores, self.threads)
        if problem is not None:
            raise ValueError(f"vCPU topology {problem}")
        if self.nics and self.network != "VM Network":
            raise ValueError("--network and --nic both name port groups: give the NICs with --nic only")
        if self.nics and self.mac:
            raise ValueError("--mac and --nic both give MACs: give each NIC's MAC with --nic PORTGROUP,mac=...")
        macs = [n.mac for n in self.nics if n.mac]
        if len(macs) != len(set(macs)):
            raise ValueError("two --nic options give the same MAC: give each NIC its own, or leave mac= out")
        return self

    @model_validator(mode="after")
    def _image_rules(self) -> VMCreate:
        if self.secure_boot and self.firmware != "uefi":
            raise ValueError("Secure Boot needs UEFI firmware: add --firmware uefi, or drop --secure-boot")
        if self.clone == "linked" and self.image is None:
            raise ValueError("a linked clone needs an image: add --image DATASTORE:PATH")
        if self.image is not None and ":" in self.image:
            problem = relative_path_problem(parse_image_ref(self.image)[1])
            if problem is not None:
                raise ValueError(f"image {self.image!r}: its path {problem} (write DATASTORE:path/inside/it)")
        return self

    @property
    def library_image(self) -> str | None:
        """The library image's name, when ``image`` names one (not DATASTORE:path)."""
        return self.image if self.image is not None and ":" not in self.image else None

    def image_source(self) -> ImageSource | None:
        """DATASTORE:path only; a library image is resolved by the controller."""
        if self.image is None or ":" not in self.image:
            return None
        datastore, path = parse_image_ref(self.image)
        return ImageSource(datastore=datastore, path=path, clone=self.clone)

    @property
    def boot_mode(self) -> str:
        return self.boot or ("disk" if self.image else "kernel")


class MigrationPolicy(Request):
    """How live migrations of a VM may escalate and when they give up; unset fields inherit (VM → cluster →
    built-in defaults). A migration request's own values win; each task keeps the snapshot it used."""
    downtime_ms: int | None = Field(default=None, ge=10, le=2_000_000)
    progress_timeout_s: float | None = Field(default=None, ge=1, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    completion_timeout_s_per_gib: float | None = Field(default=None, ge=1, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    auto_converge: StrictBool | None = None
    xbzrle: StrictBool | None = None
    allow_postcopy: StrictBool | None = None


class VMUpdate(Request):
    encrypted_vmotion: str | None = Field(default=None, pattern=ENCRYPTED_VMOTION_PATTERN)
    migration_policy: MigrationPolicy | None = Field(default=None, description="set fields replace the VM's")


class ClusterUpdate(Request):
    migration_policy: MigrationPolicy = Field(description="the cluster's default policy (set fields replace)")


class VMOut(VMSummary):
    spec: dict[str, Any]
    runtime: dict[str, Any] | None = None
    migration_policy: dict[str, Any] = Field(default_factory=dict)

    @field_serializer("spec", when_used="json")
    def _spec_without_keys(self, spec: dict[str, Any]) -> dict[str, Any]:
        """On the wire, an encrypted disk's wrapped passphrase is only its fingerprint: no API client (a viewer,
        the web page) gets key material, even wrapped; the controller keeps it in its database."""
        disks = spec.get("disks")
        if not isinstance(disks, list) or not any(isinstance(d, dict) and d.get("key_wrapped") for d in disks):
            return spec
        return spec | {"disks": [d | {"key_wrapped": wrapped_fingerprint(d["key_wrapped"])}
                                 if isinstance(d, dict) and d.get("key_wrapped") else d for d in disks]}


def wrapped_fingerprint(wrapped: str) -> str:
    return "sha256:" + hashlib.sha256(wrapped.encode()).hexdigest()[:16]


class MigrateRequest(Request):
    host: Name | None = Field(default=None, description="destination host; default: stay on the current host")
    datastore: Name | None = Field(default=None, description="move the VM folder and every disk to this datastore")
    disks: dict[DiskRef, Name] = Field(default_factory=dict, max_length=MAX_DISKS,
                                       description="per-disk placement: disk index or id -> datastore")
    disk_format: str | None = Field(default=None, pattern=DISK_FORMAT_PATTERN,
                                    description="convert moved disks: thin qcow2 or preallocated raw")
    disk_mbps: int | None = Field(default=None, ge=1, le=1_000_000, description="cap for disk copies (Mbit/s)")
    downtime_ms: int | None = Field(default=None, ge=10, le=2_000_000,
                                    description="switchover budget (ceiling); default: VM, then cluster policy, 500")
    max_bandwidth_mbps: int | None = Field(default=None, ge=1, le=1_000_000,
                                           description="cap for this migration; default: the link speed")
    progress_timeout_s: float | None = Field(default=None, ge=1, le=MAX_TIMEOUT_S, allow_inf_nan=False,
                                             description="default: VM, then cluster policy, 150")
    completion_timeout_s_per_gib: float | None = Field(default=None, ge=1, le=MAX_TIMEOUT_S, allow_inf_nan=False,
                                                       description="default: VM, then cluster policy, 150")
    priority: str = Field(default="normal", pattern="^(high|normal)$")
    tuning: str = Field(default="auto", pattern="^(auto|qemu-defaults)$",
                        description="auto: kvmotion's tuning; qemu-defaults: a plain QEMU migration (baseline)")
    multifd_channels: int | None = Field(default=None, ge=0, le=16,
                                         description="parallel streams (0: one); default: by link speed")
    auto_converge: StrictBool | None = Field(default=None, description="escalation: let QEMU throttle the guest's vCPUs "
                                                                 "when pre-copy stops converging; default: policy, on")
    xbzrle: StrictBool | None = Field(default=None, description="delta-encode rewritten pages; default: when plain "
                                                          "pre-copy is predicted not to converge")
    allow_postcopy: StrictBool | None = Field(default=None, description="escalation: switch to post-copy (the VM runs "
                                              "on the destination and pulls the rest) when pre-copy does not "
                                              "converge at the downtime ceiling; default: policy, off")
    postcopy_bandwidth_mbps: int | None = Field(default=None, ge=1, le=1_000_000,
                                                description="cap for the post-copy phase; default: the link")
    controller: Name | None = Field(default=None, description="cross-controller vMotion: the domain member that "
                                    "manages --host (kvmotion domain list)")
    networks: dict[PortGroupName, PortGroupName] = Field(default_factory=dict, max_length=MAX_NICS_MAP,
                                                         description="cross-controller: source port group -> "
                                                                     "destination port group")
    guest_first: StrictBool | None = Field(default=None, description="the stream's threads yield the host CPU to "
                                           "the guest's vCPUs (nice 10), so a busy host slows the stream, not the "
                                           "guest; default: on")


class PhaseRecord(BaseModel):
    name: str
    status: str                        # running | ok | failed | skipped
    started_at: float
    ended_at: float | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class TaskSummary(BaseModel):
    """A task in a list's ``view=summary``: its own columns, without its phases, live figures, options, result
    and error (``GET /tasks/{id}`` has them)."""
    id: str
    kind: str
    vm_uuid: str
    vm_name: str
    source: str
    destination: str
    state: str
    phase: str
    progress: float
    created_at: float
    updated_at: float
    started_at: float = 0.0
    finished_at: float


class TaskOut(TaskSummary):
    phases: list[PhaseRecord]
    live: dict[str, Any]
    options: dict[str, Any]
    result: dict[str, Any]
    error: dict[str, Any] | None


class EventOut(BaseModel):
    """One thing that happened (derived from the task journal), newest first in ``GET /events``."""
    at: float
    level: str = Field(description="info | warning | error")
    kind: str = Field(description="task.queued | task.started | task.phase | task.succeeded | task.failed | "
                                  "task.unknown")
    subject: str = Field(description="vm:NAME, host:NAME or image:NAME")
    message: str
    task_id: str
    remedy: str = ""


class MigratePlan(BaseModel):
    """What a migration would do, before it starts (the web client's compatibility and review steps)."""
    kind: str | None = Field(description="vmotion, svmotion, xvmotion, cold, or cross-controller; None: blocked "
                                          "before a kind was known")
    source: str
    destination: str
    findings: list[Finding]
    prediction: dict[str, Any] | None = Field(description="converges, total_s, downtime_ms, passes, strategy, …; "
                                                          "None when memory does not move or cannot be sampled")
    encryption: dict[str, Any] = Field(description="mode (tls | plain) and the reason")


class ClusterCreate(Request):
    name: Name
    evc_mode: Name | None = None


class ClusterOut(BaseModel):
    name: str
    evc_mode: str | None
    hosts: list[str]
    migration_policy: dict[str, Any] = Field(default_factory=dict)


class CdromChange(Request):
    drive: Name = "cd0"
    media: str = Field(pattern="^(none|local|client)$")
    path: DatastorePath | None = Field(default=None, description="local media: an ISO image, relative to datastore")
    datastore: Name | None = Field(default=None, description="local media: its datastore (default: the VM's)")
    nbd: NbdUrl | None = Field(default=None, description="client media: nbd://HOST:PORT/EXPORT")


class MaintenanceRequest(Request):
    enter: bool

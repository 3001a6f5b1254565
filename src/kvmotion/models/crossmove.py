"""What two controllers of a domain say to each other about a cross-controller move (docs/cross-controller.md)."""
from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from kvmotion.models.agent import (DISK_FORMAT_PATTERN, MAX_CPU_FEATURES, MAX_DISKS, DeviceId, DiskRef, HostFacts,
                                   Name, PortGroupName, VMSpec)
from kvmotion.models.findings import Finding
from kvmotion.models.moves import MoveKind

MOVE_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
IDENTITY_PATTERN = r"^CN=[A-Za-z0-9._-]{1,120}$"
Passphrase = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]      # controller.keys: token_hex(32)

# The destination host's agent calls a source controller may make during its move, and nothing else.
HostOp = Literal["status", "prepare_incoming", "abort_incoming", "resume", "announce", "take_lease", "locks",
                 "put_home", "remove_files", "migration", "health_check", "guest_clock_sync"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CrossOffer(_Strict):
    """The source controller's question: may this VM come to HOST of yours, and (reserve) hold a place for it."""

    move_id: str = Field(pattern=MOVE_ID_PATTERN)           # the source's task id; the destination's task has it too
    spec: VMSpec
    power_state: str = Field(pattern="^(poweredOn|poweredOff)$")
    source_host: Name
    source_facts: HostFacts
    source_identity: str = Field(pattern=IDENTITY_PATTERN)  # the source host's client certificate (tls-authz)
    vm_cpu_features: list[Name] | None = Field(default=None, max_length=MAX_CPU_FEATURES * 8)
    host: Name
    datastore: Name | None = None
    disks: dict[DiskRef, Name] = Field(default_factory=dict, max_length=MAX_DISKS)
    disk_format: str | None = Field(default=None, pattern=DISK_FORMAT_PATTERN)
    networks: dict[PortGroupName, PortGroupName] = Field(default_factory=dict, max_length=32)
    # reservation only: the passphrases of the VM's encrypted disks (node -> key), over this mutual-TLS channel;
    # the destination controller wraps them with its own master key at once and keeps nothing else of them
    disk_keys: dict[DeviceId, Passphrase] = Field(default_factory=dict, max_length=MAX_DISKS)
    measured_mb: dict[Name, int] = Field(default_factory=dict, max_length=MAX_DISKS + 1)   # disk id|"home" -> MiB


class CrossVerdict(_Strict):
    """The destination controller's answer: its findings, and what the VM becomes there."""

    controller: str
    findings: list[Finding]
    kind: MoveKind
    host: str
    target: VMSpec                   # after relocation onto the destination's datastores and the network mapping
    facts: HostFacts                 # the destination host's, as its controller knows them
    migration_address: str | None    # where the destination host listens for the streams
    moved_disks: list[str] = Field(default_factory=list)   # disks that get new files there (shared-nothing)
    home_moves: bool = False         # the VM folder is copied there
    reserved: bool = False           # a place is held (an incoming task, the VM in its inventory as incoming)


class PeerHostCall(_Strict):
    op: HostOp
    args: dict[str, Any] = Field(default_factory=dict)


class IncomingState(StrEnum):
    RESERVED = "reserved"            # held; the shadow may be prepared
    COMMITTED = "committed"          # the VM is the destination's
    ABORTED = "aborted"              # released; the VM never was the destination's


class IncomingOut(_Strict):
    move_id: str
    vm_uuid: str
    vm_name: str
    host: str
    source_controller: str
    state: IncomingState
    qemu_status: str | None = None   # what the destination host runs for the VM now (None: nothing, or unknown)

"""Disks and NICs added to VMs: the API's requests and the agent's messages (models/hardware.py has the rules)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, field_validator
from typing import Annotated

from kvmotion.models.agent import DISK_FORMAT_PATTERN, DiskSpec, DeviceId, Name, PortGroupName, VMSpec
from kvmotion.models.hardware import CACHE_CHOICE_PATTERN, DISK_BUS_PATTERN, NIC_MODEL_PATTERN, mac_problem, normal_mac

MAX_DISK_GB = 64 * 1024
CACHE_HELP = ("host cache: auto (none on a shared datastore, writeback on a local one) | none | directsync | "
              "writethrough | writeback | unsafe")
Mac = Annotated[str, StringConstraints(max_length=17)]


class DiskRequest(BaseModel):
    """One disk of ``vm create --disk size=GB[,datastore=DS][,bus=...][,format=...][,cache=...]`` or
    ``vm disk add``."""

    model_config = ConfigDict(extra="forbid")
    size_gb: int = Field(ge=1, le=MAX_DISK_GB, description="size in GiB")
    datastore: Name | None = Field(default=None, description="default: the VM's datastore")
    bus: str = Field(default="virtio-blk", pattern=DISK_BUS_PATTERN, description="virtio-blk | virtio-scsi | sata")
    format: str = Field(default="qcow2", pattern=DISK_FORMAT_PATTERN)
    cache: str = Field(default="auto", pattern=CACHE_CHOICE_PATTERN, description=CACHE_HELP)


class DiskCacheRequest(BaseModel):
    """A disk's host cache mode, used from the VM's next power-on (``vm disk cache VM DISK MODE``)."""

    model_config = ConfigDict(extra="forbid")
    cache: str = Field(pattern=CACHE_CHOICE_PATTERN, description=CACHE_HELP)


class NicRequest(BaseModel):
    """One NIC of ``vm create --nic PORTGROUP[,mac=][,model=]`` or ``vm nic add``."""

    model_config = ConfigDict(extra="forbid")
    portgroup: PortGroupName
    mac: Mac | None = Field(default=None, description="default: generated, unique in the inventory")
    model: str = Field(default="virtio", pattern=NIC_MODEL_PATTERN, description="virtio | e1000e")

    @field_validator("mac")
    @classmethod
    def _mac(cls, mac: str | None) -> str | None:
        if mac is None:
            return None
        problem = mac_problem(mac)
        if problem is not None:
            raise ValueError(f"MAC {mac!r} {problem}; give a unicast address like 52:54:00:12:34:56, or leave it out")
        return normal_mac(mac)


class DiskRemoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_file: StrictBool = Field(default=False, description="detach only: the image file stays on its datastore")


class DiskChange(BaseModel):
    """Agent message: a disk to create (VM off) or hot-plug (VM on), with the VM it belongs to."""

    spec: VMSpec
    disk: DiskSpec


class DiskRemoval(BaseModel):
    """Agent message: a disk to unplug (VM on) or whose image to delete (VM off)."""

    spec: VMSpec
    disk_id: DeviceId
    delete_file: bool = True

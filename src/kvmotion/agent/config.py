"""Agent configuration (a JSON file written by the installer or the lab)."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from kvmotion.models.agent import PortGroupName
from kvmotion.models.hardware import VLAN_MAX, VLAN_MIN

DATASTORE_ID_FILE = ".kvmotion-datastore.json"


class VlanPortGroup(BaseModel):
    """A port group on a VLAN: its VMs' taps join ``bridge`` (VLAN filtering on) untagged in VLAN ``vlan``; the
    ``uplinks`` (ports of the bridge towards the physical switch) carry it tagged."""

    name: PortGroupName
    bridge: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,14}$")
    vlan: int = Field(ge=VLAN_MIN, le=VLAN_MAX)
    uplinks: list[str] = Field(default_factory=list, max_length=16)


class AgentConfig(BaseModel):
    name: str
    listen_host: str = "0.0.0.0"
    listen_port: int = 8770
    mgmt_address: str                       # the address the controller reaches this agent on
    state_dir: Path
    datastores: list[Path] = Field(default_factory=list)     # mount points; identity is read from each
    migration_interfaces: list[str] = Field(default_factory=lambda: ["mig0"])
    image_dir: Path | None = None
    controller_url: str | None = None       # register here at start, when set
    enrol_token_file: Path | None = None    # the enrolment token for that registration (`kvmotion host enrol-token`)
    accelerator: str = "auto"               # auto | kvm | tcg
    kvm_probe_deadline_s: float = 8.0
    swap_dir: Path | None = None            # where VM memory-backing/swap files live, if not with the VM
    block_devices: list[Path] = Field(default_factory=list)            # raw LUNs presented to this host
    import_dirs: list[Path] = Field(default_factory=list)   # folders `image import` may read (besides DS/import/)
    declared_link_mbps: dict[str, int] = Field(default_factory=dict)   # interface -> declared speed (overrides the NIC)
    cpu_feature_mask: list[str] = Field(default_factory=list)          # LAB SETTING: act like an older CPU
    vlan_portgroups: list[VlanPortGroup] = Field(default_factory=list)  # port groups on a VLAN of a bridge

    @classmethod
    def load(cls, path: Path) -> "AgentConfig":
        return cls.model_validate(json.loads(path.read_text()))

    @property
    def url(self) -> str:
        host = f"[{self.mgmt_address}]" if ":" in self.mgmt_address else self.mgmt_address
        return f"http://{host}:{self.listen_port}"

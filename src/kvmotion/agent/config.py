"""Agent configuration: a TOML file (``kvmotion-agent init`` writes one, the lab too; packaging/config/agent.toml
describes every key) or a JSON file. Unknown keys are errors."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvmotion.common.configfile import LogLevel, load_config
from kvmotion.models.agent import Name, PortGroupName
from kvmotion.models.hardware import VLAN_MAX, VLAN_MIN

DATASTORE_ID_FILE = ".kvmotion-datastore.json"
DEFAULT_CONFIG = Path("/etc/kvmotion/agent.toml")


DatastoreKind = Literal["directory", "nfs"]


class DatastoreMarker(BaseModel):
    """A datastore's identity: the file ``DATASTORE_ID_FILE`` at its top. Hosts that read the same UUID share it."""

    uuid: str = Field(pattern=r"^[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}$")
    name: Name
    kind: DatastoreKind = "directory"       # nfs: the folder must be an NFS mount (agent.mounts)
    shared: bool = False

    @model_validator(mode="after")
    def _nfs_is_shared(self) -> "DatastoreMarker":
        if self.kind == "nfs" and not self.shared:
            raise ValueError("a datastore of kind nfs is shared: set shared to true")
        return self


class VlanPortGroup(BaseModel):
    """A port group on a VLAN: its VMs' taps join ``bridge`` (VLAN filtering on) untagged in VLAN ``vlan``; the
    ``uplinks`` (ports of the bridge towards the physical switch) carry it tagged."""

    model_config = ConfigDict(extra="forbid")

    name: PortGroupName
    bridge: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,14}$")
    vlan: int = Field(ge=VLAN_MIN, le=VLAN_MAX)
    uplinks: list[str] = Field(default_factory=list, max_length=16)


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    listen_host: str = "0.0.0.0"
    listen_port: int = Field(default=8770, ge=1, le=65535)
    mgmt_address: str                       # the address the controller reaches this agent on
    state_dir: Path
    datastores: list[Path] = Field(default_factory=list)     # mount points; identity is read from each
    migration_interfaces: list[str] = Field(default_factory=lambda: ["mig0"])
    image_dir: Path | None = None
    controller_url: str | None = None       # register here at start, when set
    enrol_token_file: Path | None = None    # the enrolment token for that registration (`kvmotion host enrol-token`)
    controller_ca_file: Path | None = None  # the controller's CA (its pki/ca-cert.pem): the only CA trusted for it
    accelerator: Literal["auto", "kvm", "tcg"] = "auto"
    kvm_probe_deadline_s: float = 8.0
    swap_dir: Path | None = None            # where VM memory-backing/swap files live, if not with the VM
    block_devices: list[Path] = Field(default_factory=list)            # raw LUNs presented to this host
    import_dirs: list[Path] = Field(default_factory=list)   # folders `image import` may read (besides DS/import/)
    declared_link_mbps: dict[str, int] = Field(default_factory=dict)   # interface -> declared speed (overrides the NIC)
    cpu_feature_mask: list[str] = Field(default_factory=list)          # LAB SETTING: act like an older CPU
    vlan_portgroups: list[VlanPortGroup] = Field(default_factory=list)  # port groups on a VLAN of a bridge
    log_level: LogLevel = "info"            # `kvmotion-agent --log-level` overrides it

    @classmethod
    def load(cls, path: Path) -> "AgentConfig":
        """The file at ``path`` (TOML, or JSON by suffix or content); ``ConfigInvalid`` naming what is wrong."""
        return load_config(cls, path, missing_remedy=f"write one: kvmotion-agent init --config {path} --name …")

    @property
    def url(self) -> str:
        host = f"[{self.mgmt_address}]" if ":" in self.mgmt_address else self.mgmt_address
        return f"https://{host}:{self.listen_port}"

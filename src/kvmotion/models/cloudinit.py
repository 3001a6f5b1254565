"""cloud-init (NoCloud) seed: what ``vm create --cloud-init`` sends, and what the agent writes into the seed ISO.

The CLI reads the files on the user's machine and sends their text; the controller checks them before anything
is created (kvmotion.controller.cloudinit) and the agent builds ``VM/cidata.iso`` (kvmotion.agent.seediso), the
VM's CD-ROM ``cd0``. The seed ISO's drive names no datastore: it is the VM folder's, and moves with the folder.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from kvmotion.models.agent import CdromSpec, ProvisionRequest, VMSpec

SEED_ISO = "cidata.iso"             # in the VM folder
SEED_LABEL = "cidata"               # the volume label NoCloud looks for
MAX_USER_DATA_BYTES = 64 << 10      # as VMware's guestinfo; cloud-init's own limit is larger
MAX_SMALL_FILE_BYTES = 16 << 10     # meta-data, network-config, SSH keys
MAX_FILE_NAME = 255


class CloudInitFile(BaseModel):
    """One input file: its name on the user's machine (for messages only) and its text."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=MAX_FILE_NAME, description="the file's name, used in messages")
    text: str = Field(max_length=MAX_USER_DATA_BYTES)


class CloudInitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_data: CloudInitFile = Field(description="#cloud-config YAML, or a script starting with #!")
    ssh_key: CloudInitFile | None = Field(default=None, description="public keys, one a line (authorized_keys form)")
    network_config: CloudInitFile | None = Field(default=None, description="network config YAML, version 1 or 2")
    meta_data: CloudInitFile | None = Field(default=None,
                                            description="meta-data YAML; default: instance-id and local-hostname")


class SeedFiles(BaseModel):
    """The checked files the agent writes into the seed ISO, as they are."""

    user_data: str = Field(max_length=2 * MAX_USER_DATA_BYTES)
    meta_data: str = Field(max_length=2 * MAX_SMALL_FILE_BYTES)
    network_config: str | None = Field(default=None, max_length=MAX_SMALL_FILE_BYTES)


class ProvisionSeedRequest(ProvisionRequest):
    """A provision request that may carry a seed: written as ``VM/cidata.iso`` with the VM's other files."""

    seed: SeedFiles | None = None


def seed_path(spec: VMSpec) -> str:
    """The seed ISO, relative to the VM's boot datastore."""
    return f"{spec.folder}/{SEED_ISO}"


def seed_cdrom(folder: str) -> CdromSpec:
    """The drive of a new VM with a seed: no datastore named, so it follows the VM folder wherever it moves."""
    return CdromSpec(id="cd0", media="local", path=f"{folder}/{SEED_ISO}")


def moves_with_folder(cd: CdromSpec, spec: VMSpec) -> bool:
    """The VM's seed ISO: in its folder, on no named datastore; every kind of move copies it with the folder."""
    return cd.media == "local" and cd.datastore is None and cd.path == seed_path(spec)


def in_folder(cd: CdromSpec, spec: VMSpec) -> bool:
    """A local image inside the VM folder on its datastore (removed with the folder when the folder moves)."""
    return cd.media == "local" and cd.datastore in (None, spec.boot_datastore) \
        and (cd.path or "").startswith(spec.folder.rstrip("/") + "/")

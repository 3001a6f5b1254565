"""The image library's wire models: import requests and results (controller ↔ agent, API ↔ CLI), OVF packages."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from kvmotion.models.agent import MAC_PATTERN, Name, PortGroupName
from kvmotion.models.boot import IMAGE_FORMAT_PATTERN

IMAGES_DIR = "images"          # a datastore's library folder: images/NAME.qcow2
IMPORT_DIR = "import"          # where an agent reads files to import by default: <datastore>/import/…
MAX_HOST_PATH = 4096
MAX_OVF_BYTES = 4 << 20        # an OVF descriptor larger than this is refused


def host_path_problem(path: str) -> str | None:
    """What is wrong with an absolute path on a host, lexically (None: nothing); the agent checks it on disk."""
    if not path.startswith("/"):
        return "is not absolute: give the path on the datastore's host, like /srv/ds/shared/import/disk.vmdk"
    if len(path) > MAX_HOST_PATH:
        return f"is longer than {MAX_HOST_PATH} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "contains a control character"
    return None


def _host_path(value: str) -> str:
    problem = host_path_problem(value)
    if problem is not None:
        raise ValueError(f"file {value[:200]!r} {problem}")
    return value


# an absolute path on a host: no control characters
HostPath = Annotated[str, StringConstraints(max_length=MAX_HOST_PATH + 1), AfterValidator(_host_path)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


def image_file(name: str) -> str:
    """Where image ``name`` lives, relative to a datastore that holds a copy."""
    return f"{IMAGES_DIR}/{name}.qcow2"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- controller API -----------------------------------------------------------------------------------------
class ImageImport(_Request):
    name: Name
    file: HostPath = Field(description="absolute path on the host, under the datastore's import/ folder "
                                       "(or an import directory of the agent's configuration)")
    datastore: Name
    host: Name | None = Field(default=None, description="the host that reads FILE (default: one that mounts DS)")


class ImageCopy(BaseModel):
    datastore: str
    path: str


class ImageOut(BaseModel):
    name: str
    state: str                         # importing | ready
    source_format: str = ""            # what qemu-img info detected
    format: str = "qcow2"              # how the library stores it
    virtual_bytes: int = 0
    file_bytes: int = 0
    sha256: str = ""
    copies: list[ImageCopy] = Field(default_factory=list)
    created_at: float = 0.0
    used_by: list[str] = Field(default_factory=list)     # VMs made from it (filled by show)


class OvfImport(_Request):
    file: HostPath = Field(description="an .ova or .ovf on the host, under the datastore's import/ folder")
    host: Name
    datastore: Name
    name: Name | None = Field(default=None, description="the VM's name (default: the OVF's)")
    network: PortGroupName = Field(default="VM Network", description="the port group every NIC joins")


# -- agent --------------------------------------------------------------------------------------------------
class AgentImageImport(_Request):
    name: Name
    file: HostPath
    datastore: Name


class AgentImageResult(BaseModel):
    datastore: str
    path: str                          # relative to the datastore
    source_format: str = Field(pattern=IMAGE_FORMAT_PATTERN)
    virtual_bytes: int
    file_bytes: int
    sha256: Sha256
    seconds: float = 0.0


class AgentImageRemove(_Request):
    datastore: Name
    name: Name


class OvfOpen(_Request):
    file: HostPath
    datastore: Name


class OvfPackage(BaseModel):
    """An opened OVF package: its descriptor's text, the folder its files are in, what the manifest proved."""

    descriptor: str = Field(max_length=MAX_OVF_BYTES)
    folder: str                         # absolute, on the host: the OVF's folder (an OVA: its extraction folder)
    workdir: str | None = None          # an OVA's extraction folder (removed with /v1/images/ovf/close)
    manifest: dict[str, str] = Field(default_factory=dict)   # file -> algorithm, each verified
    files: list[str] = Field(default_factory=list)           # the package's files (names, no folders)


class OvfClose(_Request):
    workdir: HostPath
    datastore: Name


# -- OVF descriptor, parsed -----------------------------------------------------------------------------------
class OvfDisk(BaseModel):
    file: str                           # the disk's file name in the package
    capacity_bytes: int = 0


class OvfNic(BaseModel):
    mac: str | None = Field(default=None, pattern=MAC_PATTERN)
    network: str = ""


class OvfMachine(BaseModel):
    name: str
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mb: int = Field(default=512, ge=64, le=65536)
    firmware: str = "bios"
    disks: list[OvfDisk] = Field(default_factory=list)
    nics: list[OvfNic] = Field(default_factory=list)


class AgentImportStatus(BaseModel):
    """An import job on an agent: its phase (convert, check, checksum), the phase's percent, and its outcome."""

    job: str
    name: str
    state: str = "running"              # running | success | error
    phase: str = "convert"
    percent: float = 0.0
    result: AgentImageResult | None = None
    error: dict[str, Any] | None = None

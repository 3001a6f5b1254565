"""The host as a VM sees it (datastores, port groups, LUNs, accelerator), and datastore-relative paths."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvmotion.common.errors import ConflictError, InvalidInputError
from kvmotion.models.agent import VMSpec, relative_path_problem
from kvmotion.models.boot import NVRAM_FILE, OVMF_DIR


@dataclass(frozen=True)
class HostContext:
    """What a VM needs to know about the host it runs on."""

    host_name: str
    accelerator: str
    datastore_paths: dict[str, Path]      # datastore name -> mount path on this host
    bridges: dict[str, str]               # port group name -> Linux bridge
    host_model: str = "max"               # what host-passthrough means here ("host" under KVM)
    luns: dict[str, Path] = field(default_factory=dict)   # raw LUN identity -> device path on this host
    swap_dir: Path | None = None          # memory-backing files live here when set
    firmware_dir: Path = Path(OVMF_DIR)   # OVMF code and variable templates
    vlans: dict[str, int] = field(default_factory=dict)     # VLAN port group name -> VLAN ID (on its bridge)
    uplinks: dict[str, list[str]] = field(default_factory=dict)   # VLAN port group name -> tagged bridge ports
    vlan_problems: dict[str, str] = field(default_factory=dict)   # VLAN port group name -> why it is unusable here


def resolve_datastore(ctx: HostContext, name: str) -> Path:
    try:
        return ctx.datastore_paths[name]
    except KeyError:
        raise ConflictError(
            f"datastore {name!r} is not accessible on host {ctx.host_name}",
            remedy="pick a host that mounts this datastore, or move the VM's storage first",
            details={"datastore": name, "host": ctx.host_name},
        ) from None


def safe_path(ctx: HostContext, datastore: str, rel: str, *, what: str = "disk path", directory: bool = False) -> Path:
    """A datastore-relative path, resolved; refuses anything that leaves the datastore.

    Refused (InvalidInputError, HTTP 422): an empty or absolute path, '..', a NUL byte or control character, a
    symbolic link that leads out of the datastore (or loops), the datastore root itself, and a directory where a
    file is wanted (``directory=False``) or a file where a directory is wanted (``directory=True``).
    """
    problem = relative_path_problem(rel)
    if problem is not None:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} {problem}",
                                remedy="give a path inside the datastore, like VM/VM.qcow2")
    root = resolve_datastore(ctx, datastore).resolve()
    try:
        path = (root / rel).resolve()
        is_dir = path.is_dir()
        exists = is_dir or path.exists()
    except RuntimeError:           # Python 3.11: a symbolic link loop
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} runs into a symbolic link loop",
                                remedy="remove the looping link") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} cannot be resolved: {exc}",
                                remedy="give a path inside the datastore, like VM/VM.qcow2") from None
    if root not in path.parents:
        raise InvalidInputError(f"{what} {rel!r} leaves datastore {datastore} (through a symbolic link or '..')",
                                remedy="use a path inside the datastore, without links that lead out of it")
    if directory and exists and not is_dir:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} is a file, not a directory",
                                remedy="name a directory")
    if not directory and is_dir:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} is a directory, not a file",
                                remedy="name a file, like VM/VM.qcow2")
    return path


def vm_folder(ctx: HostContext, spec: VMSpec) -> Path:
    return safe_path(ctx, spec.boot_datastore, spec.folder, what="VM folder", directory=True)




def nvram_file(ctx: HostContext, spec: VMSpec) -> Path:
    """A UEFI VM's variable store: a regular file in its VM folder."""
    return safe_path(ctx, spec.boot_datastore, f"{spec.folder}/{NVRAM_FILE}", what="NVRAM file")

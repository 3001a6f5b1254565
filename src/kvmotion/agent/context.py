"""The host as a VM sees it (datastores, port groups, LUNs, accelerator), and datastore-relative paths."""
from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kvmotion.common import confined
from kvmotion.common.confined import Place
from kvmotion.common.errors import ConflictError, InvalidInputError, NotConfined
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
    shared_datastores: frozenset[str] = frozenset()   # datastores whose marker says shared (disks: cache=none)


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
    """A datastore-relative path, checked; refuses anything that leaves the datastore or passes a link.

    Refused (InvalidInputError, HTTP 422): an empty or absolute path, '..', a NUL byte or control character, a
    symbolic link anywhere below the datastore's root (kvmotion never follows one: see
    :mod:`kvmotion.common.confined`), the datastore root itself, and a directory where a file is wanted
    (``directory=False``) or a file where a directory is wanted (``directory=True``). The path need not exist.
    """
    problem = relative_path_problem(rel)
    if problem is not None:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} {problem}",
                                remedy="give a path inside the datastore, like VM/VM.qcow2")
    root = resolve_datastore(ctx, datastore).resolve()
    try:
        st = confined.stat_in(root, rel)
    except NotConfined as exc:
        raise confined.restated(exc, f"{what} {rel!r} on datastore {datastore}", datastore=datastore) from None
    except OSError as exc:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} cannot be checked: {exc}",
                                remedy="check that the datastore is mounted and readable") from None
    is_dir = st is not None and stat.S_ISDIR(st.st_mode)
    if directory and st is not None and not is_dir:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} is a file, not a directory",
                                remedy="name a directory")
    if not directory and is_dir:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} is a directory, not a file",
                                remedy="name a file, like VM/VM.qcow2")
    return root.joinpath(*PurePosixPath(rel).parts)


def place(ctx: HostContext, datastore: str, rel: str, *, what: str = "disk path", directory: bool = False) -> Place:
    """:func:`safe_path`'s checks, and the path as a :class:`Place` the agent opens from the datastore's root."""
    safe_path(ctx, datastore, rel, what=what, directory=directory)
    return Place.of(resolve_datastore(ctx, datastore).resolve(), rel)


def vm_place(ctx: HostContext, spec: VMSpec) -> Place:
    return place(ctx, spec.boot_datastore, spec.folder, what="VM folder", directory=True)


def vm_folder(ctx: HostContext, spec: VMSpec) -> Path:
    return vm_place(ctx, spec).path


def nvram_file(ctx: HostContext, spec: VMSpec) -> Path:
    """A UEFI VM's variable store: a regular file in its VM folder."""
    return safe_path(ctx, spec.boot_datastore, f"{spec.folder}/{NVRAM_FILE}", what="NVRAM file")

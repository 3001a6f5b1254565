"""Which kind of move a request is, and where every file goes: pure functions, no I/O.

A request names a host, a datastore for the whole VM, per-disk datastores, and/or a disk format. The plan says
which disks get new image files (and their new paths), where the VM folder goes, and the kind of move:
vMotion (host only), Storage vMotion (files only, same host), shared-nothing (both), or cold (powered off).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from kvmotion.common.errors import InvalidInputError
from kvmotion.migration.kinds import kind_for
from kvmotion.models.agent import DiskSpec, VMSpec
from kvmotion.models.moves import MoveKind

@dataclass(frozen=True)
class DiskMove:
    disk_id: str
    source: DiskSpec
    target: DiskSpec


@dataclass(frozen=True)
class Relocation:
    kind: MoveKind
    source_host: str
    host: str
    before: VMSpec
    after: VMSpec
    moves: list[DiskMove] = field(default_factory=list)

    @property
    def home_moves(self) -> bool:
        """The VM folder (kernel, initrd, config) is copied to another datastore."""
        return self.before.boot_datastore != self.after.boot_datastore

    @property
    def moved_ids(self) -> tuple[str, ...]:
        return tuple(m.disk_id for m in self.moves)

    @property
    def flattened(self) -> list[str]:
        """Linked clones that get new files: the mirror or qemu-img convert copies their base in (no backing)."""
        return [m.disk_id for m in self.moves if m.source.backing]


def resolve_disk(spec: VMSpec, ref: str) -> DiskSpec:
    """A disk by id ("disk1") or index ("1")."""
    for i, d in enumerate(spec.disks):
        if ref in (d.id, str(i)):
            return d
    raise InvalidInputError(f"VM {spec.name} has no disk {ref!r} (disks: "
                            f"{', '.join(f'{i}={d.id}' for i, d in enumerate(spec.disks)) or 'none'})",
                            remedy="name a disk by index or id, e.g. --disk 0=DATASTORE")


def new_path(disk: DiskSpec, fmt: str) -> str:
    p = PurePosixPath(disk.path)
    return str(p.with_suffix("." + fmt)) if p.suffix in (".qcow2", ".raw", ".img", "") else str(p)


def plan(spec: VMSpec, power_state: str, source_host: str, host: str | None, datastore: str | None,
         disk_map: dict[str, str], disk_format: str | None, dst_readable: set[str]) -> Relocation:
    """The whole move. ``dst_readable``: datastores the destination host can read (for shared-nothing defaults)."""
    target_host = host or source_host
    per_disk = {resolve_disk(spec, ref).id: ds for ref, ds in disk_map.items()}
    changes_host = target_host != source_host
    moves: list[DiskMove] = []
    disks: list[DiskSpec] = []
    for d in spec.disks:
        ds = per_disk.get(d.id) or datastore or d.datastore
        if d.kind != "file":
            disks.append(d)
            continue
        if changes_host and ds not in dst_readable and d.id not in per_disk and datastore is None:
            ds = d.datastore          # the checker names the unreachable datastore and the remedy
        fmt = disk_format or d.format
        if ds == d.datastore and fmt == d.format:
            disks.append(d)
            continue
        target = d.model_copy(update={"datastore": ds, "format": fmt, "path": new_path(d, fmt),
                                      "backing": None, "backing_format": None})
        if ds == d.datastore and target.path == d.path:
            raise InvalidInputError(f"{d.id} would be converted onto itself ({d.path})",
                                    remedy="move it to another datastore, or rename the image first")
        moves.append(DiskMove(d.id, d, target))
        disks.append(target)
    home = datastore or spec.boot_datastore
    after = spec.model_copy(update={"disks": disks, "boot_datastore": home})
    moves_files = bool(moves) or home != spec.boot_datastore
    # --host naming where it runs, with no file moving, stays a vMotion (its precheck says SAME_HOST)
    kind = kind_for(power_state == "poweredOn", changes_host or (host is not None and not moves_files), moves_files)
    return Relocation(kind=kind, source_host=source_host, host=target_host, before=spec, after=after, moves=moves)


def required_mb(reloc: Relocation, measured: dict[str, int]) -> dict[str, int]:
    """MiB written per target datastore, from per-disk measurements (disk id -> MiB; "home" -> VM folder)."""
    out: dict[str, int] = {}
    for m in reloc.moves:
        out[m.target.datastore] = out.get(m.target.datastore, 0) + measured.get(m.disk_id, m.target.size_mb)
    if reloc.home_moves:
        home = reloc.after.boot_datastore
        out[home] = out.get(home, 0) + measured.get("home", 0)
    return out

"""A new VM's boot disk from a disk image: a full clone (``qemu-img convert``) or a linked clone (a qcow2 overlay).

``qemu-img info`` detects the source's format (qcow2, raw, vmdk, vhdx, vdi); the copy is grown to the size asked
for and checked. Every tool runs as an argument list with a deadline, never through a shell; a failure leaves no
partial file behind.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmotion.agent.context import HostContext, safe_path
from kvmotion.agent.images import measure_mb
from kvmotion.common.errors import ConflictError, InvalidInputError, NotFoundError, QemuStartFailed
from kvmotion.models.agent import DiskSpec
from kvmotion.models.boot import IMAGE_FORMATS, ImageSource, linked_clone_problem

MIB = 1 << 20
INFO_TIMEOUT_S = 60
CONVERT_TIMEOUT_S = 3600
CHECK_TIMEOUT_S = 600
CHECK_UNSUPPORTED = 63          # qemu-img check: "this image format does not support checks"
SECTOR = 512


@dataclass(frozen=True)
class SourceImage:
    path: Path
    format: str
    virtual_bytes: int


@dataclass(frozen=True)
class ClonePlan:
    """What the clone does: its size (never smaller than the image) and whether it is grown."""

    size_mb: int
    grow: bool


def plan_size(virtual_bytes: int, wanted_mb: int) -> ClonePlan:
    image_mb = (virtual_bytes + MIB - 1) // MIB
    return ClonePlan(size_mb=max(image_mb, wanted_mb), grow=wanted_mb * MIB > virtual_bytes)


def format_problem(info: dict[str, object], file_bytes: int) -> str | None:
    """Why ``qemu-img info``'s answer is no image we take (None: it is one)."""
    fmt = info.get("format")
    if fmt not in IMAGE_FORMATS:
        return f"is in format {fmt!r}, not one of {', '.join(IMAGE_FORMATS)}"
    if info.get("backing-filename") or info.get("full-backing-filename"):
        return "has a backing file of its own (a chain): flatten it first with qemu-img convert"
    if fmt == "raw" and (file_bytes == 0 or file_bytes % SECTOR):
        return f"is no disk image (a raw image is a non-empty multiple of {SECTOR} bytes; this file has {file_bytes})"
    if not isinstance(info.get("virtual-size"), int) or int(str(info["virtual-size"])) <= 0:
        return "reports no virtual size"
    return None


def extent_problem(info: dict[str, object], src: Path) -> str | None:
    """A vmdk's extents (and a qcow2's data file) must stay in the source's folder, as regular files."""
    data = (info.get("format-specific") or {})
    data = data.get("data", {}) if isinstance(data, dict) else {}
    if isinstance(data, dict) and data.get("data-file"):
        return "has an external data file: convert it to a self-contained image first"
    extents = data.get("extents", []) if isinstance(data, dict) else []
    for ext in extents if isinstance(extents, list) else []:
        name = str(ext.get("filename", "")) if isinstance(ext, dict) else ""
        target = Path(name) if name.startswith("/") else src.parent / name
        st = os.lstat(target) if os.path.lexists(target) else None
        if target.parent != src.parent or st is None or not stat.S_ISREG(st.st_mode):
            return f"names an extent {name!r} outside its own folder (or not a regular file)"
    return None


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise QemuStartFailed(f"{argv[0]} {argv[1]} did not finish within {timeout:g} s",
                              remedy="check the datastore's health and speed, then retry") from None


def source_image(ctx: HostContext, src: ImageSource) -> SourceImage:
    """The image, confined to its datastore (no symbolic link on the way), its format detected."""
    path = safe_path(ctx, src.datastore, src.path, what="disk image")
    if not path.is_file():
        raise NotFoundError(f"disk image {src.path!r} does not exist on datastore {src.datastore} of {ctx.host_name}",
                            remedy="copy the image into the datastore first, or name another file")
    res = _run(["qemu-img", "info", "-U", "--output=json", str(path)], INFO_TIMEOUT_S)
    if res.returncode != 0:
        raise InvalidInputError(f"{src.datastore}:{src.path} is no disk image qemu-img can read: "
                                f"{res.stderr.strip()[-300:]}",
                                remedy="give a qcow2, raw, vmdk, vhdx or vdi image (a truncated one: copy it again)")
    info = json.loads(res.stdout)
    problem = format_problem(info, path.stat().st_size) or extent_problem(info, path)
    if problem is not None:
        raise InvalidInputError(f"{src.datastore}:{src.path} {problem}",
                                remedy="give a qcow2, raw, vmdk, vhdx or vdi image")
    return SourceImage(path, str(info["format"]), int(info["virtual-size"]))


def check(path: Path, fmt: str, what: str) -> None:
    res = _run(["qemu-img", "check", "-U", "-f", fmt, str(path)], CHECK_TIMEOUT_S)
    if res.returncode not in (0, CHECK_UNSUPPORTED):
        raise InvalidInputError(f"{what} is corrupt (qemu-img check): {(res.stdout + res.stderr).strip()[-300:]}",
                                remedy="repair it (qemu-img check -r all) or copy the image again")


def _need_space(target: Path, need_mb: int, datastore: str) -> None:
    free_mb = shutil.disk_usage(target.parent).free // MIB
    if need_mb > free_mb:
        raise ConflictError(f"datastore {datastore} has {free_mb} MiB free; the clone needs {need_mb} MiB",
                            remedy="free space on the datastore, use a linked clone, or pick another --datastore")


def full_clone(src: SourceImage, target: Path, disk: DiskSpec) -> DiskSpec:
    """``qemu-img convert`` into the VM's disk, grown to its size, then checked."""
    plan = plan_size(src.virtual_bytes, disk.size_mb)
    target.parent.mkdir(parents=True, exist_ok=True)
    _need_space(target, measure_mb(src.path, src.format, disk.format, False), disk.datastore)
    try:
        res = _run(["qemu-img", "convert", "-U", "-f", src.format, "-O", disk.format, str(src.path), str(target)],
                   CONVERT_TIMEOUT_S)
        if res.returncode != 0:
            raise InvalidInputError(f"qemu-img convert of {src.path.name} failed: {res.stderr.strip()[-300:]}",
                                    remedy="check the image (qemu-img check) and the datastore's free space")
        if plan.grow:
            res = _run(["qemu-img", "resize", "-q", "-f", disk.format, str(target), f"{plan.size_mb}M"],
                       CHECK_TIMEOUT_S)
            if res.returncode != 0:
                raise ConflictError(f"growing {target.name} to {plan.size_mb} MiB failed: {res.stderr.strip()}",
                                    remedy="check the datastore's free space")
        check(target, disk.format, f"the copy {target.name}")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return disk.model_copy(update={"size_mb": plan.size_mb, "backing": None, "backing_format": None})


def linked_refusal(image: ImageSource, disk: DiskSpec) -> None:
    problem = linked_clone_problem("linked", image.datastore, disk.datastore)
    if problem is not None:
        raise InvalidInputError(problem, remedy="use --clone full, or create the VM on the image's datastore")
    if disk.format != "qcow2" or disk.encrypted:
        raise InvalidInputError("a linked clone is an unencrypted qcow2 overlay",
                                remedy="use --disk-format qcow2 without an encrypted disk, or --clone full")


def linked_clone(src: SourceImage, target: Path, disk: DiskSpec, image: ImageSource) -> DiskSpec:
    """A qcow2 overlay on the image: its backing path relative (the datastore may be mounted elsewhere)."""
    plan = plan_size(src.virtual_bytes, disk.size_mb)
    target.parent.mkdir(parents=True, exist_ok=True)
    backing = os.path.relpath(src.path, target.parent)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", src.format, str(target)]
    try:
        res = _run(argv + ([f"{plan.size_mb}M"] if plan.grow else []), CHECK_TIMEOUT_S)
        if res.returncode != 0:
            raise ConflictError(f"creating the overlay {target.name} failed: {res.stderr.strip()[-300:]}",
                                remedy="check the datastore's free space and permissions")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return disk.model_copy(update={"size_mb": plan.size_mb, "backing": image.path, "backing_format": src.format})


def clone(ctx: HostContext, image: ImageSource, disk: DiskSpec) -> DiskSpec:
    """The VM's boot disk made from ``image``; returns the disk as made (its size, its base)."""
    target = safe_path(ctx, disk.datastore, disk.path)
    if target.exists() or target.is_symlink():
        raise ConflictError(f"{disk.datastore}:{disk.path} already exists",
                            remedy="choose another VM name, or delete the leftover file")
    if image.clone == "linked":
        linked_refusal(image, disk)
    src = source_image(ctx, image)
    check(src.path, src.format, f"disk image {image.datastore}:{image.path}")
    if image.clone == "linked":
        return linked_clone(src, target, disk, image)
    return full_clone(src, target, disk)

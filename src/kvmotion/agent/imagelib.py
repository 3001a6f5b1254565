"""The image library on a host: read a file to import (confined, no links, no devices), store it as qcow2.

A file to import must be an absolute path under an import folder the agent allows: the datastore's own
``import/`` folder, or one of the agent configuration's ``import_dirs``. No component of the path may be a symbolic
link, and the file must be a regular file (no device, FIFO or socket). The copy is written to a temporary name in
the datastore's ``images/`` folder, checked, hashed, then linked to its final name (never over an existing file);
on any failure the temporary file is removed.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvmotion.agent.context import HostContext, resolve_datastore, safe_path
from kvmotion.agent.diskimage import (CONVERT_TIMEOUT_S, INFO_TIMEOUT_S, MIB, _run, check, extent_problem,
                                      format_problem)
from kvmotion.common import confined
from kvmotion.common.confined import Place
from kvmotion.common.errors import ConflictError, DeadlineExceeded, InvalidInputError, NotConfined, NotFoundError
from kvmotion.models.boot import IMAGE_FORMATS
from kvmotion.models.images import (IMAGES_DIR, IMPORT_DIR, AgentImageImport, AgentImageResult, image_file)

FORMATS_TEXT = ", ".join(IMAGE_FORMATS)
TEXT_PROBE_BYTES = 64 * 1024       # a raw "image" with no NUL byte in its first 64 KiB is a text file
SPACE_MARGIN_MB = 16
HASH_CHUNK = 4 * MIB
Report = Callable[[str, float], None]     # (phase, percent of that phase)
TMP_MARK = ".importing-"                  # images/.NAME.importing-HOST-RANDOM while a copy is being written
OVA_MARK = ".ova-"                        # import/.ova-HOST-RANDOM/ while an OVA is unpacked


def import_roots(ctx: HostContext, datastore: str, extra: list[Path]) -> list[Path]:
    """Where files to import may be: the datastore's import/ folder, then the configured import folders."""
    return [resolve_datastore(ctx, datastore).resolve() / IMPORT_DIR, *extra]


def confined_file(file: str, roots: list[Path], what: str = "file to import") -> Path:
    """``file`` as a regular file under one of ``roots``, reached without any symbolic link (refused otherwise)."""
    remedy = f"copy the file into one of: {', '.join(str(r) for r in roots)} (a regular file, not a link)"
    if not file.startswith("/") or os.path.normpath(file) != file:
        raise InvalidInputError(f"{what} {file!r} is not a plain absolute path", remedy=remedy)
    where = confined.locate(file, roots)
    if where is None:
        raise InvalidInputError(f"{what} {file!r} is outside the folders this host imports from",
                                remedy=remedy, details={"allowed": [str(r) for r in roots]})
    try:
        root = os.lstat(where.root)
    except FileNotFoundError:
        root = None
    if root is None or not stat.S_ISDIR(root.st_mode):
        raise NotFoundError(f"import folder {where.root} does not exist (or is a link)",
                            remedy=f"create it: mkdir {where.root}")
    try:
        st = where.stat()
    except NotConfined as exc:
        raise confined.restated(exc, f"{what} {file!r}") from None
    if st is None:
        raise NotFoundError(f"{what} {file!r} does not exist", remedy=remedy)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"{what} {file!r} is not a regular file (a device, folder, FIFO or socket)",
                                remedy=remedy)
    return where.path


def _looks_like_text(path: Path) -> bool:
    with confined.open_file(path.parent, path.name) as fh:
        return b"\x00" not in fh.read(TEXT_PROBE_BYTES)


def inspect(src: Path) -> dict[str, object]:
    """``qemu-img info`` of a file to import; refused with the reason and the fix when it is no image we take."""
    res = _run(["qemu-img", "info", "--output=json", str(src)], INFO_TIMEOUT_S)
    if res.returncode != 0:
        raise InvalidInputError(f"{src.name} is no disk image qemu-img can read (truncated or corrupt?): "
                                f"{res.stderr.strip()[-300:]}",
                                remedy=f"give a complete {FORMATS_TEXT} image (copy it again if it was cut short)",
                                details={"file": str(src)})
    info = json.loads(res.stdout)
    fmt = info.get("format")
    if fmt not in IMAGE_FORMATS:
        raise InvalidInputError(f"{src.name} is in format {fmt!r}, which the library does not take",
                                remedy=f"convert it to one of {FORMATS_TEXT} with qemu-img convert",
                                details={"file": str(src), "format": fmt})
    problem = format_problem(info, src.stat().st_size) or extent_problem(info, src)
    if problem is None and fmt == "raw" and _looks_like_text(src):
        problem = "is no disk image: it reads as text (no NUL byte in its first 64 KiB)"
    if problem is not None:
        raise InvalidInputError(f"{src.name} {problem}", remedy=f"give a {FORMATS_TEXT} disk image",
                                details={"file": str(src), "format": fmt})
    return info


def _need_space(src: Path, fmt: str, folder: Path, datastore: str) -> None:
    res = _run(["qemu-img", "measure", "--output=json", "-f", fmt, "-O", "qcow2", str(src)], INFO_TIMEOUT_S)
    if res.returncode != 0:
        raise InvalidInputError(f"{src.name} cannot be measured (corrupt?): {res.stderr.strip()[-300:]}",
                                remedy="check it with qemu-img check, or copy it again")
    need_mb = (int(json.loads(res.stdout)["required"]) + MIB - 1) // MIB + SPACE_MARGIN_MB
    free_mb = shutil.disk_usage(folder).free // MIB
    if need_mb > free_mb:
        raise ConflictError(f"datastore {datastore} has {free_mb} MiB free; the image needs {need_mb} MiB",
                            remedy="free space on the datastore, or import to another --datastore",
                            details={"datastore": datastore, "free_mb": free_mb, "need_mb": need_mb})


def sha256_of(path: Path) -> str:
    return file_digest(path, "sha256")


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of a regular file (refused if it is a symbolic link)."""
    h = hashlib.new(algorithm)
    with confined.open_file(path.parent, path.name) as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def library_folder(ctx: HostContext, datastore: str) -> Path:
    folder = safe_path(ctx, datastore, IMAGES_DIR, what="image folder", directory=True)
    folder.mkdir(exist_ok=True)
    return folder


@dataclass(frozen=True)
class ImportPlan:
    """What :func:`prepare` found: the file, its format and size, where the copy goes."""

    name: str
    datastore: str
    host: str
    src: Path
    format: str
    virtual_bytes: int
    folder: Path
    final: Path


def prepare(ctx: HostContext, req: AgentImageImport, extra_roots: list[Path]) -> ImportPlan:
    """Everything that refuses bad input, fast and before anything is written: where the file is, what it is
    (``qemu-img info``, ``qemu-img check``), a free name, enough space."""
    src = confined_file(req.file, import_roots(ctx, req.datastore, extra_roots))
    info = inspect(src)
    fmt = str(info["format"])
    if fmt != "raw":
        check(src, fmt, f"{src.name}")            # a corrupt or truncated source is refused before copying
    folder = library_folder(ctx, req.datastore)
    final = safe_path(ctx, req.datastore, image_file(req.name), what="image file")
    if final.exists() or final.is_symlink():
        raise ConflictError(f"datastore {req.datastore} already has {image_file(req.name)}",
                            remedy="choose another image name, or delete the old image first",
                            details={"datastore": req.datastore, "name": req.name})
    _need_space(src, fmt, folder, req.datastore)
    return ImportPlan(req.name, req.datastore, ctx.host_name, src, fmt, int(info["virtual-size"]), folder, final)


def _no_report(phase: str, percent: float) -> None:
    return None


def store(plan: ImportPlan, report: Report = _no_report) -> AgentImageResult:
    """Convert to qcow2 under a temporary name, check, hash, then give it its name (never overwriting)."""
    t0 = time.monotonic()
    tmp = plan.folder / f".{plan.name}{TMP_MARK}{plan.host}-{secrets.token_hex(4)}"
    try:
        report("convert", 0.0)
        res = run_with_progress(["qemu-img", "convert", "-p", "-f", plan.format, "-O", "qcow2", str(plan.src),
                                 str(tmp)], CONVERT_TIMEOUT_S, lambda pct: report("convert", pct))
        if res.returncode != 0:
            raise InvalidInputError(f"converting {plan.src.name} failed (truncated, corrupt, or the datastore is "
                                    f"full): {res.stderr.strip()[-300:]}",
                                    remedy="check the image with qemu-img check and the datastore's free space")
        report("check", 0.0)
        check(tmp, "qcow2", f"the stored copy of {plan.src.name}")
        report("checksum", 0.0)
        digest = sha256_of(tmp)
        os.link(tmp, plan.final)                   # fails if the name appeared meanwhile: nothing is overwritten
    except FileExistsError:
        raise ConflictError(f"datastore {plan.datastore} already has {image_file(plan.name)}",
                            remedy="choose another image name") from None
    finally:
        tmp.unlink(missing_ok=True)
    return AgentImageResult(datastore=plan.datastore, path=image_file(plan.name), source_format=plan.format,
                            virtual_bytes=plan.virtual_bytes, file_bytes=plan.final.stat().st_size,
                            sha256=digest, seconds=round(time.monotonic() - t0, 3))


def import_image(ctx: HostContext, req: AgentImageImport, extra_roots: list[Path],
                 report: Report = _no_report) -> AgentImageResult:
    """:func:`prepare`, then :func:`store`: the whole import in one call."""
    return store(prepare(ctx, req, extra_roots), report)


PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def run_with_progress(argv: list[str], timeout: float, on_percent: Callable[[float], None]
                      ) -> subprocess.CompletedProcess[str]:
    """Run a tool that prints ``(12.34/100%)`` progress (``qemu-img convert -p``) within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"{argv[0]} {argv[1]} did not finish within {timeout:g} s",
                                           remedy="check the datastore's health and speed, then retry")
                ready, _, _ = select.select([fd], [], [], min(left, 1.0))
                chunk = os.read(fd, 4096) if ready else b""
                if ready and not chunk:
                    break
                found = PROGRESS.findall(chunk)
                if found:
                    on_percent(float(found[-1]))
            proc.wait(timeout=max(1.0, end - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        err.seek(0)
        return subprocess.CompletedProcess(argv, proc.returncode, "", err.read().decode(errors="replace"))


def _remove_leftover(where: Place) -> bool:
    try:
        st = where.stat()
        return st is not None and (where.rmtree() if stat.S_ISDIR(st.st_mode) else where.unlink())
    except NotConfined:
        return False                    # a link (or one on the way): left alone, it is no leftover of ours


def remove_leftovers(ctx: HostContext) -> list[Path]:
    """What this host's imports left when the agent stopped mid-way (never another host's: datastores are shared;
    nothing reached through a link)."""
    removed = []
    for root in ctx.datastore_paths.values():
        for folder, pattern in ((IMAGES_DIR, f".*{TMP_MARK}{ctx.host_name}-*"),
                                (IMPORT_DIR, f"{OVA_MARK}{ctx.host_name}-*")):
            try:
                names = fnmatch.filter(confined.listdir_in(root, folder), pattern)
            except NotConfined:
                continue
            places = [Place.of(root, f"{folder}/{name}") for name in names]
            removed += [where.path for where in places if _remove_leftover(where)]
    return removed


def remove_image(ctx: HostContext, datastore: str, name: str) -> bool:
    path = safe_path(ctx, datastore, image_file(name), what="image file")
    if not (path.exists() or path.is_symlink()):
        return False
    path.unlink()
    return True


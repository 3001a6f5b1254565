"""OVF packages on a host: open an .ovf (its folder) or an .ova (a tar, extracted safely into the datastore's
``import/`` folder), verify the manifest (.mf, SHA1/SHA256/SHA512) when there is one, and hand back the descriptor.

The controller parses the descriptor and imports each disk through the image library (the extracted files sit under
the datastore's import folder, so the same confinement applies). An OVA member must be a regular file with a plain
name: no folder, no absolute path, no '..', no link or device; anything else refuses the whole package.
"""
from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import stat
import tarfile
from pathlib import Path

from kvmotion.agent.context import HostContext, resolve_datastore
from kvmotion.agent.imagelib import OVA_MARK, confined_file, file_digest, import_roots
from kvmotion.common import confined
from kvmotion.common.confined import Place
from kvmotion.common.errors import ConflictError, InvalidInputError, KvmotionError
from kvmotion.models.images import IMPORT_DIR, MAX_OVF_BYTES, OvfClose, OvfOpen, OvfPackage

MAX_MEMBERS = 64
MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,254}$")
MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\(([^()/\\]+)\)\s*=\s*([0-9a-fA-F]+)$")
CHUNK = 4 << 20


def _member_problem(m: tarfile.TarInfo) -> str | None:
    if not m.isreg():
        return "is not a regular file (a link, folder or device)"
    if not MEMBER_NAME.match(m.name) or m.name in (".", ".."):
        return "is not a plain file name (folders, absolute paths and '..' are refused)"
    return None


def _extract(ova: Path, workdir: Place) -> list[str]:
    """Every member of the tar, checked first, then written as a new file into ``workdir`` (never through a link)."""
    try:
        with tarfile.open(ova, "r:") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise InvalidInputError(f"{ova.name} has {len(members)} files (at most {MAX_MEMBERS})",
                                        remedy="give an OVA made by an OVF exporter")
            for m in members:
                problem = _member_problem(m)
                if problem is not None:
                    raise InvalidInputError(f"{ova.name}: member {m.name[:100]!r} {problem}",
                                            remedy="give an OVA whose files are plain files at its top level")
            need = sum(m.size for m in members) >> 20
            free = shutil.disk_usage(workdir.path).free >> 20
            if need + 16 > free:
                raise ConflictError(f"the datastore has {free} MiB free; unpacking {ova.name} needs {need} MiB",
                                    remedy="free space on the datastore, or choose another --datastore")
            for m in members:
                src = tar.extractfile(m)
                assert src is not None
                with src, (workdir / m.name).open_file("xb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            return [m.name for m in members]
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidInputError(f"{ova.name} is not a readable OVA (a tar archive): {exc}",
                                remedy="give an .ova made by an OVF exporter, or the .ovf with its files") from exc


def verify_manifest(folder: Path, manifest: Path) -> dict[str, str]:
    """Each line ``SHA256(file)= hex`` checked against the file in ``folder``; returns file -> algorithm."""
    out: dict[str, str] = {}
    text = confined.read_in(folder, manifest.name, MAX_OVF_BYTES).decode(errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = MANIFEST_LINE.match(line.strip())
        if m is None:
            raise InvalidInputError(f"manifest {manifest.name} line {n} is not 'SHA256(file)= digest'",
                                    remedy="fix the manifest, or remove it to import without verification")
        algo, name, want = m.group(1), m.group(2).strip(), m.group(3).lower()
        path = folder / name
        st = confined.stat_in(folder, name)
        if st is None or not stat.S_ISREG(st.st_mode):
            raise InvalidInputError(f"manifest {manifest.name} lists {name!r}, which the package lacks",
                                    remedy="give the complete package (every file the manifest lists)")
        if file_digest(path, algo.lower()) != want:
            raise InvalidInputError(f"{name} does not match its {algo} digest in {manifest.name}: the package is "
                                    "corrupt or was changed", remedy="download or export the package again",
                                    details={"file": name, "algorithm": algo})
        out[name] = algo
    return out


def _descriptor(ovf: Path) -> str:
    with confined.open_file(ovf.parent, ovf.name) as fh:
        data = fh.read(MAX_OVF_BYTES + 1)
    if len(data) > MAX_OVF_BYTES:
        raise InvalidInputError(f"OVF descriptor {ovf.name} is larger than {MAX_OVF_BYTES >> 20} MiB",
                                remedy="give a real OVF descriptor")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"OVF descriptor {ovf.name} is not UTF-8 text", remedy="give a real OVF descriptor",
                                ) from exc


def _open_ova(ctx: HostContext, src: Path, datastore: str) -> OvfPackage:
    root = resolve_datastore(ctx, datastore).resolve()
    confined.make_dirs(root, IMPORT_DIR)
    workdir = Place.of(root, f"{IMPORT_DIR}/{OVA_MARK}{ctx.host_name}-{secrets.token_hex(6)}")
    workdir.make_dirs(mode=0o700)
    try:
        names = _extract(src, workdir)
        ovfs = [n for n in names if n.lower().endswith(".ovf")]
        if not ovfs:
            raise InvalidInputError(f"{src.name} holds no .ovf descriptor", remedy="give an OVA made by an OVF exporter")
        pkg = _package(workdir.path / ovfs[0], names)
        return pkg.model_copy(update={"workdir": str(workdir)})
    except BaseException:
        with contextlib.suppress(OSError, KvmotionError):
            workdir.rmtree()
        raise


def _package(ovf: Path, names: list[str]) -> OvfPackage:
    mf = ovf.with_suffix(".mf")
    manifest = verify_manifest(ovf.parent, mf) if confined.stat_in(ovf.parent, mf.name) is not None else {}
    if manifest and ovf.name not in manifest:
        raise InvalidInputError(f"manifest {mf.name} does not list the descriptor {ovf.name}",
                                remedy="give the package as exported (its manifest covers the descriptor)")
    return OvfPackage(descriptor=_descriptor(ovf), folder=str(ovf.parent), manifest=manifest, files=names)


def open_package(ctx: HostContext, req: OvfOpen, extra_roots: list[Path]) -> OvfPackage:
    src = confined_file(req.file, import_roots(ctx, req.datastore, extra_roots), what="OVF package")
    suffix = src.suffix.lower()
    if suffix == ".ova":
        return _open_ova(ctx, src, req.datastore)
    if suffix != ".ovf":
        raise InvalidInputError(f"{src.name} is neither an .ova nor an .ovf", remedy="give FILE.ova or FILE.ovf")
    names = sorted(p.name for p in src.parent.iterdir() if p.is_file() and not p.is_symlink())
    return _package(src, names)


def close_package(ctx: HostContext, req: OvfClose) -> bool:
    """Remove an OVA's extraction folder (only such a folder, directly in the datastore's import/ folder)."""
    root = resolve_datastore(ctx, req.datastore).resolve()
    work = Path(req.workdir)
    if work.parent != root / IMPORT_DIR or not work.name.startswith(OVA_MARK):
        raise InvalidInputError(f"{req.workdir} is not an OVA extraction folder of datastore {req.datastore}",
                                remedy="name the workdir that /v1/images/ovf/open returned")
    return confined.rmtree_in(root, f"{IMPORT_DIR}/{work.name}")

"""Fetch the Debian cloud kernel with apt and pick the virtio modules out of it."""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmotion_lab.image.errors import ImageBuildError

META_PACKAGE = "linux-image-cloud-amd64"
WANTED_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_net", "virtio_blk")
"""Required roots; their dependencies (virtio, virtio_ring, virtio_pci_*_dev,
net_failover, failover) are pulled in from modules.dep."""
OPTIONAL_MODULES: tuple[str, ...] = ("virtio_console",)

_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
_APT_OPTS = ("-o", "APT::Sandbox::User=root", "-q")
_KO_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")

Log = Callable[[str], None]


@dataclass(frozen=True)
class KernelPackage:
    """The concrete kernel package a metapackage points at."""

    name: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    version: str  # Debian package version, e.g. 6.1.192-2

    @property
    def kernel_version(self) -> str:
        return self.name.removeprefix("linux-image-")


@dataclass(frozen=True)
class Module:
    name: str  # normalised (underscores)
    relpath: str  # path below lib/modules/<ver>/
    data: bytes  # uncompressed .ko


def run(cmd: Sequence[str], what: str, fix: str, cwd: Path | None = None,
        env: dict[str, str] | None = None, timeout: float = 900, stdin: str | None = None) -> str:
    """Run *cmd*; on failure raise ImageBuildError naming *what* failed and *fix*."""
    full_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, env=full_env, capture_output=True, input=stdin,
                              text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{what} failed: {cmd[0]} not found ({exc}); {fix}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{what} timed out after {timeout:.0f}s; {fix}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}): {' | '.join(detail)}; {fix}")
    return proc.stdout


def apt_update(log: Log) -> None:
    log("running apt-get update")
    run(["apt-get", *_APT_OPTS, "update"], "apt-get update",
        "check network access to the Debian mirror and /etc/apt/sources.list(.d)", env=_APT_ENV)


def _parse_depends(depends: str) -> KernelPackage | None:
    for alt in depends.split(","):
        first = alt.split("|")[0].strip()
        m = re.match(r"^(linux-image-[^\s(]+)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", first)
        if m and m.group(2):
            return KernelPackage(m.group(1), m.group(2))
    return None


def query_kernel_package(meta: str = META_PACKAGE) -> KernelPackage | None:
    """Resolve *meta* with the local apt lists only (no network); None if unknown."""
    try:
        proc = subprocess.run(["apt-cache", "show", "--no-all-versions", meta], capture_output=True,
                              text=True, env={**os.environ, **_APT_ENV}, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("Depends:"):
            return _parse_depends(line.partition(":")[2])
    return None


def apt_download(spec: str, dest: Path, log: Log, allow_update: bool = True) -> Path:
    """``apt-get download spec`` into *dest* (running apt-get update once if needed)."""
    name = spec.split("=")[0]
    before = set(dest.glob("*.deb"))
    cmd = ["apt-get", *_APT_OPTS, "download", spec]
    fix = "run `apt-get update` first and check network access to the Debian mirror"
    try:
        log(f"apt-get download {spec}")
        run(cmd, f"apt-get download {spec}", fix, cwd=dest, env=_APT_ENV)
    except ImageBuildError:
        if not allow_update:
            raise
        apt_update(log)
        run(cmd, f"apt-get download {spec}", fix, cwd=dest, env=_APT_ENV)
    new = sorted(p for p in set(dest.glob("*.deb")) - before if p.name.startswith(name + "_"))
    if not new:
        raise ImageBuildError(f"apt-get download {spec} produced no {name}_*.deb in {dest}; {fix}")
    return new[-1]


def deb_field(deb: Path, fld: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), fld], f"dpkg-deb -f {deb.name} {fld}",
               "check that dpkg is installed and the download is not corrupt").strip()


def resolve_via_meta_deb(meta_deb: Path) -> KernelPackage:
    pkg = _parse_depends(deb_field(meta_deb, "Depends"))
    if pkg is None:
        raise ImageBuildError(f"{meta_deb.name} does not depend on a versioned linux-image-* package; "
                              f"set a different metapackage or report the Debian packaging change")
    return pkg


def extract_deb(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(dest)], f"dpkg-deb -x {deb.name}",
        "check free disk space in the image cache directory", timeout=900)


def find_kernel(root: Path) -> tuple[Path, str]:
    """Return (vmlinuz path, kernel version) from an extracted linux-image package."""
    for boot in (root / "boot", root / "usr" / "boot"):
        for vmlinuz in sorted(boot.glob("vmlinuz-*")):
            version = vmlinuz.name.removeprefix("vmlinuz-")
            for moddir in (root / "lib" / "modules" / version, root / "usr" / "lib" / "modules" / version):
                if moddir.is_dir():
                    return vmlinuz, version
    raise ImageBuildError(f"no boot/vmlinuz-* with matching lib/modules/<ver> in {root}; "
                          f"the kernel package layout changed, adapt kvmotion_lab.image.kernel.find_kernel")


def module_dir(root: Path, version: str) -> Path:
    for moddir in (root / "lib" / "modules" / version, root / "usr" / "lib" / "modules" / version):
        if moddir.is_dir():
            return moddir
    raise ImageBuildError(f"lib/modules/{version} missing in {root}; the kernel package is incomplete")


def mod_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suf in _KO_SUFFIXES:
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    return base.replace("-", "_")


def read_module(path: Path) -> bytes:
    """Read a kernel module, decompressing .ko.xz/.ko.zst/.ko.gz for busybox insmod."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        try:
            return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise ImageBuildError(f"decompressing {name} failed ({exc}); run `apt-get install zstd`") from exc
    return path.read_bytes()


def _modinfo_depends(data: bytes) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if not m or not m.group(1):
        return []
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d]


def _dep_table(moddir: Path, version: str, log: Log) -> dict[str, tuple[str, list[str]]]:
    """name -> (relpath, [dep names]) from modules.dep (generated with depmod if absent)."""
    dep_file = moddir / "modules.dep"
    if not dep_file.exists():
        depmod = shutil.which("depmod") or next(
            (p for p in ("/sbin/depmod", "/usr/sbin/depmod") if os.path.exists(p)), None)
        base = moddir.parent.parent.parent  # <root>/lib/modules/<ver> -> <root>
        if depmod:
            log("modules.dep not shipped; generating it with depmod -b")
            try:
                run([depmod, "-b", str(base), version], "depmod", "run `apt-get install kmod`")
            except ImageBuildError as exc:
                log(f"depmod failed, falling back to .modinfo depends: {exc}")
    table: dict[str, tuple[str, list[str]]] = {}
    if dep_file.exists():
        for line in dep_file.read_text().splitlines():
            if ":" not in line:
                continue
            path, _, deps = line.partition(":")
            table[mod_name(path)] = (path.strip(), [mod_name(d) for d in deps.split()])
        return table
    log("no modules.dep: resolving dependencies from each module's .modinfo")
    for p in moddir.rglob("*.ko*"):
        if p.name.endswith(_KO_SUFFIXES):
            table[mod_name(p.name)] = (str(p.relative_to(moddir)), [])
    return table


def builtin_modules(moddir: Path) -> set[str]:
    f = moddir / "modules.builtin"
    if not f.exists():
        return set()
    return {mod_name(line.strip()) for line in f.read_text().splitlines() if line.strip()}


def resolve_modules(moddir: Path, version: str, log: Log,
                    wanted: Sequence[str] = WANTED_MODULES,
                    optional: Sequence[str] = OPTIONAL_MODULES) -> tuple[list[Module], list[str]]:
    """Return (modules in load order, names of requested modules that are built in)."""
    table = _dep_table(moddir, version, log)
    builtin = builtin_modules(moddir)
    order: list[Module] = []
    seen: set[str] = set()
    skipped: list[str] = []

    def visit(name: str, required: bool, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        seen.add(name)
        if name in builtin:
            skipped.append(name)
            return
        if name not in table:
            if required:
                raise ImageBuildError(f"kernel module {name} (needed by {' <- '.join(chain) or 'init'}) "
                                      f"is neither in modules.dep nor modules.builtin of {version}; "
                                      f"use a kernel package that ships it (CONFIG_{name.upper()}=m or y)")
            log(f"optional module {name} not available, skipping")
            return
        relpath, deps = table[name]
        data = read_module(moddir / relpath)
        if not deps:
            deps = _modinfo_depends(data)
        for dep in deps:
            visit(dep, True, (*chain, name))
        order.append(Module(name, relpath, data))

    for name in wanted:
        visit(name.replace("-", "_"), True, ())
    for name in optional:
        visit(name.replace("-", "_"), False, ())
    return order, sorted(skipped)


def is_static_elf(path: Path) -> bool:
    """True if *path* is a 64-bit ELF without a PT_INTERP (dynamic loader) header."""
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            phoff = struct.unpack_from("<Q", head, 32)[0]
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def find_static_busybox(work: Path, log: Log) -> Path:
    """A statically linked busybox: the host's, else extracted from busybox-static."""
    for cand in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if cand.exists() and is_static_elf(cand):
            return cand
    log("no static /bin/busybox on the host; fetching busybox-static")
    dl = work / "busybox-dl"
    dl.mkdir(parents=True, exist_ok=True)
    deb = apt_download("busybox-static", dl, log)
    extract_deb(deb, dl / "root")
    for cand in (dl / "root" / "bin" / "busybox", dl / "root" / "usr" / "bin" / "busybox"):
        if cand.exists() and is_static_elf(cand):
            return cand
    raise ImageBuildError("busybox-static did not contain a static bin/busybox; "
                          "run `apt-get install busybox-static` and retry")


def busybox_applets(busybox: Path) -> list[str]:
    out = run([str(busybox), "--list-full"], "busybox --list-full",
              "run `apt-get install --reinstall busybox-static`")
    return sorted({line.strip().strip("/") for line in out.splitlines() if line.strip()})

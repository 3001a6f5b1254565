"""Build (and cache) the tiny kvmotion test guest: Debian cloud kernel + busybox initramfs.

Public API::

    img = build_image()            # cached; downloads the kernel with apt the first time
    img.kernel, img.initrd, img.version
    append = BASE_CMDLINE + " " + kernel_cmdline(ip="198.18.1.5/24", gateway="198.18.1.1", dirty_mb_s=20)

The guest's serial/HTTP protocol is documented in :mod:`kvmotion_lab.image.guest_init`.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmotion_lab.image import guest_init, kernel
from kvmotion_lab.image.cpio import CpioArchive
from kvmotion_lab.image.errors import ImageBuildError

__all__ = [
    "BASE_CMDLINE",
    "GuestImage",
    "ImageBuildError",
    "build_image",
    "cached_image",
    "default_cache_dir",
    "kernel_cmdline",
]

FORMAT_VERSION = 1
ENV_CACHE_DIR = "KVMOTION_IMAGE_DIR"
DEFAULT_CACHE_DIR = Path("/var/lib/kvmotion/image")
BASE_CMDLINE = "console=ttyS0 quiet panic=-1"
"""What callers put before :func:`kernel_cmdline` in ``-append``."""
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "manifest.json"

Log = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # vmlinuz
    initrd: Path  # initrd.img (gzip'd newc cpio)
    version: str  # kernel version string, e.g. "6.1.0-56-cloud-amd64"


def default_cache_dir() -> Path:
    """``$KVMOTION_IMAGE_DIR`` if set (and non-empty), else ``/var/lib/kvmotion/image``."""
    env = os.environ.get(ENV_CACHE_DIR, "").strip()
    return Path(env) if env else DEFAULT_CACHE_DIR


def kernel_cmdline(ip: str | None = None, gateway: str | None = None, dirty_mb_s: float = 0.0,
                   dirty_region_mb: int = 64, extra: str = "") -> str:
    """The ``kvmotion.*`` guest parameters (append after :data:`BASE_CMDLINE`).

    *ip* is ``A.B.C.D/NN`` (``/24`` is assumed when the prefix is missing); without
    it the guest uses DHCP.  Raises ValueError on malformed input.
    """
    parts: list[str] = []
    if ip:
        iface = ipaddress.IPv4Interface(ip if "/" in ip else f"{ip}/24")
        parts.append(f"kvmotion.ip={iface.ip}/{iface.network.prefixlen}")
    if gateway:
        parts.append(f"kvmotion.gw={ipaddress.IPv4Address(gateway)}")
    rate = float(dirty_mb_s)
    if not rate >= 0.0 or rate == float("inf"):
        raise ValueError(f"dirty_mb_s must be a finite number >= 0, got {dirty_mb_s!r}")
    if int(dirty_region_mb) != dirty_region_mb or dirty_region_mb < 1:
        raise ValueError(f"dirty_region_mb must be a positive integer, got {dirty_region_mb!r}")
    parts.append(f"kvmotion.dirty={rate:g}")
    parts.append(f"kvmotion.dirty_region={int(dirty_region_mb)}")
    if extra.strip():
        parts.append(extra.strip())
    return " ".join(parts)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recipe_hash() -> str:
    """Hash of everything that defines the initramfs except the kernel package."""
    h = hashlib.sha256()
    recipe = {
        "format": FORMAT_VERSION,
        "exec": guest_init.EXEC_FILES,
        "etc": guest_init.ETC_FILES,
        "modules": list(kernel.WANTED_MODULES),
        "optional": list(kernel.OPTIONAL_MODULES),
    }
    h.update(json.dumps(recipe, sort_keys=True).encode())
    return h.hexdigest()


def _inputs_hash(pkg: kernel.KernelPackage) -> str:
    return hashlib.sha256(f"{recipe_hash()}\0{pkg.name}\0{pkg.version}".encode()).hexdigest()


def _read_manifest(d: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((d / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _image_if_valid(d: Path, *, inputs_hash: str | None = None) -> tuple[GuestImage, dict[str, Any]] | None:
    """The image in *d* if its manifest matches (recipe / inputs) and file hashes verify."""
    man = _read_manifest(d)
    if man is None or man.get("format") != FORMAT_VERSION or man.get("recipe_hash") != recipe_hash():
        return None
    if inputs_hash is not None and man.get("inputs_hash") != inputs_hash:
        return None
    files = man.get("files")
    if not isinstance(files, dict):
        return None
    for fname in (KERNEL_FILE, INITRD_FILE):
        info = files.get(fname)
        path = d / fname
        if not isinstance(info, dict) or not path.is_file():
            return None
        if path.stat().st_size != info.get("size") or _sha256_file(path) != info.get("sha256"):
            return None
    return GuestImage(d / KERNEL_FILE, d / INITRD_FILE, str(man.get("version"))), man


def cached_image(cache_dir: Path | None = None) -> GuestImage | None:
    """The newest valid cached image built from the current recipe, or None."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not cache.is_dir():
        return None
    best: tuple[float, GuestImage] | None = None
    for d in cache.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        found = _image_if_valid(d)
        if found is None:
            continue
        img, man = found
        stamp = float(man.get("built_at_epoch", 0.0))
        if best is None or stamp > best[0]:
            best = (stamp, img)
    return best[1] if best else None


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    with (cache / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            # holding the lock => no build is running: leftovers are from interrupted builds
            for d in cache.iterdir():
                if d.is_dir() and (d.name.startswith(".build-") or d.name.startswith(".old-")):
                    shutil.rmtree(d, ignore_errors=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_image(cache_dir: Path | None = None, force: bool = False, log: Log = print) -> GuestImage:
    """Return the cached guest image, building it first if missing/stale (or *force*)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageBuildError(f"cannot create image cache dir {cache}: {exc}; "
                              f"run as root or set {ENV_CACHE_DIR} to a writable directory") from exc
    with _locked(cache):
        pkg = kernel.query_kernel_package()
        if pkg is None:
            if not force and (img := cached_image(cache)) is not None:
                log(f"apt cannot resolve {kernel.META_PACKAGE}; using cached image {img.version}")
                return img
            kernel.apt_update(log)
            pkg = kernel.query_kernel_package()
            if pkg is None:
                raise ImageBuildError(f"apt-cache cannot resolve {kernel.META_PACKAGE} to a linux-image "
                                      f"package even after apt-get update; add Debian main to the apt "
                                      f"sources and run `apt-get update`")
        if not force:
            found = _image_if_valid(cache / pkg.kernel_version, inputs_hash=_inputs_hash(pkg))
            if found is not None:
                return found[0]
        return _build(cache, pkg, log)


def _build(cache: Path, pkg: kernel.KernelPackage, log: Log) -> GuestImage:
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        dl = work / "dl"
        dl.mkdir()
        meta_deb = kernel.apt_download(kernel.META_PACKAGE, dl, log)
        real = kernel.resolve_via_meta_deb(meta_deb)
        if real != pkg:
            log(f"apt-cache said {pkg.name}={pkg.version}, metapackage says {real.name}={real.version}")
            pkg = real
        deb = kernel.apt_download(f"{pkg.name}={pkg.version}", dl, log)
        root = work / "kroot"
        log(f"extracting {deb.name}")
        kernel.extract_deb(deb, root)
        vmlinuz, version = kernel.find_kernel(root)
        moddir = kernel.module_dir(root, version)
        modules, builtin = kernel.resolve_modules(moddir, version, log)
        log(f"modules (load order): {' '.join(m.name for m in modules)}; built-in: {' '.join(builtin) or '-'}")
        busybox = kernel.find_static_busybox(work, log)
        initrd = _initramfs(busybox, modules)

        out = work / "out"
        out.mkdir()
        shutil.copyfile(vmlinuz, out / KERNEL_FILE)
        (out / INITRD_FILE).write_bytes(initrd)
        manifest: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "version": version,
            "kernel_package": pkg.name,
            "kernel_package_version": pkg.version,
            "inputs_hash": _inputs_hash(pkg),
            "recipe_hash": recipe_hash(),
            "files": {f: {"sha256": _sha256_file(out / f), "size": (out / f).stat().st_size}
                      for f in (KERNEL_FILE, INITRD_FILE)},
            "modules": [m.name for m in modules],
            "builtin_skipped": builtin,
            "busybox_sha256": _sha256_file(busybox),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "built_at_epoch": time.time(),
            "build_seconds": round(time.monotonic() - t0, 2),
        }
        (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for f in (KERNEL_FILE, INITRD_FILE, MANIFEST_FILE):
            with (out / f).open("rb") as fh:
                os.fsync(fh.fileno())
        install_atomically(out, cache / version)
        log(f"built guest image {version} in {time.monotonic() - t0:.1f}s: "
            f"kernel {manifest['files'][KERNEL_FILE]['size']} B, initrd {len(initrd)} B")
        return GuestImage(cache / version / KERNEL_FILE, cache / version / INITRD_FILE, version)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def install_atomically(out: Path, target: Path) -> None:
    """Atomically put *out* at *target* (replacing a stale image)."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=".old-", dir=target.parent))
        os.rename(target, old / "img")
    os.rename(out, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _initramfs(busybox: Path, modules: list[kernel.Module]) -> bytes:
    arc = CpioArchive()
    for d in ("dev", "proc", "sys", "run", "root", "mnt", "var", "www",
              "etc/kvmotion", "lib/modules", "bin", "sbin", "usr/bin", "usr/sbin"):
        arc.add_dir(d)
    arc.add_dir("tmp", 0o1777)
    arc.add_chardev("dev/console", 5, 1)
    arc.add_chardev("dev/null", 1, 3, 0o666)
    arc.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in kernel.busybox_applets(busybox):
        if applet != "bin/busybox":
            arc.add_symlink(applet, "/bin/busybox")
    for m in modules:
        arc.add_file(f"lib/modules/{m.name}.ko", m.data, 0o644)
    arc.add_file("etc/kvmotion/modules", "".join(f"{m.name}.ko\n" for m in modules).encode())
    for path, text in guest_init.ETC_FILES.items():
        arc.add_file(path, text.encode())
    for path, text in guest_init.EXEC_FILES.items():
        arc.add_file(path, text.encode(), 0o755)
    return arc.to_gzip()

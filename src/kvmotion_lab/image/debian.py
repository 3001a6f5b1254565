"""Build (and cache) the Debian 12 guest disk: ``kvmotion image build --debian``.

Public API::

    img = build_debian_image()       # cached by recipe hash; debootstrap from deb.debian.org the first time
    img.disk                          # qcow2: GPT, BIOS boot + ESP + ext4 root; GRUB for i386-pc and x86_64-efi

No loop devices and no mounts: the root file system is made from a folder (``mkfs.ext4 -d``), the ESP with
``mkfs.vfat`` and mtools, the partition table with ``sfdisk`` on a file, GRUB's images with ``grub-mkimage`` run in
the new root (:mod:`kvmotion_lab.image.debian_disk` writes them where ``grub-install`` would).  So it builds the
same way on a host, in a container or where ``losetup`` is refused.  Needs root (debootstrap, chroot).

The guest contract (what a host passes) is in :mod:`kvmotion_lab.image.debian_guest` and README; in short: the
disk on virtio-blk, SeaBIOS or OVMF (``OVMF_CODE_4M.fd`` + a per-VM copy of ``OVMF_VARS_4M.fd``), ``-smbios
type=11,value=kvmotion:ip=A.B.C.D/NN,value=kvmotion:gw=A.B.C.D`` for a static address (else DHCP), a
virtio-serial port ``org.qemu.guest_agent.0`` for qemu-guest-agent, the serial console on ttyS0.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmotion_lab.image import debian_disk as disk
from kvmotion_lab.image import debian_recipe as recipe
from kvmotion_lab.image.build import default_cache_dir, install_atomically
from kvmotion_lab.image.errors import ImageBuildError
from kvmotion_lab.image.kernel import run

ENV_DEBIAN_DIR = "KVMOTION_DEBIAN_IMAGE_DIR"
DISK_FILE = "debian-12.qcow2"
MANIFEST_FILE = "manifest.json"
HOST_TOOLS: dict[str, str] = {"debootstrap": "debootstrap", "sfdisk": "fdisk", "mkfs.vfat": "dosfstools",
                              "mcopy": "mtools", "mkfs.ext4": "e2fsprogs", "qemu-img": "qemu-utils",
                              "chroot": "coreutils"}
"""Command -> the Debian package that has it (installed with apt when missing)."""
_FIX = "see the message above; `kvmotion image build --debian --force` starts over"

Log = Callable[[str], None]


@dataclass(frozen=True)
class DebianImage:
    disk: Path            # the qcow2 (never boot it directly: put an overlay on it)
    recipe_hash: str
    kernel: str           # e.g. 6.1.0-50-cloud-amd64
    root_uuid: str
    build_seconds: float


def default_debian_dir() -> Path:
    """``$KVMOTION_DEBIAN_IMAGE_DIR``, else ``debian`` beside the tiny guest's cache (``/var/lib/kvmotion/debian``)."""
    env = os.environ.get(ENV_DEBIAN_DIR, "").strip()
    return Path(env) if env else default_cache_dir().parent / "debian"


def _from_manifest(d: Path) -> DebianImage | None:
    try:
        man: dict[str, Any] = json.loads((d / MANIFEST_FILE).read_text())
        ok = man["recipe_hash"] == recipe.recipe_hash() and (d / DISK_FILE).stat().st_size == man["disk_bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        return None
    return DebianImage(d / DISK_FILE, man["recipe_hash"], man["kernel"], man["root_uuid"], man["build_seconds"])


def cached_debian_image(cache_dir: Path | None = None) -> DebianImage | None:
    """The image built from the current recipe, or None (nothing is built)."""
    cache = cache_dir or default_debian_dir()
    return _from_manifest(cache / recipe.recipe_hash()[:16])


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    with (cache / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            for d in cache.iterdir():   # holding the lock: leftovers are from interrupted builds
                if d.is_dir() and d.name.startswith((".build-", ".old-")):
                    shutil.rmtree(d, ignore_errors=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_debian_image(cache_dir: Path | None = None, force: bool = False, log: Log = print) -> DebianImage:
    """The cached image for the current recipe, built first when missing (or *force*)."""
    cache = cache_dir or default_debian_dir()
    if os.geteuid() != 0:
        raise ImageBuildError("building the Debian image needs root (debootstrap, chroot); run it as root")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageBuildError(f"cannot create {cache}: {exc}; set {ENV_DEBIAN_DIR} to a writable folder") from exc
    with _locked(cache):
        if not force and (img := cached_debian_image(cache)) is not None:
            return img
        ensure_host_tools(log)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            out = _build(work, log)
            target = cache / recipe.recipe_hash()[:16]
            install_atomically(out, target)
        except (ImageBuildError, OSError) as exc:
            raise ImageBuildError(f"Debian image build failed, nothing was kept: {exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
        img = cached_debian_image(cache)
        if img is None:
            raise ImageBuildError(f"the image built into {target} does not verify; {_FIX}")
        return img


def ensure_host_tools(log: Log) -> None:
    """apt-get install the packages of the tools this builder runs, when a tool is missing."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    log(f"installing {' '.join(missing)} with apt")
    env = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    fix = "check network access to the Debian mirror, or install them by hand (scripts/install.sh does)"
    run(["apt-get", "-q", "update"], "apt-get update", fix, env=env, timeout=600)
    run(["apt-get", "-q", "-y", "--no-install-recommends", "install", *missing], f"installing {missing}", fix,
        env=env, timeout=900)


def _build(work: Path, log: Log) -> Path:
    t0 = time.monotonic()
    root, out = work / "root", work / "out"
    out.mkdir()
    log(f"debootstrap {recipe.SUITE} from {recipe.MIRROR} (a few minutes)")
    _debootstrap(root)
    root_uuid = str(uuid.uuid4())
    kernel, initrd = _customize(root, root_uuid)
    log(f"root file system ready ({kernel}); making GRUB images")
    grub = _grub_images(root, work, root_uuid)
    _prune(root)
    plan = recipe.DiskPlan()
    raw = _assemble(root, work, plan, grub, root_uuid)
    log("converting to qcow2 (compressed)")
    run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(out / DISK_FILE)], "qemu-img convert",
        "check free space in the image folder", timeout=1800)
    run(["qemu-img", "check", str(out / DISK_FILE)], "qemu-img check", _FIX, timeout=300)
    seconds = round(time.monotonic() - t0, 1)
    manifest = {"recipe_hash": recipe.recipe_hash(), "kernel": kernel, "initrd": initrd, "root_uuid": root_uuid,
                "disk_bytes": (out / DISK_FILE).stat().st_size, "virtual_bytes": plan.size,
                "packages": list(recipe.PACKAGES), "build_seconds": seconds,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for f in (DISK_FILE, MANIFEST_FILE):
        with (out / f).open("rb") as fh:
            os.fsync(fh.fileno())
    log(f"built {DISK_FILE} in {seconds:.0f} s: {manifest['disk_bytes'] >> 20} MiB "
        f"(virtual {plan.disk_mib} MiB)")
    return out


def _debootstrap(root: Path) -> None:
    """debootstrap; on failure the reason dpkg gave (from debootstrap.log, which goes away with the build folder)."""
    try:
        run(["debootstrap", "--variant=minbase", f"--include={','.join(recipe.PACKAGES)}", recipe.SUITE, str(root),
             recipe.MIRROR], "debootstrap", f"check access to {recipe.MIRROR}", timeout=3600)
    except ImageBuildError as exc:
        try:
            lines = (root / "debootstrap/debootstrap.log").read_text(errors="replace").splitlines()
        except OSError:
            raise exc from None
        why = [ln.strip() for ln in lines if "depends on" in ln or "error" in ln.lower()][-4:]
        if not why:
            raise exc from None
        raise ImageBuildError(f"{exc}; debootstrap.log: {' | '.join(why)}; a dependency debootstrap cannot "
                              f"resolve (a virtual package) goes into debian_recipe.PACKAGES") from None


def _chroot(root: Path, *cmd: str, timeout: float = 300) -> str:
    return run(["chroot", str(root), *cmd], f"in the new root: {' '.join(cmd)}", _FIX,
               env={"LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}, timeout=timeout)


def _customize(root: Path, root_uuid: str) -> tuple[str, str]:
    """Write the recipe's files, enable its units; returns the kernel and initrd file names in /boot."""
    for rel, text in recipe.STATIC_FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    script = root / recipe.GUEST_SCRIPT.lstrip("/")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(recipe.guest_script_source())
    script.chmod(0o755)
    (root / "etc/fstab").write_text(recipe.fstab(root_uuid))
    _chroot(root, "systemctl", "enable", *recipe.ENABLE_UNITS)
    _chroot(root, "systemctl", "mask", *recipe.MASK_UNITS)
    _chroot(root, "passwd", "-l", "root")
    (root / "etc/machine-id").write_text("")          # each VM makes its own at first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    kernels = sorted(p.name for p in (root / "boot").glob("vmlinuz-*"))
    initrds = sorted(p.name for p in (root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise ImageBuildError(f"no kernel or initrd in {root / 'boot'} after debootstrap; {_FIX}")
    kernel, initrd = kernels[-1], initrds[-1]
    grub_dir = root / "boot/grub"
    grub_dir.mkdir(parents=True, exist_ok=True)
    (grub_dir / "grub.cfg").write_text(recipe.grub_cfg(root_uuid, kernel, initrd))
    return kernel.removeprefix("vmlinuz-"), initrd


def _grub_images(root: Path, work: Path, root_uuid: str) -> dict[str, Path]:
    """core.img (i386-pc) and BOOTX64.EFI, made by the guest's own grub-mkimage; module folders into /boot/grub."""
    (root / "tmp/kvmotion-early.cfg").write_text(recipe.grub_early_cfg(root_uuid))
    images: dict[str, Path] = {}
    for platform, name in (("i386-pc", "core.img"), ("x86_64-efi", "BOOTX64.EFI")):
        _chroot(root, "grub-mkimage", "-d", f"/usr/lib/grub/{platform}", "-O", platform,
                "-o", f"/tmp/{name}", "-c", "/tmp/kvmotion-early.cfg", "-p", "/boot/grub",
                *recipe.GRUB_MODULES[platform])
        images[platform] = work / name
        shutil.move(root / "tmp" / name, images[platform])
        shutil.copytree(root / "usr/lib/grub" / platform, root / "boot/grub" / platform, dirs_exist_ok=True)
    images["boot.img"] = work / "boot.img"
    shutil.copyfile(root / "usr/lib/grub/i386-pc/boot.img", images["boot.img"])
    (root / "tmp/kvmotion-early.cfg").unlink()
    return images


def _prune(root: Path) -> None:
    for rel in recipe.PRUNE:
        d = root / rel
        if d.is_dir():
            for child in d.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    for log_file in (root / "var/log").rglob("*"):
        if log_file.is_file():
            log_file.write_bytes(b"")


def _assemble(root: Path, work: Path, plan: recipe.DiskPlan, grub: dict[str, Path], root_uuid: str) -> Path:
    """The raw disk: GPT, core.img in the BIOS boot partition, the ESP and the root file system."""
    bios, esp, rootp = plan.partitions
    esp_img, root_img, raw = work / "esp.img", work / "root.img", work / "disk.raw"
    _sparse_file(esp_img, esp.size)
    run(["mkfs.vfat", "-n", "EFI", str(esp_img)], "mkfs.vfat", _FIX, timeout=120)
    env = {"MTOOLS_SKIP_CHECK": "1"}
    run(["mmd", "-i", str(esp_img), "::/EFI", "::/EFI/BOOT"], "mmd", _FIX, env=env, timeout=60)
    run(["mcopy", "-i", str(esp_img), str(grub["x86_64-efi"]), "::/EFI/BOOT/BOOTX64.EFI"], "mcopy", _FIX,
        env=env, timeout=60)
    _sparse_file(root_img, rootp.size)
    run(["mkfs.ext4", "-q", "-F", "-L", "kvroot", "-U", root_uuid, "-E", "root_owner=0:0", "-d", str(root),
         str(root_img)], "mkfs.ext4 -d", _FIX, timeout=1800)
    _sparse_file(raw, plan.size)
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(raw)], "sfdisk", _FIX, timeout=60,
        stdin=plan.sfdisk_script())
    disk.copy_sparse(esp_img, raw, esp.offset)
    disk.copy_sparse(root_img, raw, rootp.offset)
    core = disk.patch_core(grub["i386-pc"].read_bytes(), bios.start, bios.sectors)
    disk.write_at(raw, bios.offset, core)
    with raw.open("rb") as fh:
        mbr = fh.read(disk.SECTOR)
    disk.write_at(raw, 0, disk.patch_mbr(grub["boot.img"].read_bytes(), mbr, bios.start))
    esp_img.unlink()
    root_img.unlink()
    return raw


def _sparse_file(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        fh.truncate(size)



"""The NoCloud seed ISO: ``cidata.iso`` in the VM folder, volume label ``cidata``, files user-data, meta-data and
(optional) network-config.

Built with ``genisoimage`` (Debian's package of that name; ``mkisofs`` is the same program), with Joliet and Rock
Ridge names, as cloud-image-utils' ``cloud-localds`` does. The files are staged in a private temporary folder off
the datastore; the image is written through a file descriptor opened on a new temporary name in the VM folder
(``O_EXCL``, every component opened from the datastore's root without following a link), then renamed to
``cidata.iso`` through the folder's descriptor.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from kvmotion.agent.context import HostContext, place
from kvmotion.common import confined
from kvmotion.common.errors import ConflictError, KvmotionError, NotFoundError
from kvmotion.models.agent import VMSpec
from kvmotion.models.cloudinit import SEED_LABEL, SeedFiles, seed_path

ISO_TOOLS = ("genisoimage", "mkisofs")
BUILD_TIMEOUT_S = 60


def iso_tool() -> str:
    for name in ISO_TOOLS:
        found = shutil.which(name)
        if found:
            return found
    raise NotFoundError("no ISO builder (genisoimage) on this host: the cloud-init seed cannot be made",
                        remedy="install Debian's genisoimage package on the host (scripts/install.sh does)")


def seed_names(seed: SeedFiles) -> dict[str, str]:
    """File name in the ISO -> text."""
    files = {"user-data": seed.user_data, "meta-data": seed.meta_data}
    if seed.network_config is not None:
        files["network-config"] = seed.network_config
    return files


def build_iso(out_fd: int, files: dict[str, str], label: str = SEED_LABEL) -> None:
    """Write an ISO9660 image (Joliet + Rock Ridge) holding ``files`` to an open file descriptor."""
    tool = iso_tool()
    with tempfile.TemporaryDirectory(prefix="kvmotion-seed-") as stage:
        for name, text in files.items():
            (Path(stage) / name).write_text(text)
        argv = [tool, "-quiet", "-volid", label, "-joliet", "-rock", "-input-charset", "utf-8",
                *(str(Path(stage) / n) for n in files)]
        try:
            res = subprocess.run(argv, stdout=out_fd, stderr=subprocess.PIPE, text=True, timeout=BUILD_TIMEOUT_S,
                                 check=False)
        except subprocess.TimeoutExpired:
            raise ConflictError(f"{Path(tool).name} took more than {BUILD_TIMEOUT_S} s to build the seed ISO",
                                remedy="check the host's load and its datastore") from None
    if res.returncode != 0:
        raise ConflictError(f"{Path(tool).name} could not build the seed ISO: {res.stderr.strip()[-400:]}",
                            remedy="check free space and permissions on the datastore")


def write_seed(ctx: HostContext, spec: VMSpec, seed: SeedFiles) -> Path:
    """``VM/cidata.iso`` on the VM's datastore (confined, no symbolic links), written whole or not at all."""
    final = place(ctx, spec.boot_datastore, seed_path(spec), what="seed ISO")
    if final.stat() is not None:
        raise ConflictError(f"{final} already exists", remedy="remove the leftover VM folder first")
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    fd = tmp.open(os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            build_iso(fd, seed_names(seed))
            os.fsync(fd)
        finally:
            os.close(fd)
        confined.replace_in(final.root, tmp.rel, final.rel)
    except BaseException:
        with contextlib.suppress(OSError, KvmotionError):
            tmp.unlink()
        raise
    return final.path

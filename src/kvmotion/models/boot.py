"""How a VM boots (the test kernel or its own disk; SeaBIOS or OVMF) and where its disk image comes from.

Pure rules shared by the controller's create request, the agent's VM spec and the prechecks.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, Field

BOOT_PATTERN = "^(kernel|disk)$"
FIRMWARE_PATTERN = "^(bios|uefi)$"
CLONE_PATTERN = "^(full|linked)$"
# what ``qemu-img info`` may report for an image we take in (anything else is refused)
IMAGE_FORMATS = ("qcow2", "raw", "vmdk", "vhdx", "vdi")
IMAGE_FORMAT_PATTERN = "^(" + "|".join(IMAGE_FORMATS) + ")$"
# a gateway address (no prefix)
GATEWAY_PATTERN = r"^[0-9A-Fa-f.:]{2,45}$"
# "DATASTORE:path/to/file"
IMAGE_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}:[^\x00-\x1f\x7f]{1,1024}$"
# a library image's name, or "DATASTORE:path/to/file"
IMAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}(?::[^\x00-\x1f\x7f]{1,1024})?$"

NVRAM_FILE = "nvram.fd"               # a UEFI VM's own variable store, in its VM folder
BOOT_FILES = ("vmlinuz", "initrd.img")   # a kernel-boot VM's kernel and initramfs, in its VM folder
OVMF_DIR = "/usr/share/OVMF"          # Debian's ``ovmf`` package
OVMF_CODE = "OVMF_CODE_4M.fd"
OVMF_CODE_SECBOOT = "OVMF_CODE_4M.secboot.fd"
OVMF_VARS = "OVMF_VARS_4M.fd"
OVMF_VARS_MS = "OVMF_VARS_4M.ms.fd"   # Microsoft's keys enrolled: Secure Boot on
OVMF_FILES = (OVMF_CODE, OVMF_CODE_SECBOOT, OVMF_VARS, OVMF_VARS_MS)


def ovmf_code(secure_boot: bool) -> str:
    """The firmware code file (read-only, shared by every VM of a host)."""
    return OVMF_CODE_SECBOOT if secure_boot else OVMF_CODE


def ovmf_vars_template(secure_boot: bool) -> str:
    """The variable store a new UEFI VM's NVRAM starts from."""
    return OVMF_VARS_MS if secure_boot else OVMF_VARS


def boot_problem(boot: str, firmware: str, secure_boot: bool, machine: str) -> str | None:
    """What is wrong with a boot configuration (None: nothing)."""
    if secure_boot and firmware != "uefi":
        return "Secure Boot needs UEFI firmware"
    if secure_boot and not machine.startswith("pc-q35"):
        return "Secure Boot needs a q35 machine type (SMM)"
    return None


def boot_remedy(firmware: str) -> str:
    return "add --firmware uefi, or drop --secure-boot" if firmware != "uefi" else "use the default q35 machine type"


def parse_image_ref(ref: str) -> tuple[str, str]:
    """(datastore, relative path) of "DATASTORE:path/to/file" (checked lexically here, by the agent on disk)."""
    if not re.match(IMAGE_REF_PATTERN, ref):
        raise ValueError(f"image {ref!r} is not DATASTORE:path/to/file")
    datastore, _, path = ref.partition(":")
    return datastore, path


def linked_clone_problem(clone: str, image_datastore: str, vm_datastore: str) -> str | None:
    """A linked clone is an overlay whose backing file is the image: both on one datastore."""
    if clone == "linked" and image_datastore != vm_datastore:
        return (f"a linked clone lives on its image's datastore ({image_datastore}), not on {vm_datastore}: "
                "its backing file must stay reachable wherever the VM runs")
    return None


class ImageSource(BaseModel):
    """A disk image a new VM's boot disk is made from (on a datastore of the VM's host)."""

    datastore: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    path: str = Field(min_length=1, max_length=1024)   # relative to the datastore (the agent confines it)
    clone: str = Field(default="full", pattern=CLONE_PATTERN)


class FirmwareFact(BaseModel):
    """One OVMF file a host has, with its digest (a UEFI VM needs the same code file where it moves)."""

    name: str
    sha256: str
    size_bytes: int = 0

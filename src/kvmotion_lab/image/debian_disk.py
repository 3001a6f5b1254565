"""Assemble a raw GPT disk from partition images without loop devices, and install GRUB's BIOS stage into it.

What ``grub-install --target=i386-pc`` does for a GPT disk, done on a file: GRUB's ``boot.img`` goes into the
first 440 bytes of the protective MBR, told where ``core.img`` starts (``kernel_sector``, offset 0x5c); ``core.img``
goes into the BIOS boot partition, its first sector (``diskboot.img``) told where the rest of it is (the block list
at the end of that sector).  The constants are GRUB's (include/grub/i386/pc/boot.h, grub-core/boot/i386/pc/
diskboot.S, util/setup.c).
"""
from __future__ import annotations

import struct
from pathlib import Path

SECTOR = 512
MBR_CODE_END = 0x1B8          # boot code ends where the disk signature and partition table begin
KERNEL_SECTOR_OFFSET = 0x5C   # GRUB_BOOT_MACHINE_KERNEL_SECTOR: LBA of core.img, 8 bytes
DRIVE_CHECK_OFFSET = 0x66     # GRUB_BOOT_MACHINE_DRIVE_CHECK: a jump NOP'ed for hard disks (as grub-install does)
BLOCKLIST_SIZE = 12           # struct grub_boot_blocklist: u64 start, u16 len, u16 segment
KERNEL_SEGMENT = 0x800 + 0x20  # GRUB_BOOT_I386_PC_KERNEL_SEG + 0x20: where the rest of core.img is loaded
COPY_BLOCK = 1 << 20


def patch_mbr(boot_img: bytes, mbr: bytes, core_lba: int) -> bytes:
    """The new first sector: GRUB's boot code, the existing disk signature and (protective) partition table."""
    if len(boot_img) != SECTOR or len(mbr) != SECTOR:
        raise ValueError(f"boot.img and the MBR must be {SECTOR} bytes, got {len(boot_img)} and {len(mbr)}")
    code = bytearray(boot_img[:MBR_CODE_END])
    code[KERNEL_SECTOR_OFFSET:KERNEL_SECTOR_OFFSET + 8] = struct.pack("<Q", core_lba)
    code[DRIVE_CHECK_OFFSET:DRIVE_CHECK_OFFSET + 2] = b"\x90\x90"
    return bytes(code) + mbr[MBR_CODE_END:]


def patch_core(core_img: bytes, core_lba: int, max_sectors: int) -> bytes:
    """core.img with its first block list pointing at its own sectors 1.. (contiguous, right after sector 0)."""
    sectors = -(-len(core_img) // SECTOR)
    if sectors < 2 or sectors > max_sectors:
        raise ValueError(f"core.img is {sectors} sectors; it must fit the BIOS boot partition ({max_sectors})")
    core = bytearray(core_img.ljust(sectors * SECTOR, b"\0"))
    first = SECTOR - BLOCKLIST_SIZE
    core[first:SECTOR] = struct.pack("<QHH", core_lba + 1, sectors - 1, KERNEL_SEGMENT)
    core[first - BLOCKLIST_SIZE:first] = bytes(BLOCKLIST_SIZE)   # the terminator
    return bytes(core)


def copy_sparse(src: Path, dst: Path, offset: int) -> int:
    """Copy *src* into *dst* at byte *offset*, skipping all-zero blocks (dst is sparse); returns bytes written."""
    written = 0
    zero = bytes(COPY_BLOCK)
    with src.open("rb") as fin, dst.open("r+b") as fout:
        pos = offset
        while block := fin.read(COPY_BLOCK):
            if block != zero[:len(block)]:
                fout.seek(pos)
                fout.write(block)
                written += len(block)
            pos += len(block)
    return written


def write_at(dst: Path, offset: int, data: bytes) -> None:
    with dst.open("r+b") as fout:
        fout.seek(offset)
        fout.write(data)

"""The recipe of the Debian 12 guest disk: packages, files, GRUB configs and the partition plan (pure data).

:mod:`kvmotion_lab.image.debian` builds it.  Everything that shapes the image is here or in
:mod:`kvmotion_lab.image.debian_guest`; :func:`recipe_hash` covers both, so changing any of it rebuilds the image.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

BUILDER_VERSION = 1
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES: tuple[str, ...] = (
    "systemd", "systemd-sysv", "udev", "dbus", "linux-image-cloud-amd64", "grub-pc-bin", "grub-efi-amd64-bin",
    "qemu-guest-agent", "cloud-init", "python3", "python3-cffi-backend", "iproute2",
)
"""``debootstrap --variant=minbase --include=...``: dependencies come along, recommends do not, and virtual
packages are not resolved (python3-cffi-backend provides what python3-cryptography, a cloud-init dependency, needs)."""
GRUB_MODULES_COMMON: tuple[str, ...] = ("part_gpt", "ext2", "search_fs_uuid", "normal", "linux", "serial",
                                        "terminal", "gzio", "echo", "test", "configfile")
GRUB_MODULES: dict[str, tuple[str, ...]] = {
    "i386-pc": ("biosdisk", *GRUB_MODULES_COMMON),
    "x86_64-efi": ("fat", "efi_gop", *GRUB_MODULES_COMMON),
}
KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200 net.ifnames=0"
GUEST_SCRIPT = "/usr/local/lib/kvmotion/kvmotion_guest.py"
SECTOR = 512
MIB_SECTORS = 2048
BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


@dataclass(frozen=True)
class Partition:
    name: str
    start: int     # first sector
    sectors: int
    type_guid: str

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR


@dataclass(frozen=True)
class DiskPlan:
    """GPT: a 1 MiB BIOS boot partition (GRUB's core.img), an ESP, the root file system; 1 MiB aligned."""

    disk_mib: int = 4096
    esp_mib: int = 64

    def __post_init__(self) -> None:
        if self.esp_mib < 33 or self.disk_mib < self.esp_mib + 512:
            raise ValueError(f"disk {self.disk_mib} MiB with ESP {self.esp_mib} MiB: ESP >= 33 MiB, "
                             f"root >= 509 MiB")

    @property
    def size(self) -> int:
        return self.disk_mib * MIB_SECTORS * SECTOR

    @property
    def partitions(self) -> tuple[Partition, Partition, Partition]:
        bios = Partition("bios", MIB_SECTORS, MIB_SECTORS, BIOS_BOOT_GUID)
        esp = Partition("esp", 2 * MIB_SECTORS, self.esp_mib * MIB_SECTORS, ESP_GUID)
        root_start = esp.start + esp.sectors
        root = Partition("root", root_start, self.disk_mib * MIB_SECTORS - root_start - MIB_SECTORS, LINUX_GUID)
        return bios, esp, root

    def sfdisk_script(self) -> str:
        lines = ["label: gpt", "unit: sectors", ""]
        lines += [f"start={p.start}, size={p.sectors}, type={p.type_guid}, name={p.name}" for p in self.partitions]
        return "\n".join(lines) + "\n"


def grub_early_cfg(root_uuid: str) -> str:
    """Embedded in core.img / BOOTX64.EFI: find the root file system, then normal mode reads its grub.cfg."""
    return f"search.fs_uuid {root_uuid} root\nset prefix=($root)/boot/grub\n"


def grub_cfg(root_uuid: str, kernel: str, initrd: str) -> str:
    return (f"serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n"
            f"set timeout=1\nset default=0\n"
            f"menuentry 'Debian GNU/Linux 12 (kvmotion)' {{\n"
            f"    search --no-floppy --fs-uuid --set=root {root_uuid}\n"
            f"    linux /boot/{kernel} root=UUID={root_uuid} ro {KERNEL_CMDLINE}\n"
            f"    initrd /boot/{initrd}\n}}\n")


CLOUD_CFG = """\
# kvmotion: NoCloud seed (a vfat/iso9660 volume labelled cidata) when there is one, else nothing to wait for
datasource_list: [NoCloud, None]
network: {config: disabled}
preserve_hostname: true
manage_etc_hosts: false
locale: false
ssh_genkeytypes: []
ssh_deletekeys: false
"""
DS_IDENTIFY_CFG = "policy: enabled\n"

NET_UNIT = f"""\
[Unit]
Description=kvmotion: static address from SMBIOS OEM strings (kvmotion:ip=, kvmotion:gw=)
DefaultDependencies=no
After=systemd-remount-fs.service
Before=systemd-networkd.service network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/python3 {GUEST_SCRIPT} net

[Install]
WantedBy=systemd-networkd.service
"""

HEARTBEAT_UNIT = f"""\
[Unit]
Description=kvmotion: heartbeat on ttyS0 and HTTP on port 80
After=kvmotion-net.service

[Service]
ExecStart=/usr/bin/python3 {GUEST_SCRIPT} heartbeat
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

DHCP_NETWORK = """\
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
"""

WAIT_ONLINE_DROPIN = """\
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=15
"""


def fstab(root_uuid: str) -> str:
    return f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"


STATIC_FILES: dict[str, str] = {
    "etc/cloud/cloud.cfg.d/90-kvmotion.cfg": CLOUD_CFG,
    "etc/cloud/ds-identify.cfg": DS_IDENTIFY_CFG,
    "etc/systemd/system/kvmotion-net.service": NET_UNIT,
    "etc/systemd/system/kvmotion-heartbeat.service": HEARTBEAT_UNIT,
    "etc/systemd/network/99-kvmotion-dhcp.network": DHCP_NETWORK,
    "etc/systemd/system/systemd-networkd-wait-online.service.d/kvmotion.conf": WAIT_ONLINE_DROPIN,
    "etc/hostname": "kvmotion-debian\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 kvmotion-debian\n",
}
"""Files written into the root file system (path below /: text)."""
ENABLE_UNITS: tuple[str, ...] = ("systemd-networkd", "kvmotion-net", "kvmotion-heartbeat")
MASK_UNITS: tuple[str, ...] = ("serial-getty@ttyS0.service",)
"""ttyS0 is the heartbeat's (as in the tiny guest): a getty there would hang up the heartbeat's open console."""
PRUNE: tuple[str, ...] = ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man",
                          "usr/share/info", "usr/share/locale")
"""Folders emptied before the file system is made (the image stays small)."""


def guest_script_source() -> str:
    return (Path(__file__).parent / "debian_guest.py").read_text()


def recipe_hash() -> str:
    """Hash of everything that defines the image: builder version, suite, packages, files, GRUB, partitions."""
    recipe = {
        "builder": BUILDER_VERSION, "suite": SUITE, "mirror": MIRROR, "packages": list(PACKAGES),
        "grub_modules": {k: list(v) for k, v in GRUB_MODULES.items()}, "cmdline": KERNEL_CMDLINE,
        "files": STATIC_FILES, "enable": list(ENABLE_UNITS), "mask": list(MASK_UNITS), "prune": list(PRUNE),
        "guest_script": guest_script_source(), "plan": DiskPlan().sfdisk_script(),
        "templates": [grub_early_cfg("U"), grub_cfg("U", "K", "I"), fstab("U")],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()

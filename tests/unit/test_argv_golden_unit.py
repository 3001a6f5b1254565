"""The QEMU command line of every device configuration the product supports, pinned in tests/unit/golden/argv/.

One argv element per line; paths that vary per run are normalised (``<DS:name>``, ``<RUN>``, ``<ENCRYPTED>``).
Regenerate after an intended change with ``KVMOTION_UPDATE_GOLDEN=1`` and review the diff.

Post-copy and multifd are set over QMP on both sides (``migrate-set-capabilities``), not on the command line: they
need no configuration of their own here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kvmotion.agent.context import HostContext
from kvmotion.agent.hv.qemu.argv import build_argv
from kvmotion.models.agent import HOST_PASSTHROUGH, CdromSpec, DiskSpec, NicSpec, VMSpec
from kvmotion.models.boot import OVMF_FILES
from kvmotion.models.cloudinit import seed_cdrom

GOLDEN_DIR = Path(__file__).parent / "golden" / "argv"
UPDATE = os.environ.get("KVMOTION_UPDATE_GOLDEN") == "1"
UUID = "6b1f3c0e-9f5a-4d4e-8a55-1c2b3d4e5f60"
KEYS = {"d0": "boot-passphrase", "d1": "data-passphrase"}
LUN = "naa.600140512345678"


def _spec(**kw: object) -> VMSpec:
    return VMSpec.model_validate({"uuid": UUID, "name": "vm1", "boot_datastore": "ds1", "folder": "vm1"} | kw)


def _disk(n: int, **kw: object) -> DiskSpec:
    return DiskSpec.model_validate({"id": f"disk{n}", "node": f"d{n}", "datastore": "ds1",
                                    "path": f"vm1/vm1_{n}.qcow2"} | kw)


def _nic(n: int, portgroup: str = "VM Network") -> NicSpec:
    return NicSpec(id=f"nic{n}", mac=f"52:54:00:00:00:0{n}", portgroup=portgroup)


# name -> (spec, accelerator, with a memory-backing folder)
CONFIGS: dict[str, tuple[VMSpec, str, bool]] = {
    "bios-default": (_spec(), "tcg", False),
    "boot-disk-qcow2": (_spec(disks=[_disk(0)]), "tcg", False),
    "boot-disk-raw": (_spec(disks=[_disk(0, format="raw", path="vm1/vm1_0.img")]), "tcg", False),
    "data-disks": (_spec(disks=[_disk(0), _disk(1, datastore="ds2", path="data/vm1_1.qcow2"),
                                _disk(2, format="raw", path="vm1/vm1_2.img")]), "tcg", False),
    "encrypted-disks": (_spec(disks=[_disk(0, encrypted=True), _disk(1, encrypted=True), _disk(2)]), "tcg", False),
    "raw-lun": (_spec(disks=[_disk(0), _disk(1, kind="rdm", datastore="", path="", identity=LUN)]), "tcg", False),
    "cdrom-iso": (_spec(cdroms=[CdromSpec(media="local", path="iso/tools.iso")]), "tcg", False),
    "cdrom-iso-other-datastore": (_spec(cdroms=[CdromSpec(media="local", path="iso/tools.iso", datastore="ds2")]),
                                  "tcg", False),
    "cdrom-nbd": (_spec(cdroms=[CdromSpec(media="client", nbd="nbd://198.18.0.1:10809/tools")]), "tcg", False),
    "cdrom-empty": (_spec(cdroms=[CdromSpec()]), "tcg", False),
    "cdroms-two": (_spec(cdroms=[CdromSpec(media="local", path="iso/tools.iso"), CdromSpec(id="cd1")]), "tcg", False),
    "nic-one": (_spec(nics=[_nic(0)]), "tcg", False),
    "nics-several": (_spec(nics=[_nic(0), _nic(1, "Storage"), _nic(2, "Backup")]), "tcg", False),
    "evc-cpu-model": (_spec(cpu_model="Westmere", cpu_mask=["avx", "pcid"], cpu_enforce=True), "tcg", False),
    "host-passthrough-tcg": (_spec(cpu_model=HOST_PASSTHROUGH), "tcg", False),
    "host-passthrough-kvm": (_spec(cpu_model=HOST_PASSTHROUGH), "kvm", False),
    "kvm": (_spec(memory_mb=1024, vcpus=2, disks=[_disk(0)], nics=[_nic(0)]), "kvm", False),
    "tcg-memory-backing": (_spec(memory_mb=512), "tcg", True),
    "kvm-memory-backing": (_spec(memory_mb=512), "kvm", True),
    "guest-cmdline": (_spec(guest_ip="198.18.1.100/24", dirty_mb_s=2.5, extra_cmdline="kvmotion.probe=1",
                            machine="pc-i440fx-7.2"), "tcg", False),
    "everything": (_spec(memory_mb=2048, vcpus=4, cpu_model="Westmere", cpu_mask=["avx"], guest_ip="198.18.1.100/24",
                         disks=[_disk(0, encrypted=True), _disk(1, format="raw", path="vm1/vm1_1.img"),
                                _disk(2, kind="rdm", datastore="", path="", identity=LUN)],
                         cdroms=[CdromSpec(media="local", path="iso/tools.iso"),
                                 CdromSpec(id="cd1", media="client", nbd="nbd://[2001:db8::1]:10809/x")],
                         nics=[_nic(0), _nic(1, "Storage")]), "kvm", True),
    # more devices: disks on three buses at fixed units, two NICs (one on a VLAN port group), topology, machine
    "devices-3disk-2nic-vlan": (_spec(vcpus=4, sockets=2, cores=2, threads=1, guest_ip="198.18.1.100/24",
                                      disks=[_disk(0), _disk(1, bus="virtio-scsi", unit=0),
                                             _disk(2, bus="sata", unit=0, format="raw", path="vm1/vm1_2.img")],
                                      nics=[_nic(0), _nic(1, "VLAN 100")]), "tcg", False),
    "devices-scsi-hotplugged": (_spec(scsi_controller=True, disks=[_disk(0), _disk(3, bus="virtio-scsi", unit=1)],
                                      nics=[_nic(0)]), "tcg", False),
    "devices-i440fx-e1000e": (_spec(machine="pc-i440fx-7.2", vcpus=2, sockets=1, cores=1, threads=2,
                                    disks=[_disk(0, bus="sata", unit=0)],
                                    nics=[NicSpec(id="nic0", mac="52:54:00:00:00:00", model="e1000e")]), "kvm", False),
    # a VM booting its own disk: no kernel, disk0 first, its address as SMBIOS OEM strings (type 11)
    "disk-boot-bios": (_spec(boot="disk", guest_ip="198.18.1.100/24", gateway="198.18.1.1",
                             disks=[_disk(0)], nics=[_nic(0)]), "tcg", False),
    "disk-boot-uefi": (_spec(boot="disk", firmware="uefi", guest_ip="198.18.1.100/24", nics=[_nic(0)],
                             disks=[_disk(0, backing="images/debian-12.qcow2", backing_format="qcow2")]), "kvm", False),
    # cloud-init: the seed ISO in the VM folder on cd0, naming no datastore (it follows the folder)
    "cloud-init-seed": (_spec(boot="disk", guest_ip="198.18.1.100/24", disks=[_disk(0)], nics=[_nic(0)],
                              cdroms=[seed_cdrom("vm1")]), "tcg", False),
    "uefi-secure-boot": (_spec(boot="disk", firmware="uefi", secure_boot=True, guest_ip="198.18.1.100/24",
                               gateway="198.18.1.1", disks=[_disk(0)], nics=[_nic(0)]), "kvm", True),
    # host cache modes: automatic (disk0 on local ds1: writeback; disk1 on shared ds2: none; the LUN: none), and
    # each mode set on a disk, a linked clone's base included
    "disk-cache-modes": (_spec(scsi_controller=True, disks=[
        _disk(0), _disk(1, datastore="ds2"), _disk(2, kind="rdm", datastore="", path="", identity=LUN),
        _disk(3, cache="none", backing="images/debian-12.qcow2", backing_format="qcow2"),
        _disk(4, cache="directsync", datastore="ds2", bus="virtio-scsi", unit=0),
        _disk(5, cache="writethrough", bus="sata", unit=0), _disk(6, cache="writeback", datastore="ds2"),
        _disk(7, cache="unsafe", format="raw", path="vm1/vm1_7.img")]), "tcg", False),
}


def _host(root: Path, name: str, accelerator: str, swap: bool) -> HostContext:
    """A host whose datastores ds1 (local) and ds2 (shared) are mounted under ``root`` (another place on every
    host)."""
    stores = {ds: root / f"mnt-{ds}" for ds in ("ds1", "ds2")}
    for path in stores.values():
        (path / "iso").mkdir(parents=True, exist_ok=True)
        (path / "iso" / "tools.iso").write_bytes(b"iso")
        (path / "vm1").mkdir(exist_ok=True)
        (path / "vm1" / "cidata.iso").write_bytes(b"seed")
    lun = root / "dev-sdx"
    lun.touch()
    ovmf = root / "ovmf"
    ovmf.mkdir(exist_ok=True)
    for name in OVMF_FILES:
        (ovmf / name).write_bytes(b"fd")
    return HostContext(name, accelerator, stores, {"VM Network": "br0", "Storage": "br1", "Backup": "br2", "VLAN 100": "br0"},
                       "host" if accelerator == "kvm" else "max", {LUN: lun}, root / "swap" if swap else None, ovmf,
                       shared_datastores=frozenset({"ds2"}))


def _argv(root: Path, host: str, config: str, incoming: bool) -> list[str]:
    spec, accelerator, swap = CONFIGS[config]
    ctx = _host(root / host, host, accelerator, swap)
    run = root / host / "run"
    run.mkdir(parents=True, exist_ok=True)
    return normalise(build_argv(spec, ctx, run, incoming, dict(KEYS)), ctx, run)


def normalise(argv: list[str], ctx: HostContext, run: Path) -> list[str]:
    """Host paths by role, and the random parts of encrypted secrets."""
    swaps = [(str(run), "<RUN>")] + [(str(p.resolve()), f"<DS:{n}>") for n, p in ctx.datastore_paths.items()]
    swaps += [(str(p), f"<LUN:{i}>") for i, p in ctx.luns.items()]
    if ctx.swap_dir is not None:
        swaps.append((str(ctx.swap_dir), "<SWAP>"))
    swaps.append((str(ctx.firmware_dir), "<OVMF>"))
    out = []
    for arg in argv:
        for old, new in swaps:
            arg = arg.replace(old, new)
        out.append(re.sub(r"data=[^,]+,keyid=(\S+?),iv=[^,]+,", r"data=<ENCRYPTED>,keyid=\1,iv=<IV>,", arg))
    return out


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_argv_matches_its_golden_file(config: str, tmp_path: Path) -> None:
    argv = _argv(tmp_path, "h1", config, incoming=False)
    golden = GOLDEN_DIR / f"{config}.txt"
    text = "\n".join(argv) + "\n"
    if UPDATE:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file for {config}: run with KVMOTION_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"argv of {config} changed: review, then KVMOTION_UPDATE_GOLDEN=1"


def test_every_golden_file_has_a_configuration() -> None:
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.txt")) == sorted(CONFIGS)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_shadow_on_another_host_runs_the_same_argv_but_incoming(config: str, tmp_path: Path) -> None:
    source = _argv(tmp_path, "h1", config, incoming=False)
    shadow = _argv(tmp_path, "h2", config, incoming=True)
    assert shadow[-3:] == ["-incoming", "defer", "-S"]
    assert shadow[:-3] == source

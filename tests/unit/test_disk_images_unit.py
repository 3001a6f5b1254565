"""Boot configuration and disk-image provisioning decisions: spec validation, clone sizing, what counts as an image,
the linked-clone datastore rule and the confinement of image paths (all refused before any tool runs)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from kvmotion.agent import diskimage
from kvmotion.agent.context import HostContext
from kvmotion.common.errors import InvalidInputError, NotFoundError
from kvmotion.models.agent import DiskSpec, ImageSource, VMSpec
from kvmotion.models.api import VMCreate
from kvmotion.models.boot import linked_clone_problem, ovmf_code, ovmf_vars_template, parse_image_ref

MIB = 1 << 20


def _spec(**kw: object) -> VMSpec:
    return VMSpec.model_validate({"uuid": "u1", "name": "vm1", "boot_datastore": "ds1", "folder": "vm1"} | kw)


def test_defaults_keep_the_tiny_guest_as_it_is() -> None:
    spec = _spec()
    assert (spec.boot, spec.firmware, spec.secure_boot, spec.gateway) == ("kernel", "bios", False, None)


def test_an_old_recorded_spec_still_loads() -> None:
    old = _spec().model_dump()
    for field in ("boot", "firmware", "secure_boot", "gateway"):
        old.pop(field)
    assert VMSpec.model_validate(old).firmware == "bios"


@pytest.mark.parametrize("kw", [{"secure_boot": True}, {"secure_boot": True, "firmware": "bios"},
                                {"secure_boot": True, "firmware": "uefi", "machine": "pc-i440fx-7.2"},
                                {"firmware": "efi"}, {"boot": "cdrom"}, {"gateway": "198.18.1.1/24"}])
def test_bad_boot_configurations_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _spec(**kw)


def test_secure_boot_uses_the_secboot_code_and_microsoft_keys() -> None:
    assert _spec(firmware="uefi", secure_boot=True, boot="disk").secure_boot
    assert (ovmf_code(True), ovmf_vars_template(True)) == ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd")
    assert (ovmf_code(False), ovmf_vars_template(False)) == ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd")


def _create(**kw: object) -> VMCreate:
    return VMCreate.model_validate({"name": "vm1", "host": "h1"} | kw)


def test_create_request_image_fields() -> None:
    req = _create(image="ds1:images/debian-12.qcow2", clone="linked", firmware="uefi", disk_size_gb=4)
    assert req.boot_mode == "disk"
    assert req.image_source() == ImageSource(datastore="ds1", path="images/debian-12.qcow2", clone="linked")
    assert _create().boot_mode == "kernel" and _create().image_source() is None


@pytest.mark.parametrize("kw", [{"secure_boot": True}, {"clone": "linked"}, {"image": "images/x.qcow2"},
                                {"image": "ds1:/etc/passwd"}, {"image": "ds1:../other/x.img"},
                                {"image": "ds1:a\nb"}, {"clone": "thin", "image": "ds1:x.img"},
                                {"image": "ds1:x.img", "disk_size_gb": 0}])
def test_create_request_refuses(kw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _create(**kw)


def test_image_reference_parsing() -> None:
    assert parse_image_ref("ds-1:dir/with:colon.img") == ("ds-1", "dir/with:colon.img")
    with pytest.raises(ValueError):
        parse_image_ref("no-datastore")


def test_a_linked_clone_stays_on_its_images_datastore() -> None:
    assert linked_clone_problem("linked", "ds1", "ds1") is None
    assert linked_clone_problem("full", "ds1", "ds2") is None
    assert "ds1" in (linked_clone_problem("linked", "ds1", "ds2") or "")


@pytest.mark.parametrize("virtual, wanted, size, grow", [(100 * MIB, 1, 100, False), (100 * MIB, 200, 200, True),
                                                         (100 * MIB + 1, 1, 101, False), (100 * MIB, 100, 100, False)])
def test_a_clone_is_grown_never_shrunk(virtual: int, wanted: int, size: int, grow: bool) -> None:
    plan = diskimage.plan_size(virtual, wanted)
    assert (plan.size_mb, plan.grow) == (size, grow)


@pytest.mark.parametrize("info, size, ok", [
    ({"format": "qcow2", "virtual-size": MIB}, 4096, True),
    ({"format": "vmdk", "virtual-size": MIB}, 4096, True),
    ({"format": "raw", "virtual-size": MIB}, MIB, True),
    ({"format": "raw", "virtual-size": 6}, 6, False),                # a text file qemu-img calls "raw"
    ({"format": "raw", "virtual-size": 0}, 0, False),
    ({"format": "qed", "virtual-size": MIB}, 4096, False),
    ({"format": "qcow2", "virtual-size": MIB, "backing-filename": "/etc/x"}, 4096, False),
    ({"format": "qcow2"}, 4096, False),
])
def test_what_counts_as_an_image(info: dict[str, object], size: int, ok: bool) -> None:
    assert (diskimage.format_problem(info, size) is None) == ok


def _ctx(tmp_path: Path) -> HostContext:
    stores = {ds: tmp_path / ds for ds in ("ds1", "ds2")}
    for p in stores.values():
        (p / "images").mkdir(parents=True)
    (stores["ds1"] / "images" / "base.qcow2").write_bytes(b"x" * 512)
    os.symlink("/etc/passwd", stores["ds1"] / "images" / "out.img")
    os.symlink("base.qcow2", stores["ds1"] / "images" / "in.qcow2")
    return HostContext("h1", "tcg", stores, {})


@pytest.mark.parametrize("path, error", [("images/missing.qcow2", NotFoundError),
                                         ("../ds2/images/x", InvalidInputError), ("/etc/passwd", InvalidInputError), ("images/out.img", InvalidInputError),
                                         ("images/in.qcow2", InvalidInputError), ("images", InvalidInputError)])
def test_image_paths_are_confined_to_their_datastore(tmp_path: Path, path: str, error: type[Exception]) -> None:
    ctx = _ctx(tmp_path)
    with pytest.raises(error):
        diskimage.clone(ctx, ImageSource(datastore="ds1", path=path),
                        DiskSpec(datastore="ds1", path="vm1/vm1.qcow2"))
    assert not (tmp_path / "ds1" / "vm1" / "vm1.qcow2").exists()


def test_a_linked_clone_across_datastores_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    with pytest.raises(InvalidInputError, match="ds1"):
        diskimage.clone(ctx, ImageSource(datastore="ds1", path="images/base.qcow2", clone="linked"),
                        DiskSpec(datastore="ds2", path="vm1/vm1.qcow2"))
    with pytest.raises(InvalidInputError, match="qcow2"):
        diskimage.clone(ctx, ImageSource(datastore="ds1", path="images/base.qcow2", clone="linked"),
                        DiskSpec(datastore="ds1", path="vm1/vm1.raw", format="raw"))
    assert not (tmp_path / "ds2" / "vm1").exists()


def test_an_existing_target_is_never_overwritten(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    (tmp_path / "ds1" / "vm1").mkdir()
    (tmp_path / "ds1" / "vm1" / "vm1.qcow2").write_bytes(b"mine")
    with pytest.raises(Exception, match="already exists"):
        diskimage.clone(ctx, ImageSource(datastore="ds1", path="images/base.qcow2"),
                        DiskSpec(datastore="ds1", path="vm1/vm1.qcow2"))
    assert (tmp_path / "ds1" / "vm1" / "vm1.qcow2").read_bytes() == b"mine"


def _linked_vm(**kw: object) -> VMSpec:
    return _spec(boot="disk", firmware="uefi", boot_datastore="ds1", disks=[DiskSpec(
        datastore="ds1", path="vm1/vm1.qcow2", backing="images/debian.qcow2", backing_format="qcow2")], **kw)


def test_the_vm_folder_moves_with_its_nvram_and_without_a_kernel_it_does_not_boot() -> None:
    from kvmotion.agent.storage import HOME_FILES, home_names
    assert home_names(_spec()) == ("vmlinuz", "initrd.img")
    assert home_names(_linked_vm()) == ("nvram.fd",)
    assert home_names(_spec(boot="disk")) == ()
    assert "nvram.fd" in HOME_FILES


@pytest.mark.parametrize("power, host, ds, flattened", [
    ("poweredOn", None, "ds2", ["disk0"]),        # Storage vMotion: the full mirror copies the base in
    ("poweredOn", "h2", "ds2", ["disk0"]),        # shared-nothing
    ("poweredOff", "h2", "ds2", ["disk0"]),       # cold: qemu-img convert reads through the base
    ("poweredOn", "h2", None, []),                # vMotion on shared storage: the overlay and its base stay
])
def test_a_linked_clone_that_gets_new_files_is_flattened(power: str, host: str | None, ds: str | None,
                                                        flattened: list[str]) -> None:
    from kvmotion.migration import relocate
    reloc = relocate.plan(_linked_vm(), power, "h1", host, ds, {}, None, {"ds1", "ds2"})
    assert reloc.flattened == flattened
    moved = reloc.after.disks[0]
    assert (moved.backing is None) == bool(flattened)
    assert reloc.after.firmware == "uefi"

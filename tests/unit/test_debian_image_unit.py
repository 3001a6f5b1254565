"""The pure parts of the Debian guest image: recipe hash, partition plan, GRUB patching, OEM strings, configs."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kvmotion_lab.image import debian_disk as disk
from kvmotion_lab.image import debian_guest as guest
from kvmotion_lab.image import debian_recipe as recipe


def test_recipe_hash_is_stable_and_follows_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    h = recipe.recipe_hash()
    assert h == recipe.recipe_hash() and len(h) == 64
    monkeypatch.setattr(recipe, "PACKAGES", (*recipe.PACKAGES, "vim"))
    assert recipe.recipe_hash() != h
    monkeypatch.undo()
    monkeypatch.setattr(recipe, "guest_script_source", lambda: "print('other')\n")
    assert recipe.recipe_hash() != h


def test_recipe_hash_covers_the_unit_files(monkeypatch: pytest.MonkeyPatch) -> None:
    h = recipe.recipe_hash()
    files = dict(recipe.STATIC_FILES)
    files["etc/systemd/system/kvmotion-heartbeat.service"] += "# changed\n"
    monkeypatch.setattr(recipe, "STATIC_FILES", files)
    assert recipe.recipe_hash() != h


def test_partition_plan_is_aligned_ordered_and_leaves_room_for_the_backup_gpt() -> None:
    plan = recipe.DiskPlan(disk_mib=4096, esp_mib=64)
    bios, esp, root = plan.partitions
    assert [p.type_guid for p in plan.partitions] == [recipe.BIOS_BOOT_GUID, recipe.ESP_GUID, recipe.LINUX_GUID]
    for p in plan.partitions:
        assert p.start % recipe.MIB_SECTORS == 0 and p.sectors > 0
    assert bios.start == 2048 and bios.size == 1 << 20
    assert esp.start == bios.start + bios.sectors and esp.size == 64 << 20
    assert root.start == esp.start + esp.sectors
    assert (root.start + root.sectors) * recipe.SECTOR <= plan.size - 33 * recipe.SECTOR  # backup GPT fits
    assert plan.size == 4096 << 20


def test_partition_plan_sfdisk_script() -> None:
    text = recipe.DiskPlan().sfdisk_script()
    assert text.startswith("label: gpt\n")
    assert "start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name=bios" in text
    assert text.count("start=") == 3


@pytest.mark.parametrize("disk_mib,esp_mib", [(4096, 16), (300, 64)])
def test_partition_plan_refuses_what_cannot_work(disk_mib: int, esp_mib: int) -> None:
    with pytest.raises(ValueError):
        recipe.DiskPlan(disk_mib=disk_mib, esp_mib=esp_mib)


def test_patch_mbr_keeps_the_partition_table_and_points_at_core() -> None:
    boot = bytes(range(256)) * 2
    mbr = bytes(440) + b"\xaa" * 70 + b"\x55\xaa"
    out = disk.patch_mbr(boot, mbr, 2048)
    assert len(out) == 512 and out[440:] == mbr[440:]
    assert struct.unpack_from("<Q", out, 0x5C)[0] == 2048
    assert out[0x66:0x68] == b"\x90\x90"
    assert out[:0x5C] == boot[:0x5C]


def test_patch_core_block_list() -> None:
    core = b"\x01" * (512 * 40 + 100)   # 41 sectors
    out = disk.patch_core(core, 2048, 2048)
    assert len(out) == 41 * 512
    start, length, seg = struct.unpack_from("<QHH", out, 500)
    assert (start, length, seg) == (2049, 40, 0x820)
    assert out[488:500] == bytes(12)
    assert out[512:] == core[512:].ljust(40 * 512, b"\0")
    with pytest.raises(ValueError):
        disk.patch_core(core, 2048, 40)


def test_copy_sparse_skips_zero_blocks(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(bytes(disk.COPY_BLOCK) + b"x" * 10)
    dst.write_bytes(b"y" * (disk.COPY_BLOCK * 3))
    assert disk.copy_sparse(src, dst, 512) == 10
    data = dst.read_bytes()
    assert data[:512 + disk.COPY_BLOCK] == b"y" * (512 + disk.COPY_BLOCK)   # the zero block was not written
    assert data[512 + disk.COPY_BLOCK:512 + disk.COPY_BLOCK + 10] == b"x" * 10


def _type11(*strings: str) -> bytes:
    return bytes([11, 5, 0x00, 0x0B, len(strings)]) + b"".join(s.encode() + b"\0" for s in strings) + b"\0"


def test_oem_strings_parse_and_settings() -> None:
    raw = _type11("kvmotion:ip=198.18.1.5/16", "vendor thing", "kvmotion:gw=198.18.0.1", "kvmotion:hostname=vm1")
    strings = guest.parse_oem_raw(raw)
    assert strings == ["kvmotion:ip=198.18.1.5/16", "vendor thing", "kvmotion:gw=198.18.0.1", "kvmotion:hostname=vm1"]
    assert guest.oem_settings(strings) == {"ip": "198.18.1.5/16", "gw": "198.18.0.1", "hostname": "vm1"}
    assert guest.parse_oem_raw(b"\x01\x05\x00\x00\x01a\0\0") == []    # not type 11
    assert guest.parse_oem_raw(b"") == []


def test_read_oem_strings_from_every_type11_entry(tmp_path: Path) -> None:
    for i, s in enumerate(("kvmotion:ip=10.0.0.2", "kvmotion:dirty=20")):
        (tmp_path / f"11-{i}").mkdir()
        (tmp_path / f"11-{i}" / "raw").write_bytes(_type11(s))
    assert guest.read_oem_strings(str(tmp_path / "11-*" / "raw")) == ["kvmotion:ip=10.0.0.2", "kvmotion:dirty=20"]


def test_static_network_rendering() -> None:
    text = guest.render_static_network({"ip": "198.18.1.5/16", "gw": "198.18.0.1", "dns": "198.18.0.1,1.1.1.1"})
    assert text is not None
    assert "Address=198.18.1.5/16\n" in text and "Gateway=198.18.0.1\n" in text
    assert "DNS=198.18.0.1\nDNS=1.1.1.1\n" in text and "Name=en* eth*" in text
    assert "Address=10.1.2.3/24" in (guest.render_static_network({"ip": "10.1.2.3"}) or "")
    assert guest.render_static_network({}) is None
    with pytest.raises(ValueError):
        guest.render_static_network({"ip": "300.1.1.1/16"})


def test_cloud_init_config_never_waits_for_a_datasource() -> None:
    cfg = recipe.STATIC_FILES["etc/cloud/cloud.cfg.d/90-kvmotion.cfg"]
    assert "datasource_list: [NoCloud, None]" in cfg and "network: {config: disabled}" in cfg
    assert recipe.STATIC_FILES["etc/cloud/ds-identify.cfg"] == "policy: enabled\n"


def test_grub_configs() -> None:
    early = recipe.grub_early_cfg("1234")
    assert "search.fs_uuid 1234 root" in early and "set prefix=($root)/boot/grub" in early
    cfg = recipe.grub_cfg("1234", "vmlinuz-6.1", "initrd.img-6.1")
    assert "serial --unit=0 --speed=115200" in cfg and "set timeout=1" in cfg
    assert "linux /boot/vmlinuz-6.1 root=UUID=1234 ro console=tty0 console=ttyS0,115200" in cfg
    assert "initrd /boot/initrd.img-6.1" in cfg
    assert set(recipe.GRUB_MODULES) == {"i386-pc", "x86_64-efi"} and "biosdisk" in recipe.GRUB_MODULES["i386-pc"]


def test_heartbeat_contract_fields() -> None:
    g = guest.Guest.__new__(guest.Guest)
    g.boot_id, g.dirty, g.seq, g.dirtied_mb, g.ip, g.cloud_init = "b", 0.0, 3, 1.5, "10.0.0.2", "done"
    g.smbios_uuid, g.smbios_serial, g.macs = "u", "s", ["52:54:00:00:00:01"]
    beat = g.beat()
    for key in ("seq", "uptime", "boot_id", "hostname", "dirty_mb_s", "dirtied_mb", "ip", "records_acked",
                "smbios_uuid", "smbios_serial", "macs"):
        assert key in beat
    assert beat["seq"] == 3 and beat["dirtied_mb"] == 1


def test_bank_commits_each_transfer_once_and_keeps_the_total(tmp_path: Path) -> None:
    bank = guest.Bank(str(tmp_path / "bank.db"))
    first = bank.tx("c1", 1)
    assert bank.tx("c1", 1) == first                   # a retried transaction is not applied twice
    for seq in range(2, 40):
        bank.tx("c1", seq)
    bank.tx("c2", 1)
    seen = bank.check("c1")
    assert seen["seqs"] == list(range(1, 40))
    assert seen["rows"] == 40
    assert seen["total"] == seen["expected_total"] == guest.BANK_ACCOUNTS * guest.BANK_OPENING
    assert seen["quick_check"] == "ok"
    assert guest.Bank(str(tmp_path / "bank.db")).check("c2")["seqs"] == [1]     # reopening keeps the ledger


def test_efivar_names_are_confined() -> None:
    assert guest.efivar_path("KvmotionProbe").endswith("KvmotionProbe-" + guest.KVMOTION_VENDOR)
    for bad in ("", "../x", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            guest.efivar_path(bad)


def test_query_strings_are_parsed() -> None:
    assert guest._query("/bank/tx?client=a&seq=3") == ("/bank/tx", {"client": "a", "seq": "3"})
    assert guest._query("/heartbeat") == ("/heartbeat", {})

"""CPU catalog (real QEMU, TCG) and raw-LUN identity (real losetup)."""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest

from kvmotion.agent.blockdev import (
    BlockDeviceFact, LoopDevice, device_identity, presented_devices, resolve_identity,
)
from kvmotion.agent.cpu import (
    CpuCatalog, canonical_feature, catalog_from_json, catalog_to_json, evc_baselines, feature_names,
    probe_cpu_catalog,
)
from kvmotion.common.errors import InvalidInputError
from labtools import record_figure

MASK = {"avx2", "sse4.2"}
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None,
                                reason="needs root and losetup")


def _qemu_children() -> set[str]:
    return {p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).startswith(b"qemu-system")
            and b"kvmotion-cpuprobe-" in _cmdline(p)}


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def catalogs() -> tuple[CpuCatalog, CpuCatalog, float]:
    before = _qemu_children()
    t0 = time.monotonic()
    full = asyncio.run(probe_cpu_catalog("tcg", deadline_s=30))
    took = time.monotonic() - t0
    masked = asyncio.run(probe_cpu_catalog("tcg", mask=MASK, deadline_s=30))
    assert _qemu_children() - before == set(), "the probe left its QEMU running"
    print(f"\nprobe_cpu_catalog('tcg') took {took:.3f}s")
    return full, masked, took


@needs_qemu
def test_full_catalog(catalogs: tuple[CpuCatalog, CpuCatalog, float]) -> None:
    full, _, took = catalogs                     # the probe's own 30 s deadline guards against a hang
    record_figure("probe_cpu_catalog('tcg')", took, "s")
    assert full.accelerator == "tcg" and full.host_model == "max"
    assert {"qemu64", "Nehalem"} <= set(full.usable_models())
    assert "Haswell" not in full.models          # TCG 7.2 lacks features Haswell needs
    assert {"sse2", "avx2", "sse4.2", "lm"} <= full.host_features
    assert not {"check", "enforce", "migratable", "pmu", "l3-cache", "tcg-cpuid", "kvm"} & full.host_features
    assert not any(f.startswith(("hv-", "kvm-", "x-")) for f in full.host_features)
    assert full.masked == frozenset()
    assert full.expand("host-passthrough") == full.expand("max") == full.host_features


@needs_qemu
def test_expand(catalogs: tuple[CpuCatalog, CpuCatalog, float]) -> None:
    full, _, _ = catalogs
    q64 = full.expand("qemu64")
    assert "sse2" in q64 and "sse4.1" not in q64 and q64 <= full.host_features
    assert "sse4.1" in full.expand("Nehalem")
    assert "sse4.1" not in full.expand("Nehalem", minus=["sse4.1"])
    assert "sse4.1" not in full.expand("Nehalem", minus=["sse4_1"])      # aliases work
    assert full.expand("qemu64", minus=["sse3"]) == q64 - {"pni"}       # sse3 is QEMU's "pni"
    assert full.expand("qemu64", minus=["svm"]) == q64 - {"svm"}
    assert not {"svm", "npt", "vgif"} & full.expand("max", minus=["svm"])   # SVM sub-features go too
    assert full.expand("Nehalem") == full.expand("Nehalem-v1")
    with pytest.raises(InvalidInputError) as err:
        full.expand("Haswell")
    assert err.value.remedy
    with pytest.raises(InvalidInputError):
        full.expand("no-such-cpu")
    assert full.cpu_option("qemu64", ["sse3"]) == "qemu64,-pni"


@needs_qemu
def test_mask(catalogs: tuple[CpuCatalog, CpuCatalog, float]) -> None:
    full, masked, _ = catalogs
    assert masked.masked == frozenset(MASK)
    assert not MASK & masked.host_features
    assert masked.host_features == full.host_features - MASK
    # Nehalem and Westmere carry sse4.2 under TCG 7.2, so the mask drops them; qemu64 stays.
    assert "sse4.2" in full.models["Nehalem"]
    assert not {"Nehalem", "Nehalem-v1", "Westmere", "max"} & set(masked.models)
    assert "qemu64" in masked.models and masked.expand("qemu64") == full.expand("qemu64")
    assert all(not f & MASK for f in masked.models.values())
    with pytest.raises(InvalidInputError):
        masked.expand("Nehalem")
    assert masked.cpu_option("host-passthrough") == "max,-avx2,-sse4.2"
    with pytest.raises(InvalidInputError):
        asyncio.run(probe_cpu_catalog("tcg", mask=["avx3"]))
    with pytest.raises(InvalidInputError):
        asyncio.run(probe_cpu_catalog("hvf"))


@needs_qemu
def test_evc_baselines(catalogs: tuple[CpuCatalog, CpuCatalog, float]) -> None:
    full, masked, _ = catalogs
    both = evc_baselines([full, masked])
    assert both and set(both) <= set(full.models) & set(masked.models)
    assert "Nehalem" not in both and "Westmere" not in both
    assert "Nehalem" in evc_baselines([full])
    assert not {"max", "host", "base"} & set(both)
    assert "qemu64" in both and "qemu64-v1" not in both
    assert not any(n.endswith("-v1") for n in both)
    sizes = [len(full.models[n]) for n in both]
    assert sizes == sorted(sizes, reverse=True)
    assert both[-1] == "486"
    assert evc_baselines([]) == []


@needs_qemu
def test_json_round_trip(catalogs: tuple[CpuCatalog, CpuCatalog, float]) -> None:
    for cat in catalogs[:2]:
        again = catalog_from_json(catalog_to_json(cat))
        assert again == cat and isinstance(again.host_features, frozenset)
        assert again.expand("qemu64") == cat.expand("qemu64")
    with pytest.raises(InvalidInputError):
        catalog_from_json('{"accelerator": "tcg"}')
    with pytest.raises(InvalidInputError):
        catalog_from_json("not json")


def test_feature_names_unit() -> None:
    props = {"sse2": True, "sse3": True, "pni": True, "sse4_1": True, "avx": False, "check": True,
             "enforce": False, "kvm": True, "kvm-pv-eoi": True, "kvmclock": True, "hv-relaxed": True,
             "x-migrate-smi-count": True, "fill-mtrr-mask": True, "migratable": True, "pmu": True,
             "family": 6, "model-id": "x", "lahf_lm": True}
    assert feature_names(props) == {"sse2", "pni", "sse4.1", "lahf-lm"}
    assert canonical_feature("sse4-2") == "sse4.2" and canonical_feature("xd") == "nx"


@needs_root
def test_loop_identity(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    l1, l2, l3 = LoopDevice(), LoopDevice(), LoopDevice()
    try:
        d1 = l1.create(a, 8)
        d2 = l2.create(a, 8)
        d3 = l3.create(b, 4)
        assert len({d1, d2, d3}) == 3
        st = a.stat()
        assert device_identity(d1) == device_identity(d2) == f"loop-backing:{st.st_dev}:{st.st_ino}"
        assert device_identity(d3) is not None and device_identity(d3) != device_identity(d1)
        link = tmp_path / "lun0"
        link.symlink_to(d1)
        assert device_identity(link) == device_identity(d1)
        facts = presented_devices([link, d3, tmp_path / "missing", a])
        assert facts[0] == BlockDeviceFact(str(link), device_identity(d1), 8 * 1024 * 1024, "loop")
        assert facts[1].size_bytes == 4 * 1024 * 1024 and facts[1].kind == "loop"
        assert facts[2] == BlockDeviceFact(str(tmp_path / "missing"), None, 0, "unknown")
        assert facts[3].identity is None and facts[3].kind == "unknown"   # a regular file is no LUN
        ident_b = device_identity(d3)
        assert ident_b is not None
        assert resolve_identity(ident_b, [link, d3]) == d3
        assert resolve_identity(ident_b, [link, d2]) is None
        assert resolve_identity(device_identity(d1) or "", [d3, link]) == link
        # Same path, different file: not the same LUN any more.
        l3.detach()
        b.rename(tmp_path / "b.old")   # keep the old inode alive so the new file cannot reuse it
        l3.create(b, 4)
        assert l3.device is not None and device_identity(l3.device) != ident_b
    finally:
        for loop in (l3, l2, l1):
            loop.detach()
    assert l1.device is None and device_identity(d1) != f"loop-backing:{st.st_dev}:{st.st_ino}"


@needs_root
def test_loop_context_manager(tmp_path: Path) -> None:
    with LoopDevice(tmp_path / "c.img", 2) as loop:
        assert loop.device is not None and loop.identity == device_identity(loop.device)
        dev = loop.device
    assert device_identity(dev) != loop.identity
    assert device_identity(Path("/nonexistent")) is None
    with pytest.raises(InvalidInputError):
        LoopDevice().create(tmp_path / "absent.img")

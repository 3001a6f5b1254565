"""Disk cache modes: QEMU's -drive cache= as -blockdev options on every node of a disk, automatic by datastore
(none when shared, writeback when local), storage-move targets opened as a restart there would, the parsers, and
the change of a powered-off VM's disk (the precheck finding: test_checks_unit)."""
from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from kvmotion.agent.context import HostContext
from kvmotion.agent.hv.qemu.argv import device_props, disk_device, disk_node
from kvmotion.agent.hv.qemu.mirror import target_blockdev
from kvmotion.cli.devices import parse_cache, parse_disk
from kvmotion.common.errors import InvalidInputError, NotFoundError, WrongState
from kvmotion.controller import devices
from kvmotion.controller.db import VM, Host
from kvmotion.controller.service import Controller
from kvmotion.models.agent import DatastoreFact, DiskSpec, DiskTarget, HostFacts, VMSpec
from kvmotion.models.api import VMCreate
from kvmotion.models.devices import DiskCacheRequest, DiskRequest

pytestmark = pytest.mark.unit

# What QEMU 7.2's bdrv_parse_cache_mode makes of -drive cache=MODE: BDRV_O_NOCACHE (cache.direct), BDRV_O_NO_FLUSH
# (cache.no-flush), and writethrough (the device's write cache off). Written out here, not taken from argv.py.
QEMU_DRIVE_CACHE = {
    "none": ({"direct": True, "no-flush": False}, "on"),
    "directsync": ({"direct": True, "no-flush": False}, "off"),
    "writethrough": ({"direct": False, "no-flush": False}, "off"),
    "writeback": ({"direct": False, "no-flush": False}, "on"),
    "unsafe": ({"direct": False, "no-flush": True}, "on"),
}


def _host(tmp_path: Path, shared: frozenset[str] = frozenset({"shared"})) -> HostContext:
    stores = {ds: tmp_path / ds for ds in ("shared", "local")}
    for p in stores.values():
        (p / "v").mkdir(parents=True, exist_ok=True)
    lun = tmp_path / "dev-sdx"
    lun.touch()
    return HostContext("h1", "tcg", stores, {}, luns={"naa.1": lun}, shared_datastores=shared)


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    """A -blockdev tree's nodes: the format node and every child (file, backing, the backing's file)."""
    out = [node]
    for child in ("file", "backing"):
        if isinstance(node.get(child), dict):
            out += _nodes(node[child])
    return out


def _disk(**kw: Any) -> DiskSpec:
    return DiskSpec.model_validate({"datastore": "local", "path": "v/v.qcow2"} | kw)


@pytest.mark.parametrize("mode", sorted(QEMU_DRIVE_CACHE))
@pytest.mark.parametrize("datastore", ["shared", "local"])
def test_each_mode_is_what_qemu_drive_cache_would_open(tmp_path: Path, mode: str, datastore: str) -> None:
    cache, wce = QEMU_DRIVE_CACHE[mode]
    disk = _disk(datastore=datastore, cache=mode, backing="v/base.qcow2", backing_format="qcow2")
    nodes = _nodes(disk_node(disk, _host(tmp_path)))
    assert len(nodes) == 4                                        # qcow2, its file, the base, the base's file
    assert [n["cache"] for n in nodes] == [cache] * 4             # a set mode does not depend on the datastore
    assert device_props(disk_device(disk))["write-cache"] == wce


def test_automatic_is_none_on_a_shared_datastore_and_writeback_on_a_local_one(tmp_path: Path) -> None:
    ctx = _host(tmp_path)
    shared, local = disk_node(_disk(datastore="shared"), ctx), disk_node(_disk(), ctx)
    assert [n["cache"] for n in _nodes(shared)] == [QEMU_DRIVE_CACHE["none"][0]] * 2
    assert [n["cache"] for n in _nodes(local)] == [QEMU_DRIVE_CACHE["writeback"][0]] * 2
    assert [n["cache"] for n in _nodes(disk_node(_disk(datastore="shared"), _host(tmp_path, frozenset())))] == \
        [QEMU_DRIVE_CACHE["writeback"][0]] * 2                   # the same datastore, its marker not shared
    lun = disk_node(_disk(kind="rdm", datastore="", path="", identity="naa.1"), ctx)
    assert [(n["driver"], n["cache"]) for n in _nodes(lun)] == [("raw", QEMU_DRIVE_CACHE["none"][0]),
                                                                ("host_device", QEMU_DRIVE_CACHE["none"][0])]
    # the guest sees its write cache on either way: a VM moved between a local and a shared datastore keeps it
    assert "write-cache=on" in disk_device(_disk()) and "write-cache=on" in disk_device(_disk(datastore="shared"))


def test_a_storage_move_target_opens_as_a_restart_on_the_target_datastore(tmp_path: Path) -> None:
    vm = SimpleNamespace(ctx=_host(tmp_path))

    def target(disk: DiskSpec, datastore: str) -> dict[str, Any]:
        t = DiskTarget(disk_id=disk.id, datastore=datastore, path="v/new.qcow2", format="qcow2")
        return target_blockdev(vm, disk, t, "d0-t")              # type: ignore[arg-type]

    auto = _disk()
    assert [n["cache"] for n in _nodes(target(auto, "shared"))] == [QEMU_DRIVE_CACHE["none"][0]] * 2
    assert [n["cache"] for n in _nodes(target(auto, "local"))] == [QEMU_DRIVE_CACHE["writeback"][0]] * 2
    ws = _disk(cache="writethrough")
    assert [n["cache"] for n in _nodes(target(ws, "shared"))] == [QEMU_DRIVE_CACHE["writethrough"][0]] * 2
    restart = disk_node(auto.model_copy(update={"datastore": "shared", "path": "v/new.qcow2"}), vm.ctx)
    assert target(auto, "shared")["cache"] == restart["cache"]
    nbd = DiskTarget(disk_id="disk0", kind="nbd", nbd_host="198.19.0.12", nbd_port=10809, export="disk0")
    assert "cache" not in target_blockdev(vm, auto, nbd, "d0-t", "tls0")   # type: ignore[arg-type]


def test_the_spec_and_requests_take_the_five_modes_and_auto() -> None:
    assert DiskSpec().cache is None
    for mode in QEMU_DRIVE_CACHE:
        assert DiskSpec(cache=mode).cache == mode
    for bad in ("auto", "off", "direct", ""):
        with pytest.raises(ValidationError):
            DiskSpec(cache=bad)
    assert DiskRequest(size_gb=1).cache == "auto" and DiskCacheRequest(cache="none").cache == "none"
    with pytest.raises(ValidationError):
        DiskRequest(size_gb=1, cache="fast")
    with pytest.raises(ValidationError):
        VMCreate(name="v", host="h1", disk_cache="nocache")
    disks: list[DiskSpec] = []
    made = [devices.make_disk(DiskRequest(size_gb=1, cache=c), "v", "shared", ["shared"], "h1", disks)
            for c in ("auto", "directsync")]
    assert [d.cache for d in made] == [None, "directsync"]


def test_the_cli_parses_cache_in_disk_options_and_refuses_a_bad_one() -> None:
    assert parse_disk("size=2,cache=none") == {"size_gb": 2, "cache": "none"}
    assert parse_disk("size=2,datastore=shared,cache=WriteBack")["cache"] == "writeback"
    assert parse_cache("auto") == "auto"
    with pytest.raises(InvalidInputError) as exc:
        parse_disk("size=2,cache=fast")
    assert "'fast' is not a cache mode" in exc.value.message
    assert "none, directsync, writethrough, writeback, unsafe" in exc.value.remedy
    with pytest.raises(InvalidInputError, match="--disk-cache: cache 'off'"):
        parse_cache("off", "--disk-cache")


# -- a powered-off VM's disk cache, set through the controller ----------------------------------------------------
def _facts() -> HostFacts:
    return HostFacts(name="h1", agent_version="0", qemu_version="7.2", accelerator="tcg", cpu_model="x",
                     cpu_features=[], cpu_count=2, mem_total_mb=4096, mem_free_mb=4096, mgmt_address="198.18.0.11",
                     mgmt_family="ipv4", migration_interfaces=[], portgroups=[],
                     datastores=[DatastoreFact(uuid="u", name="shared", path="/ds", readable=True, shared=True)])


@pytest.fixture()
def ctl(tmp_path: Path, db_url: str) -> Controller:
    c = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    disks = [DiskSpec(datastore="shared", path="v/v.qcow2"), DiskSpec(id="disk1", node="d1", datastore="shared",
                                                                       path="v/v-1.qcow2", cache="writeback")]
    with c.sessions.begin() as s:
        s.add(Host(name="h1", address="http://127.0.0.1:9", facts_json=_facts().model_dump_json()))
        for uuid, name, power in (("u-1", "off1", "poweredOff"), ("u-2", "on1", "poweredOn")):
            spec = VMSpec(uuid=uuid, name=name, boot_datastore="shared", folder=name, disks=disks)
            s.add(VM(uuid=uuid, name=name, host="h1", power_state=power, spec_json=spec.model_dump_json()))
    return c


def test_a_disk_cache_changes_only_while_the_vm_is_off(ctl: Controller) -> None:
    dev = devices.Devices(ctl.inventory)
    out = asyncio.run(dev.set_disk_cache("off1", "disk1", DiskCacheRequest(cache="none")))
    assert [d["cache"] for d in out.spec["disks"]] == [None, "none"]
    out = asyncio.run(dev.set_disk_cache("off1", "1", DiskCacheRequest(cache="auto")))    # by index; auto clears
    assert [d["cache"] for d in out.spec["disks"]] == [None, None]
    with pytest.raises(WrongState, match="powered on"):
        asyncio.run(dev.set_disk_cache("on1", "disk1", DiskCacheRequest(cache="none")))
    assert VMSpec.model_validate(ctl.inventory.get_vm("on1").spec).disks[1].cache == "writeback"
    with pytest.raises(NotFoundError, match="has no disk 'disk9'"):
        asyncio.run(dev.set_disk_cache("off1", "disk9", DiskCacheRequest(cache="none")))


def test_vm_create_sets_the_boot_and_data_disks_cache(ctl: Controller) -> None:
    req = VMCreate(name="v", host="h1", data_disk_mb=8, disk_cache="writeback")
    disks = ctl.inventory._new_disks(req, "u-3", "shared", ["shared"], _facts())
    assert [(d.id, d.cache) for d in disks] == [("disk0", "writeback"), ("disk1", "writeback")]
    auto = ctl.inventory._new_disks(VMCreate(name="v", host="h1"), "u-3", "shared", ["shared"], _facts())
    assert [d.cache for d in auto] == [None]

"""Each compatibility finding, created for real in a 3-host lab (h3 is managed over IPv6)."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from kvmotion.agent.blockdev import LoopDevice
from kvmotion.cli.client import Client
from kvmotion_lab import lab as lab_mod
from kvmotion_lab import scenario
from kvmotion_lab.netns import netns_exec_argv
from labtools import (agent_vms, assert_guest_survived, cli, codes, host_settings, http_beat, remove_vm,
                     running_lab, running_vm, wait_for)


@pytest.fixture(scope="module")
def lab(guest_image):
    os.environ["KVMOTION_DATASTORE_MIGRATION_LIMIT"] = "1"     # the controller reads it at start: 1 instead of 128
    try:
        with running_lab(guest_image, 3, ipv6_hosts=frozenset({"h3"})) as info:
            yield info
    finally:
        os.environ.pop("KVMOTION_DATASTORE_MIGRATION_LIMIT", None)


@pytest.fixture(scope="module")
def client(lab) -> Client:
    return Client(lab.controller_url)


@pytest.fixture(scope="module")
def vm1(lab, client):
    vm = running_vm(client, lab, "chk1")
    yield vm
    remove_vm(client, "chk1")


def validate(client: Client, vm: str, host: str) -> dict[str, dict]:
    return codes(client.validate(vm, host))


def assert_finding(found: dict[str, dict], code: str, severity: str, remedy_part: str) -> None:
    assert code in found, list(found)
    assert found[code]["severity"] == severity, found[code]
    assert remedy_part in found[code]["remedy"], found[code]


def test_clean_move_has_no_errors(client, vm1) -> None:
    found = validate(client, "chk1", "h2")
    assert [c for c, f in found.items() if f["severity"] == "error"] == []
    assert_finding(found, "SINGLE_MIGRATION_INTERFACE", "info", "second migration interface")


def test_host_local_iso_blocks_and_client_media_does_not(lab, client, vm1, tmp_path) -> None:
    # an ISO path is relative to a datastore (default: the VM's); this one is on h1's local datastore, which h2
    # does not see (an ISO on the shared datastore moves with the VM: test_cloud_init_e2e)
    iso = lab.root / "ds" / "h1-local" / "iso" / "tools.iso"
    iso.parent.mkdir(parents=True, exist_ok=True)
    iso.write_bytes(os.urandom(2 * 1024 * 1024))
    res = cli(lab, "vm", "cdrom", "connect", "chk1", "--iso", "iso/tools.iso", "--datastore", "h1-local")
    assert res.returncode == 0, res.stderr
    assert_finding(validate(client, "chk1", "h2"), "LOCAL_MEDIA_CONNECTED", "error", "cdrom disconnect chk1")
    res = cli(lab, "vm", "migrate", "chk1", "--host", "h2")
    assert res.returncode == 3 and "LOCAL_MEDIA_CONNECTED" in res.stderr
    res = cli(lab, "vm", "migrate", "chk1", "--host", "h2", "--check")           # prints, runs nothing
    assert res.returncode == 3 and "LOCAL_MEDIA_CONNECTED" in res.stdout
    assert cli(lab, "vm", "cdrom", "disconnect", "chk1").returncode == 0        # the remedy, followed
    assert "LOCAL_MEDIA_CONNECTED" not in validate(client, "chk1", "h2")
    assert cli(lab, "vm", "migrate", "chk1", "--host", "h2", "--check").returncode == 0
    # client media: the admin's workstation (root namespace) exports the image over NBD
    pidfile = tmp_path / "nbd.pid"
    subprocess.run(["qemu-nbd", "-r", "-t", "-e", "4", "-x", "tools", "-f", "raw", "-b", lab.net.controller_ip, "-p", "10809",
                    "--fork", "--pid-file", str(pidfile), str(iso)], check=True, timeout=20)
    try:
        url = f"nbd://{lab.net.controller_ip}:10809/tools"
        assert cli(lab, "vm", "cdrom", "connect", "chk1", "--nbd", url).returncode == 0
        found = validate(client, "chk1", "h2")
        assert_finding(found, "CLIENT_MEDIA_CONNECTED", "info", "nothing to do")
        assert not [c for c, f in found.items() if f["severity"] == "error"]
        before = http_beat(lab, client, "chk1")
        move = scenario.migrate_with_probe(client, lab.net, "chk1", vm1["spec"]["guest_ip"], "h2",
                                           tmp_path / "p.jsonl", settle_s=0.5)
        assert move.ok, move.task.get("error")                               # client media moved with the VM
        after = assert_guest_survived(lab, client, "chk1", before)
        assert client.vm("chk1")["spec"]["cdroms"][0]["media"] == "client"
        assert cli(lab, "vm", "cdrom", "disconnect", "chk1").returncode == 0
        back = client.migrate("chk1", "h1")
        assert scenario.follow_task(client, back["id"])["state"] == "success"
        assert_guest_survived(lab, client, "chk1", after)
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        iso.unlink(missing_ok=True)


def test_datastore_hidden_from_destination(lab, client, vm1) -> None:
    with host_settings(lab, "h2", datastores=[Path(lab.root) / "ds" / "h2-local"]):
        assert_finding(validate(client, "chk1", "h2"), "DATASTORE_NOT_ACCESSIBLE", "error", "mount shared on h2")
    assert "DATASTORE_NOT_ACCESSIBLE" not in validate(client, "chk1", "h2")


def test_slow_declared_link(lab, client, vm1) -> None:
    with host_settings(lab, "h2", declared_link_mbps={"mig0": 100}):
        found = validate(client, "chk1", "h2")
        assert_finding(found, "LINK_TOO_SLOW", "error", "faster migration interface")
        assert "100 Mbit/s" in found["LINK_TOO_SLOW"]["message"]


def test_no_migration_interface(lab, client, vm1) -> None:
    with host_settings(lab, "h2", migration_interfaces=["mig9"]):
        assert_finding(validate(client, "chk1", "h2"), "NO_MIGRATION_INTERFACE", "error", "enable migration")


def test_ipv4_to_ipv6_managed_host_is_refused(client, vm1) -> None:
    h3 = client.host("h3")
    assert h3["facts"]["mgmt_family"] == "ipv6" and h3["state"] == "connected"
    assert_finding(validate(client, "chk1", "h3"), "MGMT_IP_FAMILY_MISMATCH", "error", "same management IP family")


def test_missing_bridge(lab, client) -> None:
    ns = lab.net.host("h1").netns
    subprocess.run(netns_exec_argv(ns, ["ip", "link", "add", "name", "br-bk", "type", "bridge"]), check=True)
    try:
        subprocess.run(netns_exec_argv(ns, ["ip", "link", "set", "br-bk", "alias", "Backup Network", "up"]),
                       check=True)
        client.host("h1")                                                   # refresh its facts
        client.create_vm(name="bk1", host="h1", network="Backup Network")
        client.start_vm("bk1")
        assert_finding(validate(client, "bk1", "h2"), "PORTGROUP_MISSING", "error", "create 'Backup Network' on h2")
        remove_vm(client, "bk1")
    finally:
        subprocess.run(netns_exec_argv(ns, ["ip", "link", "del", "br-bk"]), check=False)


def test_maintenance_and_concurrency(lab, client, vm1) -> None:
    assert cli(lab, "host", "maintenance", "enter", "h2", "--wait").returncode == 0
    try:
        assert_finding(validate(client, "chk1", "h2"), "HOST_IN_MAINTENANCE", "error", "maintenance exit h2")
    finally:
        assert cli(lab, "host", "maintenance", "exit", "h2").returncode == 0
    # a migration that cannot converge stays in flight: the VM is busy, and the datastore is at its limit (1 here)
    running_vm(client, lab, "busy1", dirty_mb_s=20)
    before = http_beat(lab, client, "busy1")
    task = client.migrate("busy1", "h2", max_bandwidth_mbps=40)
    try:
        wait_for(lambda: client.task(task["id"])["phase"] == "precopy", what="pre-copy")
        assert_finding(validate(client, "busy1", "h2"), "VM_ALREADY_MIGRATING", "error", "wait for its current task")
        assert_finding(validate(client, "chk1", "h2"), "DATASTORE_CONCURRENCY_LIMIT", "warning", "starts when a slot")
    finally:
        res = cli(lab, "task", "cancel", task["id"])
        assert res.returncode == 0, res.stdout + res.stderr
    t = client.task(task["id"])
    assert t["state"] == "error" and "cancelled" in t["error"]["message"] and t["error"]["rollback"]["source_running"]
    assert_guest_survived(lab, client, "busy1", before)                   # the cancelled move left it unharmed
    remove_vm(client, "busy1")


def test_destination_not_connected(lab, client, vm1) -> None:
    pid = lab_mod.load(lab.root).pids["agent-h2"]
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: "HOST_NOT_CONNECTED" in validate(client, "chk1", "h2"), what="h2 disconnected")
        assert_finding(validate(client, "chk1", "h2"), "HOST_NOT_CONNECTED", "error", "start kvmotion-agent on h2")
    finally:
        lab_mod.restart(lab.root, "agent-h2")
        wait_for(lambda: client.host("h2")["state"] == "connected", what="h2 back")


def test_swap_location_warns_and_the_move_still_runs(lab, client, vm1, tmp_path) -> None:
    swap = Path(lab.root) / "hosts" / "h2" / "swap"
    with host_settings(lab, "h2", swap_dir=swap):
        found = validate(client, "chk1", "h2")
        assert_finding(found, "SWAP_LOCATION_DIFFERS", "warning", "slower")
        before = http_beat(lab, client, "chk1")
        res = cli(lab, "vm", "migrate", "chk1", "--host", "h2")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "SWAP_LOCATION_DIFFERS" in res.stdout                         # shown, and it went on
        assert (swap / f"{vm1['uuid']}.ram").exists()                       # the destination backs RAM there
        after = assert_guest_survived(lab, client, "chk1", before)
        assert scenario.follow_task(client, client.migrate("chk1", "h1")["id"])["state"] == "success"
        assert_guest_survived(lab, client, "chk1", after)


def test_raw_lun_must_be_the_same_device(lab, client, tmp_path) -> None:
    root = Path(lab.root)
    a, b = tmp_path / "lun-a.img", tmp_path / "lun-b.img"
    with LoopDevice(a, 16) as la, LoopDevice(b, 16) as lb, LoopDevice(a, 16) as la2:
        for host, dev in (("h1", la.device), ("h2", lb.device)):
            (root / "hosts" / host / "dev").mkdir(exist_ok=True)
            (root / "hosts" / host / "dev" / "lun0").symlink_to(dev)
        h1_lun = root / "hosts" / "h1" / "dev" / "lun0"
        with host_settings(lab, "h1", block_devices=[h1_lun]), \
                host_settings(lab, "h2", block_devices=[root / "hosts" / "h2" / "dev" / "lun0"]):
            running_vm(client, lab, "rdm1", rdm=str(h1_lun))
            found = validate(client, "rdm1", "h2")
            assert_finding(found, "RDM_DEVICE_NOT_VISIBLE", "error", "present the same LUN to h2")
            assert "different device" in found["RDM_DEVICE_NOT_VISIBLE"]["message"]   # same name, other LUN
            (root / "hosts" / "h2" / "dev" / "lun1").symlink_to(la2.device)         # the same LUN, presented
            with host_settings(lab, "h2", block_devices=[root / "hosts" / "h2" / "dev" / "lun1"]):
                assert "RDM_DEVICE_NOT_VISIBLE" not in validate(client, "rdm1", "h2")
                before = http_beat(lab, client, "rdm1")
                t = scenario.follow_task(client, client.migrate("rdm1", "h2")["id"])
                assert t["state"] == "success", t.get("error")
                assert_guest_survived(lab, client, "rdm1", before)
                remove_vm(client, "rdm1")


def test_cpu_features_and_evc(lab, client) -> None:
    with host_settings(lab, "h2", cpu_feature_mask=["avx2", "sse4.2"]):       # lab setting: an older CPU
        running_vm(client, lab, "cpu1", cpu_model="Nehalem")
        running_vm(client, lab, "pt1", cpu_model="host-passthrough")
        assert_finding(validate(client, "cpu1", "h2"), "CPU_FEATURES_MISSING", "error", "EVC cluster baseline")
        assert "sse4.2" in validate(client, "cpu1", "h2")["CPU_FEATURES_MISSING"]["message"]
        assert_finding(validate(client, "pt1", "h2"), "CPU_PASSTHROUGH_MISMATCH", "error", "EVC cluster")
        # EVC: a baseline both hosts support; a host without the cluster's baseline cannot join
        assert cli(lab, "cluster", "create", "strict", "--evc", "Nehalem").returncode == 0
        assert cli(lab, "cluster", "add-host", "strict", "h1").returncode == 0
        res = cli(lab, "cluster", "add-host", "strict", "h2")
        assert res.returncode == 2 and "does not support" in res.stderr
        assert cli(lab, "cluster", "create", "c1").returncode == 0
        for h in ("h1", "h2"):
            client.cluster_add_host("c1", h)
        modes = client.evc_modes("c1")
        assert "Nehalem" not in modes and "qemu64" in modes
        assert client.set_evc("c1", modes[0])["evc_mode"] == modes[0]
        client.stop_vm("pt1")
        client.start_vm("pt1")                                              # powered on in the EVC cluster
        vm = client.vm("pt1")
        assert vm["spec"]["cpu_model"] == modes[0] and vm["spec"]["cpu_enforce"] is True
        before = scenario.wait_guest(lab.net.client_netns, vm["spec"]["guest_ip"])
        found = validate(client, "pt1", "h2")
        assert not {"CPU_FEATURES_MISSING", "CPU_PASSTHROUGH_MISMATCH"} & set(found)
        t = scenario.follow_task(client, client.migrate("pt1", "h2")["id"])
        assert t["state"] == "success", t.get("error")
        assert_guest_survived(lab, client, "pt1", before)          # the EVC baseline's CPU runs on the older host
        for name in ("cpu1", "pt1"):
            remove_vm(client, name)


O_DIRECT = 0o40000          # x86-64 (asm-generic/fcntl.h)


def disk_fd_flags(lab, host: str, uuid: str, image: Path) -> list[int]:
    """The open flags (/proc/PID/fdinfo) of every descriptor the VM's QEMU on ``host`` holds on ``image``."""
    pid = agent_vms(lab, host)[uuid]["pid"]
    flags = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == str(image.resolve()):
                flags.append(int(Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split("flags:")[1].split()[0], 8))
        except (OSError, IndexError):
            continue
    return flags


def test_disk_cache_none_on_shared_storage_and_the_unsafe_mode_blocks(lab, client) -> None:
    # a disk on the shared datastore with cache=writeback: the host page cache, refused for a live move
    vm = running_vm(client, lab, "cache1", datastore="shared", disk_cache="writeback")
    disk = vm["spec"]["disks"][0]
    image = Path(lab.root) / "ds" / "shared" / disk["path"]
    assert disk["cache"] == "writeback"
    flags = disk_fd_flags(lab, "h1", vm["uuid"], image)
    assert flags and not any(f & O_DIRECT for f in flags), [oct(f) for f in flags]
    found = validate(client, "cache1", "h2")
    assert_finding(found, "DISK_CACHE_UNSAFE", "error", "kvmotion vm disk cache cache1 disk0 none")
    message = found["DISK_CACHE_UNSAFE"]["message"]
    assert "disk0" in message and "cache=writeback" in message
    res = cli(lab, "vm", "migrate", "cache1", "--host", "h2")
    assert res.returncode == 3 and "DISK_CACHE_UNSAFE" in res.stderr, res.stdout + res.stderr
    # the remedy: power-cycle with the automatic mode (none on a shared datastore), then it moves
    client.stop_vm("cache1")
    res = cli(lab, "vm", "disk", "cache", "cache1", "disk0", "auto")
    assert res.returncode == 0 and "cache auto" in res.stdout, res.stdout + res.stderr
    client.start_vm("cache1")
    before = http_beat(lab, client, "cache1")
    flags = disk_fd_flags(lab, "h1", vm["uuid"], image)
    assert flags and all(f & O_DIRECT for f in flags), [oct(f) for f in flags]
    assert "DISK_CACHE_UNSAFE" not in validate(client, "cache1", "h2")
    t = scenario.follow_task(client, client.migrate("cache1", "h2")["id"])
    assert t["state"] == "success", t.get("error")
    assert_guest_survived(lab, client, "cache1", before)
    flags = disk_fd_flags(lab, "h2", vm["uuid"], image)                  # the destination opened it the same way
    assert flags and all(f & O_DIRECT for f in flags), [oct(f) for f in flags]
    remove_vm(client, "cache1")


def test_every_problem_in_one_request(lab, client) -> None:
    client.create_vm(name="bad1", host="h1", datastore="h1-local", memory_mb=60000)    # powered off
    (lab.root / "ds" / "h1-local" / "bad1" / "x.iso").write_bytes(b"\0" * 65536)     # ISO paths: datastore-relative
    client.cdrom("bad1", "cd0", "local", path="bad1/x.iso")
    res = cli(lab, "vm", "migrate", "bad1", "--host", "h3")
    assert res.returncode == 3
    # powered off, so this is a cold migration: what blocks it is where its files are
    assert "DATASTORE_NOT_ACCESSIBLE" in res.stderr and "--datastore" in res.stderr, res.stderr
    found = {f["code"] for f in client.validate("bad1", "h3")}
    assert "DATASTORE_NOT_ACCESSIBLE" in found and "VM_NOT_RUNNING" not in found
    assert [t for t in client.tasks() if t["vm_name"] == "bad1"] == []       # nothing was started
    client.delete_vm("bad1")

"""The compatibility checks as pure functions: every code, and every finding at once."""
from __future__ import annotations

from kvmotion.checks import CODES, HostView, MigrationContext, run_all
from kvmotion.models.agent import (BlockDeviceFact, CdromSpec, CpuFact, DatastoreFact, DiskSpec, HostFacts,
                                   MigrationInterface, NicSpec, PortGroupFact, TlsFact, VMSpec)
from kvmotion.models.boot import FirmwareFact

UEFI = dict(boot="disk", firmware="uefi")


def with_firmware(f: HostFacts, digests: dict[str, str] | None = None) -> HostFacts:
    """Host facts with OVMF files (file name -> sha256)."""
    f.firmware = [FirmwareFact(name=n, sha256=d, size_bytes=4 << 20) for n, d in (digests or {}).items()]
    return f


def spec(**kw) -> VMSpec:
    base = dict(uuid="u1", name="vm1", memory_mb=256, disks=[DiskSpec(datastore="shared", path="vm1/vm1.qcow2")],
                nics=[NicSpec(mac="52:54:00:00:00:01")], boot_datastore="shared", folder="vm1",
                cdroms=[CdromSpec()])
    base.update(kw)
    return VMSpec(**base)


def facts(name: str, datastores=("shared",), free_mb=4096, groups=("VM Network",), speed=10000, family="ipv4",
          ifaces=1, features=("sse2", "sse4.2", "avx2"), luns=(), swap="vm-folder", tls=True,
          shared=("shared",)) -> HostFacts:
    return HostFacts(
        name=name, agent_version="0", qemu_version="7.2", accelerator="tcg", cpu_model="x", cpu_features=[],
        cpu_count=2, mem_total_mb=8192, mem_free_mb=free_mb, mgmt_address="198.18.0.12" if family == "ipv4"
        else "2001:2::12", mgmt_family=family,
        datastores=[DatastoreFact(uuid=f"id-{d}", name=d, path=f"/ds/{d}", readable=True, shared=d in shared)
                    for d in datastores],
        portgroups=[PortGroupFact(name=g, bridge="vmnet") for g in groups],
        migration_interfaces=[MigrationInterface(ifname=f"mig{i}", address=f"198.19.{i}.12", family="ipv4",
                                                 speed_mbps=speed) for i in range(ifaces)],
        cpu=CpuFact(host_model="max", host_features=list(features), usable_models=["qemu64"]),
        block_devices=[BlockDeviceFact(path=p, identity=i) for p, i in luns], swap_location=swap,
        tls=TlsFact(supported=tls))


def with_machines(f: HostFacts, *types: str) -> HostFacts:
    f.machine_types = list(types)
    return f


def with_vlan(f: HostFacts, name: str = "VLAN 100", vlan: int = 100) -> HostFacts:
    """Host facts with a VLAN port group on the VM bridge."""
    f.portgroups.append(PortGroupFact(name=name, bridge="vmnet", vlan=vlan))
    return f


VLAN_VM = dict(nics=[NicSpec(mac="52:54:00:00:00:01"), NicSpec(id="nic1", mac="52:54:00:00:00:02",
                                                                portgroup="VLAN 100")])


def ctx(vm: VMSpec | None = None, src: HostFacts | None = None, dst: HostFacts | None = None, **kw) -> MigrationContext:
    d = dict(power_state="poweredOn", vm_cpu_features=frozenset({"sse2"}))
    d.update(kw)
    src_view = HostView("h1", "connected", False, src or facts("h1"), d.pop("src_running", 0))
    dst_view = HostView(d.pop("dst_name", "h2"), d.pop("dst_state", "connected"), d.pop("maintenance", False),
                        dst or facts("h2"), d.pop("dst_running", 0))
    return MigrationContext(spec=vm or spec(), source=src_view, destination=dst_view, **d)


def codes(c: MigrationContext) -> set[str]:
    return {f.code for f in run_all(c)}


def test_a_good_move_has_only_the_interface_advice() -> None:
    assert codes(ctx()) == {"SINGLE_MIGRATION_INTERFACE"}
    assert codes(ctx(src=facts("h1", ifaces=2), dst=facts("h2", ifaces=2))) == set()


def test_each_code_on_its_own() -> None:
    cases = {
        "SAME_HOST": ctx(dst_name="h1"),
        "VM_NOT_RUNNING": ctx(power_state="poweredOff"),
        "VM_ALREADY_MIGRATING": ctx(vm_migrating=True),
        "HOST_NOT_CONNECTED": ctx(dst_state="disconnected"),
        "HOST_IN_MAINTENANCE": ctx(maintenance=True),
        "DATASTORE_NOT_ACCESSIBLE": ctx(dst=facts("h2", datastores=("h2-local",))),
        "DATASTORE_CONCURRENCY_LIMIT": ctx(datastore_migrations={"shared": 128}),
        "RDM_DEVICE_NOT_VISIBLE": ctx(vm=spec(disks=[DiskSpec(id="disk1", kind="rdm", identity="loop:1:2")]),
                                      src=facts("h1", luns=[("/h1/lun0", "loop:1:2")]),
                                      dst=facts("h2", luns=[("/h2/lun0", "loop:9:9")])),
        "DISK_CACHE_UNSAFE": ctx(vm=spec(disks=[DiskSpec(datastore="shared", path="vm1/vm1.qcow2",
                                                         cache="writeback")])),
        "FIRMWARE_MISSING": ctx(vm=spec(**UEFI), src=with_firmware(facts("h1"), {"OVMF_CODE_4M.fd": "a"}),
                                dst=with_firmware(facts("h2"))),
        "FIRMWARE_MISMATCH": ctx(vm=spec(**UEFI), src=with_firmware(facts("h1"), {"OVMF_CODE_4M.fd": "a"}),
                                 dst=with_firmware(facts("h2"), {"OVMF_CODE_4M.fd": "b"})),
        "LOCAL_MEDIA_CONNECTED": ctx(vm=spec(cdroms=[CdromSpec(media="local", path="iso/x.iso", datastore="h1-local")])),
        "CLIENT_MEDIA_CONNECTED": ctx(vm=spec(cdroms=[CdromSpec(media="client", nbd="nbd://198.18.0.1:10809/x")])),
        "SWAP_LOCATION_DIFFERS": ctx(dst=facts("h2", swap="/swap")),
        "NO_MIGRATION_INTERFACE": ctx(dst=facts("h2", ifaces=0)),
        "MGMT_IP_FAMILY_MISMATCH": ctx(dst=facts("h2", family="ipv6")),
        "LINK_TOO_SLOW": ctx(dst=facts("h2", speed=100)),
        "HOST_CONCURRENCY_LIMIT": ctx(dst_running=8),
        "SINGLE_MIGRATION_INTERFACE": ctx(),
        "CPU_FEATURES_MISSING": ctx(vm_cpu_features=frozenset({"sse2", "avx512f"})),
        "CPU_PASSTHROUGH_MISMATCH": ctx(vm=spec(cpu_model="host-passthrough"), dst=facts("h2", features=("sse2",))),
        "ENCRYPTION_UNSUPPORTED": ctx(vm=spec(encrypted_vmotion="required"), dst=facts("h2", tls=False)),
        "ENCRYPTION_FALLBACK": ctx(dst=facts("h2", tls=False)),
        "PORTGROUP_MISSING": ctx(dst=facts("h2", groups=("Other",))),
        "PORTGROUP_VLAN_MISSING": ctx(vm=spec(**VLAN_VM), src=with_vlan(facts("h1"))),
        "PORTGROUP_VLAN_MISMATCH": ctx(vm=spec(**VLAN_VM), src=with_vlan(facts("h1")),
                                       dst=with_vlan(facts("h2"), vlan=200)),
        "MACHINE_TYPE_UNSUPPORTED": ctx(vm=spec(machine="pc-q35-7.2"), dst=with_machines(facts("h2"), "pc-q35-6.2")),
        "INSUFFICIENT_MEMORY": ctx(dst=facts("h2", free_mb=100)),
        "VM_POWERED_ON": ctx(kind="cold"),
        "NOTHING_TO_MOVE": ctx(kind="svmotion", dst_name="h1"),
        "DATASTORE_SPACE": ctx(kind="svmotion", dst_name="h1", required_mb={"shared": 100}, moved_disks=("disk0",)),
        "DISK_FORMAT_UNSUPPORTED": ctx(kind="svmotion", dst_name="h1", moved_disks=("disk0",), target_spec=spec(
            disks=[DiskSpec(datastore="shared", path="vm1/vm1.raw", format="raw", encrypted=True)])),
        "RDM_STAYS": ctx(kind="xvmotion", moved_disks=("disk0",), vm=spec(disks=[
            DiskSpec(datastore="shared", path="vm1/vm1.qcow2"), DiskSpec(id="disk1", kind="rdm", identity="l:1")]),
            src=facts("h1", luns=[("/l", "l:1")]), dst=facts("h2", luns=[("/l", "l:1")])),
    }
    from_predictor = {"CONVERGENCE_PREDICTED", "CONVERGENCE_UNLIKELY"}     # see test_predict_unit
    after_the_move = {"GUEST_UNHEALTHY", "GUEST_HEALTH_UNKNOWN"}           # see test_health_unit
    across = {c for c in CODES if c.startswith("CROSS_")}                # see test_crossmove_unit
    from_drs = {"DRS_RULE"}                                               # see test_drs_service_unit
    assert set(cases) == set(CODES) - from_predictor - after_the_move - across - from_drs, "every code in the catalog has a case"
    for code, c in cases.items():
        found = {f.code: f for f in run_all(c)}
        assert code in found, (code, list(found))
        f = found[code]
        assert f.severity == CODES[code][0] and f.message and f.remedy, f


def test_host_limit_depends_on_link_speed() -> None:
    assert "HOST_CONCURRENCY_LIMIT" in codes(ctx(dst=facts("h2", speed=1000), dst_running=4))
    assert "HOST_CONCURRENCY_LIMIT" not in codes(ctx(dst=facts("h2", speed=10000), dst_running=4))


def test_rdm_message_says_same_path_is_not_the_same_device() -> None:
    c = ctx(vm=spec(disks=[DiskSpec(id="disk1", kind="rdm", identity="loop:1:2")]),
            src=facts("h1", luns=[("/dev/lun0", "loop:1:2")]), dst=facts("h2", luns=[("/dev/lun0", "loop:9:9")]))
    f = next(f for f in run_all(c) if f.code == "RDM_DEVICE_NOT_VISIBLE")
    assert "different device" in f.message
    same = ctx(vm=spec(disks=[DiskSpec(id="disk1", kind="rdm", identity="loop:1:2")]),
               dst=facts("h2", luns=[("/other/path", "loop:1:2")]))
    assert "RDM_DEVICE_NOT_VISIBLE" not in codes(same)      # same identity under another path is fine


def test_storage_move_lifts_the_datastore_requirement() -> None:
    moved = spec(boot_datastore="h2-local", disks=[DiskSpec(datastore="h2-local", path="vm1/vm1.qcow2")])
    dst = facts("h2", datastores=("h2-local",))
    assert "DATASTORE_NOT_ACCESSIBLE" in codes(ctx(dst=dst))
    assert "DATASTORE_NOT_ACCESSIBLE" not in codes(ctx(dst=dst, kind="xvmotion", target_spec=moved,
                                                       moved_disks=("disk0",)))


def test_every_blocker_at_once_errors_first() -> None:
    c = ctx(vm=spec(cdroms=[CdromSpec(media="local", path="/iso/x.iso")], memory_mb=30000), power_state="poweredOff",
            maintenance=True, dst=facts("h2", datastores=(), groups=(), speed=100, family="ipv6", free_mb=1000))
    found = run_all(c)
    assert {"VM_NOT_RUNNING", "HOST_IN_MAINTENANCE", "DATASTORE_NOT_ACCESSIBLE", "LOCAL_MEDIA_CONNECTED",
            "LINK_TOO_SLOW", "MGMT_IP_FAMILY_MISMATCH", "PORTGROUP_MISSING", "INSUFFICIENT_MEMORY"} <= {f.code for f in found}
    sev = [f.severity for f in found]
    assert sev == sorted(sev, key=["error", "warning", "info"].index)


def test_encryption_policy() -> None:
    assert "ENCRYPTION_FALLBACK" not in codes(ctx(vm=spec(encrypted_vmotion="disabled"), dst=facts("h2", tls=False)))
    enc = spec(disks=[DiskSpec(datastore="shared", path="vm1/vm1.qcow2", encrypted=True)], encrypted_vmotion="opportunistic")
    assert "ENCRYPTION_UNSUPPORTED" in codes(ctx(vm=enc, dst=facts("h2", tls=False)))   # encrypted VMs: always
    assert not {"ENCRYPTION_UNSUPPORTED", "ENCRYPTION_FALLBACK"} & codes(ctx(vm=spec(encrypted_vmotion="required")))


def test_a_uefi_vm_moves_freely_between_hosts_with_the_same_firmware() -> None:
    same = {"OVMF_CODE_4M.fd": "a", "OVMF_CODE_4M.secboot.fd": "s"}
    c = ctx(vm=spec(**UEFI), src=with_firmware(facts("h1"), same), dst=with_firmware(facts("h2"), same))
    assert codes(c) == {"SINGLE_MIGRATION_INTERFACE"}
    secure = ctx(vm=spec(secure_boot=True, **UEFI), src=with_firmware(facts("h1"), same),
                 dst=with_firmware(facts("h2"), {"OVMF_CODE_4M.fd": "a"}))
    assert "FIRMWARE_MISSING" in codes(secure)           # Secure Boot needs the secboot build there
    assert "FIRMWARE_MISSING" in codes(ctx(kind="cold", power_state="poweredOff", vm=spec(**UEFI),
                                           dst=with_firmware(facts("h2"))))
    assert codes(ctx(vm=spec())) == {"SINGLE_MIGRATION_INTERFACE"}     # BIOS VMs need no OVMF


def test_a_vlan_port_group_on_both_hosts_alike_is_no_finding() -> None:
    found = codes(ctx(vm=spec(**VLAN_VM), src=with_vlan(facts("h1")), dst=with_vlan(facts("h2"))))
    assert not found & {"PORTGROUP_VLAN_MISSING", "PORTGROUP_VLAN_MISMATCH", "PORTGROUP_MISSING"}


def test_a_missing_vlan_port_group_names_its_vlan_and_the_fix() -> None:
    f = next(f for f in run_all(ctx(vm=spec(**VLAN_VM), src=with_vlan(facts("h1")))) if f.code.startswith("PORTGROUP"))
    assert f.code == "PORTGROUP_VLAN_MISSING" and "VLAN 100" in f.message and "h2" in f.remedy
    assert f.subject == "network:VLAN 100"


def test_machine_types_unknown_or_offered_are_no_finding() -> None:
    assert "MACHINE_TYPE_UNSUPPORTED" not in codes(ctx(vm=spec(machine="pc-i440fx-7.2")))
    assert "MACHINE_TYPE_UNSUPPORTED" not in codes(ctx(vm=spec(machine="pc-i440fx-7.2"), dst=with_machines(
        facts("h2"), "pc-q35-7.2", "pc-i440fx-7.2")))
    assert "MACHINE_TYPE_UNSUPPORTED" in codes(ctx(kind="cold", power_state="poweredOff", vm=spec(
        machine="pc-i440fx-7.2"), dst=with_machines(facts("h2"), "pc-q35-7.2")))


def test_a_vlan_port_group_the_destination_cannot_carry_is_a_finding() -> None:
    dst = with_vlan(facts("h2"))
    dst.portgroups[-1].problem = "the kernel has no bridge VLAN filtering"
    f = next(f for f in run_all(ctx(vm=spec(**VLAN_VM), src=with_vlan(facts("h1")), dst=dst))
             if f.code.startswith("PORTGROUP"))
    assert f.code == "PORTGROUP_VLAN_MISSING" and "cannot be used on h2" in f.message and "VLAN filtering" in f.message


# -- disk cache modes (libvirt's qemuMigrationSrcIsSafe) -------------------------------------------------------------
def cached(mode: str | None, datastore: str = "shared", **kw) -> VMSpec:
    """A VM whose disk0 has ``mode`` (None: automatic) on ``datastore``; a shared-datastore disk1 with cache=none."""
    return spec(disks=[DiskSpec(datastore=datastore, path="vm1/vm1.qcow2", cache=mode, **kw),
                       DiskSpec(id="disk1", node="d1", datastore="shared", path="vm1/vm1-1.qcow2", cache="none")])


def cache_findings(c: MigrationContext) -> list:
    return [f for f in run_all(c) if f.code == "DISK_CACHE_UNSAFE"]


def test_a_disk_that_stays_with_the_host_page_cache_blocks_a_live_move() -> None:
    for mode in ("writeback", "writethrough", "unsafe"):
        found = cache_findings(ctx(vm=cached(mode)))
        assert len(found) == 1, (mode, found)
        f = found[0]
        assert f.severity == "error" and f.subject == "device:disk0"
        assert f"cache={mode}" in f.message and "disk0" in f.message and "stays on datastore shared" in f.message
        assert "kvmotion vm disk cache vm1 disk0 none" in f.remedy and "power vm1 off" in f.remedy
        assert "--disk disk0=DATASTORE" in f.remedy


def test_no_host_page_cache_or_a_disk_moved_with_the_storage_is_safe() -> None:
    for mode in ("none", "directsync", None):          # None: automatic, none on a datastore marked shared
        assert cache_findings(ctx(vm=cached(mode))) == [], mode
    moved = cached("writeback")                         # shared-nothing: disk0 gets a new file on h2-local
    after = moved.model_copy(update={"disks": [moved.disks[0].model_copy(update={"datastore": "h2-local"}),
                                               moved.disks[1]]})
    assert cache_findings(ctx(vm=moved, kind="xvmotion", target_spec=after, moved_disks=("disk0",),
                              dst=facts("h2", datastores=("shared", "h2-local")))) == []


def test_cold_and_same_host_moves_do_not_check_the_cache() -> None:
    writeback = cached("writeback")
    assert cache_findings(ctx(vm=writeback, kind="cold", power_state="poweredOff")) == []
    assert cache_findings(ctx(vm=writeback, kind="svmotion", dst_name="h1", moved_disks=("disk1",))) == []


def test_automatic_on_a_datastore_not_marked_shared_is_writeback_and_blocks() -> None:
    both = ("shared", "nfs")                            # both hosts mount "nfs", but its marker says not shared
    found = cache_findings(ctx(vm=cached(None, datastore="nfs"), src=facts("h1", datastores=both),
                               dst=facts("h2", datastores=both)))
    assert len(found) == 1 and "cache=writeback (automatic" in found[0].message
    assert "not marked shared on h1" in found[0].message


def test_a_raw_lun_is_shared_storage_too() -> None:
    luns = [("/dev/sdx", "naa.1")]
    def lun(mode: str | None) -> VMSpec:
        return spec(disks=[DiskSpec(id="disk1", node="d1", kind="rdm", identity="naa.1", cache=mode)])
    assert cache_findings(ctx(vm=lun(None), src=facts("h1", luns=luns), dst=facts("h2", luns=luns))) == []
    found = cache_findings(ctx(vm=lun("writeback"), src=facts("h1", luns=luns), dst=facts("h2", luns=luns)))
    assert [f.subject for f in found] == ["device:disk1"] and "raw LUN naa.1" in found[0].message

"""The checks, one function per SPEC §3 requirement. Each returns its findings; ``run_all`` returns them all."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from kvmotion.checks.context import MEMORY_HEADROOM_MB, MIN_LINK_MBPS, HostView, MigrationContext
from kvmotion.migration.kinds import kind
from kvmotion.models.findings import Finding, finding
from kvmotion.models.moves import MoveKind
from kvmotion.models.agent import HOST_PASSTHROUGH, CdromSpec, HostFacts
from kvmotion.models.hardware import MIGRATION_SAFE_CACHE, effective_cache
from kvmotion.models.cloudinit import in_folder, moves_with_folder
from kvmotion.models.boot import ovmf_code

Check = Callable[[MigrationContext], list[Finding]]


def _host(h: HostView) -> str:
    return f"host:{h.name}"


def placement(ctx: MigrationContext) -> list[Finding]:
    out = []
    src, dst, vm = ctx.source, ctx.destination, ctx.spec
    move = kind(ctx.kind)
    if dst.name == src.name and move.crosses_hosts:
        out.append(finding("SAME_HOST", _host(dst), f"VM {vm.name} already runs on {dst.name}",
                           "choose a different destination host"))
    if ctx.power_state != "poweredOn" and move.powered_on:
        out.append(finding("VM_NOT_RUNNING", f"vm:{vm.name}", f"VM {vm.name} is powered off; vMotion moves running VMs",
                           "use cold migration for a powered-off VM, or power it on first"))
    if ctx.power_state == "poweredOn" and not move.powered_on:
        out.append(finding("VM_POWERED_ON", f"vm:{vm.name}", f"VM {vm.name} is powered on; cold migration moves "
                           "powered-off VMs", f"power it off first (kvmotion vm stop {vm.name}), or use vMotion"))
    if ctx.vm_migrating:
        out.append(finding("VM_ALREADY_MIGRATING", f"vm:{vm.name}", f"VM {vm.name} is already being migrated",
                           "wait for its current task to finish (kvmotion task list)"))
    if dst.state != "connected" or dst.facts is None:
        out.append(finding("HOST_NOT_CONNECTED", _host(dst), f"destination host {dst.name} is {dst.state}",
                           f"start kvmotion-agent on {dst.name} or reconnect it"))
    if dst.maintenance:
        out.append(finding("HOST_IN_MAINTENANCE", _host(dst), f"destination host {dst.name} is in maintenance mode",
                           f"pick another host, or take {dst.name} out: kvmotion host maintenance exit {dst.name}"))
    return out


def storage(ctx: MigrationContext) -> list[Finding]:
    dst, vm = ctx.destination, ctx.after
    if dst.facts is None:
        return []
    out = []
    needed = {vm.boot_datastore} | {d.datastore for d in vm.disks if d.kind == "file"}
    readable = {d.name for d in dst.facts.datastores if d.readable}
    for ds in sorted(needed - readable):
        out.append(finding("DATASTORE_NOT_ACCESSIBLE", f"datastore:{ds}",
                           f"datastore {ds} for VM {vm.name}'s files is not readable on {dst.name}",
                           f"mount {ds} on {dst.name}, choose a host that sees it, or move the storage too "
                           f"(--datastore)"))
    for ds in sorted(needed):
        running = ctx.datastore_migrations.get(ds, 0)
        if running >= ctx.datastore_limit:
            out.append(finding("DATASTORE_CONCURRENCY_LIMIT", f"datastore:{ds}",
                               f"datastore {ds} already has {running} migrations in flight (limit "
                               f"{ctx.datastore_limit}); this one will queue",
                               "nothing to do: it starts when a slot frees; or migrate fewer VMs at once"))
    return out


def raw_devices(ctx: MigrationContext) -> list[Finding]:
    dst, vm = ctx.destination, ctx.spec
    if dst.facts is None:
        return []
    out = []
    # Device names are host-local (like /dev/sdb): the same name on two hosts may be two different LUNs.
    src_paths = {b.identity: Path(b.path).name for b in (ctx.source.facts.block_devices if ctx.source.facts else [])}
    dst_by_path = {Path(b.path).name: b.identity for b in dst.facts.block_devices}
    dst_ids = {b.identity for b in dst.facts.block_devices if b.identity}
    for disk in vm.disks:
        if disk.kind != "rdm" or disk.identity in dst_ids:
            continue
        path = src_paths.get(disk.identity)
        same_path = path is not None and path in dst_by_path
        why = (f" ({path} exists there, but it is a different device: {dst_by_path[path]})" if same_path else "")
        out.append(finding("RDM_DEVICE_NOT_VISIBLE", f"device:{disk.id}",
                           f"raw LUN {disk.identity} of {disk.id} is not presented to {dst.name}{why}",
                           f"present the same LUN to {dst.name} (zoning/masking), or pick a host that sees it"))
    return out


def disk_cache(ctx: MigrationContext) -> list[Finding]:
    """A disk both hosts open during a live move must bypass the host page cache (cache none or directsync).

    Followed: libvirt's qemuMigrationSrcIsSafe (src/qemu/qemu_migration.c). A disk the migration copies (storage
    migration) is safe, and so is a disk opened with cache=none or directsync; a disk that stays where it is with
    any other mode is refused (VIR_ERR_MIGRATE_UNSAFE), because the destination may read stale pages from its
    host's page cache, or miss writes still in the source host's. Not followed: libvirt lets other modes pass when
    QEMU's file driver has ``drop-cache`` (QEMU 4.0+: the destination fdatasyncs and drops the file's pages with
    POSIX_FADV_DONTNEED when it activates the image). kvmotion does not rely on that: the drop is advisory (Linux
    keeps pages that are dirty, locked or mapped, e.g. by another process reading the image) and covers only the
    destination's cache, where O_DIRECT needs no page cache on either host. Cold moves (not checked) and disks
    moved with the storage are safe; a raw LUN stays and is checked like a file."""
    src, dst, vm = ctx.source, ctx.destination, ctx.spec
    if not kind(ctx.kind).moves_memory or src.name == dst.name:
        return []
    shared = {d.name for d in (src.facts.datastores if src.facts else []) if d.shared}
    out = []
    for disk in vm.disks:
        mode = effective_cache(disk.cache, disk.kind == "rdm" or disk.datastore in shared)
        if disk.id in ctx.moved_disks or mode in MIGRATION_SAFE_CACHE:
            continue
        where = f"raw LUN {disk.identity}" if disk.kind == "rdm" else f"datastore {disk.datastore}"
        how = "set" if disk.cache else ("automatic: writeback, as the datastore is not marked shared on "
                                        f"{src.name}")
        out.append(finding("DISK_CACHE_UNSAFE", f"device:{disk.id}",
                           f"{disk.id} of VM {vm.name} stays on {where}, which {src.name} and {dst.name} open at "
                           f"once, with cache={mode} ({how}): the destination may read stale data from the host "
                           "page cache", f"power {vm.name} off, set cache=none (kvmotion vm disk cache {vm.name} "
                           f"{disk.id} none), power it on and migrate; or move the disk's storage too "
                           f"(--disk {disk.id}=DATASTORE)"))
    return out


def firmware(ctx: MigrationContext) -> list[Finding]:
    """A UEFI VM needs its OVMF code file on the destination, the same build to boot the same way after a move."""
    vm, src, dst = ctx.spec, ctx.source.facts, ctx.destination.facts
    if vm.firmware != "uefi" or dst is None:
        return []
    code = ovmf_code(vm.secure_boot)
    theirs = {f.name: f for f in dst.firmware}
    ours = {f.name: f for f in (src.firmware if src else [])}
    subject = f"host:{ctx.destination.name}"
    if code not in theirs:
        return [finding("FIRMWARE_MISSING", subject, f"{ctx.destination.name} has no {code} for the UEFI VM {vm.name}",
                        f"install Debian's ovmf package on {ctx.destination.name} (apt-get install ovmf), "
                        "or pick a host that has it")]
    if code in ours and ours[code].sha256 != theirs[code].sha256:
        return [finding("FIRMWARE_MISMATCH", subject,
                        f"{code} on {ctx.destination.name} (sha256 {theirs[code].sha256[:12]}, "
                        f"{theirs[code].size_bytes} bytes) differs from {ctx.source.name}'s "
                        f"({ours[code].sha256[:12]}, {ours[code].size_bytes} bytes): {vm.name} keeps its firmware "
                        "until it reboots, then boots the destination's build",
                        "install the same ovmf package version on both hosts, or pick a host that has it")]
    return []


def media(ctx: MigrationContext) -> list[Finding]:
    """CD/DVD media: an ISO on a datastore the destination also sees moves with the VM (as in vSphere); an ISO
    the destination cannot reach (another host's datastore, or left behind by a moving VM folder) blocks."""
    out = []
    for cd in ctx.spec.cdroms:
        if cd.media == "local" and cd.path:
            problem = _local_media_problem(ctx, cd)
            if problem is not None:
                out.append(finding("LOCAL_MEDIA_CONNECTED", f"device:{cd.id}", f"{cd.id} has the image {cd.path} "
                                   f"connected, {problem}", f"disconnect it: kvmotion vm cdrom disconnect "
                                   f"{ctx.spec.name} --drive {cd.id}, or put the image on a datastore "
                                   f"{ctx.destination.name} also mounts"))
        elif cd.media == "client":
            out.append(finding("CLIENT_MEDIA_CONNECTED", f"device:{cd.id}",
                               f"{cd.id} has client media {cd.nbd} connected; it stays connected after the move",
                               "nothing to do"))
    return out


def _local_media_problem(ctx: MigrationContext, cd: CdromSpec) -> str | None:
    """Why the destination could not open a local ISO after the move, or None when it can."""
    before, after = ctx.spec, ctx.after
    home_moves = before.boot_datastore != after.boot_datastore
    if home_moves and in_folder(cd, before) and not moves_with_folder(cd, before):
        return f"inside the VM folder on {before.boot_datastore}, which is removed when the folder moves"
    if home_moves and cd.datastore is None and not moves_with_folder(cd, before):
        return f"which would be looked for on {after.boot_datastore}, where it is not"
    datastore = cd.datastore or after.boot_datastore
    dst = ctx.destination.facts
    if dst is not None and datastore not in {d.name for d in dst.datastores if d.readable}:
        return f"on datastore {datastore}, which {ctx.destination.name} does not see (host-local media)"
    return None


def memory_backing(ctx: MigrationContext) -> list[Finding]:
    dst = ctx.destination
    if dst.facts is None or dst.facts.swap_location == "vm-folder":
        return []
    return [finding("SWAP_LOCATION_DIFFERS", _host(dst),
                    f"{dst.name} keeps VM memory-backing files in {dst.facts.swap_location}, not with the VM; "
                    "they are created there during the move, which makes it slower",
                    f"keep memory-backing files with the VM on {dst.name}, or accept a slower move")]


def _mig_ifaces(facts: HostFacts | None) -> list[tuple[str, int | None]]:
    return [(i.ifname, i.speed_mbps) for i in (facts.migration_interfaces if facts else []) if i.enabled and i.address]


def network(ctx: MigrationContext) -> list[Finding]:
    out = []
    hosts = [h for h in (ctx.source, ctx.destination) if h.facts is not None]
    if len(hosts) == 2 and hosts[0].name == hosts[1].name:     # same host (refused anyway): one finding each
        hosts = hosts[:1]
    for h in hosts:
        ifaces = _mig_ifaces(h.facts)
        if not ifaces:
            out.append(finding("NO_MIGRATION_INTERFACE", _host(h), f"{h.name} has no migration-enabled interface",
                               f"enable migration on an interface of {h.name} and give it an address"))
            continue
        best = max((s or 0) for _, s in ifaces)
        if best < MIN_LINK_MBPS:
            out.append(finding("LINK_TOO_SLOW", _host(h),
                               f"{h.name}'s migration link runs at {best} Mbit/s; a migration needs {MIN_LINK_MBPS}",
                               f"use a faster migration interface on {h.name} (1 GbE or more)"))
        if len(ifaces) < 2:
            out.append(finding("SINGLE_MIGRATION_INTERFACE", _host(h),
                               f"{h.name} has one migration interface ({ifaces[0][0]})",
                               "add a second migration interface for bandwidth and redundancy"))
        if h.running_migrations >= h.host_limit():
            out.append(finding("HOST_CONCURRENCY_LIMIT", _host(h),
                               f"{h.name} already runs {h.running_migrations} migrations (limit {h.host_limit()} "
                               "on its link); this one will queue",
                               "nothing to do: it starts when a slot frees"))
    if len(hosts) == 2:
        a, b = (h.facts.mgmt_family for h in hosts if h.facts)
        if a != b:
            out.append(finding("MGMT_IP_FAMILY_MISMATCH", _host(ctx.destination),
                               f"{ctx.source.name} is managed over {a} but {ctx.destination.name} over {b}",
                               "migrate between hosts of the same management IP family (IPv4↔IPv4, IPv6↔IPv6)"))
    return out


def cpu(ctx: MigrationContext) -> list[Finding]:
    src, dst, vm = ctx.source.facts, ctx.destination.facts, ctx.spec
    if dst is None or dst.cpu is None:
        return []
    if vm.cpu_model == HOST_PASSTHROUGH:
        if src is None or src.cpu is None:
            return []
        a, b = set(src.cpu.host_features), set(dst.cpu.host_features)
        if a != b:
            diff = sorted(a ^ b)
            return [finding("CPU_PASSTHROUGH_MISMATCH", f"vm:{vm.name}",
                            f"VM {vm.name} uses host-passthrough; {ctx.source.name} and {ctx.destination.name} "
                            f"differ in {len(diff)} CPU features ({', '.join(diff[:8])}{'…' if len(diff) > 8 else ''})",
                            "put both hosts in an EVC cluster and restart the VM there, or give it a named model")]
        return []
    if ctx.vm_cpu_features is None:
        return []
    missing = sorted(ctx.vm_cpu_features - set(dst.cpu.host_features))
    if missing:
        return [finding("CPU_FEATURES_MISSING", _host(ctx.destination),
                        f"{ctx.destination.name} lacks {len(missing)} CPU feature(s) VM {vm.name} sees "
                        f"({vm.cpu_model}): {', '.join(missing[:10])}{'…' if len(missing) > 10 else ''}",
                        "use an EVC cluster baseline both hosts support, mask these features on the VM "
                        f"(--cpu-mask {','.join(missing[:3])}), or pick another host")]
    return []


def encryption_plan(spec_policy: str, src: HostFacts | None, dst: HostFacts | None,
                    encrypted_disks: bool) -> tuple[bool, str, list[str]]:
    """(use TLS?, why, hosts without certificates). Encrypted VMs always migrate encrypted (SPEC §4)."""
    policy = "required" if encrypted_disks else spec_policy
    lacking = [f.name for f in (src, dst) if f is not None and not (f.tls and f.tls.supported)]
    if policy == "disabled":
        return False, "encryption disabled for this VM", lacking
    if lacking:
        return False, f"{', '.join(lacking)} cannot encrypt (no valid certificate)", lacking
    return True, f"TLS: both hosts have certificates ({policy})", lacking


def encryption(ctx: MigrationContext) -> list[Finding]:
    vm = ctx.spec
    src, dst = ctx.source.facts, ctx.destination.facts
    if src is None or dst is None:
        return []
    encrypted_disks = any(d.encrypted for d in vm.disks)
    use_tls, why, lacking = encryption_plan(vm.encrypted_vmotion, src, dst, encrypted_disks)
    if use_tls or not lacking or vm.encrypted_vmotion == "disabled" and not encrypted_disks:
        return []
    hosts = ", ".join(lacking)
    if vm.encrypted_vmotion == "required" or encrypted_disks:
        return [finding("ENCRYPTION_UNSUPPORTED", f"vm:{vm.name}",
                        f"VM {vm.name} requires encrypted vMotion ({'encrypted disks' if encrypted_disks else 'policy'})"
                        f" but {hosts} has no valid migration certificate",
                        f"issue one: kvmotion host cert renew {lacking[0]}")]
    return [finding("ENCRYPTION_FALLBACK", f"vm:{vm.name}",
                    f"{hosts} has no migration certificate: VM {vm.name} (opportunistic) will migrate unencrypted",
                    f"issue one (kvmotion host cert renew {lacking[0]}), or set --encrypted-vmotion required")]


def resources(ctx: MigrationContext) -> list[Finding]:
    dst, vm = ctx.destination, ctx.spec
    if dst.facts is None:
        return []
    out = port_groups(ctx)
    need = vm.memory_mb + MEMORY_HEADROOM_MB
    if dst.facts.mem_free_mb < need and kind(ctx.kind).powered_on:
        out.append(finding("INSUFFICIENT_MEMORY", _host(dst),
                           f"{dst.name} has {dst.facts.mem_free_mb} MiB free; VM {vm.name} needs {need} MiB",
                           "free memory on the destination or pick another host"))
    return out


def port_groups(ctx: MigrationContext) -> list[Finding]:
    """Every NIC's port group on the destination, on the VLAN it has on the source."""
    src, dst, vm = ctx.source, ctx.destination, ctx.spec
    if dst.facts is None:
        return []
    there = {p.name: p for p in dst.facts.portgroups}
    here = {p.name: p for p in (src.facts.portgroups if src.facts else [])}
    out = []
    for nic in vm.nics:
        mine, theirs = here.get(nic.portgroup), there.get(nic.portgroup)
        vlan = mine.vlan if mine is not None else None
        if theirs is None and vlan is not None:
            out.append(finding("PORTGROUP_VLAN_MISSING", f"network:{nic.portgroup}",
                               f"VLAN port group {nic.portgroup!r} (VLAN {vlan}) of {nic.id} exists on {src.name} "
                               f"but not on {dst.name}", f"add it to {dst.name}'s agent configuration "
                               f"(vlan_portgroups: {nic.portgroup!r}, VLAN {vlan}) or pick another host"))
        elif theirs is None:
            out.append(finding("PORTGROUP_MISSING", f"network:{nic.portgroup}",
                               f"port group {nic.portgroup!r} of {nic.id} does not exist on {dst.name}",
                               f"create {nic.portgroup!r} on {dst.name} or pick another host"))
        elif theirs.problem is not None and vlan is not None:
            out.append(finding("PORTGROUP_VLAN_MISSING", f"network:{nic.portgroup}",
                               f"VLAN port group {nic.portgroup!r} (VLAN {vlan}) of {nic.id} cannot be used on "
                               f"{dst.name}: {theirs.problem}", f"pick a host whose kernel has bridge VLAN filtering, "
                               f"or fix {dst.name}'s kernel"))
        elif mine is not None and theirs.vlan != vlan:
            out.append(finding("PORTGROUP_VLAN_MISMATCH", f"network:{nic.portgroup}",
                               f"port group {nic.portgroup!r} of {nic.id} is on VLAN {vlan or 'none'} on {src.name} "
                               f"but on VLAN {theirs.vlan or 'none'} on {dst.name}",
                               f"give {nic.portgroup!r} the same VLAN on both hosts, or pick another host"))
    return out


def machine_type(ctx: MigrationContext) -> list[Finding]:
    """The destination's QEMU offers the VM's machine type (an unknown list: no finding)."""
    dst, vm = ctx.destination, ctx.spec
    offered = dst.facts.machine_types if dst.facts else []
    if not offered or vm.machine in offered:
        return []
    return [finding("MACHINE_TYPE_UNSUPPORTED", f"vm:{vm.name}",
                    f"the QEMU of {dst.name} does not offer machine type {vm.machine} of VM {vm.name}",
                    f"upgrade QEMU on {dst.name} to one that has {vm.machine}, or pick another host")]


SPACE_MARGIN_MB = 16


def capacity(ctx: MigrationContext) -> list[Finding]:
    """What moving the disks needs: something to move, a format they can take, room on the target datastores."""
    before, after, dst = ctx.spec, ctx.after, ctx.destination
    out = []
    if kind(ctx.kind).moves_files is not False and not ctx.moved_disks and before.boot_datastore == after.boot_datastore \
            and ctx.source.name == dst.name:
        out.append(finding("NOTHING_TO_MOVE", f"vm:{before.name}", f"VM {before.name} already is on {dst.name} "
                           f"with its files on {before.boot_datastore}", "name another host or datastore"))
    for d in after.disks:
        if d.encrypted and d.format != "qcow2":
            out.append(finding("DISK_FORMAT_UNSUPPORTED", f"device:{d.id}",
                               f"{d.id} is encrypted (LUKS inside qcow2) and cannot become {d.format}",
                               "keep --disk-format qcow2 for an encrypted VM"))
        if d.kind == "rdm" and ctx.moved_disks:
            out.append(finding("RDM_STAYS", f"device:{d.id}", f"raw LUN {d.identity} of {d.id} is not copied",
                               "nothing to do: the VM keeps using the LUN"))
    free = {d.name: d.free_mb for d in (dst.facts.datastores if dst.facts else [])}
    for ds, need in sorted(ctx.required_mb.items()):
        have = free.get(ds)
        if have is not None and need + SPACE_MARGIN_MB > have:
            out.append(finding("DATASTORE_SPACE", f"datastore:{ds}",
                               f"datastore {ds} has {have} MiB free on {dst.name}; the move writes {need} MiB there "
                               f"(plus {SPACE_MARGIN_MB} MiB headroom)",
                               f"free space on {ds}, pick another datastore, or use thin qcow2 (--disk-format qcow2)"))
    return out


ALL_CHECKS: tuple[Check, ...] = (placement, storage, raw_devices, disk_cache, firmware, media, memory_backing,
                                 network, cpu, encryption, resources, capacity, machine_type)
CHECKS_BY_KIND: dict[MoveKind, tuple[Check, ...]] = {
    MoveKind.VMOTION: ALL_CHECKS,
    MoveKind.XVMOTION: ALL_CHECKS,
    MoveKind.SVMOTION: (placement, storage, capacity),
    MoveKind.COLD: (placement, storage, raw_devices, firmware, resources, capacity, machine_type),
}


def run_all(ctx: MigrationContext) -> list[Finding]:
    """Every finding of every check that applies to this kind of move, errors first."""
    order = {"error": 0, "warning": 1, "info": 2}
    found = [f for check in CHECKS_BY_KIND[kind(ctx.kind).name] for f in check(ctx)]
    return sorted(found, key=lambda f: order[f.severity])

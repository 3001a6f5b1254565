"""The one translation from a VM definition to a QEMU command line (covered by tests/golden/argv)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvmotion.agent.context import HostContext, nvram_file, safe_path, vm_folder
from kvmotion.agent.diskkeys import disk_secret_id, encrypted_secret_args, master_object, write_master
from kvmotion.agent.procs import QEMU_BINARY
from kvmotion.common.errors import ConflictError, InvalidInputError, NotFoundError
from kvmotion.models.agent import HOST_PASSTHROUGH, CdromSpec, DiskSpec, VMSpec
from kvmotion.models.boot import BOOT_FILES, ovmf_code
from kvmotion.models.nbd import nbd_problem, parse_nbd
from kvmotion.models.hardware import NIC_DEVICE, SATA_CONTROLLER, SCSI_CONTROLLER, effective_cache

GUEST_CONSOLE = "console=ttyS0 quiet panic=-1"


def cpu_arg(spec: VMSpec, ctx: HostContext) -> str:
    model = ctx.host_model if spec.cpu_model == HOST_PASSTHROUGH else spec.cpu_model
    arg = model + "".join(f",-{f}" for f in spec.cpu_mask)
    return arg + (",enforce=on" if spec.cpu_enforce else "")


# QEMU's -drive cache=MODE (bdrv_parse_cache_mode in QEMU 7.2's block.c) as -blockdev options: BDRV_O_NOCACHE is
# the node option cache.direct (O_DIRECT), BDRV_O_NO_FLUSH cache.no-flush (QAPI BlockdevCacheOptions), and
# "writethrough" is the guest-visible write cache of the device turned off (its write-cache property; QEMU flushes
# after every write). mode -> (cache.direct, cache.no-flush, write-cache).
CACHE_OPTIONS: dict[str, tuple[bool, bool, bool]] = {
    "none": (True, False, True),
    "directsync": (True, False, False),
    "writethrough": (False, False, False),
    "writeback": (False, False, True),
    "unsafe": (False, True, True),
}


def disk_cache(disk: DiskSpec, ctx: HostContext, datastore: str | None = None) -> str:
    """The cache mode ``disk`` is opened with on this host (on ``datastore``, default its own): its own, or
    automatic (none on a datastore marked shared and on a raw LUN, writeback on a host-local one)."""
    shared = disk.kind == "rdm" or (datastore or disk.datastore) in ctx.shared_datastores
    return effective_cache(disk.cache, shared)


def cache_node_options(mode: str) -> dict[str, bool]:
    """A block node's ``cache`` options for a cache mode (every node of the disk gets them)."""
    direct, no_flush, _ = CACHE_OPTIONS[mode]
    return {"direct": direct, "no-flush": no_flush}


def write_cache(mode: str) -> str:
    """The device's guest-visible write cache for a cache mode: off for writethrough and directsync."""
    return "on" if CACHE_OPTIONS[mode][2] else "off"


def file_node(filename: str, cache: dict[str, bool], driver: str = "file") -> dict[str, Any]:
    return {"driver": driver, "filename": filename, "cache": dict(cache)}


def disk_node(disk: DiskSpec, ctx: HostContext) -> dict[str, Any]:
    node = _plain_disk_node(disk, ctx, cache_node_options(disk_cache(disk, ctx)))
    if disk.encrypted:
        node["encrypt"] = {"format": "luks", "key-secret": disk_secret_id(disk.node)}
    return node


def _plain_disk_node(disk: DiskSpec, ctx: HostContext, cache: dict[str, bool]) -> dict[str, Any]:
    """The disk's format node, its file node and (a linked clone) its base image's nodes, all with ``cache``."""
    if disk.kind == "rdm":
        path = ctx.luns.get(disk.identity or "")
        if path is None:
            raise ConflictError(f"raw LUN {disk.identity} of {disk.id} is not presented to {ctx.host_name}",
                                remedy="present the LUN to this host, or run the VM elsewhere")
        return {"node-name": disk.node, "driver": "raw", "cache": dict(cache),
                "file": file_node(str(path), cache, "host_device")}
    path = safe_path(ctx, disk.datastore, disk.path)
    node: dict[str, Any] = {"node-name": disk.node, "driver": disk.format, "cache": dict(cache),
                            "file": file_node(str(path), cache)}
    if disk.backing:       # a linked clone: its base named here, confined to the datastore (not the image header)
        base = safe_path(ctx, disk.datastore, disk.backing, what="base image")
        node["backing"] = {"driver": disk.backing_format or "qcow2", "cache": dict(cache),
                           "file": file_node(str(base), cache)}
    return node


def has_media(cd: CdromSpec) -> bool:
    """Whether a CD/DVD drive holds a medium (without opening it)."""
    return (cd.media == "local" and bool(cd.path)) or (cd.media == "client" and bool(cd.nbd))


def iso_file(ctx: HostContext, cd: CdromSpec, boot_datastore: str) -> Path:
    """A drive's local ISO image: a regular file inside its datastore (default: the VM's boot datastore)."""
    datastore = cd.datastore or boot_datastore
    path = safe_path(ctx, datastore, cd.path or "", what="ISO image")
    if not path.exists():
        raise NotFoundError(f"ISO image {cd.path!r} does not exist on datastore {datastore} of host {ctx.host_name}",
                            remedy="copy the image into the datastore first, or name another image")
    if not path.is_file():
        raise InvalidInputError(f"ISO image {cd.path!r} on datastore {datastore} is not a regular file",
                                remedy="name an image file")
    return path


def cdrom_node(cd: CdromSpec, ctx: HostContext, boot_datastore: str) -> dict[str, Any] | None:
    """The block node behind a CD/DVD drive's medium (None when the drive is empty)."""
    if cd.media == "local" and cd.path:
        file: dict[str, Any] = {"driver": "file", "filename": str(iso_file(ctx, cd, boot_datastore)), "read-only": True}
    elif cd.media == "client" and cd.nbd:
        problem = nbd_problem(cd.nbd)
        if problem is not None:
            raise InvalidInputError(f"client media address {cd.nbd!r} of {cd.id} {problem}",
                                    remedy="write it like nbd://HOST:PORT/EXPORT")
        host, port, export = parse_nbd(cd.nbd)
        file = {"driver": "nbd", "server": {"type": "inet", "host": host, "port": str(port)}, "export": export}
    else:
        return None
    return {"node-name": f"{cd.id}-media", "driver": "raw", "read-only": True, "file": file}


def disk_device(disk: DiskSpec, boot: bool = False) -> str:
    """The guest device of a disk on its bus, at its fixed unit (the same on every host, hot-plugged or not), with
    the write cache of its cache mode (automatic is on everywhere: the guest sees the same device on every host)."""
    tail = f",write-cache={write_cache(disk.cache or 'none')}" + (",bootindex=0" if boot else "")
    if disk.bus == "virtio-scsi":
        return (f"scsi-hd,drive={disk.node},id={disk.id},bus={SCSI_CONTROLLER}.0,channel=0,"
                f"scsi-id={disk.unit or 0},lun=0{tail}")
    if disk.bus == "sata":
        return f"ide-hd,drive={disk.node},id={disk.id},bus={SATA_CONTROLLER}.{disk.unit or 0}{tail}"
    return f"virtio-blk-pci,drive={disk.node},id={disk.id}{tail}"


def device_props(device: str) -> dict[str, Any]:
    """A ``-device`` string as ``device_add`` arguments (hot-plug adds exactly what a restart would have)."""
    driver, *props = device.split(",")
    out: dict[str, Any] = {"driver": driver}
    for prop in props:
        key, _, value = prop.partition("=")
        out[key] = int(value) if value.isdigit() and key in ("channel", "scsi-id", "lun", "bootindex") else value
    return out


def controller_args(spec: VMSpec) -> list[str]:
    """The disk controllers the VM's buses need; the SCSI one also when kept for hot-plug."""
    buses = {d.bus for d in spec.disks}
    args: list[str] = []
    if spec.scsi_controller or "virtio-scsi" in buses:
        args += ["-device", f"virtio-scsi-pci,id={SCSI_CONTROLLER}"]
    if "sata" in buses:
        args += ["-device", f"ich9-ahci,id={SATA_CONTROLLER}"]
    return args


def smp_arg(spec: VMSpec) -> str:
    if spec.sockets is None:
        return str(spec.vcpus)
    return f"{spec.vcpus},sockets={spec.sockets},cores={spec.cores},threads={spec.threads}"


def tap_name(uuid: str, index: int) -> str:
    return f"kv{uuid.replace('-', '')[:9]}{index}"


def secret_args(spec: VMSpec, disk_keys: dict[str, str], master_file: Path) -> list[str]:
    """A per-process master secret (a 0600 file) and every disk passphrase encrypted under it."""
    encrypted = [d for d in spec.disks if d.encrypted]
    if not encrypted:
        return []
    missing = [d.id for d in encrypted if d.node not in disk_keys]
    if missing:
        raise ConflictError(f"no key was given for the encrypted disk(s) {', '.join(missing)} of {spec.name}",
                            remedy="start the VM through the controller, which holds its keys")
    master = write_master(master_file)
    args = ["-object", master_object(master_file)]
    for d in encrypted:
        args += ["-object", encrypted_secret_args(disk_secret_id(d.node), disk_keys[d.node], master)]
    return args


# QEMU 7.2 under TCG loses guest writes during live migration: the fast path of its dirty-bitmap sync (taken for a
# RAM block whose length is a multiple of 64 pages) clears dirty bits without resetting TCG's TLB, so stores through
# the TLB after a sync are never marked dirty and never sent (fixed upstream in QEMU 9.0, 03bfc2188f "physmem: Fix
# migration dirty bitmap coherency with TCG memory access"). 8 KiB more guest RAM takes the block off that path:
# measured in docs/guest-survival.md (lost pages and broken guests with and without). KVM tracks dirty pages itself
# and keeps the exact size.
TCG_RAM_PAD_KIB = 8


def guest_ram(spec: VMSpec, ctx: HostContext, backend: bool = False) -> str:
    """The ``-m`` value (``backend``: a memory backend's size): the VM's MiB, under TCG with the pad that avoids
    QEMU 7.2's lost-write bug."""
    if ctx.accelerator == "kvm":
        return f"{spec.memory_mb}M" if backend else str(spec.memory_mb)
    return f"{spec.memory_mb * 1024 + TCG_RAM_PAD_KIB}" + ("K" if backend else "k")


def boot_args(spec: VMSpec, ctx: HostContext) -> list[str]:
    """The test kernel and its command line, or (disk boot) the guest's address as SMBIOS OEM strings."""
    if spec.boot == "disk":
        values = ([f"value=kvmotion:ip={spec.guest_ip}"] if spec.guest_ip else []) + \
                 ([f"value=kvmotion:gw={spec.gateway}"] if spec.gateway else [])
        return ["-smbios", ",".join(["type=11", *values])] if values else []
    vm_folder(ctx, spec)
    kernel, initrd = (safe_path(ctx, spec.boot_datastore, f"{spec.folder}/{name}", what="boot file")
                      for name in BOOT_FILES)       # QEMU opens them by name: no link on the way
    cmdline = f"{GUEST_CONSOLE} kvmotion.name={spec.name}"
    if spec.guest_ip:
        cmdline += f" kvmotion.ip={spec.guest_ip}"
    if spec.dirty_mb_s:
        cmdline += f" kvmotion.dirty={spec.dirty_mb_s:g}"
    if spec.extra_cmdline:
        cmdline += " " + spec.extra_cmdline
    return ["-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]


def firmware_args(spec: VMSpec, ctx: HostContext) -> tuple[str, list[str]]:
    """(the -machine suffix, the arguments) of OVMF: its code read-only, the VM's own variables read-write."""
    if spec.firmware != "uefi":
        return "", []
    code = ctx.firmware_dir / ovmf_code(spec.secure_boot)
    if not code.is_file():
        raise NotFoundError(f"UEFI firmware {code} is missing on {ctx.host_name}",
                            remedy="install Debian's ovmf package on this host (apt-get install ovmf)")
    nvram = nvram_file(ctx, spec)
    args = ["-blockdev", json.dumps({"node-name": "pflash0", "driver": "raw", "read-only": True,
                                     "file": {"driver": "file", "filename": str(code), "read-only": True}}),
            "-blockdev", json.dumps({"node-name": "pflash1", "driver": "raw",
                                     "file": {"driver": "file", "filename": str(nvram)}})]
    if spec.secure_boot:
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return ",pflash0=pflash0,pflash1=pflash1" + (",smm=on" if spec.secure_boot else ""), args


def guest_agent_args(run_dir: Path) -> list[str]:
    """A qemu-guest-agent channel: virtio-serial, its socket in the VM's run directory."""
    return ["-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=qga0,path={run_dir / 'qga.sock'},server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"]


SERIAL_SOCKET = "serial.sock"
VNC_SOCKET = "vnc.sock"
SERIAL_LOG = "serial.log"


def serial_args(run_dir: Path) -> list[str]:
    """The serial console: a unix socket in the run directory (one interactive client, relayed by the agent), and
    everything the guest prints also written to serial.log (the health checks and ``vm show`` read it).

    logappend=off: QEMU truncates the log when it opens it, so every start (a shadow too) begins empty and a
    console line from an earlier run on this host never counts; re-adoption does not reopen it. With no client
    connected QEMU still logs what the guest prints and drops it from the socket (the guest never blocks)."""
    return ["-chardev", f"socket,id=serial0,path={run_dir / SERIAL_SOCKET},server=on,wait=off,"
                        f"logfile={run_dir / SERIAL_LOG},logappend=off",
            "-serial", "chardev:serial0"]


def vnc_args(run_dir: Path) -> list[str]:
    """The graphical console: a standard VGA (last on the PCI bus, so no other device moves) and a VNC server on a
    unix socket in the run directory, never TCP, with VNC authentication: QEMU refuses every client until the agent
    sets a one-time password (a ticket, as Proxmox's vncproxy does) for its own relay's connection, then expires
    it (:mod:`kvmotion.agent.vnc`)."""
    return ["-device", "VGA,id=video0,vgamem_mb=4", "-vnc", f"unix:{run_dir / VNC_SOCKET},password=on"]


def build_argv(spec: VMSpec, ctx: HostContext, run_dir: Path, incoming: bool,
               disk_keys: dict[str, str] | None = None) -> list[str]:
    machine_opts, firmware = firmware_args(spec, ctx)
    accel = "kvm" if ctx.accelerator == "kvm" else "tcg"
    argv = [
        QEMU_BINARY,
        "-name", f"guest={spec.name},debug-threads=on",
        "-uuid", spec.uuid,
        "-machine", spec.machine + machine_opts,
        "-accel", "kvm" if accel == "kvm" else "tcg,thread=single",
        "-cpu", cpu_arg(spec, ctx),
        "-m", guest_ram(spec, ctx),
        "-smp", smp_arg(spec),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-smbios", f"type=1,manufacturer=kvmotion,product=kvmotion-vm,serial={spec.uuid},uuid={spec.uuid}",
        *boot_args(spec, ctx),
        *serial_args(run_dir),
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
        "-pidfile", str(run_dir / "qemu.pid"),
        "-msg", "timestamp=on",
    ]
    if ctx.swap_dir is not None:
        argv[argv.index("-machine") + 1] += ",memory-backend=pc.ram"
        argv += ["-object", f"memory-backend-file,id=pc.ram,size={guest_ram(spec, ctx, backend=True)},"
                            f"mem-path={ctx.swap_dir / (spec.uuid + '.ram')},share=off"]
    argv += firmware + secret_args(spec, disk_keys or {}, run_dir / "master.key")
    argv += controller_args(spec)
    for i, disk in enumerate(spec.disks):
        argv += ["-blockdev", json.dumps(disk_node(disk, ctx)),
                 "-device", disk_device(disk, boot=spec.boot == "disk" and i == 0)]
    for i, cd in enumerate(spec.cdroms):
        node = cdrom_node(cd, ctx, spec.boot_datastore)
        if node is not None:
            argv += ["-blockdev", json.dumps(node)]
        argv += ["-device", f"ide-cd,id={cd.id},bus=ide.{i}" + (f",drive={node['node-name']}" if node else "")]
    for i, nic in enumerate(spec.nics):
        tap = tap_name(spec.uuid, i)
        argv += ["-netdev", f"tap,id=net-{nic.id},ifname={tap},script=no,downscript=no",
                 "-device", f"{NIC_DEVICE[nic.model]},netdev=net-{nic.id},mac={nic.mac},id={nic.id}"]
    argv += guest_agent_args(run_dir)
    argv += vnc_args(run_dir)
    if incoming:
        argv += ["-incoming", "defer", "-S"]
    return argv



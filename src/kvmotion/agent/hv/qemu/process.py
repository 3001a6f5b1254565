"""One QEMU process per VM: command line, start, adopt after an agent restart, stop."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmotion.agent.diskkeys import disk_secret_id, encrypted_secret_args, master_object, write_master
from kvmotion.agent.procs import QEMU_BINARY, image_locks, pid_alive, pid_is_qemu_for, rss_mb
from kvmotion.agent.qmp import QMPConnection
from kvmotion.common.errors import ConflictError, InvalidInputError, KvmotionError, NotFoundError, QemuStartFailed
from kvmotion.models.agent import (HOST_PASSTHROUGH, CdromSpec, DiskSpec, VMRunState, VMRuntime, VMSpec, nbd_problem,
                                   parse_nbd, relative_path_problem)

__all__ = ["QEMU_BINARY", "HostContext", "QemuVM", "build_argv", "guest_ram", "image_locks", "pid_alive",
           "pid_is_qemu_for", "rss_mb", "safe_path", "tap_name", "vm_folder"]
GUEST_CONSOLE = "console=ttyS0 quiet panic=-1"

# Guarded lifecycle: which states may follow which.
_TRANSITIONS: dict[VMRunState, set[VMRunState]] = {
    VMRunState.STARTING: {VMRunState.RUNNING, VMRunState.INCOMING, VMRunState.PAUSED, VMRunState.STOPPED},
    VMRunState.RUNNING: {VMRunState.MIGRATING_OUT, VMRunState.PAUSED, VMRunState.STOPPED},
    VMRunState.PAUSED: {VMRunState.RUNNING, VMRunState.MIGRATING_OUT, VMRunState.STOPPED},
    VMRunState.INCOMING: {VMRunState.PAUSED, VMRunState.RUNNING, VMRunState.STOPPED},
    VMRunState.MIGRATING_OUT: {VMRunState.RUNNING, VMRunState.MIGRATED, VMRunState.STOPPED},
    VMRunState.MIGRATED: {VMRunState.RUNNING, VMRunState.STOPPED},
    VMRunState.STOPPED: set(),
}


@dataclass(frozen=True)
class HostContext:
    """What a VM needs to know about the host it runs on."""

    host_name: str
    accelerator: str
    datastore_paths: dict[str, Path]      # datastore name -> mount path on this host
    bridges: dict[str, str]               # port group name -> Linux bridge
    host_model: str = "max"               # what host-passthrough means here ("host" under KVM)
    luns: dict[str, Path] = field(default_factory=dict)   # raw LUN identity -> device path on this host
    swap_dir: Path | None = None          # memory-backing files live here when set


def cpu_arg(spec: VMSpec, ctx: HostContext) -> str:
    model = ctx.host_model if spec.cpu_model == HOST_PASSTHROUGH else spec.cpu_model
    arg = model + "".join(f",-{f}" for f in spec.cpu_mask)
    return arg + (",enforce=on" if spec.cpu_enforce else "")


def disk_node(disk: DiskSpec, ctx: HostContext) -> dict[str, Any]:
    node = _plain_disk_node(disk, ctx)
    if disk.encrypted:
        node["encrypt"] = {"format": "luks", "key-secret": disk_secret_id(disk.node)}
    return node


def _plain_disk_node(disk: DiskSpec, ctx: HostContext) -> dict[str, Any]:
    if disk.kind == "rdm":
        path = ctx.luns.get(disk.identity or "")
        if path is None:
            raise ConflictError(f"raw LUN {disk.identity} of {disk.id} is not presented to {ctx.host_name}",
                                remedy="present the LUN to this host, or run the VM elsewhere")
        return {"node-name": disk.node, "driver": "raw", "file": {"driver": "host_device", "filename": str(path)}}
    path = safe_path(ctx, disk.datastore, disk.path)
    return {"node-name": disk.node, "driver": disk.format, "file": {"driver": "file", "filename": str(path)}}


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


def tap_name(uuid: str, index: int) -> str:
    return f"kv{uuid.replace('-', '')[:9]}{index}"


def resolve_datastore(ctx: HostContext, name: str) -> Path:
    try:
        return ctx.datastore_paths[name]
    except KeyError:
        raise ConflictError(
            f"datastore {name!r} is not accessible on host {ctx.host_name}",
            remedy="pick a host that mounts this datastore, or move the VM's storage first",
            details={"datastore": name, "host": ctx.host_name},
        ) from None


def safe_path(ctx: HostContext, datastore: str, rel: str, *, what: str = "disk path", directory: bool = False) -> Path:
    """A datastore-relative path, resolved; refuses anything that leaves the datastore.

    Refused (InvalidInputError, HTTP 422): an empty or absolute path, '..', a NUL byte or control character, a
    symbolic link that leads out of the datastore (or loops), the datastore root itself, and a directory where a
    file is wanted (``directory=False``) or a file where a directory is wanted (``directory=True``).
    """
    problem = relative_path_problem(rel)
    if problem is not None:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} {problem}",
                                remedy="give a path inside the datastore, like VM/VM.qcow2")
    root = resolve_datastore(ctx, datastore).resolve()
    try:
        path = (root / rel).resolve()
        is_dir = path.is_dir()
        exists = is_dir or path.exists()
    except RuntimeError:           # Python 3.11: a symbolic link loop
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} runs into a symbolic link loop",
                                remedy="remove the looping link") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} cannot be resolved: {exc}",
                                remedy="give a path inside the datastore, like VM/VM.qcow2") from None
    if root not in path.parents:
        raise InvalidInputError(f"{what} {rel!r} leaves datastore {datastore} (through a symbolic link or '..')",
                                remedy="use a path inside the datastore, without links that lead out of it")
    if directory and exists and not is_dir:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} is a file, not a directory",
                                remedy="name a directory")
    if not directory and is_dir:
        raise InvalidInputError(f"{what} {rel!r} on datastore {datastore} is a directory, not a file",
                                remedy="name a file, like VM/VM.qcow2")
    return path


def vm_folder(ctx: HostContext, spec: VMSpec) -> Path:
    return safe_path(ctx, spec.boot_datastore, spec.folder, what="VM folder", directory=True)


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


def build_argv(spec: VMSpec, ctx: HostContext, run_dir: Path, incoming: bool,
               disk_keys: dict[str, str] | None = None) -> list[str]:
    folder = vm_folder(ctx, spec)
    cmdline = f"{GUEST_CONSOLE} kvmotion.name={spec.name}"
    if spec.guest_ip:
        cmdline += f" kvmotion.ip={spec.guest_ip}"
    if spec.dirty_mb_s:
        cmdline += f" kvmotion.dirty={spec.dirty_mb_s:g}"
    if spec.extra_cmdline:
        cmdline += " " + spec.extra_cmdline
    accel = "kvm" if ctx.accelerator == "kvm" else "tcg"
    argv = [
        QEMU_BINARY,
        "-name", f"guest={spec.name},debug-threads=on",
        "-uuid", spec.uuid,
        "-machine", spec.machine,
        "-accel", "kvm" if accel == "kvm" else "tcg,thread=single",
        "-cpu", cpu_arg(spec, ctx),
        "-m", guest_ram(spec, ctx),
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-smbios", f"type=1,manufacturer=kvmotion,product=kvmotion-vm,serial={spec.uuid},uuid={spec.uuid}",
        "-kernel", str(folder / "vmlinuz"),
        "-initrd", str(folder / "initrd.img"),
        "-append", cmdline,
        # append=off: QEMU truncates the log when it opens it, so every start (a shadow too) begins empty and a
        # console line from an earlier run on this host never counts; re-adoption does not reopen it
        "-chardev", f"file,id=serial0,path={run_dir / 'serial.log'},append=off",
        "-serial", "chardev:serial0",
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
        "-pidfile", str(run_dir / "qemu.pid"),
        "-msg", "timestamp=on",
    ]
    if ctx.swap_dir is not None:
        argv[argv.index("-machine") + 1] += ",memory-backend=pc.ram"
        argv += ["-object", f"memory-backend-file,id=pc.ram,size={guest_ram(spec, ctx, backend=True)},"
                            f"mem-path={ctx.swap_dir / (spec.uuid + '.ram')},share=off"]
    argv += secret_args(spec, disk_keys or {}, run_dir / "master.key")
    for disk in spec.disks:
        argv += ["-blockdev", json.dumps(disk_node(disk, ctx)),
                 "-device", f"virtio-blk-pci,drive={disk.node},id={disk.id}"]
    for i, cd in enumerate(spec.cdroms):
        node = cdrom_node(cd, ctx, spec.boot_datastore)
        if node is not None:
            argv += ["-blockdev", json.dumps(node)]
        argv += ["-device", f"ide-cd,id={cd.id},bus=ide.{i}" + (f",drive={node['node-name']}" if node else "")]
    for i, nic in enumerate(spec.nics):
        tap = tap_name(spec.uuid, i)
        argv += ["-netdev", f"tap,id=net-{nic.id},ifname={tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=net-{nic.id},mac={nic.mac},id={nic.id}"]
    if incoming:
        argv += ["-incoming", "defer", "-S"]
    return argv


def _run(argv: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def create_taps(spec: VMSpec, ctx: HostContext) -> list[str]:
    taps: list[str] = []
    try:
        for i, nic in enumerate(spec.nics):
            bridge = ctx.bridges.get(nic.portgroup)
            if bridge is None:
                raise ConflictError(
                    f"port group {nic.portgroup!r} does not exist on host {ctx.host_name}",
                    remedy=f"create the bridge for {nic.portgroup!r} on {ctx.host_name}, or pick another host",
                )
            tap = tap_name(spec.uuid, i)
            _run(["ip", "link", "del", tap])  # a leftover from a crashed run of this same VM
            for argv in (["ip", "tuntap", "add", "dev", tap, "mode", "tap"],
                         ["ip", "link", "set", tap, "master", bridge, "up"]):
                res = _run(argv)
                if res.returncode != 0:
                    raise QemuStartFailed(f"could not set up tap {tap}: {res.stderr.strip()}",
                                          remedy="check that the agent runs as root and the bridge exists")
            taps.append(tap)
    except KvmotionError:
        delete_taps(taps)
        raise
    return taps


def delete_taps(taps: list[str]) -> None:
    for tap in taps:
        _run(["ip", "link", "del", tap])


class QemuVM:
    """A QEMU process plus its QMP connection and run record."""

    def __init__(self, spec: VMSpec, ctx: HostContext, run_dir: Path) -> None:
        self.spec = spec
        self.ctx = ctx
        self.run_dir = run_dir
        self.state = VMRunState.STARTING
        self.pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPConnection | None = None
        self.taps: list[str] = []
        self.started_at: float | None = None
        self.role = "normal"
        self.lock = asyncio.Lock()
        self.migration: Any = None   # kvmotion.agent.migration.MigrationWatch, when one runs
        self.qemu_objects: set[str] = set()   # QOM objects this agent added to the process (TLS creds)
        self.nodes: dict[str, str] = {d.id: d.node for d in spec.disks}   # disk id -> its block node now
        self.tls_client_creds: str | None = None   # the TLS client object, for NBD disk streams
        self.mirror: Any = None       # kvmotion.agent.mirror.Mirror, while disks are mirrored
        self.exports: list[str] = []  # NBD exports of a shared-nothing shadow
        self.created_files: list[Path] = []   # files made for this shadow (removed if it is discarded)

    # -- lifecycle -----------------------------------------------------------------------
    def transition(self, new: VMRunState) -> None:
        if new == self.state:
            return
        if new not in _TRANSITIONS[self.state]:
            raise ConflictError(
                f"VM {self.spec.name} cannot go from {self.state} to {new}",
                remedy="wait for the current operation on this VM to finish",
                details={"from": str(self.state), "to": str(new)},
            )
        self.state = new
        self.save_record()

    def save_record(self) -> None:
        record = {"spec": self.spec.model_dump(), "pid": self.pid, "state": str(self.state), "role": self.role,
                  "taps": self.taps, "started_at": self.started_at, "nodes": self.nodes}
        tmp = self.run_dir / "run.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.run_dir / "run.json")

    async def start(self, incoming: bool, qmp_deadline_s: float = 15.0,
                    disk_keys: dict[str, str] | None = None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("qmp.sock", "qemu.pid"):
            (self.run_dir / stale).unlink(missing_ok=True)
        argv = build_argv(self.spec, self.ctx, self.run_dir, incoming, disk_keys)
        self.taps = create_taps(self.spec, self.ctx)
        self.role = "incoming" if incoming else "normal"
        log = open(self.run_dir / "qemu.log", "ab")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        except OSError as exc:
            delete_taps(self.taps)
            raise QemuStartFailed(f"could not run {QEMU_BINARY}: {exc}",
                                  remedy="install qemu-system-x86 on this host") from exc
        finally:
            log.close()
        self.pid = self.proc.pid
        self.started_at = time.time()
        self.save_record()
        self.qmp = QMPConnection(self.spec.name, str(self.run_dir / "qmp.sock"))
        try:
            await self._connect_or_fail(qmp_deadline_s)
            status = (await self.qmp.execute("query-status"))["status"]
        except KvmotionError:
            await self.kill()
            raise
        finally:
            (self.run_dir / "master.key").unlink(missing_ok=True)   # QEMU has read it (or is gone)
        self.transition(VMRunState.INCOMING if incoming else
                        VMRunState.RUNNING if status == "running" else VMRunState.PAUSED)

    async def _connect_or_fail(self, deadline_s: float) -> None:
        assert self.qmp is not None
        connect = asyncio.create_task(self.qmp.connect(deadline_s))
        while not connect.done():
            if self.proc is not None and self.proc.poll() is not None:
                connect.cancel()
                tail = self.log_tail()
                raise QemuStartFailed(f"QEMU for {self.spec.name} exited at start (code {self.proc.returncode}): {tail}",
                                      remedy="fix the problem QEMU reports above")
            await asyncio.sleep(0.01)
        connect.result()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.run_dir / "qemu.log").read_text(errors="replace").strip().splitlines()
            return " | ".join(text[-lines:])
        except OSError:
            return ""

    async def adopt(self, record: dict[str, Any]) -> bool:
        """Re-attach to a QEMU process that survived an agent restart. False if it is gone."""
        pid = record.get("pid")
        if not pid or not pid_alive(pid) or not pid_is_qemu_for(pid, self.spec.uuid):
            return False
        self.pid = pid
        self.taps = list(record.get("taps", []))
        self.role = record.get("role", "normal")
        self.started_at = record.get("started_at")
        self.nodes.update(record.get("nodes") or {})
        self.qmp = QMPConnection(self.spec.name, str(self.run_dir / "qmp.sock"))
        try:
            await self.qmp.connect(5.0)
            status = (await self.qmp.execute("query-status"))["status"]
        except KvmotionError:
            return False
        self.state = {"running": VMRunState.RUNNING, "inmigrate": VMRunState.INCOMING,
                      "postmigrate": VMRunState.MIGRATED, "finish-migrate": VMRunState.MIGRATING_OUT,
                      }.get(status, VMRunState.PAUSED)
        self.save_record()
        return True

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and pid_alive(self.pid)

    async def wait_exit(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive():
                return True
            await asyncio.sleep(0.01)
        return not self.alive()

    async def stop(self, graceful_timeout: float = 5.0) -> None:
        """Quit QEMU (QMP ``quit``), then SIGTERM/SIGKILL by PID; free taps and the run record."""
        if self.qmp is not None and self.alive():
            try:
                await self.qmp.execute("quit", timeout=3)
            except KvmotionError:
                pass
        if not await self.wait_exit(graceful_timeout):
            await self.kill()
        await self._cleanup()

    async def kill(self) -> None:
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            if self.pid is None or not self.alive():
                break
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            await self.wait_exit(wait)
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self.qmp is not None:
            await self.qmp.close()
            self.qmp = None
        delete_taps(self.taps)
        self.taps = []
        if self.state != VMRunState.STOPPED:
            self.state = VMRunState.STOPPED
        for name in ("run.json", "qmp.sock", "qemu.pid"):
            (self.run_dir / name).unlink(missing_ok=True)
        if self.ctx.swap_dir is not None:
            (self.ctx.swap_dir / (self.spec.uuid + ".ram")).unlink(missing_ok=True)

    async def change_cdrom(self, new: CdromSpec) -> None:
        """Swap a drive's medium live: eject what is there, insert the new one (if any)."""
        if self.qmp is None:
            raise ConflictError(f"VM {self.spec.name} is not running", remedy="power it on first")
        old = next((c for c in self.spec.cdroms if c.id == new.id), None)
        if old is None:
            raise ConflictError(f"VM {self.spec.name} has no drive {new.id}", remedy="name an existing drive")
        node = cdrom_node(new, self.ctx, self.spec.boot_datastore)    # checked before the tray opens
        await self.qmp.execute("blockdev-open-tray", {"id": new.id, "force": True})
        if has_media(old):
            await self.qmp.execute("blockdev-remove-medium", {"id": new.id})
            await self.qmp.execute("blockdev-del", {"node-name": f"{new.id}-media"})
        if node is not None:
            await self.qmp.execute("blockdev-add", node)
            await self.qmp.execute("blockdev-insert-medium", {"id": new.id, "node-name": node["node-name"]})
        await self.qmp.execute("blockdev-close-tray", {"id": new.id})
        self.spec = self.spec.model_copy(update={"cdroms": [new if c.id == new.id else c for c in self.spec.cdroms]})
        self.save_record()

    def runtime(self, qemu_status: str | None = None) -> VMRuntime:
        return VMRuntime(uuid=self.spec.uuid, name=self.spec.name, state=self.state, pid=self.pid,
                         qemu_status=qemu_status, started_at=self.started_at, spec=self.spec)

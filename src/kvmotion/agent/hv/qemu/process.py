"""One QEMU process per VM: start, adopt after an agent restart, stop, live device changes."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmotion.agent.context import HostContext
from kvmotion.agent.hv.qemu import hotplug
from kvmotion.agent.hv.qemu.argv import build_argv, cdrom_node, has_media, tap_name
from kvmotion.agent.hv.qemu.guestagent import GuestAgent
from kvmotion.agent.hv.qemu.qmp import QMPConnection
from kvmotion.agent.hv.state import check_transition, requires
from kvmotion.agent.procs import QEMU_BINARY, pid_alive, pid_is_qemu_for
from kvmotion.common.errors import ConflictError, KvmotionError, QemuStartFailed
from kvmotion.models.agent import CdromSpec, DiskSpec, VMRunState, VMRuntime, VMSpec

if TYPE_CHECKING:
    from kvmotion.agent.hv.qemu.migration import MigrationWatch
    from kvmotion.agent.hv.qemu.mirror import Mirror
    from kvmotion.agent.nbdtls import NbdCreds

LIVE = (VMRunState.RUNNING, VMRunState.PAUSED, VMRunState.INCOMING, VMRunState.MIGRATING_OUT, VMRunState.MIGRATED)


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
            taps.append(tap)
            _setup(tap, [["ip", "tuntap", "add", "dev", tap, "mode", "tap"],
                         ["ip", "link", "set", tap, "master", bridge]])
            vlan = ctx.vlans.get(nic.portgroup)
            if nic.portgroup in ctx.vlan_problems:
                raise ConflictError(
                    f"{nic.id} of {spec.name} is on VLAN port group {nic.portgroup!r}, which host {ctx.host_name} "
                    f"cannot provide: {ctx.vlan_problems[nic.portgroup]}",
                    remedy="run the VM on a host whose kernel has bridge VLAN filtering, or move the NIC to a port "
                           "group without a VLAN (kvmotion vm nic remove/add while it is off)",
                    details={"portgroup": nic.portgroup, "host": ctx.host_name})
            if vlan is not None:
                _setup(tap, vlan_commands(bridge, tap, vlan, ctx.uplinks.get(nic.portgroup, [])))
            _setup(tap, [["ip", "link", "set", tap, "up"]])
    except KvmotionError:
        delete_taps(taps)
        raise
    return taps


def vlan_commands(bridge: str, tap: str, vlan: int, uplinks: list[str]) -> list[list[str]]:
    """A tap in VLAN ``vlan`` of a VLAN-filtering bridge: untagged, its PVID, and out of the default VLAN 1; the
    bridge's uplinks carry the VLAN tagged. Ports without a VLAN keep VLAN 1 untagged, as before filtering."""
    cmds = [["ip", "link", "set", bridge, "type", "bridge", "vlan_filtering", "1"],
            ["bridge", "vlan", "del", "dev", tap, "vid", "1"],
            ["bridge", "vlan", "add", "dev", tap, "vid", str(vlan), "pvid", "untagged"]]
    return cmds + [["bridge", "vlan", "add", "dev", up, "vid", str(vlan)] for up in uplinks]


def _setup(tap: str, commands: list[list[str]]) -> None:
    for argv in commands:
        res = _run(argv)
        if res.returncode != 0:
            raise QemuStartFailed(f"could not set up tap {tap} ({' '.join(argv)}): {res.stderr.strip()}",
                                  remedy="check that the agent runs as root and the bridge exists")


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
        self.migration: MigrationWatch | None = None   # when one runs
        self.qemu_objects: set[str] = set()   # QOM objects this agent added to the process (TLS creds)
        self.nodes: dict[str, str] = {d.id: d.node for d in spec.disks}   # disk id -> its block node now
        self.nbd_keys: NbdCreds | None = None   # a shadow's NBD server PSK (its key file goes with the server)
        self.mirror: Mirror | None = None     # while disks are mirrored
        self.exports: list[str] = []  # NBD exports of a shared-nothing shadow
        self.created_files: list[Path] = []   # files made for this shadow (removed if it is discarded)
        self.guest_agent = GuestAgent(spec.name, str(run_dir / "qga.sock"))   # qemu-guest-agent's channel

    @property
    def name(self) -> str:
        return self.spec.name

    # -- lifecycle -----------------------------------------------------------------------
    def transition(self, new: VMRunState) -> None:
        check_transition(self, new)
        if new != self.state:
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
        for stale in ("qmp.sock", "qemu.pid", "serial.sock", "vnc.sock"):
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
        self.state = VMRunState.STOPPED       # from any state: the process is gone
        for name in ("run.json", "qmp.sock", "qemu.pid", "serial.sock", "vnc.sock"):
            (self.run_dir / name).unlink(missing_ok=True)
        if self.ctx.swap_dir is not None:
            (self.ctx.swap_dir / (self.spec.uuid + ".ram")).unlink(missing_ok=True)
        if self.nbd_keys is not None:         # a shadow that went before its NBD server stopped
            self.nbd_keys.release()
            self.nbd_keys = None

    @requires(*LIVE, remedy="power it on first")
    async def change_cdrom(self, new: CdromSpec) -> None:
        """Swap a drive's medium live: eject what is there, insert the new one (if any)."""
        if self.qmp is None:
            raise ConflictError(f"VM {self.spec.name} has no QMP connection", remedy="the QEMU process is gone")
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

    @requires(VMRunState.RUNNING, VMRunState.PAUSED, remedy="wait for its migration to end, or power it on first")
    async def plug_disk(self, disk: DiskSpec) -> None:
        await hotplug.plug_disk(self, disk)

    @requires(VMRunState.RUNNING, VMRunState.PAUSED, remedy="wait for its migration to end, or power it on first")
    async def unplug_disk(self, disk_id: str) -> DiskSpec:
        return await hotplug.unplug_disk(self, disk_id)

    def runtime(self, qemu_status: str | None = None) -> VMRuntime:
        return VMRuntime(uuid=self.spec.uuid, name=self.spec.name, state=self.state, pid=self.pid,
                         qemu_status=qemu_status, started_at=self.started_at, spec=self.spec)

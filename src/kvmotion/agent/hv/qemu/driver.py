"""QEMU/KVM behind the hypervisor seam: one :class:`QemuVM` per VM, migration and mirrors through QMP."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

from kvmotion.agent import nbdtls
from kvmotion.agent.accel import AccelResult, probe_kvm
from kvmotion.agent.context import HostContext
from kvmotion.agent.cpu import CpuCatalog, probe_cpu_catalog
from kvmotion.agent.hv.base import Hypervisor, Result
from kvmotion.agent.hv.qemu import guestinfo, health, incoming, load, migration, mirror, postcopy, power, sampling
from kvmotion.agent.hv.qemu.process import QemuVM
from kvmotion.agent.hv.state import requires
from kvmotion.agent.procs import image_locks, rss_mb
from kvmotion.common.errors import ConflictError, KvmotionError, NotFoundError, QMPCommandError
from kvmotion.models.console import SOCKET_NAME, ConsoleKind
from kvmotion.models.agent import (POSTCOPY_STATES, CdromSpec, DirtySample, VMLoad, DiskSpec, DiskTarget, GuestHealth,
                                   HealthCheckRequest, IncomingReady, IncomingRequest, MigrationReport,
                                   MigrationTuning, MirrorReport, OutgoingRequest, ReleaseReport, VMRunState,
                                   VMRuntime, VMSpec)
from kvmotion.models.guest import GuestClock, GuestFacts, PowerOpResult, VMPowerEvent

log = logging.getLogger(__name__)


@requires(VMRunState.INCOMING, VMRunState.STARTING, VMRunState.STOPPED,
          remedy="the VM runs here; it cannot be discarded as a shadow")
async def _discard_shadow(vm: QemuVM) -> None:
    await vm.kill()
    for p in vm.created_files:      # a shared-nothing shadow's partial disks
        p.unlink(missing_ok=True)


@requires(VMRunState.MIGRATED, remedy="the migration has not completed")
async def _end_source(vm: QemuVM) -> ReleaseReport:
    pid, freed = vm.pid, rss_mb(vm.pid or 0)
    await vm.stop(graceful_timeout=5.0)
    return ReleaseReport(source_exited=not vm.alive(), source_pid=pid, lock_released=False, memory_freed_mb=freed)


def _fd_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


class QemuHypervisor(Hypervisor):
    def __init__(self, host_name: str, state_dir: Path) -> None:
        self.host_name = host_name
        self.state_dir = state_dir
        self.vms: dict[str, QemuVM] = {}
        self.sampler = sampling.DirtySampler()
        self.load_meter = load.LoadMeter()
        self._sampling: asyncio.Task[None] | None = None
        self.guest_cache = guestinfo.FactsCache()

    def _run_dir(self, uuid: str) -> Path:
        return self.state_dir / "vms" / uuid

    def _get(self, uuid: str) -> QemuVM:
        vm = self.vms.get(uuid)
        if vm is None or vm.state == VMRunState.STOPPED:
            raise NotFoundError(f"VM {uuid} is not running on host {self.host_name}",
                                remedy="check `kvmotion vm show` for where the VM runs")
        return vm

    # -- the host's capabilities -----------------------------------------------------------
    async def probe_accelerator(self, deadline_s: float, kernel: Path | None) -> AccelResult:
        return await probe_kvm(deadline_s, kernel=kernel)

    async def probe_cpu_models(self, accelerator: str, mask: list[str]) -> CpuCatalog:
        return await probe_cpu_catalog(accelerator, mask=mask)

    # -- inventory ------------------------------------------------------------------------
    async def open(self, ctx: HostContext) -> list[str]:
        adopted = []
        for record_file in sorted((self.state_dir / "vms").glob("*/run.json")):
            try:
                record = json.loads(record_file.read_text())
                spec = VMSpec.model_validate(record["spec"])
            except (OSError, ValueError, KeyError):
                continue
            vm = QemuVM(spec, ctx, record_file.parent)
            if await vm.adopt(record):
                self.vms[spec.uuid] = vm
                adopted.append(spec.name)
                await self._follow(vm)
            else:
                vm.taps = list(record.get("taps", []))
                await vm.kill()   # gone or not ours: clear the stale record and taps
        self._sampling = asyncio.create_task(self.sampler.loop(self.vms), name="dirty-sampler")
        return adopted

    async def _follow(self, vm: QemuVM) -> None:
        try:
            watch = await incoming.readopt(vm)
        except KvmotionError as exc:
            log.warning("could not follow the migration of re-adopted %s: %s", vm.name, exc)
            watch = None
        log.info("re-adopted %s (pid %s, %s%s)", vm.name, vm.pid, vm.state,
                 f", migration {watch.report.role} {watch.report.status}" if watch else "")

    async def close(self) -> None:
        if self._sampling is not None:
            self._sampling.cancel()
        for vm in self.vms.values():   # QEMU processes keep running; only drop our connections
            if vm.qmp is not None:
                await vm.qmp.close()

    def uuids(self) -> list[str]:
        return sorted(self.vms)

    def loads(self) -> list[VMLoad]:
        return self.load_meter.loads({u: (vm.pid, vm.spec.memory_mb) for u, vm in self.vms.items()
                                      if vm.state is VMRunState.RUNNING and vm.pid})

    def spec(self, uuid: str) -> VMSpec:
        return self._get(uuid).spec

    def set_spec(self, uuid: str, spec: VMSpec) -> None:
        vm = self._get(uuid)
        vm.spec = spec
        vm.save_record()

    def list(self) -> list[VMRuntime]:
        return [vm.runtime() for vm in self.vms.values()]

    def lock(self, uuid: str) -> asyncio.Lock:
        return self._get(uuid).lock

    def holds_open(self, path: Path, uuid: str | None = None) -> bool:
        vms = [self._get(uuid)] if uuid is not None else list(self.vms.values())
        return any(_fd_open(vm.pid, path) for vm in vms if vm.pid)

    def image_locks(self, uuid: str, paths: list[Path]) -> dict[str, list[str]]:
        return image_locks(self._get(uuid).pid or 0, paths)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, spec: VMSpec, ctx: HostContext, disk_keys: dict[str, str] | None) -> VMRuntime:
        if spec.uuid in self.vms:
            raise ConflictError(f"VM {spec.name} already runs on {self.host_name}", remedy="nothing to do")
        vm = QemuVM(spec, ctx, self._run_dir(spec.uuid))
        self.vms[spec.uuid] = vm
        try:
            await vm.start(incoming=False, disk_keys=disk_keys)
        except KvmotionError:
            self.vms.pop(spec.uuid, None)
            raise
        return vm.runtime()

    async def stop(self, uuid: str) -> VMRuntime:
        vm = self._get(uuid)
        async with vm.lock:
            await vm.stop()
        self.vms.pop(uuid, None)
        self.guest_cache.forget(uuid)
        return vm.runtime()

    async def status(self, uuid: str) -> VMRuntime:
        vm = self._get(uuid)
        qemu_status = None
        if vm.alive() and vm.migration is not None and vm.migration.report.role == "destination" and \
                vm.migration.report.status in POSTCOPY_STATES:
            # never in band during post-copy (the main loop may wait for a page): what the agent confirmed
            qemu_status = "running" if vm.state == VMRunState.RUNNING else "inmigrate"
        elif vm.qmp is not None and vm.alive():
            try:
                qemu_status = (await vm.qmp.execute("query-status", timeout=3))["status"]
            except KvmotionError:
                qemu_status = "unreachable"
        elif not vm.alive():
            qemu_status = "exited"
        return vm.runtime(qemu_status)

    async def change_cdrom(self, uuid: str, cdrom: CdromSpec) -> None:
        vm = self._get(uuid)
        async with vm.lock:
            await vm.change_cdrom(cdrom)

    async def plug_disk(self, uuid: str, disk: DiskSpec) -> None:
        vm = self._get(uuid)
        async with vm.lock:
            await vm.plug_disk(disk)

    async def unplug_disk(self, uuid: str, disk_id: str) -> DiskSpec:
        vm = self._get(uuid)
        async with vm.lock:
            return await vm.unplug_disk(disk_id)

    def console_socket(self, uuid: str, kind: ConsoleKind) -> Path:
        return self._get(uuid).run_dir / SOCKET_NAME[kind]

    async def vnc_ticket(self, uuid: str, password: str | None, valid_s: int) -> bool:
        qmp = self._get(uuid).qmp
        try:
            if password is not None:      # QEMU keeps an expiry across a new password: set both, every time
                await qmp.execute("set_password", {"protocol": "vnc", "password": password})
            await qmp.execute("expire_password", {"protocol": "vnc",
                                                  "time": "now" if password is None else f"+{valid_s}"})
        except QMPCommandError:           # refused: the display was started without password=on
            return False
        return True

    def serial_tail(self, uuid: str, lines: int) -> list[str]:
        try:
            return (self._run_dir(uuid) / "serial.log").read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    # -- migration ------------------------------------------------------------------------
    async def prepare_incoming(self, req: IncomingRequest, ctx: HostContext, tls_dir: str | None,
                               created: list[Path]) -> IncomingReady:
        spec = req.spec
        if spec.uuid in self.vms:
            raise ConflictError(f"VM {spec.name} already exists on {self.host_name}",
                                remedy="a VM never runs twice; pick another destination")
        vm = QemuVM(spec, ctx, self._run_dir(spec.uuid))
        vm.created_files = created
        self.vms[spec.uuid] = vm
        try:
            await vm.start(incoming=True, disk_keys=req.disk_keys)
            return await incoming.prepare_incoming(vm, req.listen_address, req.auto_resume, req.tls_authz_identity,
                                                   tls_dir, req.new_disks, req.multifd_channels, req.postcopy,
                                                   req.nbd_psk, nbdtls.key_root(self.state_dir))
        except KvmotionError:
            await vm.kill()
            self.vms.pop(spec.uuid, None)
            raise

    async def abort_incoming(self, uuid: str) -> bool:
        vm = self.vms.get(uuid)
        if vm is None:
            return False
        await _discard_shadow(vm)
        self.vms.pop(uuid, None)
        return True

    async def migrate_out(self, uuid: str, req: OutgoingRequest, tls_dir: str | None) -> MigrationReport:
        vm = self._get(uuid)
        m = vm.mirror
        streams = m is not None and m.report.state in ("mirroring", "ready") and \
            any(t.kind == "nbd" for t in m.targets.values())

        async def handoff(_vm: QemuVM) -> None:   # at pre-switchover: the disk streams end in sync
            assert m is not None
            await mirror.complete_at_switchover(m)
        async with self.sampler.lock_for(uuid):     # never while calc-dirty-rate is measuring this VM
            watch = await migration.start_outgoing(vm, req, handoff=handoff if streams else None, tls_dir=tls_dir)
        return watch.snapshot()

    async def migration_report(self, uuid: str, wait_s: float, since: str | None) -> MigrationReport:
        vm = self._get(uuid)
        if vm.migration is None:
            raise NotFoundError(f"no migration of VM {vm.name} on {self.host_name}", remedy="start one first")
        if wait_s > 0 and since is not None:
            await vm.migration.wait_change(since, wait_s)
        report = vm.migration.snapshot()
        if report.role == "destination" and not vm.alive() and report.status not in migration.TERMINAL:
            report.status, report.error = "failed", "destination QEMU exited"
        return report

    async def cancel_outgoing(self, uuid: str, resume_if_completed: bool) -> MigrationReport | None:
        return await migration.cancel_outgoing(self._get(uuid), resume_if_completed=resume_if_completed)

    async def tune(self, uuid: str, tuning: MigrationTuning) -> Result:
        return await migration.tune(self._get(uuid), tuning.downtime_limit_ms, tuning.max_bandwidth_bytes)

    async def postcopy_start(self, uuid: str) -> Result:
        return await postcopy.start(self._get(uuid))

    async def postcopy_pause(self, uuid: str) -> Result:
        vm = self._get(uuid)
        return await postcopy.pause(vm, vm.migration.report.role if vm.migration else "source")

    async def postcopy_recover(self, uuid: str, listen_address: str) -> Result:
        return await postcopy.recover_incoming(self._get(uuid), listen_address)

    async def postcopy_resume(self, uuid: str, uri: str, probe_address: str) -> Result:
        return await postcopy.resume(self._get(uuid), uri, probe_address)

    async def finalize_destination(self, uuid: str, announce: bool) -> Result:
        return await incoming.resume_destination(self._get(uuid), and_announce=announce)

    async def announce(self, uuid: str) -> Result:
        return await incoming.announce(self._get(uuid))

    async def finalize_source(self, uuid: str) -> ReleaseReport:
        report = await _end_source(self._get(uuid))
        self.vms.pop(uuid, None)
        return report

    # -- disks ----------------------------------------------------------------------------
    def _mirror(self, uuid: str) -> mirror.Mirror:
        vm = self._get(uuid)
        if vm.mirror is None:
            raise NotFoundError(f"no disk mirror of VM {vm.name} on {self.host_name}", remedy="start one first")
        return vm.mirror

    async def mirror_start(self, uuid: str, targets: list[DiskTarget], created: list[Path], home_datastore: str | None,
                           speed_bytes: int, copy_mode: str, tls_dir: str | None) -> MirrorReport:
        vm = self._get(uuid)
        if vm.mirror is not None and vm.mirror.report.state in ("mirroring", "ready"):
            raise ConflictError(f"the disks of {vm.name} are already being mirrored", remedy="wait or cancel it")
        m = mirror.Mirror(vm, targets, created, home_datastore)
        m.nbd_creds = await mirror.nbd_client_creds(vm, targets, tls_dir, nbdtls.key_root(self.state_dir))
        vm.mirror = m
        await mirror.start(m, speed_bytes, copy_mode)
        return await mirror.poll(m)

    async def mirror_status(self, uuid: str) -> MirrorReport:
        return (await mirror.poll(self._mirror(uuid))).model_copy(deep=True)

    async def mirror_speed(self, uuid: str, speed_bytes: int) -> None:
        m = self._mirror(uuid)
        for disk_id in m.targets:
            await migration.qmp_of(m.vm).execute("block-job-set-speed",
                                                 {"device": m.job_id(disk_id), "speed": int(speed_bytes)})

    async def mirror_cancel(self, uuid: str) -> MirrorReport:
        vm = self.vms.get(uuid)
        if vm is None or vm.mirror is None:
            return MirrorReport(state="none")
        async with vm.lock:
            await mirror.cancel(vm.mirror)
        return vm.mirror.report

    async def mirror_pivot(self, uuid: str) -> tuple[float, list[DiskTarget], str | None]:
        m = self._mirror(uuid)
        await mirror.poll(m)
        stall = await mirror.pivot(m)
        return stall, list(m.targets.values()), m.home_datastore

    async def move_nvram(self, uuid: str, path: Path) -> None:
        """The pflash1 node reopened on the new file (``blockdev-reopen``); the old file is closed."""
        qmp = migration.qmp_of(self._get(uuid))
        node = f"pflash1-{os.urandom(3).hex()}"
        await qmp.execute("blockdev-add", {"node-name": node, "driver": "file", "filename": str(path)}, timeout=10)
        try:
            await qmp.execute("blockdev-reopen", {"options": [{"node-name": "pflash1", "driver": "raw",
                                                               "file": node}]}, timeout=10)
        except KvmotionError:
            await qmp.execute("blockdev-del", {"node-name": node}, timeout=10)
            raise

    async def move_media(self, uuid: str, drive: str, path: Path) -> None:
        """The drive's medium node reopened on the new file (``blockdev-reopen``, read-only); the guest sees no
        media change and the old file is closed."""
        qmp = migration.qmp_of(self._get(uuid))
        node = f"{drive}-file-{os.urandom(3).hex()}"
        await qmp.execute("blockdev-add", {"node-name": node, "driver": "file", "filename": str(path),
                                           "read-only": True}, timeout=10)
        try:
            await qmp.execute("blockdev-reopen", {"options": [{"node-name": f"{drive}-media", "driver": "raw",
                                                               "read-only": True, "file": node}]}, timeout=10)
        except KvmotionError:
            await qmp.execute("blockdev-del", {"node-name": node}, timeout=10)
            raise

    # -- guest ----------------------------------------------------------------------------
    async def dirty_sample(self, uuid: str, max_age_s: float, measure: bool) -> DirtySample:
        return await self.sampler.get(self._get(uuid), max_age_s, measure)

    async def health_check(self, uuid: str, req: HealthCheckRequest, host_name: str) -> GuestHealth:
        return await health.check(self._get(uuid), req, host_name)

    # -- guest agent and graceful power ------------------------------------------------------
    async def guest_facts(self, uuid: str, max_age_s: float, deadline_s: float) -> GuestFacts:
        vm = self._get(uuid)
        if vm.state != VMRunState.RUNNING:
            return guestinfo.not_answering(ConflictError(f"VM {vm.name} is {vm.state}: its guest does not run",
                                                         remedy="ask again once it runs"),
                                           self.guest_cache.facts.get(uuid))
        return await self.guest_cache.get(uuid, vm.guest_agent, max_age_s, deadline_s)

    async def guest_ping(self, uuid: str, deadline_s: float) -> float:
        vm = self._get(uuid)
        t0 = time.monotonic()
        await vm.guest_agent.execute("guest-ping", deadline_s=deadline_s)
        return round((time.monotonic() - t0) * 1000, 3)

    async def guest_clock_sync(self, uuid: str, deadline_s: float, step_ms: float, host_name: str,
                               set_allowance_s: float) -> GuestClock:
        vm = self.vms.get(uuid)
        if vm is None or vm.state != VMRunState.RUNNING:
            return GuestClock(host=host_name, why=f"the VM does not run on {host_name}")
        return await guestinfo.sync_clock(vm.guest_agent, host_name, deadline_s, step_ms, set_allowance_s)

    async def power_graceful(self, uuid: str, action: str, timeout_s: float, force: bool) -> PowerOpResult:
        vm = self._get(uuid)
        async with vm.lock:
            try:
                result = await _graceful(vm, action, timeout_s, force)
            finally:
                self.guest_cache.forget(uuid)     # a new boot (or none): what the guest told may have changed
        if not vm.alive() or vm.state == VMRunState.STOPPED:     # powered off (or forced off): forgotten
            await vm.kill()
            self.vms.pop(uuid, None)
            self.guest_cache.forget(uuid)
        result.runtime = vm.runtime("exited" if vm.state == VMRunState.STOPPED else None)
        return result

    async def reap(self) -> list[tuple[VMPowerEvent, VMSpec]]:
        out = []
        for uuid, vm in list(self.vms.items()):
            if vm.state not in (VMRunState.RUNNING, VMRunState.PAUSED) or vm.lock.locked() or vm.alive():
                continue
            history = vm.qmp.history if vm.qmp is not None else []
            reason, by_guest = power.exit_reason(history, vm.proc.returncode if vm.proc is not None else None)
            await vm.kill()                       # taps, run record, QMP connection
            self.vms.pop(uuid, None)
            self.guest_cache.forget(uuid)
            log.info("VM %s ended by itself: %s", vm.name, reason)
            out.append((VMPowerEvent(uuid=uuid, name=vm.name, at=time.time(), reason=reason,
                                     guest_initiated=by_guest), vm.spec))
        return out


@requires(VMRunState.RUNNING, remedy="a paused or migrating guest cannot shut down by itself: wait for the migration "
                                     "to end, or use `kvmotion vm stop` (a hard stop)")
async def _graceful(vm: QemuVM, action: str, timeout_s: float, force: bool) -> PowerOpResult:
    return await power.graceful(vm, vm.guest_agent, action, timeout_s, force)

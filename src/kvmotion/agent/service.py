"""The host agent's operations (hostd role), shared by its API and tests."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

from kvmotion.agent import facts as host_facts
from kvmotion.agent import health, images, migration, mirror, postcopy, sampling, tls
from kvmotion.agent.accel import AccelResult, probe_kvm
from kvmotion.agent.blockdev import presented_devices
from kvmotion.agent.cpu import CpuCatalog, probe_cpu_catalog
from kvmotion.agent.config import AgentConfig
from kvmotion.agent.qemuvm import HostContext, QemuVM, image_locks, rss_mb, vm_folder
from kvmotion.agent.storage import AgentStorage, disk_file
from kvmotion.common.errors import ConflictError, ImageMissing, KvmotionError, NotFoundError
from kvmotion.models.agent import POSTCOPY_STATES, DirtySample, GuestHealth, HealthCheckRequest
from kvmotion.models.agent import (CdromSpec, CpuFact, HostFacts, TlsFact, IncomingReady, LeaseInfo, MigrationReport, MigrationTuning, OutgoingRequest,
                                   ReleaseReport, VMRunState, VMRuntime, VMSpec)

log = logging.getLogger(__name__)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Agent(AgentStorage):
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.copies: dict[str, images.CopyJob] = {}
        self.nbd_exports: dict[str, images.NbdExport] = {}
        self.accel = AccelResult("tcg", "not probed yet")
        self.vms: dict[str, QemuVM] = {}
        self.cpu: CpuCatalog | None = None
        self._ops_lock = asyncio.Lock()
        self.sampler = sampling.DirtySampler()
        self._sampling: asyncio.Task[None] | None = None

    # -- start-up -------------------------------------------------------------------------
    async def startup(self) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.accelerator in ("kvm", "tcg"):
            self.accel = AccelResult(self.cfg.accelerator, "set in the agent configuration")
        else:
            self.accel = self._cached_accel() or await self._probe_accel()
        log.info("accelerator: %s (%s)", self.accel.accelerator, self.accel.reason)
        if self.cfg.swap_dir is not None:
            self.cfg.swap_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.cpu = await probe_cpu_catalog(self.accel.accelerator, mask=self.cfg.cpu_feature_mask)
        except KvmotionError as exc:
            log.error("CPU model probe failed: %s", exc)
        await self.adopt_all()
        self._sampling = asyncio.create_task(self.sampler.loop(self.vms), name="dirty-sampler")

    ACCEL_CACHE_S = 3600.0

    def _cached_accel(self) -> AccelResult | None:
        """A probe result from this host's previous agent run within the hour (restarts stay fast)."""
        try:
            data = json.loads((self.cfg.state_dir / "accel.json").read_text())
            if time.time() - data["at"] < self.ACCEL_CACHE_S and data["boot_id"] == _boot_id():
                return AccelResult(data["accelerator"], data["reason"] + " (cached probe)")
        except (OSError, ValueError, KeyError):
            pass
        return None

    async def _probe_accel(self) -> AccelResult:
        kernel = self._image_files()[0] if self._image_ready() else None
        result = await probe_kvm(self.cfg.kvm_probe_deadline_s, kernel=kernel)
        (self.cfg.state_dir / "accel.json").write_text(json.dumps(
            {"accelerator": result.accelerator, "reason": result.reason, "at": time.time(), "boot_id": _boot_id()}))
        return result

    async def adopt_all(self) -> list[str]:
        """Re-adopt QEMU processes that outlived a previous agent: their run records are on disk."""
        adopted = []
        for record_file in sorted((self.cfg.state_dir / "vms").glob("*/run.json")):
            try:
                record = json.loads(record_file.read_text())
                spec = VMSpec.model_validate(record["spec"])
            except (OSError, ValueError, KeyError):
                continue
            vm = QemuVM(spec, self.context(), record_file.parent)
            if await vm.adopt(record):
                self.vms[spec.uuid] = vm
                adopted.append(spec.name)
                try:
                    watch = await migration.readopt(vm)
                except KvmotionError as exc:
                    log.warning("could not follow the migration of re-adopted %s: %s", spec.name, exc)
                    watch = None
                log.info("re-adopted %s (pid %s, %s%s)", spec.name, vm.pid, vm.state,
                         f", migration {watch.report.role} {watch.report.status}" if watch else "")
            else:
                vm.taps = list(record.get("taps", []))
                await vm.kill()   # gone or not ours: clear the stale record and taps
        return adopted

    async def shutdown(self) -> None:
        if self._sampling is not None:
            self._sampling.cancel()
        for exp in list(self.nbd_exports.values()):
            exp.stop()
        for job in self.copies.values():
            job.stop()
        for vm in self.vms.values():   # QEMU processes keep running; only drop our connections
            if vm.qmp is not None:
                await vm.qmp.close()

    # -- facts ----------------------------------------------------------------------------
    def context(self) -> HostContext:
        stores = {d.name: Path(d.path) for d in map(host_facts.read_datastore, self.cfg.datastores) if d.readable}
        bridges = {p.name: p.bridge for p in host_facts.portgroups()}
        luns = {b.identity: Path(b.path) for b in presented_devices(self.cfg.block_devices) if b.identity}
        host_model = self.cpu.host_model if self.cpu else ("host" if self.accel.accelerator == "kvm" else "max")
        return HostContext(self.cfg.name, self.accel.accelerator, stores, bridges, host_model, luns, self.cfg.swap_dir)

    def cpu_fact(self) -> CpuFact | None:
        if self.cpu is None:
            return None
        return CpuFact(host_model=self.cpu.host_model, host_features=sorted(self.cpu.host_features),
                       usable_models=self.cpu.usable_models(), masked=sorted(self.cpu.masked))

    def cpu_expand(self, model: str, mask: list[str]) -> list[str]:
        if self.cpu is None:
            raise ConflictError(f"host {self.cfg.name} has not probed its CPU models yet", remedy="retry shortly")
        return sorted(self.cpu.expand(model, minus=mask))

    def facts(self) -> HostFacts:
        facts = host_facts.gather(self.cfg, self.accel.accelerator, self.accel.reason, sorted(self.vms),
                                  self.cpu_fact())
        facts.tls = tls.status(self.tls_dir)
        return facts

    # -- VM files -------------------------------------------------------------------------
    def _image_files(self) -> tuple[Path, Path]:
        base = self.cfg.image_dir or Path("/var/lib/kvmotion/image")
        manifests = sorted(base.glob("*/manifest.json"))
        if not manifests:
            raise ImageMissing(f"no guest image under {base}", remedy="run `kvmotion image build` on this host")
        return manifests[-1].parent / "vmlinuz", manifests[-1].parent / "initrd.img"

    def _image_ready(self) -> bool:
        try:
            self._image_files()
            return True
        except ImageMissing:
            return False

    def provision(self, spec: VMSpec, disk_keys: dict[str, str] | None = None) -> Path:
        """Create the VM's folder on its datastore: config, boot files, disks. Nothing is left on failure."""
        ctx = self.context()
        folder = vm_folder(ctx, spec)
        if folder.exists() and any(folder.iterdir()):
            raise ConflictError(f"folder {folder} already exists on datastore {spec.boot_datastore}",
                                remedy="choose another VM name, or delete the leftover folder")
        kernel, initrd = self._image_files()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kernel, folder / "vmlinuz")
            shutil.copyfile(initrd, folder / "initrd.img")
            for disk in (d for d in spec.disks if d.kind == "file"):   # raw LUNs exist already
                if disk.encrypted and (not disk_keys or disk.node not in disk_keys):
                    raise ConflictError(f"no key for encrypted disk {disk.id}", remedy="create it via the controller")
                images.create_image(disk_file(ctx, disk), disk.format, disk.size_mb,
                                    passphrase=disk_keys[disk.node] if disk.encrypted and disk_keys else None)
            (folder / "vm.json").write_text(spec.model_dump_json(indent=1))
        except (OSError, KvmotionError, subprocess.TimeoutExpired):
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def destroy_files(self, spec: VMSpec) -> None:
        if spec.uuid in self.vms:
            raise ConflictError(f"VM {spec.name} still runs on {self.cfg.name}", remedy="power it off first")
        self.remove_files(spec, [d.id for d in spec.disks], home=True)

    # -- power ----------------------------------------------------------------------------
    def get(self, uuid: str) -> QemuVM:
        vm = self.vms.get(uuid)
        if vm is None or vm.state == VMRunState.STOPPED:
            raise NotFoundError(f"VM {uuid} is not running on host {self.cfg.name}",
                                remedy="check `kvmotion vm show` for where the VM runs")
        return vm

    def _run_dir(self, uuid: str) -> Path:
        return self.cfg.state_dir / "vms" / uuid

    async def start(self, spec: VMSpec, disk_keys: dict[str, str] | None = None) -> VMRuntime:
        if spec.uuid in self.vms:
            raise ConflictError(f"VM {spec.name} already runs on {self.cfg.name}", remedy="nothing to do")
        ctx = self.context()
        self.take_leases(spec, expected_holder=None)
        vm = QemuVM(spec, ctx, self._run_dir(spec.uuid))
        self.vms[spec.uuid] = vm
        try:
            await vm.start(incoming=False, disk_keys=disk_keys)
        except KvmotionError:
            self.vms.pop(spec.uuid, None)
            self.release_leases(spec)
            raise
        return vm.runtime()

    async def change_cdrom(self, uuid: str, cdrom: CdromSpec) -> dict[str, str]:
        vm = self.get(uuid)
        async with vm.lock:
            await vm.change_cdrom(cdrom)
        return {"drive": cdrom.id, "media": cdrom.media}

    async def stop(self, uuid: str) -> VMRuntime:
        vm = self.get(uuid)
        async with vm.lock:
            await vm.stop()
        self.vms.pop(uuid, None)
        self.release_leases(vm.spec)
        return vm.runtime()

    async def status(self, uuid: str) -> VMRuntime:
        vm = self.get(uuid)
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

    def list(self) -> list[VMRuntime]:
        return [vm.runtime() for vm in self.vms.values()]

    # -- migration primitives -------------------------------------------------------------
    @property
    def tls_dir(self) -> Path:
        return self.cfg.state_dir / "tls"

    def _tls_dir_if_valid(self) -> str | None:
        return str(self.tls_dir) if tls.status(self.tls_dir).supported else None

    def tls_csrs(self) -> dict[str, str]:
        return tls.make_csrs(self.tls_dir, self.cfg.name)

    def tls_install(self, ca_cert: str, server_cert: str, client_cert: str) -> TlsFact:
        return tls.install(self.tls_dir, ca_cert, server_cert, client_cert)

    def tls_remove(self) -> TlsFact:
        tls.remove(self.tls_dir)
        return tls.status(self.tls_dir)

    async def prepare_incoming(self, spec: VMSpec, listen_address: str, auto_resume: bool = True,
                               tls_authz_identity: str | None = None,
                               disk_keys: dict[str, str] | None = None,
                               new_disks: list[str] | None = None, multifd_channels: int = 0,
                               postcopy: bool = False) -> IncomingReady:
        """A shadow VM. For shared-nothing (``new_disks``) its disks are created empty here and NBD-exported."""
        if spec.uuid in self.vms:
            raise ConflictError(f"VM {spec.name} already exists on {self.cfg.name}",
                                remedy="a VM never runs twice; pick another destination")
        created = await asyncio.to_thread(self.create_disks, spec, new_disks or [], disk_keys or {})
        vm = QemuVM(spec, self.context(), self._run_dir(spec.uuid))
        vm.created_files = created
        self.vms[spec.uuid] = vm
        try:
            await vm.start(incoming=True, disk_keys=disk_keys)
            return await migration.prepare_incoming(vm, listen_address, auto_resume, tls_authz_identity,
                                                    self._tls_dir_if_valid(), new_disks, multifd_channels, postcopy)
        except KvmotionError:
            await vm.kill()
            self.vms.pop(spec.uuid, None)
            for p in created:
                p.unlink(missing_ok=True)
            raise

    async def abort_incoming(self, uuid: str) -> bool:
        """Remove a shadow VM. Refuses if the VM already runs here (it is no shadow then)."""
        vm = self.vms.get(uuid)
        if vm is None:
            return False
        if vm.state not in (VMRunState.INCOMING, VMRunState.STARTING, VMRunState.STOPPED):
            raise ConflictError(f"VM {vm.spec.name} is {vm.state} on {self.cfg.name}, not a shadow",
                                remedy="the VM runs here; it cannot be discarded as a shadow")
        await vm.kill()
        self.vms.pop(uuid, None)
        for p in vm.created_files:      # a shared-nothing shadow's partial disks
            p.unlink(missing_ok=True)
        return True

    async def start_outgoing(self, uuid: str, req: OutgoingRequest) -> MigrationReport:
        vm = self.get(uuid)
        m = vm.mirror
        streams = m is not None and m.report.state in ("mirroring", "ready") and \
            any(t.kind == "nbd" for t in m.targets.values())

        async def handoff(_vm: QemuVM) -> None:   # at pre-switchover: the disk streams end in sync
            await mirror.complete_at_switchover(m)
        async with self.sampler.lock_for(uuid):     # never while calc-dirty-rate is measuring this VM
            watch = await migration.start_outgoing(vm, req, handoff=handoff if streams else None,
                                                   tls_dir=self._tls_dir_if_valid())
        return watch.snapshot()

    async def migration_report(self, uuid: str, wait_s: float = 0.0, since: str | None = None) -> MigrationReport:
        """The migration's state; with ``wait_s`` and ``since``, once it leaves status ``since`` (long poll)."""
        vm = self.get(uuid)
        if vm.migration is None:
            raise NotFoundError(f"no migration of VM {vm.spec.name} on {self.cfg.name}", remedy="start one first")
        if wait_s > 0 and since is not None:
            await vm.migration.wait_change(since, wait_s)
        report = vm.migration.snapshot()
        if report.role == "destination" and not vm.alive() and report.status not in migration.TERMINAL:
            report.status, report.error = "failed", "destination QEMU exited"
        return report

    async def cancel_outgoing(self, uuid: str, resume_if_completed: bool = True) -> MigrationReport | None:
        return await migration.cancel_outgoing(self.get(uuid), resume_if_completed=resume_if_completed)

    async def postcopy_start(self, uuid: str) -> dict[str, object]:
        return await postcopy.start(self.get(uuid))

    async def postcopy_pause(self, uuid: str) -> dict[str, object]:
        vm = self.get(uuid)
        return await postcopy.pause(vm, vm.migration.report.role if vm.migration else "source")

    async def postcopy_recover(self, uuid: str, listen_address: str) -> dict[str, object]:
        return await postcopy.recover_incoming(self.get(uuid), listen_address)

    async def postcopy_resume(self, uuid: str, uri: str, probe_address: str) -> dict[str, object]:
        return await postcopy.resume(self.get(uuid), uri, probe_address)

    async def tune(self, uuid: str, tuning: MigrationTuning) -> dict[str, object]:
        return await migration.tune(self.get(uuid), tuning.downtime_limit_ms, tuning.max_bandwidth_bytes)

    async def resume(self, uuid: str, announce: bool = False) -> dict[str, object]:
        return await migration.resume_destination(self.get(uuid), and_announce=announce)

    async def announce(self, uuid: str) -> dict[str, object]:
        return await migration.announce(self.get(uuid))

    def take_lease(self, uuid: str, expected_holder: str | None) -> LeaseInfo:
        return self.take_leases(self.get(uuid).spec, expected_holder)

    async def finalize_source(self, uuid: str) -> ReleaseReport:
        """End the source QEMU after a completed migration and free its memory."""
        vm = self.get(uuid)
        if vm.state != VMRunState.MIGRATED:
            raise ConflictError(f"VM {vm.spec.name} is {vm.state} on {self.cfg.name}; only a migrated-away "
                                "source may be finalized", remedy="the migration has not completed")
        pid, freed = vm.pid, rss_mb(vm.pid or 0)
        await vm.stop(graceful_timeout=5.0)
        self.vms.pop(uuid, None)
        self.release_leases(vm.spec)
        still = [p for p, h in self.lease_holders(vm.spec).items() if h == self.cfg.name]
        return ReleaseReport(source_exited=not vm.alive(), source_pid=pid, lock_released=not still,
                             memory_freed_mb=freed)

    def locks(self, uuid: str) -> dict[str, list[str]]:
        """Which locks this host's QEMU holds on the VM's disk images (evidence of the lock hand-over)."""
        vm = self.get(uuid)
        paths = [disk_file(vm.ctx, d) for d in vm.spec.disks if d.kind == "file"]
        return image_locks(vm.pid or 0, paths)

    async def dirty_sample(self, uuid: str, max_age_s: float, measure: bool = True) -> DirtySample:
        """The VM's dirty rate (cached up to ``max_age_s``, else measured in about 1 s when ``measure`` is set
        and the VM runs outside any migration) and its touched RAM (always fresh)."""
        return await self.sampler.get(self.get(uuid), max_age_s, measure)

    async def health_check(self, uuid: str, req: HealthCheckRequest) -> GuestHealth:
        """Does the guest live here? Sampled over ``req.window_s`` (see :mod:`kvmotion.agent.health`)."""
        return await health.check(self.get(uuid), req, self.cfg.name)

    def serial_tail(self, uuid: str, lines: int) -> list[str]:
        path = self._run_dir(uuid) / "serial.log"
        try:
            return path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

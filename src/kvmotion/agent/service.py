"""The host agent's operations (hostd role), shared by its API and tests."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import subprocess
import time
from pathlib import Path

from kvmotion.agent import facts as host_facts
from kvmotion.agent import diskimage, imagelib, images, nbdtls, seediso, tls
from kvmotion.agent.guest import GuestOps
from kvmotion.agent.importjob import ImportJobs
from kvmotion.agent.accel import AccelResult
from kvmotion.agent.blockdev import presented_devices
from kvmotion.agent.config import AgentConfig
from kvmotion.agent.context import HostContext, place, vm_place
from kvmotion.agent.cpu import CpuCatalog
from kvmotion.agent.hv.base import Hypervisor, Result
from kvmotion.agent.storage import AgentStorage, disk_file, write_vm_json
from kvmotion.common import confined
from kvmotion.common.keywrap import HostKey
from kvmotion.agent.apitls import ApiIdentity
from kvmotion.common.private import private_dir
from kvmotion.common.errors import ConflictError, ImageMissing, InvalidInputError, KvmotionError, NotFoundError
from kvmotion.models.agent import (CdromSpec, CpuFact, DirtySample, GuestHealth, HealthCheckRequest, HostFacts,
                                   IncomingReady, IncomingRequest, LeaseInfo, MigrationReport, MigrationTuning,
                                   OutgoingRequest, ReleaseReport, TlsFact, VMRuntime, VMSpec)
from kvmotion.models.agent import DiskSpec, ImageSource
from kvmotion.models.boot import BOOT_FILES, NVRAM_FILE, ovmf_vars_template
from kvmotion.models.cloudinit import SeedFiles
from kvmotion.models.console import ConsoleKind

log = logging.getLogger(__name__)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Agent(AgentStorage, GuestOps):
    """The host's operations; every one on a VM's process goes through ``hv``."""

    def __init__(self, cfg: AgentConfig, hv: Hypervisor) -> None:
        self.cfg = cfg
        self.hv = hv
        self.copies: dict[str, images.CopyJob] = {}
        self.nbd_exports: dict[str, images.NbdExport] = {}
        self.accel = AccelResult("tcg", "not probed yet")
        self.cpu: CpuCatalog | None = None
        self.image_imports = ImportJobs()

    @functools.cached_property
    def keywrap(self) -> HostKey:
        """This host's key-wrapping key: disk passphrases arrive wrapped to it (:mod:`kvmotion.common.keywrap`)."""
        return HostKey.load_or_create(self.cfg.state_dir, self.cfg.name)

    @functools.cached_property
    def api(self) -> ApiIdentity:
        """The TLS identity of this agent's API (:mod:`kvmotion.agent.apitls`)."""
        return ApiIdentity(self.cfg.state_dir, self.cfg.name, [self.cfg.mgmt_address, self.cfg.name])

    # -- start-up -------------------------------------------------------------------------
    async def startup(self) -> None:
        private_dir(self.cfg.state_dir)       # its secret, keys and the VMs' run directories: 0700
        if self.cfg.accelerator in ("kvm", "tcg"):
            self.accel = AccelResult(self.cfg.accelerator, "set in the agent configuration")
        else:
            self.accel = self._cached_accel() or await self._probe_accel()
        log.info("accelerator: %s (%s)", self.accel.accelerator, self.accel.reason)
        if self.cfg.swap_dir is not None:
            self.cfg.swap_dir.mkdir(parents=True, exist_ok=True)
        for path in await asyncio.to_thread(imagelib.remove_leftovers, self.context()):
            log.warning("removed %s, left by an image import this agent did not finish", path)
        for path in nbdtls.sweep(self.nbd_key_root):
            log.warning("removed NBD key directory %s, left by a previous agent run", path)
        try:
            self.cpu = await self.hv.probe_cpu_models(self.accel.accelerator, list(self.cfg.cpu_feature_mask))
        except KvmotionError as exc:
            log.error("CPU model probe failed: %s", exc)
        await self.hv.open(self.context())
        self.start_reaper()       # VMs that power off by themselves (kvmotion.agent.guest)

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
        result = await self.hv.probe_accelerator(self.cfg.kvm_probe_deadline_s, kernel)
        (self.cfg.state_dir / "accel.json").write_text(json.dumps(
            {"accelerator": result.accelerator, "reason": result.reason, "at": time.time(), "boot_id": _boot_id()}))
        return result

    async def shutdown(self) -> None:
        self.stop_reaper()
        for exp in list(self.nbd_exports.values()):
            exp.stop()
        for job in self.copies.values():
            job.stop()
        self.image_imports.stop()
        await self.hv.close()

    # -- facts ----------------------------------------------------------------------------
    def context(self) -> HostContext:
        readable = [d for d in map(host_facts.read_datastore, self.cfg.datastores) if d.readable]
        stores = {d.name: Path(d.path) for d in readable}
        groups = host_facts.portgroups(self.cfg.vlan_portgroups)
        bridges = {p.name: p.bridge for p in groups}
        vlans = {p.name: p.vlan for p in groups if p.vlan is not None}
        uplinks = {v.name: list(v.uplinks) for v in self.cfg.vlan_portgroups}
        problems = {p.name: p.problem for p in groups if p.problem}
        luns = {b.identity: Path(b.path) for b in presented_devices(self.cfg.block_devices) if b.identity}
        host_model = self.cpu.host_model if self.cpu else ("host" if self.accel.accelerator == "kvm" else "max")
        return HostContext(self.cfg.name, self.accel.accelerator, stores, bridges, host_model, luns, self.cfg.swap_dir,
                           vlans=vlans, uplinks=uplinks, vlan_problems=problems,
                           shared_datastores=frozenset(d.name for d in readable if d.shared))

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
        facts = host_facts.gather(self.cfg, self.accel.accelerator, self.accel.reason, self.hv.uuids(),
                                  self.cpu_fact())
        facts.tls = tls.status(self.tls_dir)
        facts.keywrap_public = self.keywrap.public_b64
        facts.api_cert_sha256 = self.api.cert_sha256
        facts.firmware = host_facts.firmware(self.context().firmware_dir)
        facts.vm_power_events = self.power_events()
        facts.vm_load = self.hv.loads()
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

    def provision(self, spec: VMSpec, disk_keys: dict[str, str] | None = None,
                  image: ImageSource | None = None, seed: SeedFiles | None = None) -> VMSpec:
        """Create the VM's folder on its datastore: config, boot files or NVRAM, disks (disk0 from ``image``),
        and the cloud-init seed ISO when given.

        Nothing is left on failure. Returns the spec as made (a disk from an image: its size and base).
        """
        ctx = self.context()
        folder = vm_place(ctx, spec)
        if folder.listdir():
            raise ConflictError(f"folder {folder} already exists on datastore {spec.boot_datastore}",
                                remedy="choose another VM name, or delete the leftover folder")
        boot = self._image_files() if spec.boot == "kernel" else ()
        made: list[Path] = []
        try:
            folder.make_dirs()
            for src, name in zip(boot, BOOT_FILES):
                confined.copy_in(src, folder.root, folder.rel / name)
            if spec.firmware == "uefi":
                self._new_nvram(ctx, spec)
            if seed is not None:
                seediso.write_seed(ctx, spec, seed)
            disks = []
            for disk in spec.disks:
                if disk.kind == "file":      # raw LUNs exist already
                    disk = self._new_disk(ctx, disk, disk_keys or {}, image if disk.id == spec.disks[0].id else None)
                    made.append(disk_file(ctx, disk))
                disks.append(disk)
            spec = spec.model_copy(update={"disks": disks})
            write_vm_json(folder, spec)
        except (OSError, KvmotionError, subprocess.TimeoutExpired):
            for path in made:                # disks outside the folder (another datastore)
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError, KvmotionError):
                folder.rmtree()
            raise
        return spec

    @staticmethod
    def _new_nvram(ctx: HostContext, spec: VMSpec) -> None:
        template = ctx.firmware_dir / ovmf_vars_template(spec.secure_boot)
        if not template.is_file():
            raise NotFoundError(f"UEFI variable template {template} is missing on {ctx.host_name}",
                                remedy="install Debian's ovmf package on this host (apt-get install ovmf)")
        nvram = place(ctx, spec.boot_datastore, f"{spec.folder}/{NVRAM_FILE}", what="NVRAM file")
        confined.copy_in(template, nvram.root, nvram.rel)

    @staticmethod
    def _new_disk(ctx: HostContext, disk: DiskSpec, disk_keys: dict[str, str], image: ImageSource | None) -> DiskSpec:
        if disk.encrypted and disk.node not in disk_keys:
            raise ConflictError(f"no key for encrypted disk {disk.id}", remedy="create it via the controller")
        if image is not None:
            if disk.encrypted:
                raise InvalidInputError("a disk made from an image is not encrypted here",
                                        remedy="drop --encrypted-disk, or create an empty encrypted disk")
            return diskimage.clone(ctx, image, disk)
        images.create_image(disk_file(ctx, disk), disk.format, disk.size_mb,
                            passphrase=disk_keys[disk.node] if disk.encrypted else None)
        return disk

    def destroy_files(self, spec: VMSpec) -> None:
        if spec.uuid in self.hv.uuids():
            raise ConflictError(f"VM {spec.name} still runs on {self.cfg.name}", remedy="power it off first")
        self.remove_files(spec, [d.id for d in spec.disks], home=True)

    # -- power ----------------------------------------------------------------------------
    async def start(self, spec: VMSpec, disk_keys: dict[str, str] | None = None) -> VMRuntime:
        if spec.uuid in self.hv.uuids():
            raise ConflictError(f"VM {spec.name} already runs on {self.cfg.name}", remedy="nothing to do")
        ctx = self.context()
        self.take_leases(spec, expected_holder=None)
        try:
            return await self.hv.start(spec, ctx, disk_keys)
        except KvmotionError:
            self.release_leases(spec)
            raise

    async def change_cdrom(self, uuid: str, cdrom: CdromSpec) -> dict[str, str]:
        await self.hv.change_cdrom(uuid, cdrom)
        return {"drive": cdrom.id, "media": cdrom.media}

    async def stop(self, uuid: str) -> VMRuntime:
        runtime = await self.hv.stop(uuid)
        self.release_leases(runtime.spec)
        return runtime

    async def status(self, uuid: str) -> VMRuntime:
        return await self.hv.status(uuid)

    def list(self) -> list[VMRuntime]:
        return self.hv.list()

    def serial_tail(self, uuid: str, lines: int) -> list[str]:
        return self.hv.serial_tail(uuid, lines)

    def console_socket(self, uuid: str, kind: ConsoleKind) -> Path:
        return self.hv.console_socket(uuid, kind)

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

    async def prepare_incoming(self, req: IncomingRequest) -> IncomingReady:
        """A shadow VM. For shared-nothing (``req.new_disks``) its disks are created empty here and NBD-exported."""
        if req.spec.uuid in self.hv.uuids():
            raise ConflictError(f"VM {req.spec.name} already exists on {self.cfg.name}",
                                remedy="a VM never runs twice; pick another destination")
        if req.new_disks and not (req.tls_authz_identity or req.nbd_psk):
            raise InvalidInputError(f"the disks of shadow {req.spec.name} would be served over NBD without TLS",
                                    remedy="send tls_authz_identity (x509) or nbd_psk with new_disks")
        created = await asyncio.to_thread(self.create_disks, req.spec, req.new_disks, req.disk_keys)
        try:
            return await self.hv.prepare_incoming(req, self.context(), self._tls_dir_if_valid(), created)
        except KvmotionError:
            for p in created:
                p.unlink(missing_ok=True)
            raise

    async def abort_incoming(self, uuid: str) -> bool:
        """Remove a shadow VM. Refuses if the VM already runs here (it is no shadow then)."""
        return await self.hv.abort_incoming(uuid)

    async def start_outgoing(self, uuid: str, req: OutgoingRequest) -> MigrationReport:
        return await self.hv.migrate_out(uuid, req, self._tls_dir_if_valid())

    async def migration_report(self, uuid: str, wait_s: float = 0.0, since: str | None = None) -> MigrationReport:
        """The migration's state; with ``wait_s`` and ``since``, once it leaves status ``since`` (long poll)."""
        return await self.hv.migration_report(uuid, wait_s, since)

    async def cancel_outgoing(self, uuid: str, resume_if_completed: bool = True) -> MigrationReport | None:
        return await self.hv.cancel_outgoing(uuid, resume_if_completed)

    async def postcopy_start(self, uuid: str) -> Result:
        return await self.hv.postcopy_start(uuid)

    async def postcopy_pause(self, uuid: str) -> Result:
        return await self.hv.postcopy_pause(uuid)

    async def postcopy_recover(self, uuid: str, listen_address: str) -> Result:
        return await self.hv.postcopy_recover(uuid, listen_address)

    async def postcopy_resume(self, uuid: str, uri: str, probe_address: str) -> Result:
        return await self.hv.postcopy_resume(uuid, uri, probe_address)

    async def tune(self, uuid: str, tuning: MigrationTuning) -> Result:
        return await self.hv.tune(uuid, tuning)

    async def resume(self, uuid: str, announce: bool = False) -> Result:
        return await self.hv.finalize_destination(uuid, announce)

    async def announce(self, uuid: str) -> Result:
        return await self.hv.announce(uuid)

    def take_lease(self, uuid: str, expected_holder: str | None) -> LeaseInfo:
        return self.take_leases(self.hv.spec(uuid), expected_holder)

    async def finalize_source(self, uuid: str) -> ReleaseReport:
        """End the source QEMU after a completed migration and free its memory."""
        spec = self.hv.spec(uuid)
        report = await self.hv.finalize_source(uuid)
        self.release_leases(spec)
        still = [p for p, h in self.lease_holders(spec).items() if h == self.cfg.name]
        return report.model_copy(update={"lock_released": not still})

    def locks(self, uuid: str) -> dict[str, list[str]]:
        """Which locks this host's QEMU holds on the VM's disk images (evidence of the lock hand-over)."""
        ctx = self.context()
        return self.hv.image_locks(uuid, [disk_file(ctx, d) for d in self.hv.spec(uuid).disks if d.kind == "file"])

    async def dirty_sample(self, uuid: str, max_age_s: float, measure: bool = True) -> DirtySample:
        """The VM's dirty rate (cached up to ``max_age_s``, else measured in about 1 s when ``measure`` is set
        and the VM runs outside any migration) and its touched RAM (always fresh)."""
        return await self.hv.dirty_sample(uuid, max_age_s, measure)

    async def health_check(self, uuid: str, req: HealthCheckRequest) -> GuestHealth:
        """Does the guest live here? Sampled over ``req.window_s`` (see :mod:`kvmotion.agent.hv.qemu.health`)."""
        return await self.hv.health_check(uuid, req, self.cfg.name)

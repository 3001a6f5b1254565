"""The hypervisor seam (Ganeti style): every operation the agent performs on a VM's process.

The agent's service and API talk to a :class:`Hypervisor` only; :class:`kvmotion.agent.hv.qemu.driver.QemuHypervisor`
is the implementation. Host matters (leases, datastores, files, TLS material) stay with the service and are passed
in. A VM is named by its UUID; an unknown one is a ``NotFoundError``, a wrong run state a ``WrongState``.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from pathlib import Path

from kvmotion.agent.accel import AccelResult
from kvmotion.agent.context import HostContext
from kvmotion.agent.cpu import CpuCatalog
from kvmotion.common.errors import ConsoleUnavailable
from kvmotion.models.console import ConsoleKind
from kvmotion.models.agent import (CdromSpec, DirtySample, VMLoad, DiskSpec, DiskTarget, GuestHealth, HealthCheckRequest, IncomingReady,
                                   IncomingRequest, MigrationReport, MigrationTuning, MirrorReport, OutgoingRequest,
                                   ReleaseReport, VMRuntime, VMSpec)
from kvmotion.models.guest import GuestClock, GuestFacts, PowerOpResult, VMPowerEvent

Result = dict[str, object]


class Hypervisor(ABC):
    """The VMs of one host and their lifecycle: start, prepare incoming, migrate out, status, finalize on either
    side, device and disk changes."""

    # -- the host's capabilities -----------------------------------------------------------
    @abstractmethod
    async def probe_accelerator(self, deadline_s: float, kernel: Path | None) -> AccelResult:
        """Whether hardware acceleration works here (else emulation), tried within ``deadline_s``."""

    @abstractmethod
    async def probe_cpu_models(self, accelerator: str, mask: list[str]) -> CpuCatalog:
        """The CPU models this host can run, with the features in ``mask`` hidden."""

    # -- inventory ------------------------------------------------------------------------
    @abstractmethod
    async def open(self, ctx: HostContext) -> list[str]:
        """Re-adopt the VMs that outlived a previous agent (their names) and start background work."""

    @abstractmethod
    async def close(self) -> None:
        """Stop background work and drop connections; the VMs keep running."""

    @abstractmethod
    def uuids(self) -> list[str]:
        """Every VM this host holds, in any state (shadows too)."""

    def loads(self) -> list[VMLoad]:
        """What each running VM costs this host (CPU and resident RAM; DRS's input). A driver that cannot tell
        reports nothing."""
        return []

    @abstractmethod
    def spec(self, uuid: str) -> VMSpec:
        """A running VM's definition as it is now."""

    @abstractmethod
    def set_spec(self, uuid: str, spec: VMSpec) -> None:
        """Record a running VM's new definition (after its disks moved)."""

    @abstractmethod
    def list(self) -> list[VMRuntime]:
        """Every VM with its run state."""

    @abstractmethod
    def lock(self, uuid: str) -> asyncio.Lock:
        """Held by every operation that changes a running VM's devices or disks."""

    @abstractmethod
    def holds_open(self, path: Path, uuid: str | None = None) -> bool:
        """Whether the VM's process (``uuid``) or any VM's process has ``path`` open."""

    @abstractmethod
    def image_locks(self, uuid: str, paths: list[Path]) -> dict[str, list[str]]:
        """The locks the VM's process holds on ``paths``."""

    # -- lifecycle ------------------------------------------------------------------------
    @abstractmethod
    async def start(self, spec: VMSpec, ctx: HostContext, disk_keys: dict[str, str] | None) -> VMRuntime:
        """Power a VM on."""

    @abstractmethod
    async def stop(self, uuid: str) -> VMRuntime:
        """Power a VM off and forget it."""

    @abstractmethod
    async def status(self, uuid: str) -> VMRuntime:
        """The run state, with what the hypervisor reports about the process."""

    @abstractmethod
    async def change_cdrom(self, uuid: str, cdrom: CdromSpec) -> None:
        """Swap a CD/DVD drive's medium live."""

    @abstractmethod
    async def plug_disk(self, uuid: str, disk: DiskSpec) -> None:
        """Hot-plug a disk whose image exists (virtio-scsi only); the VM's spec then has it."""

    @abstractmethod
    async def unplug_disk(self, uuid: str, disk_id: str) -> DiskSpec:
        """Hot-unplug a disk once the guest released it (virtio-scsi only); returns it (its image stays)."""

    @abstractmethod
    def serial_tail(self, uuid: str, lines: int) -> list[str]:
        """The last lines of the VM's serial console."""

    def console_socket(self, uuid: str, kind: ConsoleKind) -> Path:
        """The unix socket of a running VM's console (the agent relays it); drivers without one refuse."""
        raise ConsoleUnavailable(f"VM {uuid} has no {kind} console on this hypervisor",
                                 remedy="use `kvmotion vm show` for the serial log", details={"vm": uuid, "kind": str(kind)})

    async def vnc_ticket(self, uuid: str, password: str | None, valid_s: int) -> bool:
        """Let one VNC client in: ``password`` valid for ``valid_s`` seconds (None: expire it now). False when the
        VM's display takes no password (a QEMU started before VNC passwords); drivers without VNC refuse."""
        raise ConsoleUnavailable(f"VM {uuid} has no VNC console on this hypervisor",
                                 remedy="use the serial console", details={"vm": uuid, "kind": "vnc"})

    # -- migration ------------------------------------------------------------------------
    @abstractmethod
    async def prepare_incoming(self, req: IncomingRequest, ctx: HostContext, tls_dir: str | None,
                               created: list[Path]) -> IncomingReady:
        """A paused shadow VM listening for the incoming state; ``created`` are files it owns (removed on abort)."""

    @abstractmethod
    async def abort_incoming(self, uuid: str) -> bool:
        """Discard a shadow (False: there was none)."""

    @abstractmethod
    async def migrate_out(self, uuid: str, req: OutgoingRequest, tls_dir: str | None) -> MigrationReport:
        """Send a running VM to a prepared shadow; followed in the background."""

    @abstractmethod
    async def migration_report(self, uuid: str, wait_s: float, since: str | None) -> MigrationReport:
        """The migration's state; with ``wait_s`` and ``since``, once it leaves status ``since``."""

    @abstractmethod
    async def cancel_outgoing(self, uuid: str, resume_if_completed: bool) -> MigrationReport | None:
        """Stop an outgoing migration and run the VM here again."""

    @abstractmethod
    async def tune(self, uuid: str, tuning: MigrationTuning) -> Result:
        """Change a running migration's limits."""

    @abstractmethod
    async def postcopy_start(self, uuid: str) -> Result:
        """Switch a running pre-copy to post-copy."""

    @abstractmethod
    async def postcopy_pause(self, uuid: str) -> Result:
        """Pause a post-copy whose link stalls."""

    @abstractmethod
    async def postcopy_recover(self, uuid: str, listen_address: str) -> Result:
        """Destination: listen for the source's reconnection."""

    @abstractmethod
    async def postcopy_resume(self, uuid: str, uri: str, probe_address: str) -> Result:
        """Source: reconnect a paused post-copy."""

    @abstractmethod
    async def finalize_destination(self, uuid: str, announce: bool) -> Result:
        """Run the arrived VM and confirm it runs (and announce its MACs)."""

    @abstractmethod
    async def announce(self, uuid: str) -> Result:
        """Announce the VM's MAC addresses on its networks again."""

    @abstractmethod
    async def finalize_source(self, uuid: str) -> ReleaseReport:
        """End a migrated-away source and free its memory (``lock_released`` is the caller's to fill in)."""

    # -- disks ----------------------------------------------------------------------------
    @abstractmethod
    async def mirror_start(self, uuid: str, targets: list[DiskTarget], created: list[Path], home_datastore: str | None,
                           speed_bytes: int, copy_mode: str, tls_dir: str | None) -> MirrorReport:
        """Mirror a running VM's disks to ``targets``."""

    @abstractmethod
    async def mirror_status(self, uuid: str) -> MirrorReport:
        """The mirrors' progress."""

    @abstractmethod
    async def mirror_speed(self, uuid: str, speed_bytes: int) -> None:
        """Limit the mirrors' speed."""

    @abstractmethod
    async def mirror_cancel(self, uuid: str) -> MirrorReport:
        """Stop the mirrors; the VM keeps its disks."""

    @abstractmethod
    async def mirror_pivot(self, uuid: str) -> tuple[float, list[DiskTarget], str | None]:
        """Switch the VM to the mirrored disks (caller holds :meth:`lock`): the I/O stall in ms, the targets, and
        the datastore the VM folder moves to."""

    @abstractmethod
    async def move_nvram(self, uuid: str, path: Path) -> None:
        """A running UEFI VM writes its variables to ``path`` from now on (a copy of its NVRAM, made by the caller,
        who holds :meth:`lock`): Storage vMotion moves the VM folder."""

    async def move_media(self, uuid: str, drive: str, path: Path) -> None:
        """A running VM's CD/DVD medium is read from ``path`` from now on (a copy of the same image, made by the
        caller, who holds :meth:`lock`): Storage vMotion moves the VM folder with its cloud-init seed ISO."""
        raise NotImplementedError

    # -- guest ----------------------------------------------------------------------------
    @abstractmethod
    async def dirty_sample(self, uuid: str, max_age_s: float, measure: bool) -> DirtySample:
        """The VM's dirty rate and touched RAM."""

    @abstractmethod
    async def health_check(self, uuid: str, req: HealthCheckRequest, host_name: str) -> GuestHealth:
        """Does the guest live here?"""

    # -- guest agent and graceful power ------------------------------------------------------
    @abstractmethod
    async def guest_facts(self, uuid: str, max_age_s: float, deadline_s: float) -> GuestFacts:
        """What the guest agent tells about the guest (cached up to ``max_age_s``); never waits past
        ``deadline_s``: a silent agent gives ``guest_agent: "not answering"``."""

    @abstractmethod
    async def guest_ping(self, uuid: str, deadline_s: float) -> float:
        """The guest agent's round trip in ms; ``GuestAgentSilent`` when it does not answer in time."""

    @abstractmethod
    async def guest_clock_sync(self, uuid: str, deadline_s: float, step_ms: float, host_name: str,
                               set_allowance_s: float) -> GuestClock:
        """Read the guest clock against the host's, set it when off by more than ``step_ms``, read it again.
        Never raises; a silent agent costs ``deadline_s``, a set ``set_allowance_s`` more at most."""

    @abstractmethod
    async def power_graceful(self, uuid: str, action: str, timeout_s: float, force: bool) -> PowerOpResult:
        """Shut down or reboot (``action``) through the guest agent, else ACPI (shutdown) or a reset (reboot);
        a VM that powered off is forgotten like a stopped one."""

    @abstractmethod
    async def reap(self) -> list[tuple[VMPowerEvent, VMSpec]]:
        """The running VMs whose QEMU ended by itself since the last call (the guest powered off, or QEMU died):
        cleaned up and forgotten, with their definitions."""

"""The agent's half of a live migration (driver primitives, Ganeti style).

prepare_incoming -> start_outgoing (watched; parks at pre-switchover only for the handoff)
-> resume_destination -> finalize_source.   cancel_outgoing / abort_incoming undo.
"""
from __future__ import annotations

import asyncio
import hashlib
import collections
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from kvmotion.agent.qemuvm import QemuVM
from kvmotion.agent.qmp import next_event
from kvmotion.agent.tls import ensure_dh_params
from kvmotion.common.errors import ConflictError, KvmotionError, MigrationFailed
from kvmotion.models.agent import (POSTCOPY_STATES, IncomingReady, MigrationPass, MigrationReport, OutgoingRequest,
                                   VMRunState)

log = logging.getLogger(__name__)

PORT_RANGE = range(49152, 49408)
PARK_ENV = "KVMOTION_FAULT_PARK_S"
POLL_S = 0.1
MAX_PASSES_KEPT = 200
TERMINAL = {"completed", "failed", "cancelled"}

Hook = Callable[[QemuVM], Awaitable[None]]


RESERVE_S = 60.0
_handed_out: dict[int, float] = {}      # port -> when: bounded by PORT_RANGE


def pick_port(address: str) -> int:
    """A free port for QEMU to listen on. A port handed out stays reserved for ``RESERVE_S``: between this
    check and QEMU's own bind, a concurrent preparation (several incoming VMs at once) must not get it too."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    now = time.monotonic()
    for port in PORT_RANGE:
        if now - _handed_out.get(port, -RESERVE_S) < RESERVE_S:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
        _handed_out[port] = now
        return port
    raise ConflictError(f"no free migration port on {address} in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}",
                        remedy="wait for running migrations to finish")


def uri_for(address: str, port: int) -> str:
    return f"tcp:[{address}]:{port}" if ":" in address else f"tcp:{address}:{port}"


def _qmp(vm: QemuVM) -> Any:
    if vm.qmp is None:
        raise ConflictError(f"VM {vm.spec.name} has no QMP connection", remedy="the QEMU process is gone")
    return vm.qmp


async def set_caps(vm: QemuVM, caps: dict[str, bool]) -> None:
    await _qmp(vm).execute("migrate-set-capabilities", {
        "capabilities": [{"capability": k, "state": v} for k, v in caps.items()]})


# The destination's self-announce (RARP/GARP for every NIC) when its state is complete: the first at once,
# then after 20, 90, 210, 380 ms (QEMU's default waits 50 ms, then 150, 250, ...): switches learn the new
# port while the guest still resumes, and the repeats cover a switch that missed the first.
ANNOUNCE = {"announce-initial": 20, "announce-max": 200, "announce-rounds": 5, "announce-step": 50}


AUTO_CONVERGE = {"throttle-trigger-threshold": 50, "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                 "max-cpu-throttle": 99}


def stream_caps(multifd_channels: int, xbzrle: bool = False, postcopy: bool = False) -> dict[str, bool]:
    """Capabilities of the migration stream, set explicitly every time: a VM that arrived with multifd
    keeps the capability in its QEMU and would otherwise leave with it. QEMU 7.2 cannot combine multifd with
    post-copy; post-copy must be on both sides."""
    return {"multifd": multifd_channels > 0, "xbzrle": xbzrle and multifd_channels == 0,
            "postcopy-ram": postcopy and multifd_channels == 0}


def in_postcopy(r: MigrationReport) -> bool:
    """Post-copy started: the guest's memory is split between the hosts; the source must never run again."""
    return r.status in POSTCOPY_STATES or bool(r.extra.get("postcopy_started_at"))


def stream_params(multifd_channels: int) -> dict[str, Any]:
    return {"multifd-channels": multifd_channels} if multifd_channels > 0 else {}


async def query_migrate(vm: QemuVM) -> dict[str, Any]:
    return await _qmp(vm).execute("query-migrate", timeout=5)


class MigrationWatch:
    """Follows one migration on one side and keeps a bounded record of its passes."""

    def __init__(self, vm: QemuVM, role: str) -> None:
        self.vm = vm
        self.report = MigrationReport(role=role, status="setup", started_at=time.time())
        self._passes: collections.deque[MigrationPass] = collections.deque(maxlen=MAX_PASSES_KEPT)
        self.task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()
        self._changed = asyncio.Event()      # replaced at every status change: waiters wake at once

    def bump(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, since: str, timeout: float) -> None:
        """Return when the status is no longer ``since``, the watch ended, or after ``timeout`` (a long poll:
        the controller learns of pre-switchover and completion at once instead of at its next poll)."""
        end = time.monotonic() + timeout
        while self.report.status == since and not self.done.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            changed, done = asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(self.done.wait())
            try:
                await asyncio.wait({changed, done}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                done.cancel()

    def snapshot(self) -> MigrationReport:
        self.report.passes = list(self._passes)
        return self.report.model_copy(deep=True)

    def absorb(self, info: dict[str, Any]) -> None:
        r = self.report
        status = info.get("status", r.status)
        if r.status in TERMINAL and status not in TERMINAL:
            return
        if status != r.status:
            r.status = status
            if status in POSTCOPY_STATES:
                r.extra.setdefault("postcopy_started_at", time.time())
            if status != "postcopy-paused":
                r.extra.pop("recover_uri", None)      # a recovery listener is used up once the status moves on
            self.bump()
        for key, attr in (("total-time", "total_time_ms"), ("downtime", "downtime_ms"), ("setup-time", "setup_time_ms")):
            if key in info:
                setattr(r, attr, int(info[key]))
        if info.get("error-desc"):
            r.error = info["error-desc"]
        xb = info.get("xbzrle-cache")
        if xb:          # delta encoding at work: pages sent as deltas, misses, and deltas too big to send
            r.extra["xbzrle"] = {"pages": int(xb.get("pages", 0)), "bytes": int(xb.get("bytes", 0)),
                                 "cache_miss": int(xb.get("cache-miss", 0)), "overflow": int(xb.get("overflow", 0))}
        ram = info.get("ram")
        if ram:
            r.ram_total, r.ram_transferred, r.ram_remaining = ram["total"], ram["transferred"], ram["remaining"]
            r.dirty_pages_rate = int(ram.get("dirty-pages-rate", 0))
            r.mbps = float(ram.get("mbps", 0.0))
            r.extra["multifd_bytes"] = int(ram.get("multifd-bytes", 0))
            if ram.get("postcopy-bytes") or ram.get("postcopy-requests"):
                r.extra["postcopy_bytes"] = int(ram.get("postcopy-bytes", 0))
                r.extra["postcopy_requests"] = int(ram.get("postcopy-requests", 0))
            pass_no = int(ram.get("dirty-sync-count", 0))
            if not self._passes or self._passes[-1].pass_no != pass_no:
                self._passes.append(MigrationPass(
                    t=time.time(), pass_no=pass_no, transferred=r.ram_transferred, remaining=r.ram_remaining,
                    total=r.ram_total, dirty_pages_rate=r.dirty_pages_rate, mbps=r.mbps))
            else:
                last = self._passes[-1]
                last.transferred, last.remaining, last.mbps = r.ram_transferred, r.ram_remaining, r.mbps
                last.dirty_pages_rate = r.dirty_pages_rate
        if "cpu-throttle-percentage" in info:       # auto-converge is throttling the vCPUs
            pct = int(info["cpu-throttle-percentage"])
            r.extra["cpu_throttle_pct"] = pct
            r.extra["max_cpu_throttle_pct"] = max(pct, int(r.extra.get("max_cpu_throttle_pct", 0)))


async def _tls_object(vm: QemuVM, endpoint: str, tls_dir: str) -> str:
    """The process's tls-creds-x509 object for one endpoint and the current certificate files.

    QEMU reads the files when the object is made, so the id carries a digest of them: renewed certificates
    get a new object (object-add blocks QMP for ~0.7 s, so an unchanged one is reused).
    """
    digest = hashlib.sha256(b"".join(
        (Path(tls_dir) / f).read_bytes() for f in ("ca-cert.pem", f"{endpoint}-cert.pem", f"{endpoint}-key.pem")))
    oid = f"kvm-tls-{endpoint}-{digest.hexdigest()[:12]}"
    if oid not in vm.qemu_objects:
        if endpoint == "server":
            ensure_dh_params(Path(tls_dir))
        await _qmp(vm).execute("object-add", {"qom-type": "tls-creds-x509", "id": oid, "dir": tls_dir,
                                              "endpoint": endpoint, "verify-peer": True}, timeout=20)
        vm.qemu_objects.add(oid)
    return oid


async def prepare_incoming(vm: QemuVM, listen_address: str, auto_resume: bool = True,
                           tls_authz_identity: str | None = None, tls_dir: str | None = None,
                           export_disks: list[str] | None = None, multifd_channels: int = 0,
                           postcopy: bool = False) -> IncomingReady:
    """Shadow VM: QEMU is already started with ``-incoming defer -S``; open the listener.

    With ``auto_resume`` the shadow runs (``cont``) the moment its incoming migration completes: the
    source is parked in postmigrate by then, so the guest's pause is QEMU's downtime plus one event,
    not a controller round trip.
    """
    await set_caps(vm, {"events": True, "late-block-activate": True, "return-path": True}
                   | stream_caps(multifd_channels, postcopy=postcopy))
    await _qmp(vm).execute("migrate-set-parameters", ANNOUNCE | stream_params(multifd_channels))
    creds: str | None = None
    if tls_authz_identity:
        if tls_dir is None:
            raise ConflictError("this host has no TLS certificate for encrypted migration",
                                remedy="renew the host's certificate: kvmotion host cert renew HOST")
        creds = await _tls_object(vm, "server", tls_dir)
        await _qmp(vm).execute("object-add", {"qom-type": "authz-simple", "id": "kvm-authz",
                                              "identity": tls_authz_identity})
        await _qmp(vm).execute("migrate-set-parameters", {"tls-creds": creds, "tls-authz": "kvm-authz"})
    else:
        await _qmp(vm).execute("migrate-set-parameters", {"tls-creds": ""})
    nbd_port, exports = (await _export_disks(vm, listen_address, export_disks, creds)) if export_disks else (None, {})
    port = pick_port(listen_address)
    uri = uri_for(listen_address, port)
    watch = MigrationWatch(vm, "destination")
    vm.migration = watch
    qmp = _qmp(vm)
    listener_cm = qmp.listener(("MIGRATION",))
    listener = listener_cm.__enter__()   # registered before migrate-incoming; released by the watcher
    try:
        await qmp.execute("migrate-incoming", {"uri": uri})
    except KvmotionError:
        listener_cm.__exit__(None, None, None)
        raise
    watch.task = asyncio.create_task(_watch_incoming(watch, listener, listener_cm, auto_resume),
                                     name=f"incoming-{vm.spec.name}")
    assert vm.pid is not None
    return IncomingReady(uri=uri, pid=vm.pid, nbd_port=nbd_port, exports=exports)


async def _export_disks(vm: QemuVM, address: str, disk_ids: list[str],
                        creds: str | None) -> tuple[int, dict[str, str]]:
    """Shared-nothing shadow: serve its (empty) disks over NBD, writable, for the source's mirrors (§4).

    With TLS the NBD stream uses the same credentials and client identity check as the memory stream.
    """
    port = pick_port(address)
    server: dict[str, Any] = {"addr": {"type": "inet", "data": {"host": address, "port": str(port)}}}
    if creds:
        server |= {"tls-creds": creds, "tls-authz": "kvm-authz"}
    qmp = _qmp(vm)
    await qmp.execute("nbd-server-start", server, timeout=10)
    exports = {}
    for disk_id in disk_ids:
        name = f"drive-{disk_id}"
        await qmp.execute("block-export-add", {"type": "nbd", "id": f"exp-{disk_id}", "node-name": vm.nodes[disk_id],
                                               "name": name, "writable": True}, timeout=10)
        vm.exports.append(f"exp-{disk_id}")
        exports[disk_id] = name
    return port, exports


async def stop_exports(vm: QemuVM) -> None:
    """After the incoming migration: the source has detached; end the exports and the NBD server."""
    qmp = _qmp(vm)
    for exp in list(vm.exports):
        for attempt in range(50):      # "still in use" while the source's connection closes
            try:
                await qmp.execute("block-export-del", {"id": exp}, timeout=5)
                break
            except KvmotionError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.02)
        vm.exports.remove(exp)
    await qmp.execute("nbd-server-stop", timeout=5)


async def _watch_incoming(watch: MigrationWatch, listener: Any, listener_cm: Any, auto_resume: bool) -> None:
    vm = watch.vm
    r = watch.report
    last_poll = 0.0
    try:
        while vm.alive():
            ev = await next_event(listener, timeout=POLL_S)
            status = ev["data"].get("status") if ev else None
            if status == "completed":
                r.status, r.completed_at = "completed", time.time()
                watch.bump()
                if auto_resume and vm.state == VMRunState.INCOMING:
                    await _run_shadow(vm, r)
                vm.role = "normal"
                break
            if status in ("failed", "cancelled"):
                r.status = status
                break
            if status in POSTCOPY_STATES and status != r.status:
                watch.absorb({"status": status})
            # In post-copy the destination follows events only: its main loop may block on a missing page,
            # and in-band commands would queue up behind it (see ``postcopy.pause``).
            if time.monotonic() - last_poll >= 0.5 and r.status not in POSTCOPY_STATES:
                last_poll = time.monotonic()
                watch.absorb(await query_migrate(vm))
                if r.status in TERMINAL:
                    r.completed_at = r.completed_at or time.time()
                    break
            if auto_resume and r.status == "postcopy-active" and vm.state == VMRunState.INCOMING and \
                    int(r.extra.get("run_attempts", 0)) < 3:
                r.extra["run_attempts"] = int(r.extra.get("run_attempts", 0)) + 1
                try:
                    await _run_postcopy_guest(vm, r)
                except KvmotionError as exc:    # post-copy cannot be given up: retried, then left to the controller
                    log.error("%s: running the guest in post-copy: %s", vm.spec.name, exc.message)
    except KvmotionError as exc:
        r.error = r.error or exc.message
    finally:
        listener_cm.__exit__(None, None, None)
        if not vm.alive() and r.status != "completed":
            r.status = "failed"
            r.error = r.error or "destination QEMU exited during the incoming migration"
        if r.status != "completed":
            r.failed_at = time.time()
        watch.done.set()
        watch.bump()


POSTCOPY_RUN_WAIT_S = 5.0


async def _run_postcopy_guest(vm: QemuVM, r: MigrationReport) -> None:
    """Post-copy: the device state arrives first, then QEMU leaves ``inmigrate`` (paused: the shadow was started
    with -S). Run the guest then, not at completion: that is the point of post-copy. A ``cont`` while still
    ``inmigrate`` would activate the disks before the source released them."""
    qmp = _qmp(vm)
    end = time.monotonic() + POSTCOPY_RUN_WAIT_S
    while (await qmp.execute("query-status", timeout=5))["status"] == "inmigrate":
        if time.monotonic() > end:
            log.error("%s: post-copy started but the device state did not arrive in %.0f s", vm.spec.name,
                      POSTCOPY_RUN_WAIT_S)
            return
        await asyncio.sleep(0.005)
    r.extra["resumed_at"] = time.time()
    await qmp.execute("cont", timeout=5)
    status = (await qmp.execute("query-status", timeout=5))["status"]
    r.extra["resume_confirmed_at"] = time.time()
    r.extra["qemu_status"] = status
    if status == "running":
        vm.transition(VMRunState.RUNNING)      # role stays "incoming" until the last page arrived


async def _run_shadow(vm: QemuVM, r: MigrationReport) -> None:
    qmp = _qmp(vm)
    if vm.exports:
        await stop_exports(vm)
    r.extra["resumed_at"] = time.time()
    await qmp.execute("cont")
    status = (await qmp.execute("query-status"))["status"]
    r.extra["resume_confirmed_at"] = time.time()
    r.extra["qemu_status"] = status
    if status == "running":
        vm.role = "normal"
        vm.transition(VMRunState.RUNNING)


async def start_outgoing(vm: QemuVM, req: OutgoingRequest, handoff: Hook | None = None,
                         tls_dir: str | None = None) -> MigrationWatch:
    if vm.state not in (VMRunState.RUNNING, VMRunState.PAUSED):
        raise ConflictError(f"VM {vm.spec.name} is {vm.state}, not running",
                            remedy="only a running VM can be live-migrated; use cold migration")
    qmp = _qmp(vm)
    await set_caps(vm, {"events": True, "return-path": True, "pause-before-switchover": True,
                        "auto-converge": req.auto_converge}
                   | stream_caps(req.multifd_channels, req.xbzrle_cache_bytes > 0, req.postcopy))
    params: dict[str, Any] = {"max-bandwidth": int(req.max_bandwidth_bytes),
                              "downtime-limit": int(req.downtime_limit_ms), "tls-creds": "", "tls-hostname": ""}
    params |= stream_params(req.multifd_channels)
    if req.postcopy:        # 0: post-copy sends as fast as the link goes
        params["max-postcopy-bandwidth"] = int(req.postcopy_bandwidth_bytes)
    if req.auto_converge:       # QEMU's defaults: throttle once two syncs in a row dirty > 50 % of what was sent
        params |= AUTO_CONVERGE
    if req.xbzrle_cache_bytes > 0 and req.multifd_channels == 0:
        params["xbzrle-cache-size"] = int(req.xbzrle_cache_bytes)
    if req.tls_hostname:
        if tls_dir is None:
            raise ConflictError("this host has no TLS certificate for encrypted migration",
                                remedy="renew the host's certificate: kvmotion host cert renew HOST")
        params["tls-creds"] = vm.tls_client_creds = await _tls_object(vm, "client", tls_dir)
        params["tls-hostname"] = req.tls_hostname
    await qmp.execute("migrate-set-parameters", params)
    watch = MigrationWatch(vm, "source")
    watch.report.extra["postcopy_capable"] = bool(req.postcopy and req.multifd_channels == 0)
    vm.migration = watch
    listener_cm = qmp.listener(("MIGRATION", "MIGRATION_PASS"))
    listener = listener_cm.__enter__()  # registered before `migrate`, released by the watcher
    try:
        await qmp.execute("migrate", {"uri": req.uri})
    except KvmotionError:
        listener_cm.__exit__(None, None, None)
        vm.migration = None
        raise
    vm.transition(VMRunState.MIGRATING_OUT)
    watch.task = asyncio.create_task(_watch_outgoing(watch, listener, listener_cm, req.auto_continue, handoff),
                                     name=f"outgoing-{vm.spec.name}")
    return watch


async def _watch_outgoing(watch: MigrationWatch, listener: Any, listener_cm: Any,
                          auto_continue: bool, handoff: Hook | None) -> None:
    vm = watch.vm
    r = watch.report
    try:
        last_poll = 0.0
        while True:
            ev = await next_event(listener, timeout=POLL_S)
            status = ev["data"].get("status") if ev and ev.get("event") == "MIGRATION" else None
            if status is None and r.status == "pre-switchover" and r.pre_switchover_at is None:
                status = "pre-switchover"            # parked before this agent started (re-adopted): seen by poll
            if status == "pre-switchover" and auto_continue and r.pre_switchover_at is None:
                r.pre_switchover_at = time.time()
                r.status = status
                watch.bump()
                if handoff is not None:
                    await handoff(vm)
                park = float(os.environ.get(PARK_ENV, "0") or 0)
                if park > 0:      # fault injection for tests: hold the switchover; unset in production
                    log.critical("fault injection: parked at pre-switchover for %.1f s", park)
                    await asyncio.sleep(park)
                await _qmp(vm).execute("migrate-continue", {"state": "pre-switchover"})
                r.continued_at = time.time()
                r.parked_ms = (r.continued_at - r.pre_switchover_at) * 1000.0
            now = time.monotonic()
            if status in TERMINAL or now - last_poll >= POLL_S:
                last_poll = now
                watch.absorb(await query_migrate(vm))
            if r.status in TERMINAL:
                break
    except KvmotionError as exc:
        r.status, r.error = "failed", exc.message
    finally:
        listener_cm.__exit__(None, None, None)
        if r.status == "completed":
            r.completed_at = time.time()
            vm.transition(VMRunState.MIGRATED)
        else:
            r.failed_at = time.time()
            await _settle_source(vm)
        watch.done.set()
        watch.bump()


async def _settle_source(vm: QemuVM) -> None:
    """After a failed or cancelled migration the source must be running again."""
    if not vm.alive():
        return
    if vm.migration is not None and in_postcopy(vm.migration.report):
        log.critical("%s: post-copy failed; the source is NOT resumed (the destination ran the guest)",
                     vm.spec.name)
        return
    try:
        status = (await _qmp(vm).execute("query-status"))["status"]
        if status != "running":
            await _qmp(vm).execute("cont")
        vm.transition(VMRunState.RUNNING)
    except KvmotionError as exc:
        log.error("could not resume %s on the source: %s", vm.spec.name, exc)


async def tune(vm: QemuVM, downtime_limit_ms: int | None, max_bandwidth_bytes: int | None) -> dict[str, Any]:
    """Change a running migration's parameters live (QEMU applies them at once)."""
    params: dict[str, Any] = {}
    if downtime_limit_ms is not None:
        params["downtime-limit"] = int(downtime_limit_ms)
    if max_bandwidth_bytes is not None:
        params["max-bandwidth"] = int(max_bandwidth_bytes)
    if params:
        await _qmp(vm).execute("migrate-set-parameters", params)
        if vm.migration is not None:
            vm.migration.report.extra.setdefault("tuning", []).append({"t": time.time(), **params})
    return params


async def cancel_outgoing(vm: QemuVM, timeout: float = 10.0, resume_if_completed: bool = True
                          ) -> MigrationReport | None:
    """Cancel; if QEMU already completed but the destination never ran, resume the source, but only when the
    controller confirmed the destination's shadow is gone (``resume_if_completed``): otherwise the VM could run
    twice, and it stays parked for reconciliation."""
    watch: MigrationWatch | None = vm.migration
    if watch is None:
        return None
    if in_postcopy(watch.report):
        raise ConflictError(f"the migration of {vm.spec.name} is in post-copy: the guest runs on the destination "
                            "and part of its memory is still here; a cancel would lose it",
                            remedy="let it complete; a failed link is paused and recovered")
    if watch.report.status not in TERMINAL:
        try:
            await _qmp(vm).execute("migrate_cancel")
        except KvmotionError as exc:
            log.warning("migrate_cancel on %s: %s", vm.spec.name, exc)
    try:
        await asyncio.wait_for(watch.done.wait(), timeout=timeout)
    except asyncio.TimeoutError as exc:
        raise MigrationFailed(f"migration of {vm.spec.name} did not stop within {timeout:.0f}s after cancel",
                              remedy="inspect the source QEMU; the VM was not handed over") from exc
    if vm.state == VMRunState.MIGRATED and resume_if_completed:
        # Completed on the wire, but the destination was never started: roll back (cookbook §1).
        await _qmp(vm).execute("cont")
        vm.transition(VMRunState.RUNNING)
    return watch.snapshot()


async def resume_destination(vm: QemuVM, timeout: float = 10.0, and_announce: bool = False) -> dict[str, Any]:
    """Make sure the destination runs once its incoming migration completed, and confirm it; with
    ``and_announce`` also send the RARP/GARP series in the same call (one round trip less)."""
    watch: MigrationWatch | None = vm.migration
    if watch is None or watch.report.role != "destination":
        raise ConflictError(f"VM {vm.spec.name} is not an incoming VM here", remedy="prepare the shadow first")
    try:
        await asyncio.wait_for(watch.done.wait(), timeout=timeout)
    except asyncio.TimeoutError as exc:
        raise MigrationFailed(f"incoming state for {vm.spec.name} did not complete within {timeout:.0f}s",
                              remedy="check the migration network") from exc
    r = watch.report
    if r.status != "completed":
        raise MigrationFailed(f"incoming migration of {vm.spec.name} ended {r.status}: {r.error or 'no detail'}",
                              remedy="see the source's migration error")
    if vm.state == VMRunState.INCOMING:
        await _run_shadow(vm, r)
    status = (await _qmp(vm).execute("query-status"))["status"]
    if status != "running":
        raise MigrationFailed(f"VM {vm.spec.name} is {status!r} on the destination after cont",
                              remedy="see the destination's qemu.log")
    out: dict[str, Any] = {"incoming_completed_at": r.completed_at, "resumed_at": r.extra.get("resumed_at"),
                           "confirmed_at": time.time(), "qemu_status": status}
    if and_announce:
        try:
            out["announce"] = await announce(vm)
        except KvmotionError as exc:    # QEMU already announced at completion (ANNOUNCE); the VM runs
            out["announce"] = {"error": exc.message}
    return out


async def announce(vm: QemuVM, rounds: int = 5) -> dict[str, Any]:
    """RARP/GARP: QEMU sent its own announce at completion; send another series from the running VM."""
    params = {"initial": 50, "max": 550, "rounds": rounds, "step": 100}
    await _qmp(vm).execute("announce-self", params)
    return {"announced_at": time.time(), "rounds": rounds, "macs": [n.mac for n in vm.spec.nics]}


async def readopt(vm: QemuVM) -> MigrationWatch | None:
    """After an agent restart: follow the migration QEMU is still running for a re-adopted VM.

    A source parked at pre-switchover is continued (the switchover then completes as if nothing happened). A
    source with block mirrors is cancelled instead: their hand-over at the switchover died with the old agent,
    and a switchover without it would leave the destination's disks behind. A completed incoming state that was
    never run stays incoming, so the controller (or its reconciliation) resumes it.
    """
    info = await query_migrate(vm)
    status = info.get("status")
    if not status or status == "none" or (status in TERMINAL and vm.state == VMRunState.RUNNING):
        return None                         # nothing in flight (e.g. a VM that arrived here and runs)
    role = "destination" if vm.state == VMRunState.INCOMING or vm.role == "incoming" else "source"
    watch = MigrationWatch(vm, role)
    watch.report.extra["readopted_at"] = time.time()
    watch.absorb(info)
    vm.migration = watch
    qmp = _qmp(vm)
    if role == "source" and status not in TERMINAL and status not in POSTCOPY_STATES \
            and (await qmp.execute("query-block-jobs", timeout=5)):
        log.warning("%s: migration with disk mirrors re-adopted: cancelling it", vm.spec.name)
        await qmp.execute("migrate_cancel")
        watch.report.error = "the source agent restarted during a migration with disk mirrors"
    if status in TERMINAL:
        watch.done.set()
        if role == "destination" and status == "completed" and vm.state != VMRunState.RUNNING:
            vm.state = VMRunState.INCOMING
        return watch
    listener_cm = qmp.listener(("MIGRATION", "MIGRATION_PASS"))
    listener = listener_cm.__enter__()
    if role == "source":
        vm.state = VMRunState.MIGRATING_OUT
        watch.task = asyncio.create_task(_watch_outgoing(watch, listener, listener_cm, True, None),
                                         name=f"outgoing-{vm.spec.name}")
    else:       # a destination in post-copy already runs the guest: it is no shadow any more
        running = (await qmp.execute("query-status", timeout=5))["status"] == "running"
        vm.state = VMRunState.RUNNING if running else VMRunState.INCOMING
        watch.task = asyncio.create_task(_watch_incoming(watch, listener, listener_cm, True),
                                         name=f"incoming-{vm.spec.name}")
    vm.save_record()
    return watch

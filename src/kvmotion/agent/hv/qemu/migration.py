"""QEMU live migration, the source's half and what both halves share (driver primitives, Ganeti style).

prepare_incoming (:mod:`.incoming`) -> start_outgoing (watched; parks at pre-switchover only for the handoff)
-> resume_destination (:mod:`.incoming`) -> finalize source.   cancel_outgoing / abort incoming undo.
"""
from __future__ import annotations

import asyncio
import hashlib
import collections
import logging
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from kvmotion.agent.hv.qemu.process import QemuVM
from kvmotion.agent.hv.qemu.qmp import QMPConnection, next_event
from kvmotion.agent.hv.qemu.threads import lower_stream_threads
from kvmotion.agent.hv.state import requires
from kvmotion.agent.tls import ensure_dh_params
from kvmotion.common.errors import ConflictError, KvmotionError, SourceStuck
from kvmotion.models.agent import POSTCOPY_STATES, MigrationPass, MigrationReport, OutgoingRequest, VMRunState

log = logging.getLogger(__name__)

PARK_ENV = "KVMOTION_FAULT_PARK_S"
POLL_S = 0.1
MAX_PASSES_KEPT = 200
TERMINAL = {"completed", "failed", "cancelled"}

Hook = Callable[[QemuVM], Awaitable[None]]


def uri_for(address: str, port: int) -> str:
    return f"tcp:[{address}]:{port}" if ":" in address else f"tcp:{address}:{port}"


def qmp_of(vm: QemuVM) -> QMPConnection:
    if vm.qmp is None:
        raise ConflictError(f"VM {vm.spec.name} has no QMP connection", remedy="the QEMU process is gone")
    return vm.qmp


async def set_caps(vm: QemuVM, caps: dict[str, bool]) -> None:
    await qmp_of(vm).execute("migrate-set-capabilities", {
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
    return await qmp_of(vm).execute("query-migrate", timeout=5)


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


async def tls_object(vm: QemuVM, endpoint: str, tls_dir: str) -> str:
    """The process's tls-creds-x509 object for one endpoint and the current certificate files.

    QEMU reads the files when the object is made, so the id carries a digest of them: renewed certificates
    get a new object (object-add blocks QMP for ~0.7 s, so an unchanged one is reused).
    """
    files = [Path(tls_dir) / f for f in ("ca-cert.pem", f"{endpoint}-cert.pem", f"{endpoint}-key.pem", "ca-crl.pem")]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files if f.exists()))     # a new CRL: a new object
    oid = f"kvm-tls-{endpoint}-{digest.hexdigest()[:12]}"
    if oid not in vm.qemu_objects:
        if endpoint == "server":
            ensure_dh_params(Path(tls_dir))
        await qmp_of(vm).execute("object-add", {"qom-type": "tls-creds-x509", "id": oid, "dir": tls_dir,
                                              "endpoint": endpoint, "verify-peer": True}, timeout=20)
        vm.qemu_objects.add(oid)
    return oid


@requires(VMRunState.RUNNING, VMRunState.PAUSED, remedy="only a running VM can be live-migrated; use cold migration")
async def start_outgoing(vm: QemuVM, req: OutgoingRequest, handoff: Hook | None = None,
                         tls_dir: str | None = None) -> MigrationWatch:
    qmp = qmp_of(vm)
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
        params["tls-creds"] = await tls_object(vm, "client", tls_dir)
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
    watch.task = asyncio.create_task(watch_outgoing(watch, listener, listener_cm, req.auto_continue, handoff,
                                                    req.stream_nice), name=f"outgoing-{vm.spec.name}")
    watch.report.extra["stream_nice"] = req.stream_nice
    return watch


async def settled_query(vm: QemuVM, tries: int = 50, pause_s: float = 0.02) -> dict[str, Any]:
    """``query-migrate``, once its figures are final.

    QEMU 7.2 sets ``completed`` (event and ``query-migrate``) before its migration thread computes ``total-time`` and
    ``downtime`` (``migration_calculate_complete`` runs after the state change), so a query right after the event
    can read 0 for both. Such an answer is asked again (at most ~1 s) before anyone sees the completion."""
    info = await query_migrate(vm)
    for _ in range(tries):
        if info.get("status") != "completed" or info.get("total-time"):
            break
        await asyncio.sleep(pause_s)
        info = await query_migrate(vm)
    return info


async def watch_outgoing(watch: MigrationWatch, listener: Any, listener_cm: Any,
                          auto_continue: bool, handoff: Hook | None, nice: int = 0) -> None:
    vm = watch.vm
    r = watch.report
    reniced: set[int] = set()
    try:
        last_poll = 0.0
        while True:
            if nice:          # the stream's threads appear once `migrate` runs (multifd ones a little later)
                lower_stream_threads(vm.pid, nice, reniced)
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
                await qmp_of(vm).execute("migrate-continue", {"state": "pre-switchover"})
                r.continued_at = time.time()
                r.parked_ms = (r.continued_at - r.pre_switchover_at) * 1000.0
            now = time.monotonic()
            if status in TERMINAL or now - last_poll >= POLL_S:
                last_poll = now
                watch.absorb(await settled_query(vm))
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
        status = (await qmp_of(vm).execute("query-status"))["status"]
        if status != "running":
            await qmp_of(vm).execute("cont")
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
        await qmp_of(vm).execute("migrate-set-parameters", params)
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
            await qmp_of(vm).execute("migrate_cancel")
        except KvmotionError as exc:
            log.warning("migrate_cancel on %s: %s", vm.spec.name, exc)
    try:
        await asyncio.wait_for(watch.done.wait(), timeout=timeout)
    except asyncio.TimeoutError as exc:
        raise SourceStuck(f"migration of {vm.spec.name} did not stop within {timeout:.0f}s after cancel",
                          remedy="inspect the source QEMU; the VM was not handed over") from exc
    if vm.state == VMRunState.MIGRATED and resume_if_completed:
        # Completed on the wire, but the destination was never started: roll back (cookbook §1).
        await qmp_of(vm).execute("cont")
        vm.transition(VMRunState.RUNNING)
    return watch.snapshot()



"""QEMU live migration, the destination's half: the shadow's listener, its watch, running it; and following a
migration again after an agent restart (``readopt``)."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from kvmotion.agent.hv.qemu.migration import (ANNOUNCE, POLL_S, TERMINAL, MigrationWatch, qmp_of, query_migrate,
                                             set_caps, stream_caps, stream_params, tls_object, uri_for, watch_outgoing)
from kvmotion.agent import nbdtls
from kvmotion.agent.hv.qemu.process import QemuVM
from kvmotion.agent.hv.qemu.qmp import next_event
from kvmotion.agent.ports import pick_port
from kvmotion.common.errors import ConflictError, InvalidInputError, KvmotionError, LinkStalled, ShadowFailed
from kvmotion.models.agent import POSTCOPY_STATES, IncomingReady, MigrationReport, VMRunState
from kvmotion.models.nbd import NbdPsk

log = logging.getLogger(__name__)

PSK_SERVER_ID = "kvm-nbd-psk-server"


async def prepare_incoming(vm: QemuVM, listen_address: str, auto_resume: bool = True,
                           tls_authz_identity: str | None = None, tls_dir: str | None = None,
                           export_disks: list[str] | None = None, multifd_channels: int = 0,
                           postcopy: bool = False, nbd_psk: NbdPsk | None = None,
                           key_root: Path | None = None) -> IncomingReady:
    """Shadow VM: QEMU is already started with ``-incoming defer -S``; open the listener.

    A shared-nothing shadow (``export_disks``) serves its disks over NBD with TLS: the memory stream's x509
    credentials and client check, or without them the move's ``nbd_psk`` (its key directory in ``key_root``).

    With ``auto_resume`` the shadow runs (``cont``) the moment its incoming migration completes: the
    source is parked in postmigrate by then, so the guest's pause is QEMU's downtime plus one event,
    not a controller round trip.
    """
    await set_caps(vm, {"events": True, "late-block-activate": True, "return-path": True}
                   | stream_caps(multifd_channels, postcopy=postcopy))
    await qmp_of(vm).execute("migrate-set-parameters", ANNOUNCE | stream_params(multifd_channels))
    creds: str | None = None
    if tls_authz_identity:
        if tls_dir is None:
            raise ConflictError("this host has no TLS certificate for encrypted migration",
                                remedy="renew the host's certificate: kvmotion host cert renew HOST")
        creds = await tls_object(vm, "server", tls_dir)
        await qmp_of(vm).execute("object-add", {"qom-type": "authz-simple", "id": "kvm-authz",
                                              "identity": tls_authz_identity})
        await qmp_of(vm).execute("migrate-set-parameters", {"tls-creds": creds, "tls-authz": "kvm-authz"})
    else:
        await qmp_of(vm).execute("migrate-set-parameters", {"tls-creds": ""})
    nbd_port, exports = None, {}
    if export_disks:
        tls = await nbd_server_tls(vm, creds, nbd_psk, key_root)
        nbd_port, exports = await _export_disks(vm, listen_address, export_disks, tls)
    port = pick_port(listen_address)
    uri = uri_for(listen_address, port)
    watch = MigrationWatch(vm, "destination")
    vm.migration = watch
    qmp = qmp_of(vm)
    listener_cm = qmp.listener(("MIGRATION",))
    listener = listener_cm.__enter__()   # registered before migrate-incoming; released by the watcher
    try:
        await qmp.execute("migrate-incoming", {"uri": uri})
    except KvmotionError:
        listener_cm.__exit__(None, None, None)
        raise
    watch.task = asyncio.create_task(watch_incoming(watch, listener, listener_cm, auto_resume),
                                     name=f"incoming-{vm.spec.name}")
    assert vm.pid is not None
    return IncomingReady(uri=uri, pid=vm.pid, nbd_port=nbd_port, exports=exports)


async def nbd_server_tls(vm: QemuVM, x509_creds: str | None, psk: NbdPsk | None,
                         key_root: Path | None) -> dict[str, str]:
    """The TLS arguments of the shadow's NBD server; it never runs without them.

    x509: the memory stream's server credentials and its ``kvm-authz`` (the source host's client identity).
    Else the move's PSK: a credentials object whose key file stays until the server stops (GnuTLS reads a
    server's key file at each handshake); no authz, QEMU does not apply it to PSK (see :mod:`..nbdtls`).
    """
    if x509_creds:
        return {"tls-creds": x509_creds, "tls-authz": "kvm-authz"}
    if psk is None or key_root is None:
        raise InvalidInputError(f"the NBD server of shadow {vm.spec.name} would run without TLS",
                                remedy="send tls_authz_identity (x509) or nbd_psk with new_disks")
    vm.nbd_keys = nbdtls.server_creds(key_root, None, None, psk)
    for obj in vm.nbd_keys.objects(PSK_SERVER_ID):
        await qmp_of(vm).execute("object-add", obj, timeout=20)
    vm.qemu_objects.add(PSK_SERVER_ID)
    return {"tls-creds": PSK_SERVER_ID}


async def _export_disks(vm: QemuVM, address: str, disk_ids: list[str],
                        tls: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Shared-nothing shadow: serve its (empty) disks over NBD, writable, for the source's mirrors (§4), over
    TLS (``tls``: :func:`nbd_server_tls`)."""
    if not tls.get("tls-creds"):
        raise InvalidInputError("an NBD server without TLS credentials", remedy="see nbd_server_tls")
    port = pick_port(address)
    server: dict[str, Any] = {"addr": {"type": "inet", "data": {"host": address, "port": str(port)}}} | tls
    qmp = qmp_of(vm)
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
    qmp = qmp_of(vm)
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
    if vm.nbd_keys is not None:          # the move's PSK: out of QEMU and off the disk
        await qmp.execute("object-del", {"id": PSK_SERVER_ID}, timeout=5)
        vm.qemu_objects.discard(PSK_SERVER_ID)
        vm.nbd_keys.release()
        vm.nbd_keys = None


async def watch_incoming(watch: MigrationWatch, listener: Any, listener_cm: Any, auto_resume: bool) -> None:
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
    qmp = qmp_of(vm)
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
    qmp = qmp_of(vm)
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


async def resume_destination(vm: QemuVM, timeout: float = 10.0, and_announce: bool = False) -> dict[str, Any]:
    """Make sure the destination runs once its incoming migration completed, and confirm it; with
    ``and_announce`` also send the RARP/GARP series in the same call (one round trip less)."""
    watch: MigrationWatch | None = vm.migration
    if watch is None or watch.report.role != "destination":
        raise ConflictError(f"VM {vm.spec.name} is not an incoming VM here", remedy="prepare the shadow first")
    try:
        await asyncio.wait_for(watch.done.wait(), timeout=timeout)
    except asyncio.TimeoutError as exc:
        raise LinkStalled(f"incoming state for {vm.spec.name} did not complete within {timeout:.0f}s",
                          remedy="check the migration network") from exc
    r = watch.report
    if r.status != "completed":
        raise ShadowFailed(f"incoming migration of {vm.spec.name} ended {r.status}: {r.error or 'no detail'}",
                           remedy="see the source's migration error")
    if vm.state == VMRunState.INCOMING:
        await _run_shadow(vm, r)
    status = (await qmp_of(vm).execute("query-status"))["status"]
    if status != "running":
        raise ShadowFailed(f"VM {vm.spec.name} is {status!r} on the destination after cont",
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
    await qmp_of(vm).execute("announce-self", params)
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
    qmp = qmp_of(vm)
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
        watch.task = asyncio.create_task(watch_outgoing(watch, listener, listener_cm, True, None),
                                         name=f"outgoing-{vm.spec.name}")
    else:       # a destination in post-copy already runs the guest: it is no shadow any more
        running = (await qmp.execute("query-status", timeout=5))["status"] == "running"
        vm.state = VMRunState.RUNNING if running else VMRunState.INCOMING
        watch.task = asyncio.create_task(watch_incoming(watch, listener, listener_cm, True),
                                         name=f"incoming-{vm.spec.name}")
    vm.save_record()
    return watch


"""Post-copy on the agent (QEMU 7.2): start it, pause it when the link fails, and recover it.

Once post-copy starts the guest runs on the destination while part of its memory is still on the source:
neither QEMU may end until the migration completes, and the source is never resumed. A failed link pauses
both sides (QEMU does it itself on an I/O error; ``pause`` does it when the link just stalls), and ``recover``
(destination: ``migrate-recover`` on a new port) plus ``resume`` (source: ``migrate`` with ``resume``) continue
from where it stopped.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from typing import Any

from kvmotion.agent.hv.qemu.migration import MigrationWatch, qmp_of, query_migrate, uri_for
from kvmotion.agent.ports import pick_port
from kvmotion.agent.hv.qemu.process import QemuVM
from kvmotion.common.errors import ConflictError, KvmotionError, DestinationLost
from kvmotion.models.agent import POSTCOPY_STATES

log = logging.getLogger(__name__)

ACTIVE = "postcopy-active"
PAUSED = "postcopy-paused"
PROBE_PORT = 9          # discard: a refused connection proves the address answers as well as an accepted one


def _watch(vm: QemuVM, role: str) -> MigrationWatch:
    w = vm.migration
    if w is None or w.report.role != role:
        raise ConflictError(f"VM {vm.spec.name} has no {'outgoing' if role == 'source' else 'incoming'} "
                            "migration here", remedy="start the migration first")
    return w


async def _status(vm: QemuVM, watch: MigrationWatch) -> str:
    info = await query_migrate(vm)
    watch.absorb(info)
    return str(info.get("status", "none"))


async def start(vm: QemuVM) -> dict[str, Any]:
    """Switch a running pre-copy to post-copy (the source stops, the destination runs and pulls the rest)."""
    w = _watch(vm, "source")
    status = await _status(vm, w)
    if status in POSTCOPY_STATES:
        return {"status": status, "postcopy_started_at": w.report.extra.get("postcopy_started_at")}
    if status != "active":
        raise ConflictError(f"the migration of {vm.spec.name} is {status}; post-copy starts from an active "
                            "pre-copy", remedy="wait for the pre-copy to be active")
    if not w.report.extra.get("postcopy_capable"):
        raise ConflictError(f"the migration of {vm.spec.name} was started without post-copy",
                            remedy="allow post-copy in the VM's migration policy before the migration starts")
    await qmp_of(vm).execute("migrate-start-postcopy", timeout=5)
    w.report.extra["postcopy_started_at"] = time.time()      # from here the source is never resumed
    return {"status": "postcopy-requested", "postcopy_started_at": w.report.extra["postcopy_started_at"]}


async def pause(vm: QemuVM, role: str) -> dict[str, Any]:
    """Pause a post-copy whose link stalls (QEMU pauses by itself only when the socket reports an error).

    The destination is paused out of band and never queried in band: while its link is down its main loop
    blocks on a missing page, and queued in-band commands would end up blocking the monitor for OOB too.
    """
    w = _watch(vm, role)
    status = await _status(vm, w) if role == "source" else w.report.status
    if (status == ACTIVE) if role == "source" else (status != PAUSED):
        try:
            await qmp_of(vm).execute("migrate-pause", timeout=3, oob=True)
            w.report.extra["postcopy_pauses"] = int(w.report.extra.get("postcopy_pauses", 0)) + 1
        except KvmotionError as exc:          # it paused by itself meanwhile (QEMU checks the state)
            log.info("%s: migrate-pause: %s", vm.spec.name, exc.message)
        if role == "source":
            status = await _status(vm, w)
    return {"status": w.report.status if role == "destination" else status}


async def recover_incoming(vm: QemuVM, listen_address: str) -> dict[str, Any]:
    """Destination: listen for the source's reconnection on a new port (out of band, see ``pause``)."""
    w = _watch(vm, "destination")
    pending = w.report.extra.get("recover_uri")     # dropped when the status leaves postcopy-paused
    if pending:
        return {"uri": pending, "status": w.report.status}   # still listening since the last attempt: reuse it
    uri = uri_for(listen_address, pick_port(listen_address))
    try:
        await qmp_of(vm).execute("migrate-recover", {"uri": uri}, timeout=3, oob=True)
    except KvmotionError as exc:                # QEMU checks the state: paused, not yet recovering
        raise ConflictError(f"the incoming post-copy of {vm.spec.name} cannot be recovered now: {exc.message}",
                            remedy="it must be paused first (it pauses by itself when its link fails)") from exc
    w.report.extra["recover_uri"] = uri
    return {"uri": uri, "status": w.report.status}


def reachable(address: str, timeout: float = 1.0) -> bool:
    """Does ``address`` answer on the migration network? A TCP connection attempt to a closed port is answered
    at once by a live host (refused); a dead link times out or has no route. QEMU's own reconnection would wait
    for the kernel's SYN retries (minutes) and cannot be paused meanwhile."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((address, PROBE_PORT))
        except ConnectionRefusedError:
            return True
        except OSError as exc:
            return exc.errno == errno.ECONNREFUSED
    return True


async def resume(vm: QemuVM, uri: str, probe_address: str) -> dict[str, Any]:
    """Source: reconnect a paused post-copy to the destination's recovery listener."""
    w = _watch(vm, "source")
    status = await _status(vm, w)
    if status != PAUSED:
        raise ConflictError(f"the post-copy of {vm.spec.name} is {status}, not paused", remedy="nothing to recover")
    if not await asyncio.to_thread(reachable, probe_address):
        raise DestinationLost(f"the destination's migration address {probe_address} does not answer",
                              remedy="restore the migration link; recovery is retried")
    try:
        await qmp_of(vm).execute("migrate", {"uri": uri, "resume": True}, timeout=10)
    except KvmotionError as exc:
        log.warning("post-copy resume of %s: %s", vm.spec.name, exc)
        raise
    w.report.extra["postcopy_recoveries"] = int(w.report.extra.get("postcopy_recoveries", 0)) + 1
    return {"status": await _status(vm, w)}

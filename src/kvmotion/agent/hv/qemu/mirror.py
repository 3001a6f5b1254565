"""Disk mirrors of a running VM (cookbook §3 and §4): Storage vMotion and the disk half of shared-nothing.

A mirror job copies a disk to its target while the guest keeps writing; READY means the target is in sync
(with write-blocking, every later guest write reaches both). Then either the pivot (``block-job-complete``:
the device now uses the target) or, for shared-nothing, a cancel at pre-switchover (the target is a
consistent copy and the destination QEMU takes over).
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from kvmotion.agent.diskkeys import disk_secret_id
from kvmotion.agent.context import safe_path
from kvmotion.agent import nbdtls
from kvmotion.agent.hv.qemu.argv import cache_node_options, disk_cache, file_node
from kvmotion.agent.hv.qemu.migration import qmp_of, tls_object
from kvmotion.agent.hv.qemu.process import QemuVM
from kvmotion.common.errors import ConflictError, InvalidInputError, KvmotionError, MirrorFailed
from kvmotion.models.agent import DiskSpec, DiskTarget, MirrorJob, MirrorReport

log = logging.getLogger(__name__)

JOB_PREFIX = "kvm-mv-"
PSK_CLIENT_ID = "kvm-nbd-psk-client"


class Mirror:
    """The mirror jobs of one VM, with the targets they write to."""

    def __init__(self, vm: QemuVM, targets: list[DiskTarget], created: list[Path],
                 home_datastore: str | None = None) -> None:
        self.vm = vm
        self.home_datastore = home_datastore     # Storage vMotion: the VM folder moves here at the pivot
        self.targets = {t.disk_id: t for t in targets}
        self.created = created                   # target image files this agent created (removed on cancel)
        self.target_nodes: dict[str, str] = {}   # disk id -> target node name
        self.nbd_creds: str | None = None        # the TLS client object the NBD targets use (nbd_client_creds)
        self.report = MirrorReport(started_at=time.time(), state="mirroring")
        self._last: tuple[float, int] | None = None

    def job_id(self, disk_id: str) -> str:
        return JOB_PREFIX + disk_id


async def target_node_name(vm: QemuVM, disk: DiskSpec) -> str:
    """A node name not in use in the process (a leftover of an interrupted mirror may still be there)."""
    used = {n.get("node-name") for n in await qmp_of(vm).execute("query-named-block-nodes", {"flat": True}, timeout=5)}
    n = 1
    while f"{disk.node}-m{n}" in used or f"{disk.node}-m{n}" in vm.nodes.values():
        n += 1
    return f"{disk.node}-m{n}"


async def nbd_client_creds(vm: QemuVM, targets: list[DiskTarget], tls_dir: str | None,
                           key_root: Path) -> str | None:
    """The TLS client credentials (QOM id) of the NBD targets, made now; None when there is no NBD target.

    x509: the host's client certificate (one object per certificate, shared with the memory stream). PSK: the
    move's key in its own object; QEMU's PSK client reads the key when the object is made, so its key directory
    goes at once; the object goes when the mirror ends (:func:`_drop_psk`).
    """
    nbd = [t for t in targets if t.kind == "nbd"]
    if not nbd:
        return None
    if len({(t.tls_hostname, t.psk) for t in nbd}) > 1:
        raise InvalidInputError("the NBD targets of one mirror name different TLS credentials",
                                remedy="send one tls_hostname or one psk for every NBD target of the move")
    creds = nbdtls.client_creds(key_root, tls_dir, nbd[0].tls_hostname, nbd[0].psk)
    if creds.psk is None:
        assert tls_dir is not None
        return await tls_object(vm, "client", tls_dir)
    try:
        if PSK_CLIENT_ID in vm.qemu_objects:        # a mirror of an earlier move that ended uncleanly
            await qmp_of(vm).execute("object-del", {"id": PSK_CLIENT_ID}, timeout=5)
            vm.qemu_objects.discard(PSK_CLIENT_ID)
        for obj in creds.objects(PSK_CLIENT_ID):
            await qmp_of(vm).execute("object-add", obj, timeout=20)
        vm.qemu_objects.add(PSK_CLIENT_ID)
    finally:
        creds.release()
    return PSK_CLIENT_ID


async def _drop_psk(m: Mirror) -> None:
    """The move's PSK client object, once no NBD target uses it."""
    if m.nbd_creds == PSK_CLIENT_ID and PSK_CLIENT_ID in m.vm.qemu_objects:
        try:
            await qmp_of(m.vm).execute("object-del", {"id": PSK_CLIENT_ID}, timeout=5)
            m.vm.qemu_objects.discard(PSK_CLIENT_ID)
        except KvmotionError as exc:
            log.warning("could not remove the NBD key object of %s: %s", m.vm.spec.name, exc)


def target_blockdev(vm: QemuVM, disk: DiskSpec, t: DiskTarget, node: str,
                    nbd_creds: str | None = None) -> dict[str, Any]:
    """The target node: a new image file, or an NBD export on another host, which is only ever reached over TLS
    (``nbd_creds``; x509 also checks the server's certificate against ``t.tls_hostname``)."""
    if t.kind == "nbd":
        if not nbd_creds:
            raise InvalidInputError(f"the NBD target of {disk.id} has no TLS credentials",
                                    remedy="send tls_hostname (x509) or psk; NBD never runs without TLS")
        server = {"type": "inet", "host": t.nbd_host, "port": str(t.nbd_port)}
        dev: dict[str, Any] = {"driver": "nbd", "node-name": node, "server": server, "export": t.export,
                               "tls-creds": nbd_creds}
        if t.tls_hostname:
            dev["tls-hostname"] = t.tls_hostname
        return dev
    path = safe_path(vm.ctx, t.datastore, t.path)
    cache = cache_node_options(disk_cache(disk, vm.ctx, t.datastore))    # as a restart on the target would open it
    dev = {"node-name": node, "driver": t.format, "cache": cache, "file": file_node(str(path), cache)}
    if disk.encrypted:
        dev["encrypt"] = {"format": "luks", "key-secret": disk_secret_id(disk.node)}
    return dev


async def start(m: Mirror, speed_bytes: int, copy_mode: str) -> None:
    """Attach every target and start every job; on any error, undo what was done."""
    vm, qmp = m.vm, qmp_of(m.vm)
    disks = {d.id: d for d in vm.spec.disks}
    try:
        for disk_id, t in m.targets.items():
            disk = disks[disk_id]
            node = await target_node_name(vm, disk)
            await qmp.execute("blockdev-add", target_blockdev(vm, disk, t, node, m.nbd_creds), timeout=30)
            m.target_nodes[disk_id] = node
            args: dict[str, Any] = {"job-id": m.job_id(disk_id), "device": vm.nodes[disk_id], "target": node,
                                    "sync": "full", "copy-mode": copy_mode, "auto-dismiss": False}
            if speed_bytes:
                args["speed"] = int(speed_bytes)
            await qmp.execute("blockdev-mirror", args, timeout=10)
    except KvmotionError:
        await cancel(m)
        raise


async def poll(m: Mirror) -> MirrorReport:
    """Refresh the report from ``query-jobs`` (status, error) and ``query-block-jobs`` (offset, length)."""
    r = m.report
    if r.state in ("pivoted", "cancelled") or not m.vm.alive():
        if r.state in ("mirroring", "ready"):
            r.state, r.error = "failed", r.error or "the VM's QEMU exited during the mirror"
        return r
    qmp = qmp_of(m.vm)
    jobs = {j["id"]: j for j in await qmp.execute("query-jobs", timeout=5)}
    blocks = {j["device"]: j for j in await qmp.execute("query-block-jobs", timeout=5)}
    out = []
    for disk_id, t in m.targets.items():
        jid = m.job_id(disk_id)
        job, blk = jobs.get(jid, {}), blocks.get(jid, {})
        out.append(MirrorJob(disk_id=disk_id, job_id=jid, target=t.export or f"{t.datastore}:{t.path}",
                             status=job.get("status", "absent"), ready=bool(blk.get("ready")) or
                             job.get("status") == "ready", offset=int(blk.get("offset", job.get("current-progress", 0))),
                             length=int(blk.get("len", job.get("total-progress", 0))), error=job.get("error")))
    r.jobs = out
    r.done, r.total = sum(j.offset for j in out), sum(j.length for j in out)
    now = time.monotonic()
    if m._last is not None and now > m._last[0]:
        rate = (r.done - m._last[1]) / (now - m._last[0])
        r.mbps = round(0.6 * r.mbps + 0.4 * max(rate, 0) * 8 / 1e6, 1) if r.mbps else round(max(rate, 0) * 8 / 1e6, 1)
    m._last = (now, r.done)
    failed = [j for j in out if j.error or j.status in ("aborting", "absent") or
              (j.status == "concluded" and not j.ready)]
    if failed:
        r.state = "failed"
        r.error = "; ".join(f"{j.disk_id}: {j.error or j.status}" for j in failed)
    elif out and all(j.ready for j in out):
        if r.state != "ready":
            r.state, r.ready_at = "ready", time.time()
    return r


async def _wait_concluded(m: Mirror, deadline_s: float) -> dict[str, dict[str, Any]]:
    qmp = qmp_of(m.vm)
    end = time.monotonic() + deadline_s
    wanted = {m.job_id(d) for d in m.targets}
    while True:
        jobs = {j["id"]: j for j in await qmp.execute("query-jobs", timeout=5) if j["id"] in wanted}
        if all(j["status"] in ("concluded", "null") for j in jobs.values()):
            return jobs
        if time.monotonic() > end:
            raise MirrorFailed(f"the disk mirrors of {m.vm.spec.name} did not conclude within {deadline_s:.0f}s",
                               remedy="check the target datastore or the destination host")
        await asyncio.sleep(0.02)


async def _dismiss(m: Mirror, jobs: dict[str, dict[str, Any]]) -> None:
    for jid in jobs:
        try:
            await qmp_of(m.vm).execute("job-dismiss", {"id": jid}, timeout=5)
        except KvmotionError:
            pass


async def pivot(m: Mirror, deadline_s: float = 60.0) -> float:
    """``block-job-complete`` every job, wait for them, drop the old nodes. Returns the I/O stall in ms."""
    if m.report.state != "ready":
        raise ConflictError(f"the mirrors of {m.vm.spec.name} are {m.report.state}, not ready",
                            remedy="wait until every disk is in sync")
    qmp = qmp_of(m.vm)
    t0 = time.monotonic()
    for disk_id in m.targets:
        await qmp.execute("block-job-complete", {"device": m.job_id(disk_id)}, timeout=10)
    jobs = await _wait_concluded(m, deadline_s)
    stall_ms = (time.monotonic() - t0) * 1000.0
    errors = {jid: j["error"] for jid, j in jobs.items() if j.get("error")}
    await _dismiss(m, jobs)
    if errors:
        m.report.state, m.report.error = "failed", "; ".join(f"{k}: {v}" for k, v in errors.items())
        raise MirrorFailed(f"the pivot of {m.vm.spec.name} failed: {m.report.error}",
                           remedy="the VM keeps its original disks; check the target datastore")
    for disk_id, node in m.target_nodes.items():
        old = m.vm.nodes[disk_id]
        m.vm.nodes[disk_id] = node
        try:
            await qmp.execute("blockdev-del", {"node-name": old}, timeout=10)
        except KvmotionError as exc:
            log.warning("could not close the old node %s of %s: %s", old, m.vm.spec.name, exc)
    m.report.state = "pivoted"
    return stall_ms


async def complete_at_switchover(m: Mirror, deadline_s: float = 30.0) -> None:
    """Shared-nothing, at pre-switchover: the NBD targets are in sync; cancel (= complete without pivot)."""
    qmp = qmp_of(m.vm)
    for disk_id in m.targets:
        await qmp.execute("block-job-cancel", {"device": m.job_id(disk_id)}, timeout=10)
    jobs = await _wait_concluded(m, deadline_s)
    errors = {jid: j["error"] for jid, j in jobs.items() if j.get("error")}
    await _dismiss(m, jobs)
    for node in m.target_nodes.values():
        await qmp.execute("blockdev-del", {"node-name": node}, timeout=10)
    m.target_nodes.clear()
    await _drop_psk(m)
    if errors:
        raise MirrorFailed(f"the disk streams of {m.vm.spec.name} failed at switchover: {errors}",
                           remedy="the VM stays on the source; check the destination host")
    m.report.state = "pivoted"


async def cancel(m: Mirror) -> None:
    """Stop every job, detach every target, remove the target files this agent created.

    After a pivot the targets are the VM's disks: nothing is undone then.
    """
    vm = m.vm
    if m.report.state == "pivoted":
        return
    if vm.alive() and vm.qmp is not None:
        qmp = vm.qmp
        wanted = {m.job_id(d) for d in m.targets}
        try:
            live = {j["id"]: j for j in await qmp.execute("query-jobs", timeout=5) if j["id"] in wanted}
            for jid, j in live.items():
                if j["status"] not in ("concluded", "null", "aborting"):
                    await qmp.execute("block-job-cancel", {"device": jid, "force": True}, timeout=10)
            if live:
                await _dismiss(m, await _wait_concluded(m, 30.0))
        except KvmotionError as exc:
            log.warning("cancelling the mirrors of %s: %s", vm.spec.name, exc)
        for node in list(m.target_nodes.values()):
            try:
                await qmp.execute("blockdev-del", {"node-name": node}, timeout=10)
            except KvmotionError as exc:
                log.warning("could not detach %s from %s: %s", node, vm.spec.name, exc)
        m.target_nodes.clear()
        await _drop_psk(m)
    for path in m.created:
        path.unlink(missing_ok=True)
    if m.report.state not in ("failed",):
        m.report.state = "cancelled"

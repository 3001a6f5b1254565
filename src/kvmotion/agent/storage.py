"""The agent's storage primitives: disk mirrors of running VMs, cold copies, VM folders, disk leases.

Mixed into :class:`kvmotion.agent.service.Agent`; the controller decides the order, the agent executes.
"""
from __future__ import annotations

import asyncio
import base64
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kvmotion.agent import images, lease as leases, nbdtls
from kvmotion.agent.context import HostContext, nvram_file, place, safe_path, vm_folder, vm_place
from kvmotion.agent.hv.base import Hypervisor
from kvmotion.agent.ports import pick_port
from kvmotion.common import confined
from kvmotion.common.confined import Place
from kvmotion.common.errors import ConflictError, InvalidInputError, NotFoundError
from kvmotion.models.boot import BOOT_FILES, NVRAM_FILE
from kvmotion.models.cloudinit import SEED_ISO, moves_with_folder, seed_path
from kvmotion.models.nbd import NbdPsk
from kvmotion.models.agent import (DiskCopyRequest, DiskCopyStatus, DiskExport, DiskSpec, DiskTarget, LeaseInfo,
                                   MirrorReport, MirrorRequest, PivotReport, VMSpec)

if TYPE_CHECKING:
    from kvmotion.agent.config import AgentConfig

HOME_FILES = (*BOOT_FILES, NVRAM_FILE, SEED_ISO, "vm.json")
MAX_HOME_BYTES = 256 << 20


__all__ = ["AgentStorage", "disk_file", "lease_files", "safe_path", "source_file"]


def disk_file(ctx: HostContext, disk: DiskSpec) -> Path:
    """A file disk's image: inside its datastore (see :func:`kvmotion.agent.context.safe_path`)."""
    return safe_path(ctx, disk.datastore, disk.path)


def source_file(ctx: HostContext, source: str) -> Path:
    """A cold copy's local source: an absolute path to a regular file inside one of this host's datastores,
    reached without a symbolic link."""
    remedy = "give the image's path on this host, inside one of its datastores (the file itself, not a link)"
    if not source or "\x00" in source or not source.startswith("/"):
        raise InvalidInputError(f"copy source {source!r} is not an absolute path without NUL bytes", remedy=remedy)
    where = confined.locate(source, [r.resolve() for r in ctx.datastore_paths.values()])
    if where is None:
        raise InvalidInputError(f"copy source {source!r} is not a plain path inside a datastore of host "
                                f"{ctx.host_name}", remedy="copy from a datastore this host mounts, or through an "
                                "NBD export (write the path without '..', '//' or a trailing '/')")
    st = where.stat()
    if st is None:
        raise NotFoundError(f"{source} does not exist on {ctx.host_name}", remedy="check the VM's disks")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"copy source {source!r} is not a regular file", remedy="name a disk image")
    return where.path


def home_names(spec: VMSpec) -> tuple[str, ...]:
    """The VM folder's files that move with it (vm.json is written anew): the test kernel, the UEFI NVRAM."""
    return (BOOT_FILES if spec.boot == "kernel" else ()) + ((NVRAM_FILE,) if spec.firmware == "uefi" else ())


def present_home_names(folder: Place, spec: VMSpec) -> tuple[str, ...]:
    """The files to move: ``home_names``, and the cloud-init seed ISO when the folder has one."""
    return home_names(spec) + ((SEED_ISO,) if (folder / SEED_ISO).stat() is not None else ())


def disk_place(ctx: HostContext, disk: DiskSpec) -> Place:
    """:func:`disk_file` as a :class:`Place`: what the agent itself opens, unlinks or locks next to it."""
    return place(ctx, disk.datastore, disk.path)


def lease_files(ctx: HostContext, spec: VMSpec) -> list[Place]:
    return leases.lease_paths(vm_place(ctx, spec), [disk_place(ctx, d) for d in spec.disks if d.kind == "file"])


def write_vm_json(folder: Place, spec: VMSpec) -> None:
    (folder / "vm.json").write(spec.model_dump_json(indent=1).encode())


class AgentStorage:
    cfg: AgentConfig
    hv: Hypervisor
    copies: dict[str, images.CopyJob]
    nbd_exports: dict[str, images.NbdExport]

    def context(self) -> HostContext:
        raise NotImplementedError

    def _tls_dir_if_valid(self) -> str | None:
        raise NotImplementedError

    @property
    def nbd_key_root(self) -> Path:
        """Where the PSK key directories of this host's NBD stream ends live while they run."""
        return nbdtls.key_root(self.cfg.state_dir)

    # -- leases -----------------------------------------------------------------------------------
    def take_leases(self, spec: VMSpec, expected_holder: str | None) -> LeaseInfo:
        return leases.take_all(lease_files(self.context(), spec), spec.uuid, self.cfg.name, expected_holder)

    def release_leases(self, spec: VMSpec) -> int:
        return leases.release_all(lease_files(self.context(), spec), self.cfg.name)

    def lease_holders(self, spec: VMSpec) -> dict[str, str]:
        out = {}
        for p in lease_files(self.context(), spec):
            lease = leases.read_lease(p)
            out[str(p)] = lease.host if lease else ""
        return out

    # -- sizes ------------------------------------------------------------------------------------
    def measure(self, spec: VMSpec, formats: dict[str, str], preallocate: bool) -> dict[str, int]:
        """MiB each disk needs in its new format (disk id -> MiB); the VM folder's files too ("home")."""
        ctx = self.context()
        out = {}
        for d in spec.disks:
            if d.kind == "file" and d.id in formats:
                verbatim = d.encrypted
                fmt = "raw" if verbatim else formats[d.id]
                out[d.id] = images.measure_mb(disk_file(ctx, d), "raw" if verbatim else d.format, fmt,
                                              preallocate and fmt == "raw" and not verbatim)
        folder = vm_place(ctx, spec)
        out["home"] = sum(st.st_size for f in HOME_FILES if (st := (folder / f).stat()) is not None) >> 20
        return out

    # -- VM folders ---------------------------------------------------------------------------------
    def home_files(self, spec: VMSpec) -> dict[str, str]:
        """The VM folder's files to relay, each read from the datastore's root without following a link."""
        folder = vm_place(self.context(), spec)
        return {name: base64.b64encode((folder / name).read(MAX_HOME_BYTES)).decode()
                for name in present_home_names(folder, spec)}

    def put_home(self, spec: VMSpec, files: dict[str, str]) -> str:
        """Create the VM folder from another host's copy; refuses to overwrite an existing folder."""
        folder = vm_place(self.context(), spec)
        if any(name in HOME_FILES for name in folder.listdir()):
            raise ConflictError(f"folder {folder} already holds a VM", remedy="remove the leftover folder first")
        expected = home_names(spec)
        if not set(expected) <= set(files) <= {*expected, SEED_ISO}:
            raise InvalidInputError(f"VM folder files {sorted(files)} are not the ones VM {spec.name} has",
                                    remedy="send exactly: " + (", ".join(expected) or "nothing")
                                    + f" (and {SEED_ISO} when it has one)")
        folder.make_dirs()
        for name, data in files.items():
            (folder / name).write(base64.b64decode(data))
        write_vm_json(folder, spec)
        return str(folder)

    def _copy_home(self, old: VMSpec, new: VMSpec) -> None:
        src, dst = vm_place(self.context(), old), vm_place(self.context(), new)
        if src == dst:
            return
        dst.make_dirs()
        for name in present_home_names(src, old):  # the NVRAM as of the pivot: the caller reopens QEMU's on the copy
            (dst / name).write((src / name).read(MAX_HOME_BYTES))
        write_vm_json(dst, new)

    def remove_files(self, spec: VMSpec, disk_ids: list[str], home: bool) -> list[str]:
        """Delete a VM's files left behind by a move: the named disks and/or its folder.

        Refuses any file a QEMU on this host still has open, and any disk leased by another host.
        """
        ctx = self.context()
        doomed = [disk_place(ctx, d) for d in spec.disks if d.id in disk_ids and d.kind == "file"]
        in_use = {str(p) for p in doomed if self.hv.holds_open(p.path)}
        if in_use:
            raise ConflictError(f"{', '.join(sorted(in_use))} is still open by a VM on {self.cfg.name}",
                                remedy="the move has not finished; nothing was deleted")
        for p in doomed:
            lease = leases.read_lease(leases.disk_lease_path(p))
            if lease is not None and lease.host and lease.host != self.cfg.name:
                raise ConflictError(f"{p} is leased by {lease.host}", remedy="nothing was deleted")
        removed = [str(f) for p in doomed for f in (p, leases.disk_lease_path(p)) if f.unlink()]
        for parent in {p.parent for p in doomed}:
            if parent.rel.parts and parent.stat() is not None and not parent.listdir():
                confined.rmdir_in(parent.root, parent.rel)         # the disk's folder, now empty
        if home:
            folder = vm_place(ctx, spec)
            if spec.uuid in self.hv.uuids() and vm_folder(ctx, self.hv.spec(spec.uuid)) == folder.path:
                raise ConflictError(f"the VM folder {folder} belongs to a VM running here", remedy="nothing to do")
            if folder.rmtree():
                removed.append(str(folder))
        return removed

    # -- mirrors (running VMs) ------------------------------------------------------------------------
    async def mirror_start(self, uuid: str, req: MirrorRequest) -> MirrorReport:
        spec = self.hv.spec(uuid)
        disks = {d.id: d for d in spec.disks}
        created: list[Path] = []
        try:
            for t in req.targets:
                disk = disks.get(t.disk_id)
                if disk is None or disk.kind != "file":
                    raise InvalidInputError(f"VM {spec.name} has no image disk {t.disk_id!r}",
                                            remedy="name one of: " + ", ".join(d.id for d in spec.disks))
                if t.kind == "nbd":         # its TLS credentials: hv.mirror_start (mirror.nbd_client_creds)
                    continue
                path = await self._new_target(disk, t, req.disk_keys)
                created.append(path)
            return await self.hv.mirror_start(uuid, req.targets, created, req.home_datastore, req.speed_bytes,
                                              req.copy_mode, self._tls_dir_if_valid())
        except BaseException:
            for p in created:
                p.unlink(missing_ok=True)
            raise

    async def _new_target(self, disk: DiskSpec, t: DiskTarget, disk_keys: dict[str, str]) -> Path:
        """A mirror's target image on a datastore of this host, created empty."""
        path = safe_path(self.context(), t.datastore, t.path)
        if path.exists():
            raise ConflictError(f"{path} already exists", remedy="remove the leftover file or pick another datastore")
        key = disk_keys.get(disk.node) if disk.encrypted else None
        if disk.encrypted and key is None:
            raise ConflictError(f"no key for encrypted disk {disk.id}", remedy="move it through the controller")
        await asyncio.to_thread(images.create_image, path, t.format, disk.size_mb,
                                preallocate=t.preallocate, passphrase=key)
        return path

    async def mirror_status(self, uuid: str) -> MirrorReport:
        return await self.hv.mirror_status(uuid)

    async def mirror_speed(self, uuid: str, speed_bytes: int) -> None:
        await self.hv.mirror_speed(uuid, speed_bytes)

    async def mirror_cancel(self, uuid: str) -> MirrorReport:
        return await self.hv.mirror_cancel(uuid)

    async def mirror_pivot(self, uuid: str) -> PivotReport:
        """Storage vMotion's switch: the VM now runs on the new images; the old ones are closed, not deleted."""
        ctx = self.context()
        async with self.hv.lock(uuid):
            old = self.hv.spec(uuid)
            stall, targets, home_datastore = await self.hv.mirror_pivot(uuid)
            moved = {t.disk_id: t for t in targets}
            disks = [d.model_copy(update={"datastore": moved[d.id].datastore, "path": moved[d.id].path,
                                          "format": moved[d.id].format, "backing": None, "backing_format": None})
                     if d.id in moved else d for d in old.disks]      # a full mirror flattens a linked clone
            home = home_datastore or old.boot_datastore
            new = old.model_copy(update={"disks": disks, "boot_datastore": home})
            if home != old.boot_datastore:
                await asyncio.to_thread(self._copy_home, old, new)
                if new.firmware == "uefi":        # QEMU writes the new NVRAM from here on, the old one is closed
                    await self.hv.move_nvram(uuid, nvram_file(ctx, new))
                for cd in new.cdroms:             # the seed ISO: read from the new folder's copy
                    if moves_with_folder(cd, new):
                        await self.hv.move_media(uuid, cd.id, safe_path(ctx, new.boot_datastore, seed_path(new)))
            else:
                write_vm_json(vm_place(ctx, new), new)
            self.take_leases(new, expected_holder=None)
            self.hv.set_spec(uuid, new)
            old_files = [disk_place(ctx, d) for d in old.disks if d.id in moved]
            new_files = [disk_place(ctx, d) for d in new.disks if d.id in moved]
            closed = not any(self.hv.holds_open(p.path, uuid) for p in old_files)
            for d in new.disks:        # the mirror leaves zero areas as holes: allocate them again
                if d.id in moved and moved[d.id].preallocate:
                    await asyncio.to_thread(_fallocate, disk_place(ctx, d))
            leases.release_all([leases.disk_lease_path(p) for p in old_files], self.cfg.name)
            if home != old.boot_datastore:
                leases.release_one(vm_place(ctx, old) / leases.LEASE_FILE, self.cfg.name)
        return PivotReport(pivoted_at=time.time(), write_stall_ms=round(stall, 2), old_files=[str(p) for p in old_files],
                           new_files=[str(p) for p in new_files], old_files_closed=closed, spec=new)

    def check_images(self, spec: VMSpec, disk_ids: list[str]) -> dict[str, dict[str, object]]:
        ctx = self.context()
        out: dict[str, dict[str, object]] = {}
        for d in spec.disks:
            if d.id in disk_ids and d.kind == "file":
                ok, text = images.check_image(disk_file(ctx, d), "raw" if d.encrypted else d.format)
                out[d.id] = {"ok": ok, "detail": text}
        return out

    # -- cold copies ----------------------------------------------------------------------------------
    def disk_export(self, spec: VMSpec, disk_id: str, listen_address: str, tls_authz_identity: str | None,
                    psk: NbdPsk | None) -> DiskExport:
        """A read-only TLS export of a powered-off VM's disk: x509 admitting only ``tls_authz_identity`` (the
        destination host's client certificate), or the move's ``psk``."""
        disk = next((d for d in spec.disks if d.id == disk_id and d.kind == "file"), None)
        if disk is None:
            raise NotFoundError(f"VM {spec.name} has no image disk {disk_id}", remedy="check the disk id")
        if spec.uuid in self.hv.uuids():
            raise ConflictError(f"VM {spec.name} runs on {self.cfg.name}", remedy="power it off for a cold migration")
        path = disk_file(self.context(), disk)
        creds = nbdtls.server_creds(self.nbd_key_root, self._tls_dir_if_valid(), tls_authz_identity, psk)
        exp = images.NbdExport(path, disk.format, listen_address, pick_port(listen_address), disk.encrypted, creds)
        try:
            out = exp.start()
            self.nbd_exports[out.export_id] = exp
            exp.wait_listening()
        except Exception:
            exp.stop()
            self.nbd_exports.pop(exp.export_id, None)
            raise
        return out

    def disk_export_stop(self, export_id: str) -> bool:
        exp = self.nbd_exports.pop(export_id, None)
        if exp is None:
            return False
        exp.stop()
        return True

    def disk_copy(self, req: DiskCopyRequest) -> DiskCopyStatus:
        if bool(req.source_path) == bool(req.source_uri):
            raise InvalidInputError("give exactly one of source_path and source_uri", remedy="fix the request")
        ctx = self.context()
        target = safe_path(ctx, req.datastore, req.path)
        if target.exists():
            raise ConflictError(f"{target} already exists", remedy="remove the leftover file or pick another datastore")
        if req.source_path:
            req = req.model_copy(update={"source_path": str(source_file(ctx, req.source_path))})
        if len(self.copies) >= images.MAX_COPY_JOBS_KEPT:
            for jid in [j for j, c in self.copies.items() if c.status.ended_at][:16]:
                self.copies.pop(jid)
        creds = nbdtls.client_creds(self.nbd_key_root, self._tls_dir_if_valid(), req.source_tls_hostname,
                                    req.source_psk) if req.source_uri else None
        job = images.CopyJob(req, target, creds)
        try:
            job.argvs()             # a source it cannot read (no credentials) is refused now, not in the job
        except Exception:
            if creds is not None:
                creds.release()
            raise
        job.task = asyncio.create_task(job.run(), name=f"copy-{job.status.job}")
        self.copies[job.status.job] = job
        return job.status

    def copy_status(self, job_id: str) -> DiskCopyStatus:
        job = self.copies.get(job_id)
        if job is None:
            raise NotFoundError(f"no disk copy {job_id} on {self.cfg.name}", remedy="check the job id")
        return job.status

    async def copy_cancel(self, job_id: str) -> DiskCopyStatus:
        job = self.copies.get(job_id)
        if job is None:
            raise NotFoundError(f"no disk copy {job_id} on {self.cfg.name}", remedy="check the job id")
        job.stop()
        if job.task is not None:
            await asyncio.wait_for(asyncio.shield(job.task), timeout=15)
        job.target.unlink(missing_ok=True)
        return job.status

    def create_disks(self, spec: VMSpec, disk_ids: list[str], disk_keys: dict[str, str]) -> list[Path]:
        """Empty images of the VM's size and format (a shared-nothing shadow's targets)."""
        ctx = self.context()
        created: list[Path] = []
        try:
            for d in spec.disks:
                if d.id not in disk_ids:
                    continue
                path = disk_file(ctx, d)
                if path.exists():
                    raise ConflictError(f"{path} already exists on {self.cfg.name}",
                                        remedy="remove the leftover file or pick another datastore")
                images.create_image(path, d.format, d.size_mb, passphrase=disk_keys.get(d.node) if d.encrypted else None)
                created.append(path)
        except BaseException:
            for p in created:
                p.unlink(missing_ok=True)
            raise
        return created


def _fallocate(image: Place) -> None:
    """Allocate every block of a raw image (content unchanged; safe while QEMU uses it)."""
    fd = image.open(os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)

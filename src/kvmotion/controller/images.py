"""The image library: import a user's disk image (qcow2, raw, vmdk, vhdx, vdi) into a datastore, list, show and
delete images, and bring in a VMware VM from an OVF package. Typed service functions shared by the API and tests.

An import checks the file at once (bad input is refused by the request, nothing written), then runs as a task
(phases convert, check, checksum, with percent) within ``IMAGE_IMPORT_TIMEOUT_S``. The name is reserved first, so a
second import of it is refused, and released on any failure.
"""
from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common.errors import (AgentUnreachable, ConflictError, DeadlineExceeded, InvalidInputError, KvmotionError,
                                   NotFoundError)
from kvmotion.controller import imagestore, ovf
from kvmotion.controller import tasks as task_store
from kvmotion.controller.agents import IMAGE_IMPORT_TIMEOUT_S, AgentClient
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.tasks import TaskJournal
from kvmotion.models.devices import NicRequest
from kvmotion.models.api import TaskOut, VMCreate, VMOut
from kvmotion.models.moves import TaskKind
from kvmotion.models.images import (AgentImageImport, AgentImportStatus, ImageImport, ImageOut, OvfClose, OvfMachine, OvfOpen,
                                    OvfPackage, OvfImport)

log = logging.getLogger(__name__)
POLL_S = 0.5
AGENT_SILENCE_S = 60.0              # the agent may miss polls this long before the import counts as lost
PHASE_START = {"convert": 0.0, "check": 80.0, "checksum": 90.0}     # the task's overall percent per phase
PHASE_SHARE = {"convert": 80.0, "check": 10.0, "checksum": 10.0}


def _overall(phase: str, percent: float) -> float:
    return PHASE_START.get(phase, 0.0) + PHASE_SHARE.get(phase, 0.0) * min(percent, 100.0) / 100.0


class ImageLibrary:
    def __init__(self, sessions: sessionmaker[Session], inventory: Inventory) -> None:
        self.sessions = sessions
        self.inventory = inventory
        self._running: dict[str, asyncio.Task[ImageOut]] = {}

    def list_images(self) -> list[ImageOut]:
        return imagestore.list_images(self.sessions)

    def get_image(self, name: str) -> ImageOut:
        return imagestore.get_image(self.sessions, name)

    def host_for(self, datastore: str, host: str | None = None) -> str:
        """A connected host that mounts ``datastore`` (``host`` itself when given)."""
        stores = {d["name"]: d for d in self.inventory.datastores()}
        if datastore not in stores:
            raise NotFoundError(f"datastore {datastore!r} is not in the inventory (known: "
                                f"{', '.join(sorted(stores)) or 'none'})", remedy="pass --datastore with a known "
                                "datastore (kvmotion host show HOST lists a host's)", details={"datastore": datastore})
        candidates = [h for h in stores[datastore]["hosts"] if host is None or h == host]
        connected = [h for h in candidates if self.inventory.get_host(h).state == "connected"]
        if not connected:
            who = f"host {host}" if host else "no connected host"
            raise ConflictError(f"{who} does not mount datastore {datastore} (or is not connected)",
                                remedy="reconnect a host that mounts it, or name one with --host",
                                details={"datastore": datastore, "hosts": stores[datastore]["hosts"]})
        return connected[0]

    async def import_image(self, req: ImageImport) -> TaskOut:
        """Reserve the name, let the agent check the file (bad input is refused here, nothing written), then follow
        its copy as a task (phases convert, check, checksum, with percent); the name is released on failure."""
        host = self.host_for(req.datastore, req.host)
        imagestore.reserve(self.sessions, req.name, req.datastore)
        try:
            job = await self.inventory.agent(host).image_import(
                AgentImageImport(name=req.name, file=req.file, datastore=req.datastore))
            journal = TaskJournal.create(self.sessions, str(TaskKind.IMAGE_IMPORT), "", req.name, host,
                                         req.datastore, req.model_dump())
        except BaseException:
            imagestore.forget(self.sessions, req.name)
            raise
        self._running[journal.id] = asyncio.create_task(self._follow(journal, host, job), name=f"import-{req.name}")
        return journal.read()

    def running_tasks(self) -> list[asyncio.Task[ImageOut]]:
        """The imports this controller follows now."""
        return list(self._running.values())

    async def wait(self, task_id: str) -> ImageOut:
        """The outcome of an import this controller runs (raises its error)."""
        return await self._running[task_id]

    async def _follow(self, journal: TaskJournal, host: str, job: AgentImportStatus) -> ImageOut:
        end = time.monotonic() + IMAGE_IMPORT_TIMEOUT_S
        phase, silent_since = "", None
        try:
            while job.state == "running":
                if job.phase != phase:
                    if phase:
                        journal.end_phase()
                    phase = job.phase
                    journal.begin_phase(phase, PHASE_START.get(phase, 0.0))
                journal.live({"phase": phase, "percent": round(job.percent, 1)}, progress=_overall(phase, job.percent))
                if time.monotonic() > end:
                    raise DeadlineExceeded(f"the import of {job.name} took longer than {IMAGE_IMPORT_TIMEOUT_S:g} s",
                                           remedy="check the datastore's speed, then import again")
                await asyncio.sleep(POLL_S)
                try:
                    job, silent_since = await self.inventory.agent(host).image_import_status(job.job), None
                except AgentUnreachable:
                    silent_since = silent_since or time.monotonic()
                    if time.monotonic() - silent_since > AGENT_SILENCE_S:
                        raise
            if job.state != "success" or job.result is None:
                raise KvmotionError.from_dict(job.error or {"message": "the import failed"})
            image = imagestore.complete(self.sessions, job.name, job.result)
            journal.end_phase()
            journal.finish("success", result=image.model_dump())
            return image
        except BaseException as exc:
            imagestore.forget(self.sessions, job.name)
            err = exc if isinstance(exc, KvmotionError) else KvmotionError(f"the import stopped: {exc!r}")
            journal.end_phase("failed")
            journal.finish("error", error=err.to_dict())
            raise
        finally:
            self._running.pop(journal.id, None)

    def abandon_unfinished(self) -> None:
        """After a restart: imports this controller no longer follows end in error, their names released."""
        for t in task_store.unfinished(self.sessions, kind=str(TaskKind.IMAGE_IMPORT)):
            if t.id in self._running:
                continue
            imagestore.forget(self.sessions, t.vm_name)
            TaskJournal(self.sessions, t.id).finish("error", error={
                "code": "CONFLICT", "message": f"the controller restarted while importing image {t.vm_name}",
                "remedy": f"import it again (if {t.destination} holds images/{t.vm_name}.qcow2 already, remove it)"})

    async def delete_image(self, name: str) -> None:
        """Remove every copy, then the record; refused while a VM was made from it."""
        image = self.get_image(name)
        if image.state != "ready":
            raise ConflictError(f"image {name!r} is being imported", remedy="wait for its import task to finish "
                                "(kvmotion task list), then delete it", details={"image": name})
        if image.used_by:
            raise ConflictError(f"image {name!r} is used by VM(s) {', '.join(image.used_by)}",
                                remedy="delete those VMs first (a linked clone needs its base; a full clone records "
                                "its source)", details={"image": name, "vms": image.used_by})
        for copy in image.copies:
            host = self.host_for(copy.datastore)
            await self.inventory.agent(host).image_remove(copy.datastore, name)
        imagestore.forget(self.sessions, name)

    # -- OVF -----------------------------------------------------------------------------------------------
    async def import_ovf(self, req: OvfImport) -> VMOut:
        """An OVF/OVA package as a new VM (powered off): its disk through the library, then a full clone."""
        if req.datastore not in {d["name"] for d in self.inventory.datastores() if req.host in d["hosts"]}:
            raise InvalidInputError(f"datastore {req.datastore!r} is not accessible on {req.host}",
                                    remedy="pass --datastore with a datastore the host mounts")
        agent = self.inventory.agent(req.host)
        pkg = await agent.ovf_open(OvfOpen(file=req.file, datastore=req.datastore))
        try:
            machine = ovf.parse(pkg.descriptor)
            name = req.name or machine.name
            _check_package(machine, pkg)
            if any(v.name == name for v in self.inventory.list_vms()):
                raise ConflictError(f"a VM named {name!r} already exists", remedy="pass --name with another name")
            return await self._create_from(machine, pkg, name, req, agent)
        finally:
            if pkg.workdir:
                await _close(agent, OvfClose(workdir=pkg.workdir, datastore=req.datastore))

    async def _create_from(self, machine: OvfMachine, pkg: OvfPackage, name: str, req: OvfImport,
                           agent: AgentClient) -> VMOut:
        image = f"{name}-disk0"
        task = await self.import_image(ImageImport(name=image, file=f"{pkg.folder}/{machine.disks[0].file}",
                                                   datastore=req.datastore, host=req.host))
        await self.wait(task.id)
        try:
            nics = [NicRequest(portgroup=req.network, mac=n.mac) for n in machine.nics]
            return await self.inventory.create_vm(VMCreate(
                name=name, host=req.host, memory_mb=machine.memory_mb, vcpus=machine.vcpus, datastore=req.datastore,
                image=image, clone="full", boot="disk", firmware=machine.firmware,
                **({"nics": nics} if nics else {"network": req.network})))
        except BaseException:
            await self.delete_image(image)
            raise


def _check_package(machine: OvfMachine, pkg: OvfPackage) -> None:
    if len(machine.disks) > 1:
        raise InvalidInputError(f"the OVF VM has {len(machine.disks)} disks; kvmotion imports a VM with one disk",
                                remedy="detach the data disks before exporting, and import them with "
                                "`kvmotion image import`")
    for d in machine.disks:
        if d.file not in pkg.files:
            raise InvalidInputError(f"the OVF names disk file {d.file!r}, which the package lacks",
                                    remedy="give the complete package (the .ovf with its disk files)")
        if pkg.manifest and d.file not in pkg.manifest:
            raise InvalidInputError(f"the package's manifest does not cover disk file {d.file!r}",
                                    remedy="give the package as exported (its manifest lists every file)")


async def _close(agent: AgentClient, req: OvfClose) -> None:
    try:
        await agent.ovf_close(req)
    except KvmotionError as exc:      # the import's own outcome matters more; the folder is named in the log
        log.warning("could not remove the OVA folder %s: %s", req.workdir, exc)

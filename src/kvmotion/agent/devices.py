"""Disks added to and removed from a VM on this host: their image files, and hot-plug on a running VM.

Every image file is confined to its datastore (``disk_file`` → ``safe_path``); nothing is left half made: a new image
is removed again when plugging it fails.
"""
from __future__ import annotations

import asyncio
import subprocess

from kvmotion.agent import images
from kvmotion.agent.service import Agent
from kvmotion.agent.storage import disk_file, disk_place
from kvmotion.common.errors import ConflictError, InvalidInputError, KvmotionError
from kvmotion.models.agent import DiskSpec, VMSpec
from kvmotion.models.devices import DiskChange


def _new_image(agent: Agent, disk: DiskSpec) -> None:
    if disk.kind != "file" or disk.encrypted or disk.backing:
        raise InvalidInputError(f"disk {disk.id}: only plain file disks are added to a VM",
                                remedy="add an unencrypted qcow2 or raw disk")
    path = disk_file(agent.context(), disk)
    if path.exists():
        raise ConflictError(f"{disk.path} already exists on datastore {disk.datastore}",
                            remedy="remove the leftover file, or name the disk differently", details={"path": str(path)})
    images.create_image(path, disk.format, disk.size_mb)


async def create_disk(agent: Agent, change: DiskChange) -> DiskSpec:
    """A powered-off VM's new disk: its empty image (qemu-img, with a deadline), off the event loop."""
    if change.spec.uuid in agent.hv.uuids():
        raise ConflictError(f"VM {change.spec.name} runs on {agent.cfg.name}", remedy="hot-plug the disk instead")
    await asyncio.to_thread(_new_image, agent, change.disk)
    return change.disk


async def plug_disk(agent: Agent, change: DiskChange) -> VMSpec:
    """A running VM's new disk: its image, then QMP hot-plug; the image is removed again when plugging fails."""
    uuid = change.spec.uuid
    spec = agent.hv.spec(uuid)
    await asyncio.to_thread(_new_image, agent, change.disk)
    try:
        await agent.hv.plug_disk(uuid, change.disk)
    except (KvmotionError, OSError, subprocess.TimeoutExpired):
        disk_place(agent.context(), change.disk).unlink()
        raise
    spec = agent.hv.spec(uuid)
    agent.take_leases(spec, expected_holder=agent.cfg.name)     # the new image's lease (the others are held)
    return spec


async def unplug_disk(agent: Agent, uuid: str, disk_id: str, delete_file: bool) -> VMSpec:
    """Hot-unplug a running VM's disk; then its image is deleted, unless kept."""
    before = agent.hv.spec(uuid)
    disk = await agent.hv.unplug_disk(uuid, disk_id)
    if delete_file and disk.kind == "file":
        agent.remove_files(before, [disk.id], home=False)
    return agent.hv.spec(uuid)


def remove_disk_file(agent: Agent, spec: VMSpec, disk_id: str) -> list[str]:
    """A powered-off VM's removed disk: its image (refused while a QEMU here still has it open)."""
    return agent.remove_files(spec, [disk_id], home=False)

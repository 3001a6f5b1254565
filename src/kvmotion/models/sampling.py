"""A VM's dirty rate as its host measures it (kept apart from models.agent, which re-exports it)."""
from __future__ import annotations

from pydantic import BaseModel


class DirtySample(BaseModel):
    """A VM's dirty rate and touched RAM, as measured on its host (see ``kvmotion.agent.hv.qemu.sampling``)."""

    dirty_mb_s: float
    sampled_at: float
    memory_mb: int
    ram_touched_mb: int | None = None       # resident guest RAM: the non-zero pages a migration must send

"""Is the guest alive after a move: what the agent samples (kvmotion.agent.hv.qemu.health) and its verdict."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class HealthCheckRequest(BaseModel):
    window_s: float = Field(default=1.5, ge=0.5, le=10.0, allow_inf_nan=False)   # how long counters are watched
    since: float | None = Field(default=None, ge=0, allow_inf_nan=False)   # agent clock; None: since it arrived
    probe: bool = True                    # ARP probes to the guest's IP on its first NIC (answered: it lives)


class VcpuHealth(BaseModel):
    thread_id: int
    cpus: list[int]                       # the vCPUs this thread runs (TCG single-threaded: all of them)
    busy_pct: float | None = None         # utime+stime over the window, % of one core


class NicHealth(BaseModel):
    nic: str
    tap: str
    tx_packets: int | None = None         # host -> guest: frames QEMU took from the tap during the window
    tx_dropped: int | None = None         # host -> guest: frames the tap dropped (its queue was full)
    guest_frames: int = 0                 # guest -> host frames the guest itself sent (QEMU's RARP not counted)
    probes_sent: int = 0
    probes_answered: int = 0
    error: str | None = None


class GuestHealth(BaseModel):
    verdict: str = Field(default="unknown", pattern="^(healthy|unhealthy|unknown)$")
    reasons: list[str] = Field(default_factory=list)      # why this verdict, with the numbers
    evidence: list[str] = Field(default_factory=list)     # every signal as it was read
    host: str = ""
    run_state: str | None = None          # QEMU query-status, "exited" or "no-answer" (hung); None: not read
    window_s: float = 0.0
    vcpus: list[VcpuHealth] = Field(default_factory=list)
    nics: list[NicHealth] = Field(default_factory=list)
    events: list[dict[str, Any]] = Field(default_factory=list)   # QMP events that end a guest's life, since the move
    console: list[str] = Field(default_factory=list)             # alarming console lines written since the move
    errors: list[str] = Field(default_factory=list)              # what could not be sampled
    checked_at: float = 0.0

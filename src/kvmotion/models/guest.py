"""Guest integration through qemu-guest-agent: guest facts, the clock after a move, graceful power operations,
and the power-offs a guest does by itself (how the controller's inventory learns of them)."""
from __future__ import annotations

from pydantic import BaseModel, Field

from kvmotion.models.agent import VMRuntime

NOT_ANSWERING = "not answering"
ANSWERING = "answering"
MAX_POWER_TIMEOUT_S = 1800
CLOCK_STEP_MS = 128.0
"""A guest clock off by more than this is set after a move; less is left alone (ntpd's step threshold: below it a
time daemon slews, and stepping a clock that is almost right only makes it jump)."""


class GuestInterface(BaseModel):
    name: str
    mac: str | None = None
    addresses: list[str] = Field(default_factory=list)        # ADDRESS/PREFIX, IPv4 and IPv6


class GuestFilesystem(BaseModel):
    mountpoint: str
    type: str
    device: str = ""
    total_bytes: int | None = None
    used_bytes: int | None = None


class GuestFacts(BaseModel):
    """What the guest agent says about the guest; ``guest_agent`` is "answering" or "not answering"."""

    guest_agent: str = NOT_ANSWERING
    collected_at: float | None = None       # when these facts were read from the guest (wall clock)
    cached: bool = False                     # served from the host agent's cache, not read now
    agent_version: str | None = None
    os: dict[str, str] | None = None        # pretty_name, name, id, version, version_id, kernel_release, machine
    hostname: str | None = None
    ip_addresses: list[str] = Field(default_factory=list)   # every address but loopback's, ADDRESS/PREFIX
    interfaces: list[GuestInterface] = Field(default_factory=list)
    filesystems: list[GuestFilesystem] = Field(default_factory=list)
    errors: dict[str, str] = Field(default_factory=dict)    # command -> its error, while the agent answered
    error: str | None = None                 # why the agent is not answering now
    remedy: str | None = None
    last_answer_at: float | None = None     # when the agent last answered (facts from then may be above)


class ClockSyncRequest(BaseModel):
    deadline_s: float = Field(default=2.0, ge=0.2, le=30, description="for the sync and the first read")
    set_allowance_s: float = Field(default=3.0, ge=0, le=30, description="more for a set and the read after it")
    step_ms: float = Field(default=CLOCK_STEP_MS, ge=0, le=86_400_000)


class GuestClock(BaseModel):
    """The guest's clock against its host's, after a move: ``offset`` = guest − host, in ms."""

    offset_before_ms: float | None = None
    offset_after_ms: float | None = None
    set: bool = False
    why: str = ""
    host: str = ""
    rtt_ms: float | None = None             # one guest-get-time round trip (the offsets' uncertainty)
    seconds: float = 0.0                     # what the whole exchange took


class PowerRequest(BaseModel):
    """A graceful power operation: the guest agent first, else ACPI (shutdown) or a reset (reboot)."""

    model_config = {"extra": "forbid"}

    timeout_s: float = Field(default=120.0, ge=1, le=MAX_POWER_TIMEOUT_S,
                             description="how long the guest may take; then --force acts, or the call fails")
    force: bool = Field(default=False, description="after the timeout: hard stop (shutdown) or reset (reboot)")


class PowerOpResult(BaseModel):
    action: str                   # shutdown | reboot
    method: str                   # guest-agent | acpi | reset
    outcome: str                  # poweredOff | rebooted | reset | forced-off | forced-reset
    forced: bool = False
    seconds: float = 0.0          # from the request to the guest's end (or its reset)
    guest_agent_error: str | None = None    # why the guest agent was not used
    note: str = ""                # what the caller should know (a reset is no clean reboot)
    runtime: VMRuntime | None = None


class VMPowerEvent(BaseModel):
    """A VM whose QEMU ended by itself on this host (the guest powered off, or QEMU died): the agent forgot it."""

    uuid: str
    name: str
    at: float
    reason: str
    guest_initiated: bool = False


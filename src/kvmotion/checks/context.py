"""Everything a compatibility decision needs, gathered beforehand (the checks themselves do no I/O)."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvmotion.models.agent import HostFacts, VMSpec
from kvmotion.models.moves import MoveKind

HOST_LIMIT_SLOW = 4          # concurrent migrations per host below 10 GbE
HOST_LIMIT_FAST = 8          # at 10 GbE or more
FAST_LINK_MBPS = 10_000
DATASTORE_LIMIT = 128        # concurrent vMotions per datastore
MIN_LINK_MBPS = 250
MEMORY_HEADROOM_MB = 64


def host_slots(link_mbps: int) -> int:
    """Concurrent migrations a host may run: 4 below 10 GbE, 8 at 10 GbE or more (SPEC §3)."""
    return HOST_LIMIT_FAST if link_mbps >= FAST_LINK_MBPS else HOST_LIMIT_SLOW


@dataclass(frozen=True)
class HostView:
    name: str
    state: str                       # connected | disconnected
    maintenance: bool
    facts: HostFacts | None
    running_migrations: int = 0      # migrations in flight that involve this host

    def host_limit(self) -> int:
        speeds = [i.speed_mbps or 0 for i in (self.facts.migration_interfaces if self.facts else []) if i.enabled]
        return host_slots(max(speeds, default=0))


@dataclass(frozen=True)
class MigrationContext:
    spec: VMSpec
    power_state: str
    source: HostView
    destination: HostView
    vm_cpu_features: frozenset[str] | None = None       # what the VM sees (expanded on the source)
    vm_migrating: bool = False
    datastore_migrations: dict[str, int] = field(default_factory=dict)   # datastore -> migrations in flight
    datastore_limit: int = DATASTORE_LIMIT
    kind: MoveKind = MoveKind.VMOTION
    target_spec: VMSpec | None = None                   # the VM after the move (None: same files)
    required_mb: dict[str, int] = field(default_factory=dict)   # target datastore -> MiB the move writes there
    moved_disks: tuple[str, ...] = ()                   # disk ids that get new image files

    @property
    def after(self) -> VMSpec:
        return self.target_spec or self.spec

"""The registered kinds of move: what each needs, and its declared phase machine.

Every kind lists its phases in order with the phases each may go to (its transition table) and where each
starts in the task's 0..100 progress. The engine refuses a transition the table does not declare; ROLLBACK is
reachable from every phase before the kind's commit point, RECONCILE from every phase. Scheduler, service and
prechecks ask the registry instead of comparing kind strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvmotion.common.errors import InvalidInputError, PhaseTableViolation
from kvmotion.models.moves import MoveKind, Phase

P = Phase


@dataclass(frozen=True)
class Kind:
    name: MoveKind
    title: str
    powered_on: bool                 # the VM must run (live kinds) or be off (cold)
    crosses_hosts: bool | None       # True: always; False: never; None: either (cold)
    moves_memory: bool               # a live memory migration (pre-copy, switchover, …)
    moves_files: bool | None         # True: always; False: never; None: when the request names datastores
    transitions: dict[Phase, frozenset[Phase]]
    progress_at: dict[Phase, float]
    commit: frozenset[Phase] = field(default_factory=frozenset)   # from these on: completed, never rolled back

    @property
    def phases(self) -> tuple[Phase, ...]:
        return tuple(self.transitions)

    @property
    def first(self) -> Phase:
        return self.phases[0]

    def allows(self, before: Phase | None, after: Phase) -> bool:
        """Whether the table declares ``before -> after`` (None: the task has no phase yet)."""
        if after == P.RECONCILE:
            return True
        if after == P.ROLLBACK:
            return before is not None and before not in self.commit
        if before is None:
            return after == self.first
        return after in self.transitions.get(before, frozenset())

    def check(self, before: Phase | None, after: Phase) -> None:
        if not self.allows(before, after):
            raise PhaseTableViolation(f"a {self.name} move may not go from {before or 'its start'} to {after}",
                                remedy="report this bug; the move was stopped before acting")

    def is_local(self, source: str, destination: str) -> bool:
        """Nothing crosses hosts: admission counts it against the datastores only."""
        return self.crosses_hosts is False or (self.crosses_hosts is None and source == destination)


def _table(*chain: tuple[Phase, tuple[Phase, ...]]) -> dict[Phase, frozenset[Phase]]:
    return {phase: frozenset(nxt) for phase, nxt in chain}


_LIVE_TAIL = ((P.PRECOPY, (P.SWITCHOVER,)), (P.SWITCHOVER, (P.RESUME, P.POSTCOPY)), (P.POSTCOPY, (P.RESUME,)),
              (P.RESUME, (P.ANNOUNCE,)), (P.ANNOUNCE, (P.RELEASE,)), (P.RELEASE, ()))
_LIVE_PROGRESS = {P.PRECHECK: 0, P.SHADOW: 5, P.DISKS: 6, P.PRECOPY: 10, P.SWITCHOVER: 90, P.POSTCOPY: 91,
                  P.RESUME: 93, P.ANNOUNCE: 96, P.RELEASE: 97}
_LIVE_COMMIT = frozenset({P.ANNOUNCE, P.RELEASE})      # and, by the engine, once resumed or in post-copy

KINDS: dict[MoveKind, Kind] = {k.name: k for k in (
    Kind(MoveKind.VMOTION, "vMotion", powered_on=True, crosses_hosts=True, moves_memory=True, moves_files=False,
         transitions=_table((P.PRECHECK, (P.SHADOW,)), (P.SHADOW, (P.PRECOPY,)), *_LIVE_TAIL),
         progress_at=_LIVE_PROGRESS, commit=_LIVE_COMMIT),
    Kind(MoveKind.XVMOTION, "shared-nothing vMotion", powered_on=True, crosses_hosts=True, moves_memory=True,
         moves_files=True,
         transitions=_table((P.PRECHECK, (P.SHADOW,)), (P.SHADOW, (P.DISKS,)), (P.DISKS, (P.PRECOPY,)), *_LIVE_TAIL),
         progress_at=_LIVE_PROGRESS, commit=_LIVE_COMMIT),
    Kind(MoveKind.SVMOTION, "Storage vMotion", powered_on=True, crosses_hosts=False, moves_memory=False,
         moves_files=True,
         transitions=_table((P.PRECHECK, (P.MIRROR,)), (P.MIRROR, (P.PIVOT,)), (P.PIVOT, (P.VERIFY,)),
                            (P.VERIFY, (P.CLEANUP,)), (P.CLEANUP, ())),
         progress_at={P.PRECHECK: 0, P.MIRROR: 5, P.PIVOT: 85, P.VERIFY: 92, P.CLEANUP: 96},
         commit=frozenset({P.VERIFY, P.CLEANUP})),
    Kind(MoveKind.COLD, "cold migration", powered_on=False, crosses_hosts=None, moves_memory=False, moves_files=None,
         transitions=_table((P.PRECHECK, (P.COPY,)), (P.COPY, (P.REGISTER,)), (P.REGISTER, (P.CLEANUP,)),
                            (P.CLEANUP, ())),
         progress_at={P.PRECHECK: 0, P.COPY: 5, P.REGISTER: 85, P.CLEANUP: 95},
         commit=frozenset({P.CLEANUP})),
)}


def kind(name: str | MoveKind) -> Kind:
    try:
        return KINDS[MoveKind(name)]
    except ValueError:
        raise InvalidInputError(f"{name!r} is not a kind of move",
                                remedy="one of: " + ", ".join(k.value for k in KINDS)) from None


def kind_for(powered_on: bool, host_changes: bool, files_move: bool) -> MoveKind:
    """The kind a request is, from the VM's power state and what it changes."""
    if not powered_on:
        return MoveKind.COLD
    if host_changes:
        return MoveKind.XVMOTION if files_move else MoveKind.VMOTION
    return MoveKind.SVMOTION

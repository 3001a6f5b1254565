"""The VM run-state machine: which states may follow which, and the one guard over it (``requires``)."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Protocol, TypeVar

from kvmotion.common.errors import WrongState
from kvmotion.models.agent import VMRunState

TRANSITIONS: dict[VMRunState, frozenset[VMRunState]] = {
    VMRunState.STARTING: frozenset({VMRunState.RUNNING, VMRunState.INCOMING, VMRunState.PAUSED, VMRunState.STOPPED}),
    VMRunState.RUNNING: frozenset({VMRunState.MIGRATING_OUT, VMRunState.PAUSED, VMRunState.STOPPED}),
    VMRunState.PAUSED: frozenset({VMRunState.RUNNING, VMRunState.MIGRATING_OUT, VMRunState.STOPPED}),
    VMRunState.INCOMING: frozenset({VMRunState.PAUSED, VMRunState.RUNNING, VMRunState.STOPPED}),
    VMRunState.MIGRATING_OUT: frozenset({VMRunState.RUNNING, VMRunState.MIGRATED, VMRunState.STOPPED}),
    VMRunState.MIGRATED: frozenset({VMRunState.RUNNING, VMRunState.STOPPED}),
    VMRunState.STOPPED: frozenset(),
}


class Guarded(Protocol):
    """What the guard reads: a VM with a name and a run state."""

    state: VMRunState

    @property
    def name(self) -> str: ...


F = TypeVar("F", bound=Callable[..., Any])


def wrong_state(vm: Guarded, allowed: frozenset[VMRunState], doing: str, remedy: str) -> WrongState:
    return WrongState(f"VM {vm.name} is {vm.state}; {doing} needs it "
                      f"{' or '.join(sorted(str(s) for s in allowed))}", remedy=remedy,
                      details={"state": str(vm.state), "allowed": sorted(str(s) for s in allowed)})


BUSY = "wait for the current operation on this VM to finish"


def requires(*states: VMRunState, remedy: str = BUSY) -> Callable[[F], F]:
    """Guard a function whose first argument is a :class:`Guarded` VM: refuse (``WrongState``, HTTP 409) unless
    the VM is in one of ``states``."""
    allowed = frozenset(states)

    def wrap(fn: F) -> F:
        doing = fn.__name__.strip("_").replace("_", " ")

        def check(vm: Guarded) -> None:
            if vm.state not in allowed:
                raise wrong_state(vm, allowed, doing, remedy)

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def guarded_async(vm: Guarded, *args: Any, **kwargs: Any) -> Any:
                check(vm)
                return await fn(vm, *args, **kwargs)
            return guarded_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def guarded(vm: Guarded, *args: Any, **kwargs: Any) -> Any:
            check(vm)
            return fn(vm, *args, **kwargs)
        return guarded  # type: ignore[return-value]
    return wrap


def check_transition(vm: Guarded, new: VMRunState) -> None:
    """Refuse a state change the table does not allow."""
    if new != vm.state and new not in TRANSITIONS[vm.state]:
        raise wrong_state(vm, frozenset(s for s, nxt in TRANSITIONS.items() if new in nxt), f"going to {new}", BUSY)

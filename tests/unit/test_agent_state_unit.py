"""The agent's run-state guard and its failure classes, without QEMU."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from kvmotion.agent.hv.state import TRANSITIONS, check_transition, requires
from kvmotion.common.errors import (ConflictError, DestinationLost, ErrorCode, KvmotionError, LinkStalled,
                                    MigrationFailed, MirrorFailed, ShadowFailed, SourceStuck, WrongState)
from kvmotion.models.agent import VMRunState


@dataclass
class FakeVM:
    name: str
    state: VMRunState


@requires(VMRunState.RUNNING, VMRunState.PAUSED, remedy="power it on first")
async def migrate(vm: FakeVM, uri: str) -> str:
    return uri


@requires(VMRunState.MIGRATED)
def finalize(vm: FakeVM) -> bool:
    return True


def test_the_guard_lets_allowed_states_through() -> None:
    assert asyncio.run(migrate(FakeVM("vm1", VMRunState.PAUSED), "tcp:x")) == "tcp:x"
    assert finalize(FakeVM("vm1", VMRunState.MIGRATED))


def test_the_guard_names_the_state_and_the_remedy() -> None:
    with pytest.raises(WrongState) as exc:
        asyncio.run(migrate(FakeVM("vm1", VMRunState.INCOMING), "tcp:x"))
    err = exc.value
    assert isinstance(err, ConflictError) and err.http_status == 409
    assert err.details == {"state": "incoming", "allowed": ["paused", "running"]}
    assert err.remedy == "power it on first" and "vm1 is incoming" in str(err)
    with pytest.raises(WrongState):
        finalize(FakeVM("vm1", VMRunState.RUNNING))


def test_transitions_follow_the_table() -> None:
    for old, allowed in TRANSITIONS.items():
        for new in VMRunState:
            vm = FakeVM("vm1", old)
            if new == old or new in allowed:
                check_transition(vm, new)
            else:
                with pytest.raises(WrongState):
                    check_transition(vm, new)


@pytest.mark.parametrize("cls", [LinkStalled, DestinationLost, ShadowFailed, SourceStuck, MirrorFailed])
def test_failures_keep_the_wire_code_and_come_back_as_their_class(cls: type[MigrationFailed]) -> None:
    err = cls("it failed", remedy="retry")
    wire = err.to_dict()
    assert wire["code"] == ErrorCode.MIGRATION_FAILED and wire["details"] == {"failure": cls.failure}
    back = KvmotionError.from_dict(wire)
    assert type(back) is cls and isinstance(back, MigrationFailed) and back.message == "it failed"


def test_a_plain_migration_failure_has_no_failure_detail() -> None:
    wire = MigrationFailed("it failed").to_dict()
    assert "details" not in wire and type(KvmotionError.from_dict(wire)) is MigrationFailed

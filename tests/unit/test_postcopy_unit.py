"""Post-copy guards on the agent that need no QEMU: a source in post-copy is never cancelled or resumed."""
from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from kvmotion.agent.hv.qemu import migration, postcopy
from kvmotion.common.errors import ConflictError


def _source(status: str, **extra: object) -> SimpleNamespace:
    vm = SimpleNamespace(spec=SimpleNamespace(name="pc"), qmp=None, migration=None)
    w = migration.MigrationWatch(vm, "source")  # type: ignore[arg-type]
    w.report.status = status
    w.report.extra.update(extra)
    vm.migration = w
    return vm


@pytest.mark.parametrize("status", ["postcopy-active", "postcopy-paused", "postcopy-recover"])
def test_a_source_in_postcopy_is_never_cancelled(status: str) -> None:
    with pytest.raises(ConflictError, match="post-copy.*would lose it"):
        asyncio.run(migration.cancel_outgoing(_source(status)))


def test_a_failed_postcopy_source_is_not_resumed() -> None:
    # the watch saw post-copy start, then the migration failed: the source must stay stopped
    vm = _source("failed", postcopy_started_at=1.0)
    vm.alive = lambda: True
    asyncio.run(migration._settle_source(vm))       # would need QMP (None here) if it tried to resume
    assert migration.in_postcopy(vm.migration.report)


def test_the_status_moving_on_drops_a_used_recovery_listener() -> None:
    vm = _source("postcopy-paused", recover_uri="tcp:198.19.0.12:49200")
    vm.migration.absorb({"status": "postcopy-paused"})
    assert vm.migration.report.extra["recover_uri"]          # still listening: reused by the next attempt
    vm.migration.absorb({"status": "postcopy-recover"})
    assert "recover_uri" not in vm.migration.report.extra
    assert vm.migration.report.extra["postcopy_started_at"] > 0


def test_reachable_tells_a_live_address_from_a_dead_one() -> None:
    with socket.socket() as s:                  # a live host answers a closed port at once (refused)
        s.bind(("127.0.0.1", 0))
        assert postcopy.reachable("127.0.0.1", timeout=1.0)
    assert not postcopy.reachable("100::1", timeout=0.3)   # RFC 6666 discard-only prefix: no route, no answer

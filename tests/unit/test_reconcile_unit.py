"""Reconciliation decisions (pure): every combination of what the two hosts report."""
from __future__ import annotations

import itertools

import pytest

from kvmotion.migration.recover import Resolution, Seen, View, decide

R, H, A, U = Seen.RUNNING, Seen.HELD, Seen.ABSENT, Seen.UNREACHABLE


@pytest.mark.parametrize("src", [View(R, "running"), View(H, "postmigrate"), View(H, "paused"), View(A), View(U)])
def test_destination_running_always_completes(src: View) -> None:
    d = decide(src, View(R, "running"))
    assert d.resolution == Resolution.COMPLETE
    if src.seen == R:
        assert "stale" in d.reason and "never resumed" in d.reason


@pytest.mark.parametrize("src", [View(R, "running"), View(H, "paused"), View(A), View(U)])
def test_unreachable_destination_is_unknown_never_destructive(src: View) -> None:
    assert decide(src, View(U)).resolution == Resolution.WAIT


def test_complete_state_on_a_held_destination_is_resumed_there() -> None:
    d = decide(View(H, "postmigrate"), View(H, "paused", incoming_completed=True))
    assert d.resolution == Resolution.RESUME_DESTINATION
    d = decide(View(A), View(H, "paused", incoming_completed=True))
    assert d.resolution == Resolution.RESUME_DESTINATION


def test_source_running_rolls_back() -> None:
    for dst in (View(H, "inmigrate"), View(A), View(H, "paused", incoming_completed=True)):
        assert decide(View(R, "running"), dst).resolution == Resolution.ROLLBACK


def test_unreachable_source_waits_unless_the_destination_runs() -> None:
    assert decide(View(U), View(H, "inmigrate")).resolution == Resolution.WAIT
    assert decide(View(U), View(A)).resolution == Resolution.WAIT


def test_paused_source_resumes_only_before_a_switchover() -> None:
    assert decide(View(H, "paused"), View(H, "inmigrate")).resolution == Resolution.RESUME_SOURCE
    assert decide(View(H, "finish-migrate"), View(A)).resolution == Resolution.RESUME_SOURCE
    lost = decide(View(H, "postmigrate"), View(A))        # switched, but the destination has nothing
    assert lost.resolution == Resolution.LOST and "operator" in lost.reason
    assert decide(View(A), View(A)).resolution == Resolution.LOST


def test_never_two_copies() -> None:
    """No decision ever lets both sides run: whenever the source may go on, the destination is removed
    first, and whenever the destination runs, the source is released or stopped."""
    views = [View(R, "running"), View(H, "paused"), View(H, "postmigrate"), View(A), View(U),
             View(H, "paused", incoming_completed=True), View(H, "inmigrate")]
    for src, dst in itertools.product(views, views):
        d = decide(src, dst)
        if dst.seen == R:
            assert d.resolution == Resolution.COMPLETE
        if d.resolution in (Resolution.ROLLBACK, Resolution.RESUME_SOURCE):
            assert dst.seen != R and not (dst.incoming_completed and src.seen != R)
        if Seen.UNREACHABLE in (src.seen, dst.seen) and dst.seen != R:
            assert d.resolution == Resolution.WAIT


PC_ACTIVE, PC_PAUSED = "postcopy-active", "postcopy-paused"


def test_postcopy_in_flight_is_never_completed_early_nor_rolled_back() -> None:
    # The destination runs the guest during post-copy, but the source still holds part of its memory:
    # stopping the source (COMPLETE) would lose it, resuming it (ROLLBACK) would make two copies.
    src, dst = View(H, "finish-migrate", migration=PC_ACTIVE), View(R, "running", migration=PC_ACTIVE)
    d = decide(src, dst)
    assert d.resolution == Resolution.POSTCOPY_WAIT and "both QEMUs are kept" in d.reason
    assert decide(View(U), dst).resolution == Resolution.POSTCOPY_WAIT          # unreachable source: wait
    assert decide(src, View(U)).resolution == Resolution.POSTCOPY_WAIT          # unreachable destination: wait
    assert decide(View(H, "finish-migrate", migration="postcopy-recover"), dst).resolution == \
        Resolution.POSTCOPY_WAIT


def test_postcopy_paused_on_both_hosts_is_recovered() -> None:
    d = decide(View(H, "finish-migrate", migration=PC_PAUSED), View(R, "running", migration=PC_PAUSED))
    assert d.resolution == Resolution.POSTCOPY_RECOVER
    # one side has not noticed the dead link yet: wait (the engine or the next check pauses it)
    assert decide(View(H, "finish-migrate", migration=PC_PAUSED),
                  View(R, "running", migration=PC_ACTIVE)).resolution == Resolution.POSTCOPY_WAIT


def test_a_qemu_lost_during_postcopy_goes_to_an_operator() -> None:
    lost = decide(View(H, "finish-migrate", migration=PC_PAUSED), View(A))
    assert lost.resolution == Resolution.LOST and "destination QEMU is gone during post-copy" in lost.reason
    lost = decide(View(A), View(R, "running", migration=PC_PAUSED))
    assert lost.resolution == Resolution.LOST and "source QEMU is gone" in lost.reason


def test_postcopy_completed_completes() -> None:
    d = decide(View(H, "postmigrate", migration="completed"), View(R, "running", migration="completed"))
    assert d.resolution == Resolution.COMPLETE


def test_a_silent_postcopy_link_is_seen_between_two_checks() -> None:
    from kvmotion.migration.recover import postcopy_stalled
    src = View(H, "finish-migrate", migration=PC_ACTIVE, sent=1000)
    assert not postcopy_stalled({}, src, 100.0)                                       # first look: no history
    assert postcopy_stalled({"postcopy_sent": 1000, "checked_at": 90.0}, src, 100.0)  # nothing sent in 10 s
    assert not postcopy_stalled({"postcopy_sent": 900, "checked_at": 90.0}, src, 100.0)   # it moves
    assert not postcopy_stalled({"postcopy_sent": 1000, "checked_at": 99.0}, src, 100.0)  # too soon to tell
    paused = View(H, "finish-migrate", migration=PC_PAUSED, sent=1000)
    assert not postcopy_stalled({"postcopy_sent": 1000, "checked_at": 90.0}, paused, 100.0)  # already paused

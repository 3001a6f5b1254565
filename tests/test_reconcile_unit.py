"""Reconciliation decisions (pure): every combination of what the two hosts report."""
from __future__ import annotations

import itertools

import pytest

from kvmotion.controller.reconcile import Resolution, Seen, View, decide

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

"""Why a move failed, as subclasses of ``MigrationFailed`` with a structured ``details["cause"]``.

Decisions return a ``Cause``; the engine raises the matching subclass, whose remedy is its own. Nothing
branches on message text.
"""
from __future__ import annotations

from enum import StrEnum

from kvmotion.common.errors import KvmotionError, MigrationFailed


class Cause(StrEnum):
    CANCELLED = "cancelled"
    LINK_STALLED = "link-stalled"
    NOT_CONVERGING = "not-converging"
    TIMED_OUT = "timed-out"
    DESTINATION_LOST = "destination-lost"
    QEMU_FAILED = "qemu-failed"
    DISKS_FAILED = "disks-failed"
    AGENT_SILENT = "agent-silent"
    POSTCOPY_LOST = "postcopy-lost"
    INTERNAL = "internal"


class MoveFailed(MigrationFailed):
    cause_kind: Cause = Cause.INTERNAL
    default_remedy = "see the error; the VM still runs on the source"

    def __init__(self, message: str, *, remedy: str = "", details: dict | None = None) -> None:
        super().__init__(message, remedy=remedy or self.default_remedy,
                         details={"cause": str(self.cause_kind)} | (details or {}))


class Cancelled(MoveFailed):
    cause_kind = Cause.CANCELLED
    default_remedy = "nothing to do; the VM stays where it was, with its files"


class LinkStalled(MoveFailed):
    cause_kind = Cause.LINK_STALLED
    default_remedy = ("check the migration network between the hosts (links, MTU, firewall); "
                      "the VM stays on the source")


class NotConverging(MoveFailed):
    cause_kind = Cause.NOT_CONVERGING
    default_remedy = "raise --downtime-ms, give the migration more bandwidth, or lower the guest's write rate"


class TimedOut(NotConverging):
    cause_kind = Cause.TIMED_OUT


class DestinationLost(MoveFailed):
    cause_kind = Cause.DESTINATION_LOST
    default_remedy = "check the destination host's agent log and its QEMU log, then retry"


class QemuFailed(MoveFailed):
    cause_kind = Cause.QEMU_FAILED


class DisksFailed(MoveFailed):
    cause_kind = Cause.DISKS_FAILED
    default_remedy = "check the target datastore (space, permissions) and retry"


class AgentSilent(MoveFailed):
    cause_kind = Cause.AGENT_SILENT


class PostcopyLost(MoveFailed):
    cause_kind = Cause.POSTCOPY_LOST
    default_remedy = "both QEMUs are kept; see the task's reconciliation"


class PhaseTableViolation(KvmotionError):
    """The engine was asked for a transition its kind does not declare: a bug, stopped before acting."""


BY_CAUSE: dict[Cause, type[MoveFailed]] = {c.cause_kind: c for c in (
    Cancelled, LinkStalled, NotConverging, TimedOut, DestinationLost, QemuFailed, DisksFailed, AgentSilent,
    PostcopyLost)}


def failure(cause: Cause, message: str, remedy: str = "") -> MoveFailed:
    return BY_CAUSE.get(cause, MoveFailed)(message, remedy=remedy)

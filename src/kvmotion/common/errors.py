"""One error tree for kvmotion, with structured causes.

Callers branch on ``code`` (a stable string), never on message text.  Every error
carries a ``remedy``: what the user can do about it.
"""
from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    NOT_FOUND = "NOT_FOUND"
    INVALID_INPUT = "INVALID_INPUT"
    CONFLICT = "CONFLICT"
    PRECHECK_FAILED = "PRECHECK_FAILED"
    AGENT_UNREACHABLE = "AGENT_UNREACHABLE"
    AGENT_ERROR = "AGENT_ERROR"
    PEER_UNREACHABLE = "PEER_UNREACHABLE"
    QMP_ERROR = "QMP_ERROR"
    QMP_TIMEOUT = "QMP_TIMEOUT"
    QEMU_START_FAILED = "QEMU_START_FAILED"
    MIGRATION_FAILED = "MIGRATION_FAILED"
    TIMEOUT = "TIMEOUT"
    IMAGE_MISSING = "IMAGE_MISSING"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    CSRF_REJECTED = "CSRF_REJECTED"
    INTERNAL = "INTERNAL"
    GUEST_AGENT_SILENT = "GUEST_AGENT_SILENT"
    GUEST_AGENT_ERROR = "GUEST_AGENT_ERROR"
    NO_LEADER = "NO_LEADER"


_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.INVALID_INPUT: 422,
    ErrorCode.CONFLICT: 409,
    ErrorCode.PRECHECK_FAILED: 409,
    ErrorCode.AGENT_UNREACHABLE: 502,
    ErrorCode.AGENT_ERROR: 502,
    ErrorCode.PEER_UNREACHABLE: 502,
    ErrorCode.QMP_ERROR: 500,
    ErrorCode.QMP_TIMEOUT: 504,
    ErrorCode.QEMU_START_FAILED: 500,
    ErrorCode.MIGRATION_FAILED: 500,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.IMAGE_MISSING: 409,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.CSRF_REJECTED: 403,
    ErrorCode.INTERNAL: 500,
    ErrorCode.GUEST_AGENT_SILENT: 504,
    ErrorCode.GUEST_AGENT_ERROR: 502,
    ErrorCode.NO_LEADER: 503,
}


class KvmotionError(Exception):
    """Base of every error kvmotion raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        remedy: str = "",
        code: ErrorCode | None = None,
        details: dict[str, Any] | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.remedy = remedy
        self.details = details or {}
        self.cause = cause

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": str(self.code), "message": self.message, "remedy": self.remedy}
        if self.details:
            out["details"] = self.details
        if self.cause is not None:
            out["cause"] = f"{type(self.cause).__name__}: {self.cause}"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KvmotionError":
        code = ErrorCode(data.get("code", "INTERNAL")) if data.get("code") in ErrorCode.__members__ else ErrorCode.INTERNAL
        sub = _BY_FAILURE.get((data.get("details") or {}).get("failure"), _BY_CODE.get(code, KvmotionError))
        err = sub(data.get("message", "unknown error"), remedy=data.get("remedy", ""), details=data.get("details"))
        err.code = code
        return err

    def __str__(self) -> str:
        return self.message + (f" (fix: {self.remedy})" if self.remedy else "")


class NotFoundError(KvmotionError):
    code = ErrorCode.NOT_FOUND


class InvalidInputError(KvmotionError):
    code = ErrorCode.INVALID_INPUT


class NotConfined(InvalidInputError):
    """A path kvmotion will not open below a datastore (or its own state folder): a symbolic link anywhere in it,
    '..', an absolute part, or not the kind of file wanted; ``details``: path, reason (symlink, parent, absolute,
    not-directory, not-regular, hardlink)."""


class CloudInitInvalid(InvalidInputError):
    """A cloud-init input file that cannot be used; ``details``: file (its name), kind, line (1-based, or None)."""


class ConfigInvalid(InvalidInputError):
    """A configuration file that cannot be used; ``details``: file, keys (the dotted keys at fault, may be empty)."""


class DatabaseUnusable(KvmotionError):
    """The controller's database cannot be used as it is: unreachable, a schema revision this release does not
    know (a newer release upgraded it), or no driver; ``details``: database (its URL without the password),
    revision (when one is at fault)."""


class ConflictError(KvmotionError):
    code = ErrorCode.CONFLICT


class WrongState(ConflictError):
    """An operation the VM's run state does not allow; ``details`` name the state and the allowed ones."""


class DuplicateMac(ConflictError):
    """A MAC another NIC of the inventory already has; ``details``: mac, vm, nic."""


class HotplugUnsupported(WrongState):
    """A device change a running VM cannot take on that bus; ``details``: device, bus, state."""


class ConsoleBusy(ConflictError):
    """Another session holds the VM's serial console (one interactive client at a time); ``details``: vm, kind."""


class ConsoleUnavailable(ConflictError):
    """The VM runs without that console socket (started by an older kvmotion, or not running); ``details``: vm, kind."""


class UnauthorizedError(KvmotionError):
    """No credentials, or credentials that are unknown, revoked or expired (HTTP 401)."""

    code = ErrorCode.UNAUTHORIZED


class ForbiddenError(KvmotionError):
    """Valid credentials whose role is too low for the call (HTTP 403)."""

    code = ErrorCode.FORBIDDEN


class CsrfRejected(ForbiddenError):
    """A state-changing call of a web-client session without its CSRF token, or from another origin (HTTP 403)."""

    code = ErrorCode.CSRF_REJECTED


class PrecheckFailed(KvmotionError):
    """Prechecks found blockers; ``details['findings']`` lists every one of them."""

    code = ErrorCode.PRECHECK_FAILED


class AgentUnreachable(KvmotionError):
    code = ErrorCode.AGENT_UNREACHABLE


class AgentError(KvmotionError):
    code = ErrorCode.AGENT_ERROR


class NoLeader(KvmotionError):
    """A controller of a database several controllers share, not their leader, could not hand a state-changing
    call on: no controller leads right now (a takeover is under way), or the leader did not answer;
    ``details``: leader (its name, when one is known), url."""

    code = ErrorCode.NO_LEADER


class PeerUnreachable(KvmotionError):
    """Another controller of the trust domain did not answer, or not with its pinned identity; ``details``: url."""

    code = ErrorCode.PEER_UNREACHABLE


class QMPCommandError(KvmotionError):
    code = ErrorCode.QMP_ERROR


class QMPTimeout(KvmotionError):
    code = ErrorCode.QMP_TIMEOUT


class QemuStartFailed(KvmotionError):
    code = ErrorCode.QEMU_START_FAILED


class Failure(StrEnum):
    """Why a move failed: ``details['failure']`` of a ``MigrationFailed`` (decisions return one; nothing
    branches on message text)."""

    CANCELLED = "cancelled"
    LINK_STALLED = "link-stalled"
    NOT_CONVERGING = "not-converging"
    TIMED_OUT = "timed-out"
    DESTINATION_LOST = "destination-lost"
    SHADOW_FAILED = "shadow-failed"
    SOURCE_STUCK = "source-stuck"
    QEMU_FAILED = "qemu-failed"
    MIRROR_FAILED = "mirror-failed"
    COPY_FAILED = "copy-failed"
    AGENT_SILENT = "agent-silent"
    POSTCOPY_LOST = "postcopy-lost"


class MigrationFailed(KvmotionError):
    """A move failed. Subclasses name the failure in ``details['failure']`` (same code on the wire) and bring
    their own default remedy."""

    code = ErrorCode.MIGRATION_FAILED
    failure: Failure | None = None
    default_remedy = ""

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs["remedy"] = kwargs.get("remedy") or self.default_remedy
        super().__init__(message, **kwargs)
        if self.failure is not None:
            self.details = {"failure": str(self.failure), **self.details}


class Cancelled(MigrationFailed):
    """The user cancelled the move before its commit point."""

    failure = Failure.CANCELLED
    default_remedy = "nothing to do; the VM stays where it was, with its files"


class LinkStalled(MigrationFailed):
    """The migration stream made no progress in time."""

    failure = Failure.LINK_STALLED
    default_remedy = "check the migration network between the hosts (links, MTU, firewall); the VM stays on the source"


class NotConverging(MigrationFailed):
    """Pre-copy does not converge: the guest rewrites memory faster than the link carries it."""

    failure = Failure.NOT_CONVERGING
    default_remedy = "raise --downtime-ms, give the migration more bandwidth, or lower the guest's write rate"


class TimedOut(NotConverging):
    """The move exceeded its completion timeout."""

    failure = Failure.TIMED_OUT


class DestinationLost(MigrationFailed):
    """The destination host or its migration address stopped answering."""

    failure = Failure.DESTINATION_LOST
    default_remedy = "check the destination host's agent log and its QEMU log, then retry"


class ShadowFailed(DestinationLost):
    """The destination's incoming VM ended without running the guest."""

    failure = Failure.SHADOW_FAILED


class SourceStuck(MigrationFailed):
    """The source QEMU did not leave its migration when told to."""

    failure = Failure.SOURCE_STUCK


class QemuMigrationFailed(MigrationFailed):
    """QEMU reports the migration failed or cancelled (its own error in the message)."""

    failure = Failure.QEMU_FAILED
    default_remedy = "see the error; the VM still runs on the source"


class MirrorFailed(MigrationFailed):
    """A disk mirror failed or did not conclude."""

    failure = Failure.MIRROR_FAILED
    default_remedy = "check the target datastore (space, permissions) and retry"


class CopyFailed(MirrorFailed):
    """A cold copy (qemu-img convert and compare) failed."""

    failure = Failure.COPY_FAILED


class AgentSilent(MigrationFailed):
    """An agent did not answer for longer than a move waits for it."""

    failure = Failure.AGENT_SILENT


class PostcopyLost(MigrationFailed):
    """Post-copy failed where QEMU cannot resume it: the guest's memory is split between the hosts."""

    failure = Failure.POSTCOPY_LOST
    default_remedy = "both QEMUs are kept; see the task's reconciliation"


class GuestAgentSilent(KvmotionError):
    """The VM's qemu-guest-agent did not answer in time (none installed, not started, or the guest is busy);
    ``details``: vm, command, deadline_s."""

    code = ErrorCode.GUEST_AGENT_SILENT


class GuestAgentError(KvmotionError):
    """The guest agent answered with an error (``details``: vm, command, error_class, desc)."""

    code = ErrorCode.GUEST_AGENT_ERROR


class PhaseTableViolation(KvmotionError):
    """The engine was asked for a transition its kind does not declare: a bug, stopped before acting."""


class DeadlineExceeded(KvmotionError):
    code = ErrorCode.TIMEOUT


class ImageMissing(KvmotionError):
    code = ErrorCode.IMAGE_MISSING


_BY_CODE: dict[ErrorCode, type[KvmotionError]] = {
    cls.code: cls
    for cls in (
        NotFoundError, InvalidInputError, ConflictError, PrecheckFailed, AgentUnreachable, AgentError,
        PeerUnreachable, QMPCommandError, QMPTimeout, QemuStartFailed, MigrationFailed, DeadlineExceeded, ImageMissing,
        UnauthorizedError, ForbiddenError, CsrfRejected, GuestAgentSilent, GuestAgentError, NoLeader,
    )
}
_BY_FAILURE: dict[str | None, type[MigrationFailed]] = {
    str(cls.failure): cls for cls in (Cancelled, LinkStalled, NotConverging, TimedOut, DestinationLost, ShadowFailed,
                                      SourceStuck, QemuMigrationFailed, MirrorFailed, CopyFailed, AgentSilent,
                                      PostcopyLost)
}


def migration_failure(failure: Failure, message: str, remedy: str = "") -> MigrationFailed:
    """The error a decision's ``failure`` stands for."""
    return _BY_FAILURE[str(failure)](message, remedy=remedy)

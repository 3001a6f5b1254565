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
    QMP_ERROR = "QMP_ERROR"
    QMP_TIMEOUT = "QMP_TIMEOUT"
    QEMU_START_FAILED = "QEMU_START_FAILED"
    MIGRATION_FAILED = "MIGRATION_FAILED"
    TIMEOUT = "TIMEOUT"
    IMAGE_MISSING = "IMAGE_MISSING"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    INTERNAL = "INTERNAL"


_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.INVALID_INPUT: 422,
    ErrorCode.CONFLICT: 409,
    ErrorCode.PRECHECK_FAILED: 409,
    ErrorCode.AGENT_UNREACHABLE: 502,
    ErrorCode.AGENT_ERROR: 502,
    ErrorCode.QMP_ERROR: 500,
    ErrorCode.QMP_TIMEOUT: 504,
    ErrorCode.QEMU_START_FAILED: 500,
    ErrorCode.MIGRATION_FAILED: 500,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.IMAGE_MISSING: 409,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.INTERNAL: 500,
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


class ConflictError(KvmotionError):
    code = ErrorCode.CONFLICT


class WrongState(ConflictError):
    """An operation the VM's run state does not allow; ``details`` name the state and the allowed ones."""


class UnauthorizedError(KvmotionError):
    """No credentials, or credentials that are unknown, revoked or expired (HTTP 401)."""

    code = ErrorCode.UNAUTHORIZED


class ForbiddenError(KvmotionError):
    """Valid credentials whose role is too low for the call (HTTP 403)."""

    code = ErrorCode.FORBIDDEN


class PrecheckFailed(KvmotionError):
    """Prechecks found blockers; ``details['findings']`` lists every one of them."""

    code = ErrorCode.PRECHECK_FAILED


class AgentUnreachable(KvmotionError):
    code = ErrorCode.AGENT_UNREACHABLE


class AgentError(KvmotionError):
    code = ErrorCode.AGENT_ERROR


class QMPCommandError(KvmotionError):
    code = ErrorCode.QMP_ERROR


class QMPTimeout(KvmotionError):
    code = ErrorCode.QMP_TIMEOUT


class QemuStartFailed(KvmotionError):
    code = ErrorCode.QEMU_START_FAILED


class MigrationFailed(KvmotionError):
    """A move failed. Subclasses name the failure in ``details['failure']`` (same code on the wire)."""

    code = ErrorCode.MIGRATION_FAILED
    failure: str | None = None

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        if self.failure is not None:
            self.details = {"failure": self.failure, **self.details}


class LinkStalled(MigrationFailed):
    """The migration stream made no progress in time."""

    failure = "link-stalled"


class DestinationLost(MigrationFailed):
    """The destination host or its migration address stopped answering."""

    failure = "destination-lost"


class ShadowFailed(MigrationFailed):
    """The destination's incoming VM ended without running the guest."""

    failure = "shadow-failed"


class SourceStuck(MigrationFailed):
    """The source QEMU did not leave its migration when told to."""

    failure = "source-stuck"


class MirrorFailed(MigrationFailed):
    """A disk mirror failed or did not conclude."""

    failure = "mirror-failed"


class DeadlineExceeded(KvmotionError):
    code = ErrorCode.TIMEOUT


class ImageMissing(KvmotionError):
    code = ErrorCode.IMAGE_MISSING


_BY_CODE: dict[ErrorCode, type[KvmotionError]] = {
    cls.code: cls
    for cls in (
        NotFoundError, InvalidInputError, ConflictError, PrecheckFailed, AgentUnreachable, AgentError,
        QMPCommandError, QMPTimeout, QemuStartFailed, MigrationFailed, DeadlineExceeded, ImageMissing,
        UnauthorizedError, ForbiddenError,
    )
}
_BY_FAILURE: dict[str | None, type[KvmotionError]] = {
    cls.failure: cls for cls in (LinkStalled, DestinationLost, ShadowFailed, SourceStuck, MirrorFailed)
}

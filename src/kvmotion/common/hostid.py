"""A host's fingerprint: what an admin compares before approving a host that registered itself.

It is derived from the agent's secret (which never leaves the host except once, at enrolment), so the agent
prints the same fingerprint on the host (its log at start, ``kvmotion-agent --config FILE --fingerprint``) that
the controller shows for the pending registration: a host that registered with someone else's name, or a
registration replayed from another machine, shows another fingerprint.
"""
from __future__ import annotations

import hashlib
import hmac

_LABEL = b"kvmotion host identity v1"


def fingerprint(secret: str) -> str:
    """SHA-256 based, 16 bytes as colon-separated hex pairs (like an SSH or certificate fingerprint)."""
    digest = hmac.new(secret.encode(), _LABEL, hashlib.sha256).digest()[:16]
    return ":".join(f"{b:02X}" for b in digest)


def same(a: str, b: str, size: int = 16) -> bool:
    """Fingerprints of ``size`` bytes equal, ignoring case, colons and spaces (a controller's is 32 bytes long:
    ``kvmotion.common.pinning.fingerprint``)."""
    def norm(x: str) -> str:
        return "".join(c for c in x.upper() if c in "0123456789ABCDEF")
    return hmac.compare_digest(norm(a), norm(b)) and len(norm(a)) == 2 * size

"""Shared HTTP client settings: one TLS context for every client of the process.

httpx builds a fresh TLS context (the CA bundle, ~20 ms of CPU) for every client it creates; the controller
makes one client per agent call and the CLI one per request, so one context is made once and shared. It trusts
the system's CAs plus a kvmotion controller's CA when one is named: ``$KVMOTION_CA_FILE``, or :func:`trust`
(the CLI's config ``ca_file``, the lab).
"""
from __future__ import annotations

import functools
import os
import ssl
from pathlib import Path

from kvmotion.common.errors import InvalidInputError

CA_ENV = "KVMOTION_CA_FILE"


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    named = os.environ.get(CA_ENV)
    if named:
        trust(Path(named), ctx)
    return ctx


_trusted: set[str] = set()


def trust(ca_file: Path, ctx: ssl.SSLContext | None = None) -> None:
    """Trust a controller's CA certificate (PEM) from now on, in the shared context."""
    ctx = ctx or tls_context()
    key = f"{id(ctx)}:{ca_file.resolve()}"
    if key in _trusted:
        return
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInputError(f"cannot read the CA certificate {ca_file}: {exc}",
                                remedy="copy the controller's pki/ca-cert.pem and name it (ca_file)") from exc
    _trusted.add(key)


def untrusted(exc: BaseException) -> bool:
    """Whether a connection failed on the server's certificate (the cause chain holds the TLS verification)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False

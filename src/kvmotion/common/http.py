"""Shared HTTP client settings.

httpx builds a fresh TLS context (the CA bundle, ~20 ms of CPU) for every client it creates; the controller
makes one client per agent call and the CLI one per request, so one context is made once and shared.
"""
from __future__ import annotations

import functools
import ssl


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()

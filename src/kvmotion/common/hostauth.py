"""Controller → agent authentication: every request is signed with the host's enrolment secret.

The agent makes a random secret at first start (``agent.secret``, mode 0600). The controller learns it once,
at enrolment (``host add`` or self-registration with an enrolment token), and keeps it wrapped with its master
key. Each request carries::

    X-Kvmotion-Auth: v1 ts=<unix seconds> nonce=<hex> sig=<hex>

where ``sig = HMAC-SHA256(secret, "v1\\n{ts}\\n{nonce}\\n{METHOD}\\n{path?query}\\n{sha256(body)}")``. The
secret itself never crosses the wire; the agent refuses a request whose signature is wrong, whose clock is
more than ``SKEW_S`` away, or whose nonce it has already seen (a captured request cannot be replayed).
Agents never hold each other's secrets, so they cannot call each other.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import os
import re
import secrets
import time
from pathlib import Path
from typing import Generator

import httpx

from kvmotion.common.errors import InvalidInputError, UnauthorizedError

HEADER = "x-kvmotion-auth"
SECRET_FILE = "agent.secret"
SKEW_S = 60.0
NONCE_CACHE = 20000
_HEADER_RE = re.compile(r"^v1 ts=(\d{1,12}(?:\.\d{1,6})?) nonce=([0-9a-f]{16,64}) sig=([0-9a-f]{64})$")
_SECRET_RE = re.compile(r"^[0-9a-f]{64}$")


def check_secret(secret: str) -> str:
    if not _SECRET_RE.match(secret or ""):
        raise InvalidInputError("a host secret is 64 hex characters",
                                remedy=f"copy it from the agent's state directory ({SECRET_FILE})")
    return secret


def load_or_create_secret(state_dir: Path) -> str:
    """The agent's secret, created (0600, exclusive) on first start."""
    path = state_dir / SECRET_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return check_secret(path.read_text().strip())
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return check_secret(path.read_text().strip())


def _mac(secret: str, ts: str, nonce: str, method: str, target: str, body: bytes) -> str:
    msg = "\n".join(("v1", ts, nonce, method.upper(), target, hashlib.sha256(body).hexdigest()))
    return hmac.new(secret.encode(), msg.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, method: str, target: str, body: bytes, now: float | None = None) -> str:
    """The header value for one request (``target`` is the path with its query string)."""
    ts, nonce = str(int(time.time() if now is None else now)), secrets.token_hex(16)
    return f"v1 ts={ts} nonce={nonce} sig={_mac(secret, ts, nonce, method, target, body)}"


class NonceCache:
    """Nonces seen within the clock window; bounded (the oldest are forgotten first)."""

    def __init__(self, size: int = NONCE_CACHE) -> None:
        self.size = size
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def check_and_add(self, nonce: str, ts: float) -> bool:
        now = time.time()
        while self._seen and (len(self._seen) >= self.size or next(iter(self._seen.values())) < now - 2 * SKEW_S):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = ts
        return True


def verify(secret: str, header: str | None, method: str, target: str, body: bytes, nonces: NonceCache,
           now: float | None = None) -> None:
    """Raise ``UnauthorizedError`` (naming the reason) unless the request is signed with ``secret``."""
    remedy = "only this host's controller may call the agent; enrol the host with `kvmotion host add`"
    m = _HEADER_RE.match(header or "")
    if not m:
        raise UnauthorizedError("request is not signed by the controller", remedy=remedy)
    ts_s, nonce, sig = m.groups()
    ts = float(ts_s)
    if abs((time.time() if now is None else now) - ts) > SKEW_S:
        raise UnauthorizedError(f"request timestamp is more than {SKEW_S:.0f} s off this host's clock",
                                remedy="synchronise the clocks (NTP) of the controller and the host")
    if not hmac.compare_digest(_mac(secret, ts_s, nonce, method, target, body), sig):
        raise UnauthorizedError("request signature does not match this host's secret", remedy=remedy)
    if not nonces.check_and_add(nonce, ts):
        raise UnauthorizedError("request was already used (replay)", remedy=remedy)


class HostAuth(httpx.Auth):
    """httpx authentication that signs each request for one agent."""

    requires_request_body = True

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[HEADER] = sign(self._secret, request.method, request.url.raw_path.decode("ascii"),
                                       request.content)
        yield request

    def __repr__(self) -> str:     # never show the secret
        return "HostAuth(<secret>)"

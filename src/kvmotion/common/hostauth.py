"""Controller → agent authentication: every request is signed with the host's enrolment secret.

The agent makes a random secret at first start (``agent.secret``, mode 0600). The controller learns it once,
at enrolment (``host add`` or self-registration with an enrolment token), and keeps it wrapped with its master
key. Each request carries::

    X-Kvmotion-Auth: v1 ts=<unix seconds> nonce=<hex> sig=<hex>

where ``sig = HMAC-SHA256(secret, "v1\\n{ts}\\n{nonce}\\n{METHOD}\\n{path?query}\\n{sha256(body)}")``. The
secret itself never crosses the wire; the agent refuses a request whose signature is wrong, whose clock is
more than ``SKEW_S`` away, or whose nonce it has already seen (a captured request cannot be replayed).
Agents never hold each other's secrets, so they cannot call each other.

Every answer to a validly signed request is signed too, bound to that request's nonce::

    X-Kvmotion-Response-Auth: v1 sig=<hex>,  sig = HMAC-SHA256(secret, "v1-resp\n{nonce}\n{status}\n{sha256(body)}")

so the controller can tell the agent's answer from a forged one (e.g. a ``tls.supported=false`` that would
downgrade encryption, or a CSR of the attacker's key) and from an old answer replayed. Refusals of requests
that were not validly signed (401, 413) stay unsigned: the agent cannot know whom it answers.
"""
from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Generator

import httpx

from kvmotion.common.errors import InvalidInputError, UnauthorizedError
from kvmotion.common.private import keep_private

HEADER = "x-kvmotion-auth"
RESPONSE_HEADER = "x-kvmotion-response-auth"
SECRET_FILE = "agent.secret"
SKEW_S = 60.0
KEEP_MARGIN_S = 5.0         # a nonce is kept this much longer than the window (a clock stepped back a little)
NONCE_CACHE = 50000         # live nonces (~750 requests a second for a minute): far above the controller's rate
_HEADER_RE = re.compile(r"^v1 ts=(\d{1,12}(?:\.\d{1,6})?) nonce=([0-9a-f]{16,64}) sig=([0-9a-f]{64})$")
_RESPONSE_RE = re.compile(r"^v1 sig=([0-9a-f]{64})$")
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
        keep_private(path)
        return check_secret(path.read_text().strip())
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return check_secret(path.read_text().strip())


def _mac(secret: str, ts: str, nonce: str, method: str, target: str, body_sha256: str) -> str:
    msg = "\n".join(("v1", ts, nonce, method.upper(), target, body_sha256))
    return hmac.new(secret.encode(), msg.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, method: str, target: str, body: bytes, now: float | None = None) -> str:
    """The header value for one request (``target`` is the path with its query string)."""
    ts, nonce = str(int(time.time() if now is None else now)), secrets.token_hex(16)
    return f"v1 ts={ts} nonce={nonce} sig={_mac(secret, ts, nonce, method, target, hashlib.sha256(body).hexdigest())}"


class NonceCache:
    """The nonces of accepted requests, each kept while its timestamp is inside the clock window (once it is
    out, the clock check alone refuses a replay). Bounded, and it never forgets a nonce early: when ``size``
    nonces are still inside the window it refuses new requests (``UnauthorizedError``, saying so) rather than
    evict one that could then be replayed. Only validly signed requests are added, so only the controller can
    fill it. Subclasses make it durable (``_record``)."""

    def __init__(self, size: int = NONCE_CACHE) -> None:
        self.size = size
        self._seen: dict[str, float] = {}
        self._by_ts: list[tuple[float, str]] = []       # a heap: the oldest timestamp first

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, nonce: str) -> bool:
        return nonce in self._seen

    def _expire(self, now: float) -> None:
        while self._by_ts and self._by_ts[0][0] < now - SKEW_S - KEEP_MARGIN_S:
            _, nonce = heapq.heappop(self._by_ts)
            self._seen.pop(nonce, None)

    def _remember(self, nonce: str, ts: float) -> None:
        self._seen[nonce] = ts
        heapq.heappush(self._by_ts, (ts, nonce))

    def _record(self, nonce: str, ts: float) -> None:
        """Keep it beyond this process (the base class keeps nonces in memory only)."""

    def close(self) -> None:
        """Release what ``_record`` holds (nothing here)."""

    def check_and_add(self, nonce: str, ts: float, now: float | None = None) -> bool:
        """False when ``nonce`` was already used; raises when the cache is full of live nonces."""
        self._expire(time.time() if now is None else now)
        if nonce in self._seen:
            return False
        if len(self._seen) >= self.size:
            raise UnauthorizedError(
                f"this agent already accepted {self.size} requests within the last {SKEW_S:.0f} s and takes no "
                "more until they leave that window (it never forgets one early: that would allow a replay)",
                remedy=f"retry in {SKEW_S:.0f} s; the controller sends far more requests than it should",
                details={"nonce_store": "full"})
        self._remember(nonce, ts)
        self._record(nonce, ts)
        return True


@dataclass(frozen=True)
class SignedHeader:
    """A request's signature header, its format and clock checked (its MAC not yet)."""

    ts_s: str
    nonce: str
    sig: str

    @property
    def ts(self) -> float:
        return float(self.ts_s)


def _refused(message: str) -> UnauthorizedError:
    return UnauthorizedError(message, remedy="only this host's controller may call the agent; enrol the host with "
                             "`kvmotion host add`")


def check_header(header: str | None, nonces: NonceCache, now: float | None = None) -> SignedHeader:
    """What can be checked before the body is read: the header's format, its clock, that its nonce is new."""
    m = _HEADER_RE.match(header or "")
    if not m:
        raise _refused("request is not signed by the controller")
    signed = SignedHeader(*m.groups())
    if abs((time.time() if now is None else now) - signed.ts) > SKEW_S:
        raise UnauthorizedError(f"request timestamp is more than {SKEW_S:.0f} s off this host's clock",
                                remedy="synchronise the clocks (NTP) of the controller and the host")
    if nonces.seen(signed.nonce):
        raise _refused("request was already used (replay)")
    return signed


def check_mac(secret: str, signed: SignedHeader, method: str, target: str, body_sha256: str) -> None:
    if not hmac.compare_digest(_mac(secret, signed.ts_s, signed.nonce, method, target, body_sha256), signed.sig):
        raise _refused("request signature does not match this host's secret")


def claim_nonce(signed: SignedHeader, nonces: NonceCache, now: float | None = None) -> None:
    """Use the nonce of a request whose MAC is good (at most once)."""
    if not nonces.check_and_add(signed.nonce, signed.ts, now):
        raise _refused("request was already used (replay)")


def verify(secret: str, header: str | None, method: str, target: str, body: bytes, nonces: NonceCache,
           now: float | None = None) -> SignedHeader:
    """Raise ``UnauthorizedError`` (naming the reason) unless the request is signed with ``secret``."""
    signed = check_header(header, nonces, now)
    check_mac(secret, signed, method, target, hashlib.sha256(body).hexdigest())
    claim_nonce(signed, nonces, now)
    return signed


# -- agent → controller: every answer is signed too -----------------------------------------------------------
def _response_mac(secret: str, nonce: str, status: int, body_sha256: str) -> str:
    msg = "\n".join(("v1-resp", nonce, str(status), body_sha256))
    return hmac.new(secret.encode(), msg.encode(), hashlib.sha256).hexdigest()


def sign_response(secret: str, nonce: str, status: int, body: bytes) -> str:
    """The response header's value: bound to the request's nonce, so an old answer cannot pass for a new one."""
    return f"v1 sig={_response_mac(secret, nonce, status, hashlib.sha256(body).hexdigest())}"


def response_auth(secret: str, request_header: str | None, status: int, body: bytes,
                  header: str | None) -> str | None:
    """None when the response is the agent's answer to the request signed with ``request_header``; else why not:
    ``"missing"`` (no signature) or ``"forged"`` (a signature that is not the agent's, for this request)."""
    if not header:
        return "missing"
    m, r = _HEADER_RE.match(request_header or ""), _RESPONSE_RE.match(header)
    if not m or not r:
        return "forged"
    good = _response_mac(secret, m.group(2), status, hashlib.sha256(body).hexdigest())
    return None if hmac.compare_digest(good, r.group(1)) else "forged"


class HostAuth(httpx.Auth):
    """httpx authentication that signs each request for one agent."""

    requires_request_body = True

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[HEADER] = sign(self._secret, request.method, request.url.raw_path.decode("ascii"),
                                       request.content)
        yield request

    def check_response(self, response: httpx.Response) -> str | None:
        """Is ``response`` the agent's signed answer to the request this signed? None, ``"missing"``, ``"forged"``."""
        return response_auth(self._secret, response.request.headers.get(HEADER), response.status_code,
                             response.content, response.headers.get(RESPONSE_HEADER))

    def __repr__(self) -> str:     # never show the secret
        return "HostAuth(<secret>)"

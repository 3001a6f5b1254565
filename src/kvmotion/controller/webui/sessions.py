"""Web-client sessions: a sign-in with an API token gets an opaque session id in an HttpOnly cookie and a CSRF
token for the page; the token itself stays here, never in the page.

Each request re-authenticates the session's token (``Tokens.authenticate``), so revoking or expiring the token
ends its sessions at once. Sessions live in this controller's memory: bounded in number (the oldest idle one
goes first) and in idle time; a controller restart signs everyone out.
"""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from kvmotion.common.asgi import Scope, header
from kvmotion.common.errors import CsrfRejected

COOKIE = "kvmotion_session"
CSRF_HEADER = "x-csrf-token"
IDLE_S = 8 * 3600.0
MAX_SESSIONS = 1000
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class UiSession:
    id: str
    token: str
    csrf: str
    used_at: float


class UiSessions:
    """The signed-in browsers of this controller (thread-safe: the gate looks them up from worker threads)."""

    def __init__(self, idle_s: float = IDLE_S, limit: int = MAX_SESSIONS) -> None:
        self.idle_s = idle_s
        self.limit = limit
        self._by_id: OrderedDict[str, UiSession] = OrderedDict()     # least recently used first
        self._lock = threading.Lock()

    def open(self, token: str) -> UiSession:
        """A new session for an already authenticated token."""
        s = UiSession(id=secrets.token_urlsafe(32), token=token, csrf=secrets.token_urlsafe(32), used_at=time.time())
        with self._lock:
            self._by_id[s.id] = s
            while len(self._by_id) > self.limit:
                self._by_id.popitem(last=False)
        return s

    def find(self, session_id: str | None) -> UiSession | None:
        if not session_id:
            return None
        now = time.time()
        with self._lock:
            s = self._by_id.get(session_id)
            if s is None:
                return None
            if now - s.used_at > self.idle_s:
                del self._by_id[session_id]
                return None
            s.used_at = now
            self._by_id.move_to_end(session_id)
            return s

    def close(self, session_id: str | None) -> None:
        with self._lock:
            self._by_id.pop(session_id or "", None)

    def __len__(self) -> int:
        return len(self._by_id)


def cookie_of(scope: Scope) -> str | None:
    """The session id the request's Cookie header carries, or None."""
    for part in (header(scope, "cookie") or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return value
    return None


def same_origin(scope: Scope) -> bool:
    """The request's Origin (when the browser sent one) is this controller's own: scheme-less host:port match."""
    origin = header(scope, "origin")
    if origin is None:
        return True
    host = header(scope, "host") or ""
    return origin.partition("://")[2].rstrip("/") == host


def check_origin(scope: Scope, what: str) -> None:
    if not same_origin(scope):
        raise CsrfRejected(f"{what}: the request comes from another origin ({header(scope, 'origin')})",
                           remedy="use the web client served by this controller (/ui)")


def check_csrf(scope: Scope, session: UiSession, what: str) -> None:
    """A state-changing call of a session must carry its CSRF token and come from the controller's origin; a
    websocket handshake (it carries no custom header) must come from that origin."""
    if scope.get("method", "GET") in SAFE_METHODS and scope.get("type") == "http":
        return
    check_origin(scope, what)
    if scope.get("type") == "websocket":
        return
    sent = header(scope, CSRF_HEADER) or ""
    if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        raise CsrfRejected(f"{what}: a web-client session's state-changing call needs its CSRF token",
                           remedy="reload the web client (/ui) and sign in again; scripts use a bearer token")


def set_cookie_header(session: UiSession) -> str:
    return (f"{COOKIE}={session.id}; HttpOnly; Secure; SameSite=Strict; Path=/; "
            f"Max-Age={int(IDLE_S)}")


def clear_cookie_header() -> str:
    return f"{COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0"

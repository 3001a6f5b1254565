"""The controller's front door (raw ASGI, before FastAPI reads anything): a bearer token, then a bounded body.

Every HTTP request under ``/api/v1`` (and to ``/metrics``, and to the API's docs unless they are public) must
carry a valid token BEFORE a byte of its body is read or parsed: a caller without one gets a 401 in the usual
error shape and costs a token lookup, nothing more. Roles stay checked by each endpoint (``routes.deps.role``,
which reuses the principal found here). Bodies are bounded: ``MAX_BODY`` by default, more only where a request legitimately
carries more (``BODY_LIMITS``); a larger one is a 413 at once when its Content-Length says so, else as soon as
the limit is passed. A path or query holding a NUL character is refused (422): no database stores one.
Websockets (the consoles) pass through: they authenticate in ``routes/console.py``.
A web client's session (``webui.sessions``) stands in for the token: its cookie, and on a state-changing call its
CSRF token and the controller's own origin too.
Calls under ``/api/v1/peer/`` come from the other controllers of the trust domain: ``peers`` authenticates them
by the connection's client certificate alone (``peertls.PEER_CERT``); a bearer token counts for nothing there.
"""
from __future__ import annotations

import re
from typing import Callable

import anyio.to_thread

from kvmotion.common.asgi import (ASGIApp, BodyTooLarge, Receive, Scope, Send, declared_length, header, read_body,
                                  replay, reply_json, too_large)
from kvmotion.common.errors import InvalidInputError, KvmotionError, UnauthorizedError
from kvmotion.controller.auth import Peer, Principal, Role, Tokens, authenticate_bearer, require_role
from kvmotion.controller.peertls import PEER_CERT
from kvmotion.controller.webui.sessions import UiSessions, check_csrf, cookie_of

API_PREFIX = "/api/v1/"
PEER_PREFIX = "/api/v1/peer/"
PeerCheck = Callable[[bytes | None, str, str], Peer]    # (client certificate DER, method, path) -> the caller
MAX_BODY = 1 << 20
# VM creation may carry cloud-init files: four of at most 64 Ki characters each, up to 12 bytes a character
# once JSON-escaped (a surrogate pair as two \uXXXX), with their names: under 4 MiB.
BODY_LIMITS: dict[tuple[str, str], int] = {("POST", "/api/v1/vms"): 4 << 20}
# A cross-controller move relays the VM folder (kernel, initrd: the agent takes up to 200 MiB of base64) to the
# destination host; only a member controller, authenticated by its pinned certificate, may send that much.
PEER_HOST_CALL = re.compile(r"^/api/v1/peer/moves/[0-9a-f-]{36}/host$")
PEER_HOST_BODY = 210 << 20


class ApiGate:
    """ASGI middleware: authenticate, bound the body, then hand the request on unchanged (see the module)."""

    def __init__(self, app: ASGIApp, tokens: Tokens, viewer_paths: frozenset[str] = frozenset(),
                 max_body: int = MAX_BODY, limits: dict[tuple[str, str], int] | None = None,
                 peers: PeerCheck | None = None, ui: UiSessions | None = None) -> None:
        self.app = app
        self.tokens = tokens
        self.ui = ui
        self.peers = peers
        self.viewer_paths = viewer_paths        # outside /api/v1, guarded too (viewer role): metrics, docs
        self.max_body = max_body
        self.limits = BODY_LIMITS if limits is None else limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        viewer = path in self.viewer_paths
        if scope["type"] != "http" or not (path.startswith(API_PREFIX) or viewer):
            await self.app(scope, receive, send)
            return
        what = f"{scope['method']} {path}"
        try:
            # anyio's worker threads (those of the plain-function routes), not the event loop's default executor:
            # a token check never queues behind the monitor's facts rounds, which fill that executor (docs/scale.md)
            principal = await anyio.to_thread.run_sync(self._caller, scope, what)
            scope.setdefault("state", {})["principal"] = principal    # the audit names the caller, even if refused
            if viewer:
                require_role(principal, Role.VIEWER, what)
        except KvmotionError as exc:
            await reply_json(send, exc.http_status, exc.to_dict())
            return
        if "\x00" in path or b"%00" in scope.get("query_string", b""):
            await reply_json(send, 422, InvalidInputError(
                f"{scope['method']}: the request's path or query holds a NUL character",
                remedy="leave it out: no name or value kvmotion keeps may hold one").to_dict())
            return
        limit = self.limits.get((scope["method"], path.rstrip("/")), self.max_body)
        if isinstance(principal, Peer) and principal.role == "peer" and PEER_HOST_CALL.match(path):
            limit = PEER_HOST_BODY
        declared = declared_length(scope)
        try:
            if declared is not None and declared > limit:
                raise BodyTooLarge(declared)
            body = await read_body(receive, limit)
        except BodyTooLarge:
            await reply_json(send, 413, too_large(limit))
            return
        if body is not None:
            await self.app(scope, replay(body, receive), send)

    def _caller(self, scope: Scope, what: str) -> Principal | Peer:
        path = scope["path"]
        if not path.startswith(PEER_PREFIX):
            return authenticate_bearer(self.tokens, self._token(scope, what), what)
        if self.peers is None:
            raise UnauthorizedError(f"{what}: this controller takes no calls from other controllers",
                                    remedy="call the /api/v1 endpoints of its admin API with a token")
        return self.peers(scope.get("state", {}).get(PEER_CERT), scope["method"], path)


    def _token(self, scope: Scope, what: str) -> str | None:
        """The bearer token, else the token of the web-client session the cookie names (CSRF checked)."""
        token = _bearer(scope)
        if token is None and self.ui is not None:
            session = self.ui.find(cookie_of(scope))
            if session is not None:
                check_csrf(scope, session, what)
                token = session.token
        scope.setdefault("state", {})["token"] = token       # a follower hands it on (``forward``)
        return token


def _bearer(scope: Scope) -> str | None:
    value = header(scope, "authorization") or ""
    scheme, _, token = value.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def principal_of(scope: Scope) -> Principal | None:
    """The caller ``ApiGate`` authenticated for this request (None: the gate did not run)."""
    found = scope.get("state", {}).get("principal")
    return found if isinstance(found, Principal) else None

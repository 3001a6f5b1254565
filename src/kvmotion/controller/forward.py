"""A follower's front door for writes (raw ASGI, inside ``gate.ApiGate``): a state-changing call (POST, PUT, PATCH,
DELETE under ``/api/v1``) on a controller that does not lead (``controller.leader``) is handed on to the leader
and its answer returned as it is; reads (GET, HEAD, OPTIONS) are served here, from the shared database.

The caller was authenticated here already; the leader authenticates and checks the role again, with the same
token (a web-client session's token stands in for its cookie: sessions live in one controller's memory). The
call is sent once, with a deadline (``FORWARD_DEADLINE_S``), trusting the controllers' shared CA. No leader known,
a leader that does not answer, or a call that was forwarded once already: 503 ``NO_LEADER`` (the caller retries:
a takeover takes seconds, docs/controllers.md).

Calls of other controllers of a trust domain (``/api/v1/peer/``) are authenticated by their client certificate,
which cannot be handed on: a follower refuses their writes with ``NO_LEADER``, naming the leader's URL.
Websockets (consoles) are served here: a console is a connection to the VM's host, not a change of state.
"""
from __future__ import annotations

import logging
import ssl
from pathlib import Path

import httpx

from kvmotion.common.asgi import ASGIApp, Receive, Scope, Send, header, read_body, reply_json
from kvmotion.common.errors import NoLeader
from kvmotion.controller.leader import LeaderInfo, Leadership

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/"
PEER_PREFIX = "/api/v1/peer/"
READS = frozenset({"GET", "HEAD", "OPTIONS"})
FORWARDED_BY = "x-kvmotion-forwarded-by"
FORWARD_DEADLINE_S = 120.0          # a migration's checks ask both hosts: well within this
MAX_FORWARD_BODY = 256 << 20        # the gate bounded it already; this only bounds the read here
# headers not handed on: the connection's own, and the caller's credentials (the token goes as a bearer)
DROPPED_REQUEST = frozenset({"host", "content-length", "connection", "transfer-encoding", "cookie", "authorization",
                             "x-csrf-token", "origin", "accept-encoding", FORWARDED_BY})
DROPPED_RESPONSE = frozenset({"content-length", "connection", "transfer-encoding", "content-encoding", "server",
                              "date"})


def leader_tls(ca_file: Path) -> ssl.SSLContext:
    """The system's CAs and the controllers' own (their shared pki_dir's ca-cert.pem), if it exists."""
    ctx = ssl.create_default_context()
    if ca_file.exists():
        ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


class LeaderForward:
    """ASGI middleware: writes go to the leader while this controller follows (see the module)."""

    def __init__(self, app: ASGIApp, leadership: Leadership, ca_file: Path,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.app = app
        self.leadership = leadership
        self.tls = leader_tls(ca_file)
        self.transport = transport            # tests: a leader in the same process

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or scope["method"] in READS or not path.startswith(API_PREFIX)
                or self.leadership.is_leader or not self.leadership.shared):
            await self.app(scope, receive, send)
            return
        target = self.leadership.forward_to()
        refusal = self._refusal(scope, target)
        if refusal is not None:
            await reply_json(send, refusal.http_status, refusal.to_dict(), headers=[(b"retry-after", b"2")])
            return
        assert target is not None
        body = await read_body(receive, MAX_FORWARD_BODY)
        if body is None:
            return
        try:
            resp = await self._send(scope, target, body)
        except httpx.HTTPError as exc:
            err = NoLeader(f"{scope['method']} {path}: the leader {target.name} ({target.url}) did not answer: "
                           f"{type(exc).__name__}", remedy="try again in a few seconds: another controller takes "
                           "over if the leader is gone (GET /api/v1/controllers shows the leader)",
                           details={"leader": target.name, "url": target.url})
            await reply_json(send, err.http_status, err.to_dict(), headers=[(b"retry-after", b"2")])
            return
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.multi_items()
                   if k.lower() not in DROPPED_RESPONSE]
        headers.append((b"content-length", str(len(resp.content)).encode()))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": resp.content})

    def _refusal(self, scope: Scope, target: LeaderInfo | None) -> NoLeader | None:
        what = f"{scope['method']} {scope['path']}"
        known = {"leader": target.name, "url": target.url} if target else {}
        if target is None:
            return NoLeader(f"{what}: no controller leads right now, and this one ({self.leadership.name}) only "
                            "serves reads", remedy="try again in a few seconds (a takeover is under way); GET "
                            "/api/v1/controllers shows the leader once there is one", details=known)
        if header(scope, FORWARDED_BY) is not None:
            return NoLeader(f"{what} was handed on by {header(scope, FORWARDED_BY)}, but this controller "
                            f"({self.leadership.name}) does not lead either", remedy="try again in a few seconds: "
                            "the leader just changed", details=known)
        if scope["path"].startswith(PEER_PREFIX):
            return NoLeader(f"{what}: this controller ({self.leadership.name}) does not lead the controllers of "
                            f"its database; {target.name} does, at {target.url}",
                            remedy=f"call {target.url} (a domain member calls the URL this controller gave when it "
                                   "joined: give one that reaches the leader)", details=known)
        return None

    async def _send(self, scope: Scope, target: LeaderInfo, body: bytes) -> httpx.Response:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])
                   if k.decode("latin-1").lower() not in DROPPED_REQUEST]
        token = scope.get("state", {}).get("token")
        if token:
            headers.append(("authorization", f"Bearer {token}"))
        headers.append((FORWARDED_BY, self.leadership.name))
        query = scope.get("query_string", b"").decode("latin-1")
        url = target.url.rstrip("/") + scope.get("raw_path", scope["path"].encode()).decode("latin-1") + \
            (f"?{query}" if query else "")
        async with httpx.AsyncClient(verify=self.tls, timeout=FORWARD_DEADLINE_S, transport=self.transport) as client:
            log.debug("forwarding %s %s to the leader %s", scope["method"], scope["path"], target.name)
            return await client.request(scope["method"], url, content=body, headers=headers)

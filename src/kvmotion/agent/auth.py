"""The agent accepts only requests signed by its controller (see ``kvmotion.common.hostauth``)."""
from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

from kvmotion.common.errors import UnauthorizedError
from kvmotion.common.hostauth import HEADER, NonceCache, verify

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024 * 1024       # the largest request is a relayed VM folder (kernel + initrd, base64)

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class SignedRequestsOnly:
    """ASGI middleware: read the whole body, check the signature, then hand the request on unchanged."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self._secret = secret
        self._nonces = NonceCache()

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > MAX_BODY:
                await _reply(send, 413, {"code": "INVALID_INPUT", "message": "request body too large",
                                         "remedy": f"send at most {MAX_BODY >> 20} MiB"})
                return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        raw_path = scope.get("raw_path") or scope["path"].encode()
        target = raw_path.decode("latin-1") + (f"?{scope['query_string'].decode('latin-1')}"
                                              if scope.get("query_string") else "")
        try:
            verify(self._secret, headers.get(HEADER), scope["method"], target, body, self._nonces)
        except UnauthorizedError as exc:
            client = (scope.get("client") or ("?", 0))[0]
            log.warning("refused %s %s from %s: %s", scope["method"], scope["path"], client, exc.message)
            await _reply(send, 401, exc.to_dict())
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reply(send: Callable[[Message], Awaitable[None]], status: int, error: dict[str, Any]) -> None:
    payload = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})

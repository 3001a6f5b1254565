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
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
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
        exc = self._refusal(scope, scope["method"], body)
        if exc is not None:
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


    def _refusal(self, scope: Scope, method: str, body: bytes) -> UnauthorizedError | None:
        """Why the request's signature is refused (None: it is good)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        raw_path = scope.get("raw_path") or scope["path"].encode()
        target = raw_path.decode("latin-1") + (f"?{scope['query_string'].decode('latin-1')}"
                                              if scope.get("query_string") else "")
        try:
            verify(self._secret, headers.get(HEADER), method, target, body, self._nonces)
        except UnauthorizedError as exc:
            client = (scope.get("client") or ("?", 0))[0]
            log.warning("refused %s %s from %s: %s", method, scope["path"], client, exc.message)
            return exc
        return None

    async def _websocket(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                         send: Callable[[Message], Awaitable[None]]) -> None:
        """A websocket handshake is signed as a ``GET`` of its path with an empty body (same header, same nonce
        cache); a refused one gets a 401 with the error (or a 4401 close where the server cannot answer HTTP)."""
        exc = self._refusal(scope, "GET", b"")
        if exc is None:
            await self.app(scope, receive, send)
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            await _reply(send, 401, exc.to_dict(), prefix="websocket.")
        else:
            await send({"type": "websocket.close", "code": 4401, "reason": exc.message[:120]})


async def _reply(send: Callable[[Message], Awaitable[None]], status: int, error: dict[str, Any],
                 prefix: str = "") -> None:
    payload = json.dumps({"error": error}).encode()
    await send({"type": f"{prefix}http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": f"{prefix}http.response.body", "body": payload})

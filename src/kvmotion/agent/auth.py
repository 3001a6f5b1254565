"""The agent accepts only requests signed by its controller, and signs its answers (``kvmotion.common.hostauth``).

Order of the checks, cheapest first, so an unsigned request costs the agent nothing: the header's format, its
clock and the freshness of its nonce, before a byte of the body is read (401 at once); the declared length
(413 at once); the body, read in linear time and refused as soon as it passes ``max_body`` (413); then the MAC
over the body, and the nonce is used. Only a request that passed all of that reaches the API, and every answer
to it (errors and crashes too) carries the response signature bound to its nonce.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

from kvmotion.common.asgi import (ASGIApp, BodyTooLarge, Message, Receive, Scope, Send, declared_length, header,
                                  read_body, replay, reply_json, too_large)
from kvmotion.common.errors import KvmotionError, UnauthorizedError
from kvmotion.common.hostauth import (HEADER, RESPONSE_HEADER, NonceCache, SignedHeader, check_header, check_mac,
                                      claim_nonce, sign_response, verify)

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024 * 1024       # the largest request is a relayed VM folder (kernel + initrd, base64)
_RESPONSE_HEADER = RESPONSE_HEADER.encode()


class SignedRequestsOnly:
    """ASGI middleware: check the signature (before the body where it can), then hand the request on unchanged,
    signing the answer."""

    def __init__(self, app: ASGIApp, secret: str, nonces: NonceCache | None = None, max_body: int = MAX_BODY) -> None:
        self.app = app
        self._secret = secret
        self._nonces = nonces if nonces is not None else NonceCache()
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            signed = check_header(header(scope, HEADER), self._nonces)
        except UnauthorizedError as exc:
            await self._refuse(scope, send, exc)
            return
        declared = declared_length(scope)
        try:
            if declared is not None and declared > self.max_body:
                raise BodyTooLarge(declared)
            body = await read_body(receive, self.max_body)
        except BodyTooLarge:
            await reply_json(send, 413, too_large(self.max_body))
            return
        if body is None:
            return
        try:
            check_mac(self._secret, signed, scope["method"], _target(scope), hashlib.sha256(body).hexdigest())
        except UnauthorizedError as exc:
            await self._refuse(scope, send, exc)
            return
        await self._signed_call(scope, replay(body, receive), ResponseSigner(send, self._secret, signed.nonce),
                                signed)

    async def _signed_call(self, scope: Scope, receive: Receive, signer: "ResponseSigner",
                           signed: SignedHeader) -> None:
        """The API's answer to a request whose MAC is good, signed; a crash of the app is a signed 500."""
        try:
            claim_nonce(signed, self._nonces)
        except UnauthorizedError as exc:
            await self._refuse(scope, signer, exc)
            return
        try:
            await self.app(scope, receive, signer)
        except Exception:
            if not signer.sent:
                await reply_json(signer, 500, KvmotionError("the agent failed on this request",
                                                            remedy="see the agent's log").to_dict())
            raise

    @staticmethod
    async def _refuse(scope: Scope, send: Send, exc: UnauthorizedError) -> None:
        client = (scope.get("client") or ("?", 0))[0]
        log.warning("refused %s %s from %s: %s", scope["method"], scope["path"], client, exc.message)
        await reply_json(send, 401, exc.to_dict())

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A websocket handshake is signed as a ``GET`` of its path with an empty body (same header, same nonce
        cache); a refused one gets a 401 with the error (or a 4401 close where the server cannot answer HTTP).
        Websocket answers (the consoles) are not signed: out of the scope of response signing."""
        try:
            verify(self._secret, header(scope, HEADER), "GET", _target(scope), b"", self._nonces)
        except UnauthorizedError as exc:
            client = (scope.get("client") or ("?", 0))[0]
            log.warning("refused websocket %s from %s: %s", scope["path"], client, exc.message)
            if "websocket.http.response" in scope.get("extensions", {}):
                await reply_json(send, 401, exc.to_dict(), prefix="websocket.")
            else:
                await send({"type": "websocket.close", "code": 4401, "reason": exc.message[:120]})
            return
        await self.app(scope, receive, send)


def _target(scope: Scope) -> str:
    """What the controller signed: the raw path and the query string."""
    raw_path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    return raw_path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")


class ResponseSigner:
    """An ASGI ``send`` that holds the answer back until its body is complete, then sends it with the response
    signature (``X-Kvmotion-Response-Auth``) bound to the request's nonce. The agent streams no answers."""

    def __init__(self, send: Send, secret: str, nonce: str) -> None:
        self._send = send
        self._secret = secret
        self._nonce = nonce
        self._start: Message | None = None
        self._chunks: list[bytes] = []
        self.sent = False

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._start = message
            return
        if kind != "http.response.body" or self._start is None:
            await self._send(message)
            return
        self._chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(self._chunks)
        sig = sign_response(self._secret, self._nonce, int(self._start["status"]), body)
        headers: list[Any] = [(k, v) for k, v in self._start.get("headers", []) if k.lower() != _RESPONSE_HEADER]
        self.sent = True
        await self._send({**self._start, "headers": headers + [(_RESPONSE_HEADER, sig.encode())]})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

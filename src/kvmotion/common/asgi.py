"""Small pieces of raw ASGI shared by the agent's and the controller's front doors (request checks made before
FastAPI reads anything): the declared body length, a bounded body read in linear time, and a JSON error reply."""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Iterable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body is larger than the limit (raised as soon as the limit is passed)."""


def header(scope: Scope, name: str) -> str | None:
    """One request header (``name`` in lower case), or None."""
    key = name.encode("latin-1")
    for k, v in scope.get("headers", []):
        if k.lower() == key:
            return v.decode("latin-1")
    return None


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length when it names one (None: absent or not a number)."""
    value = header(scope, "content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body (None: the client went away). Linear in its size (chunks joined once); raises
    ``BodyTooLarge`` as soon as more than ``limit`` bytes came, without reading the rest."""
    chunks: list[bytes] = []
    size, more = 0, True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size)
        chunks.append(chunk)
        more = msg.get("more_body", False)
    return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then whatever the connection says next."""
    delivered = False

    async def again() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return again


async def reply_json(send: Send, status: int, error: dict[str, Any], prefix: str = "",
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """An error in the API's shape, ``{"error": {code, message, remedy, …}}``."""
    payload = json.dumps({"error": error}).encode()
    await send({"type": f"{prefix}http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": f"{prefix}http.response.body", "body": payload})


def too_large(limit: int) -> dict[str, Any]:
    """The error of a 413."""
    return {"code": "INVALID_INPUT", "message": f"request body larger than {_size(limit)}",
            "remedy": f"send at most {_size(limit)} in one request"}


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"

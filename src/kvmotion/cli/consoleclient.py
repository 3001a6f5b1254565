"""A console client for the controller's websocket (the CLI, the demo and the tests share it)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from kvmotion.cli.config import default_token, default_url, trust_configured_ca
from kvmotion.common.errors import AgentUnreachable, KvmotionError
from kvmotion.common.http import tls_context

CONNECT_DEADLINE_S = 15.0
ESCAPE = b"\x1d"             # Ctrl-], as virsh console
MAX_FRAME = (1 << 20, 64 << 20)   # serial, VNC (one whole RFB message per frame: a raw 4K screen is 33 MiB)


def console_url(base: str | None, vm: str, kind: str) -> str:
    base = (base or default_url()).rstrip("/")
    scheme, rest = base.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/api/v1/vms/{vm}/console/{kind}"


async def open_console(vm: str, kind: str = "serial", url: str | None = None,
                       token: str | None = None) -> ClientConnection:
    """An open console websocket; a refusal raises the controller's error (403 for a viewer token, ...)."""
    target = console_url(url, vm, kind)
    trust_configured_ca()
    tok = token if token is not None else default_token()
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    try:
        return await connect(target, additional_headers=headers, open_timeout=CONNECT_DEADLINE_S, close_timeout=2,
                             max_size=MAX_FRAME[kind == "vnc"], max_queue=16, compression=None,
                             ssl=tls_context() if target.startswith("wss:") else None)
    except InvalidStatus as exc:
        try:
            err = json.loads(exc.response.body or b"{}").get("error")
        except (ValueError, AttributeError):
            err = None
        if isinstance(err, dict):
            raise KvmotionError.from_dict(err) from exc
        raise KvmotionError(f"the controller refused the console: HTTP {exc.response.status_code}",
                            remedy="check the URL and the token") from exc
    except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
        raise AgentUnreachable(f"controller at {target} did not open the console: {type(exc).__name__}",
                               remedy="start it (`kvmotion lab up` in the lab) or pass --url") from exc


@dataclass
class Received:
    """What a read-only session saw: the bytes with their arrival times, and the controller's events."""
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None

    @property
    def text(self) -> str:
        return b"".join(c for _, c in self.chunks).decode(errors="replace")

    def lines(self) -> list[tuple[float, str]]:
        """Complete lines with the arrival time of their last byte."""
        out: list[tuple[float, str]] = []
        buf = b""
        for t, chunk in self.chunks:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                out.append((t, line.decode(errors="replace").rstrip("\r")))
        return out

    def event(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]


async def read_console(conn: ClientConnection, until: Callable[[Received], bool], deadline_s: float,
                       on_bytes: Callable[[bytes], None] | None = None,
                       on_event: Callable[[dict[str, Any]], None] | None = None) -> Received:
    """Read until ``until`` holds, the session ends, or ``deadline_s`` passes (then the session is closed)."""
    got = Received()
    end = time.monotonic() + deadline_s
    try:
        while not until(got):
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                msg = await asyncio.wait_for(conn.recv(), left)
            except asyncio.TimeoutError:
                break
            if isinstance(msg, str):
                event = json.loads(msg)
                got.events.append(event)
                if on_event:
                    on_event(event)
            else:
                got.chunks.append((time.time(), msg))
                if on_bytes:
                    on_bytes(msg)
    except ConnectionClosed as exc:
        got.close_code = exc.rcvd.code if exc.rcvd else None
        return got
    for event in await end_session(conn):
        got.events.append(event)
        if on_event:
            on_event(event)
    got.close_code = conn.close_code
    return got


async def _drain_end(conn: ClientConnection) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        while True:
            msg = await asyncio.wait_for(conn.recv(), 3)
            if isinstance(msg, str):
                out.append(json.loads(msg))
    except (ConnectionClosed, asyncio.TimeoutError):
        pass
    return out


async def end_session(conn: ClientConnection) -> list[dict[str, Any]]:
    """Ask the controller to end the session; returns the events up to its close (``end`` has the record)."""
    try:
        await asyncio.wait_for(conn.send(json.dumps({"op": "end"})), 5)
    except (ConnectionClosed, asyncio.TimeoutError):
        return []
    out = await _drain_end(conn)
    await conn.close()
    return out

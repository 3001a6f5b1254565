"""The controller's leg of a console session: a websocket to a host agent, its handshake signed like any call.

What the agent sends over a websocket is not signed (its HTTP answers are, and ``AgentClient`` checks them):
console streams are out of the scope of response signing."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from kvmotion.common.errors import AgentError, AgentUnreachable, KvmotionError
from kvmotion.common.hostauth import HEADER, sign
from kvmotion.common.pinning import ClientTls, client_context
from kvmotion.controller.inventory import Inventory
from kvmotion.models.console import ConsoleKind

CONNECT_DEADLINE_S = 8.0
SEND_DEADLINE_S = 10.0
MAX_FRAME = 1 << 20          # bounded: one frame at most 1 MiB, at most 16 frames queued
MAX_QUEUE = 16

Received = bytes | dict[str, Any] | None      # console bytes, an agent event, or None once closed


class Link(Protocol):
    """One open console connection to the agent of ``host``."""
    host: str

    async def recv(self) -> Received: ...

    async def send(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


Connector = Callable[[str, str, ConsoleKind, bool], Awaitable[Link]]     # host, uuid, kind, replay


class AgentLink:
    def __init__(self, host: str, conn: ClientConnection) -> None:
        self.host = host
        self._conn = conn

    async def recv(self) -> Received:
        try:
            msg = await self._conn.recv()
        except ConnectionClosed:
            return None
        if isinstance(msg, str):
            try:
                event = json.loads(msg)
            except ValueError:
                return {}
            return event if isinstance(event, dict) else {}
        return msg

    async def send(self, data: bytes) -> None:
        try:
            await asyncio.wait_for(self._conn.send(data), SEND_DEADLINE_S)
        except (ConnectionClosed, asyncio.TimeoutError):
            await self.close()

    async def close(self) -> None:
        await self._conn.close()


def ws_url(address: str, path: str) -> str:
    """``http(s)://host:port`` of an agent as the ``ws(s)://`` URL of ``path``."""
    scheme, rest = address.rstrip("/").split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"


def _refusal(host: str, exc: InvalidStatus) -> KvmotionError:
    status = exc.response.status_code
    try:
        err = json.loads(exc.response.body or b"{}").get("error")
    except (ValueError, AttributeError):
        err = None
    if status == 401:
        return AgentError(f"agent of host {host} refused the controller's console handshake",
                          remedy=(err or {}).get("remedy") or "re-enrol the host with `kvmotion host add`",
                          details={"host": host, "auth_refused": True})
    if isinstance(err, dict):
        out = KvmotionError.from_dict(err)
        out.details.setdefault("host", host)
        return out
    return AgentError(f"agent of host {host} answered {status} to a console handshake", remedy="see the agent's log",
                      details={"host": host})


async def connect_agent(host: str, address: str, secret: str, uuid: str, kind: ConsoleKind, replay: bool,
                        tls: ClientTls) -> AgentLink:
    path = f"/v1/vms/{uuid}/console/{kind}" + ("?replay=true" if replay else "")
    url = ws_url(address, path)
    try:
        conn = await connect(url, additional_headers={HEADER: sign(secret, "GET", path, b"")},
                             open_timeout=CONNECT_DEADLINE_S, close_timeout=2, max_size=MAX_FRAME,
                             max_queue=MAX_QUEUE, compression=None,
                             ssl=client_context(tls) if url.startswith("wss:") else None)
    except InvalidStatus as exc:
        raise _refusal(host, exc) from exc
    except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
        raise AgentUnreachable(f"agent of host {host} at {address} did not open the {kind} console: "
                               f"{type(exc).__name__}", remedy=f"check that kvmotion-agent runs on {host}",
                               details={"host": host}, cause=exc) from exc
    return AgentLink(host, conn)


def agent_connector(inv: Inventory) -> Connector:
    """Console connections to the agents of the inventory's hosts."""
    async def open_link(host: str, uuid: str, kind: ConsoleKind, replay: bool) -> Link:
        address = (await asyncio.to_thread(inv.get_host, host)).address
        secret = await asyncio.to_thread(inv.host_secret, host)
        tls = await asyncio.to_thread(inv.agent_tls_for, host)
        return await connect_agent(host, address, secret, uuid, kind, replay, tls)
    return open_link

"""The agent's half of a graphical console: QEMU's VNC server (a unix socket with VNC authentication) opened for
the controller's relay with a one-time password.

QEMU runs ``-vnc unix:RUN/vnc.sock,password=on`` and refuses every client until a password is set. For each
session the agent sets a random one valid for a few seconds (QMP ``set_password`` + ``expire_password``), does the
RFB handshake itself, and expires the password as soon as it is in: the password is never stored nor sent
anywhere. The websocket to the controller then starts after ServerInit: a text event ``attached`` carries the
ServerInit (hex), binary frames carry the RFB messages both ways. The controller presents its own handshake to
the user's client (noVNC), so it can move the session to another host's server when the VM moves
(:mod:`kvmotion.controller.console_vnc`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import struct
from pathlib import Path

from starlette.websockets import WebSocket

from kvmotion.agent.console import open_socket, pump
from kvmotion.agent.hv.base import Hypervisor
from kvmotion.common import rfb
from kvmotion.common.errors import ConsoleUnavailable

HANDSHAKE_DEADLINE_S = 5.0
TICKET_VALID_S = 10


async def _read(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise ConsoleUnavailable("QEMU's VNC server closed the connection during the handshake",
                                 remedy="check the VM's QEMU on this host") from exc


async def _reason(reader: asyncio.StreamReader) -> str:
    (n,) = struct.unpack(">I", await _read(reader, 4))
    return (await _read(reader, min(n, 1024))).decode("utf-8", "replace")


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, password: str | None) -> bytes:
    """RFB 3.8 as a client of QEMU, shared; returns the ServerInit."""
    version = await _read(reader, 12)
    if not version.startswith(b"RFB 003."):
        raise rfb.RFBError(f"the VNC socket answered {version!r}, not RFB", remedy="check the VM's QEMU")
    writer.write(rfb.VERSION)
    n = (await _read(reader, 1))[0]
    if n == 0:
        raise ConsoleUnavailable(f"QEMU's VNC server refused: {await _reason(reader)}", remedy="restart the VM")
    types = await _read(reader, n)
    if password is not None and rfb.SEC_VNC in types:
        writer.write(bytes([rfb.SEC_VNC]))
        writer.write(rfb.vnc_auth_response(await _read(reader, 16), password))
    elif rfb.SEC_NONE in types:
        writer.write(bytes([rfb.SEC_NONE]))
    else:
        raise ConsoleUnavailable(f"QEMU's VNC server offers security types {list(types)} and this VM's display "
                                 "takes no password", remedy="restart the VM with this kvmotion version")
    if struct.unpack(">I", await _read(reader, 4))[0] != 0:
        raise ConsoleUnavailable(f"QEMU's VNC server refused the agent: {await _reason(reader)}",
                                 remedy="retry; if it persists, restart the VM")
    writer.write(b"\x01")                                          # ClientInit: shared
    head = await _read(reader, 24)
    (name_len,) = struct.unpack(">I", head[20:24])
    return head + await _read(reader, min(name_len, 4096))


async def attach(hv: Hypervisor, uuid: str, sock: Path,
                 lock: asyncio.Lock) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A connection to the VM's VNC server, authenticated with a one-time password; one ticket at a time per VM."""
    async with lock:
        password = secrets.token_urlsafe(6)                     # 8 characters: what VNC authentication uses
        if not await hv.vnc_ticket(uuid, password, TICKET_VALID_S):
            password = None
        reader, writer = await open_socket(sock)
        try:
            init = await asyncio.wait_for(handshake(reader, writer, password), HANDSHAKE_DEADLINE_S)
        except BaseException:
            writer.close()
            raise
        finally:
            if password is not None:
                with contextlib.suppress(Exception):
                    await hv.vnc_ticket(uuid, None, 0)
    return reader, writer, init


async def relay(ws: WebSocket, hv: Hypervisor, uuid: str, sock: Path, lock: asyncio.Lock) -> None:
    try:
        reader, writer, init = await attach(hv, uuid, sock, lock)
    except asyncio.TimeoutError as exc:
        raise ConsoleUnavailable(f"QEMU's VNC server did not finish the handshake within "
                                 f"{HANDSHAKE_DEADLINE_S:.0f} s", remedy="check the VM's QEMU on this host") from exc
    try:
        await ws.accept()
        await ws.send_text(json.dumps({"event": "attached", "server_init": init.hex()}))
        await pump(ws, reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2)

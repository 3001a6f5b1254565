"""A graphical console session that follows its VM: the controller speaks RFB to the user's client (noVNC) itself.

The agent's leg starts after ServerInit (its agent did the handshake with QEMU, with a one-time password). The
controller gives the client its own RFB 3.8 handshake (security type None: the client is authenticated by its
token and the operator role) and the first server's ServerInit, then relays whole messages only, both ways
(:mod:`kvmotion.common.rfb`), keeping the client's pixel format and encodings (stateless ones only).

When the VM moves the source's leg closes (its QEMU quits at RELEASE); a half message it left is dropped. The relay
waits for the new owner (as the serial console does), attaches to its agent, tells the new server the client's
pixel format and encodings and asks for the whole screen: the client sees its screen stop and refresh, and never
reconnects. Input typed in between is dropped and counted. A screen size that changed is announced with a
DesktopSize rectangle when the client takes it; otherwise the session closes with ``CLOSE_MOVED``.
"""
from __future__ import annotations

import asyncio
import struct
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from kvmotion.common import rfb
from kvmotion.common.errors import ConsoleUnavailable
from kvmotion.controller.console import SEND_DEADLINE_S, ConsoleRelay, SessionEnded, op_of
from kvmotion.controller.console_link import Connector, Link
from kvmotion.controller.inventory import Inventory
from kvmotion.models.console import CLOSE_MOVED, CLOSE_NORMAL, ConsoleKind, ConsoleMove, ConsoleSession

HANDSHAKE_DEADLINE_S = 30.0


class VNCRelay(ConsoleRelay):
    def __init__(self, ws: WebSocket, inv: Inventory, connect: Connector, session: ConsoleSession) -> None:
        super().__init__(ws, inv, connect, session)
        self.pixels = rfb.PixelState()
        self.down = rfb.Framer(lambda: rfb.server_grammar(self.pixels))
        self.up = rfb.Framer(rfb.client_grammar)
        self.init: rfb.ServerInit | None = None
        self.pixel_format: bytes | None = None      # the client's SetPixelFormat (else ServerInit's format)
        self.encodings: bytes | None = None         # its SetEncodings, stateless encodings only
        self.kept: list[int] = []
        self.ready = False                          # a server is attached and knows the client's state
        self.closed_at = 0.0
        self.early = bytearray()                    # client bytes that came with its handshake

    async def _open(self) -> None:
        self.link = await self.connect(self.s.hosts[0], self.s.uuid, ConsoleKind.VNC, False)
        self.init = await server_init(self.link)
        self.pixels.bpp = self.init.bpp
        try:
            await asyncio.wait_for(self._client_handshake(), HANDSHAKE_DEADLINE_S)
        except (asyncio.TimeoutError, WebSocketDisconnect, RuntimeError) as exc:
            raise SessionEnded(f"the VNC client did not finish the RFB handshake ({type(exc).__name__})",
                               CLOSE_NORMAL) from exc
        self.ready = True

    # -- the client's side ---------------------------------------------------------------------------
    async def _read_client(self, n: int) -> bytes:
        while len(self.early) < n:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(msg.get("code", 1000))
            self.early += msg.get("bytes") or b""
        out = bytes(self.early[:n])
        del self.early[:n]
        return out

    async def _client_handshake(self) -> None:
        """RFB as the server: 3.3, 3.7 and 3.8, security type None; ServerInit is the first server's."""
        assert self.init is not None
        await self.ws.send_bytes(rfb.VERSION)
        version = await self._read_client(12)
        minor = int(version[8:11]) if version.startswith(b"RFB 003.") and version[8:11].isdigit() else 3
        if minor >= 7:
            await self.ws.send_bytes(bytes([1, rfb.SEC_NONE]))
            if (await self._read_client(1))[0] != rfb.SEC_NONE:
                raise RuntimeError("the client chose a security type it was not offered")
            if minor >= 8:
                await self.ws.send_bytes(struct.pack(">I", 0))
        else:
            await self.ws.send_bytes(struct.pack(">I", rfb.SEC_NONE))
        await self._read_client(1)                                # ClientInit: the relay is always shared
        await self.ws.send_bytes(self.init.encode())

    async def _upstream(self) -> None:
        try:
            if self.early:
                await self._from_client(bytes(self.early))
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if msg.get("text") is not None and op_of(msg["text"]) == "end":     # as on a serial session
                    self.end_requested = True
                    break
                if msg.get("bytes"):
                    await self._from_client(msg["bytes"])
        except (WebSocketDisconnect, RuntimeError):
            pass
        except rfb.RFBError as exc:
            self.s.end_reason = exc.message
        self.stopping = True
        if self.link is not None:
            await self.link.close()

    async def _from_client(self, data: bytes) -> None:
        self.s.bytes_from_client += len(data)
        for m in self.up.feed(data):
            if m[0] == rfb.SET_PIXEL_FORMAT:
                self.pixel_format = m
                self.pixels.bpp = rfb.bytes_per_pixel(m[4:20])
            elif m[0] == rfb.SET_ENCODINGS:
                m, self.kept = rfb.stateless(m)
                self.encodings = m
            elif not self.ready and m[0] in rfb.INPUT:
                self.s.input_dropped += len(m)
            if self.ready and self.link is not None:
                await self.link.send(m)

    # -- the server's side ---------------------------------------------------------------------------
    async def _follow(self) -> int:
        while True:
            assert self.link is not None
            await self._downstream(self.link)
            if self.stopping:
                self.s.end_reason = self.s.end_reason or \
                    ("client ended the session" if self.end_requested else "client closed")
                return CLOSE_NORMAL
            old, self.closed_at, self.ready = self.link.host, time.time(), False
            await self.link.close()
            self.down.reset()                                      # a half message of the source's: dropped
            host = await self._next_owner(old)
            link = await self.connect(host, self.s.uuid, ConsoleKind.VNC, False)
            await self._resume(link, await server_init(link))
            self.link, self.ready = link, True
            if host != old:
                self.s.hosts.append(host)
                self.pending = ConsoleMove(from_host=old, to_host=host, at=time.time(), gap_ms=-1.0,
                                           reconnect_ms=round((time.time() - self.closed_at) * 1000, 1))
                self.s.moves.append(self.pending)

    async def _resume(self, link: Link, init: rfb.ServerInit) -> None:
        """Tell the new server what the client asked of the old one, and ask for the whole screen."""
        assert self.init is not None
        if (init.width, init.height) != (self.init.width, self.init.height):
            if rfb.DESKTOP_SIZE not in self.kept:
                raise SessionEnded(f"VM {self.s.vm} moved to {link.host} and its screen size changed: reconnect",
                                   CLOSE_MOVED)
            await self._to_client(rfb.desktop_size(init.width, init.height))
            self.init = rfb.ServerInit(init.width, init.height, self.init.pixel_format, self.init.name)
        await link.send(self.pixel_format or bytes(4) + self.init.pixel_format)
        if self.encodings is not None:
            await link.send(self.encodings)
        await link.send(rfb.update_request(False, init.width, init.height))

    async def _downstream(self, link: Link) -> None:
        while (msg := await link.recv()) is not None:
            if isinstance(msg, dict):
                continue
            whole = self.down.feed(msg)
            if not whole:
                continue
            if self.pending is not None:     # the screen froze when the source closed; it shows again now
                self.pending.gap_ms = round((time.time() - self.closed_at) * 1000, 1)
                self.pending = None
            if not await self._to_client(b"".join(whole)):
                return

    async def _to_client(self, data: bytes) -> bool:
        self.s.bytes_to_client += len(data)
        try:
            await asyncio.wait_for(self.ws.send_bytes(data), SEND_DEADLINE_S)
        except (WebSocketDisconnect, RuntimeError, asyncio.TimeoutError):
            self.stopping = True
            return False
        return True


async def server_init(link: Link) -> rfb.ServerInit:
    """The ServerInit of a fresh agent leg (its ``attached`` event)."""
    try:
        return await asyncio.wait_for(_server_init(link), HANDSHAKE_DEADLINE_S)
    except asyncio.TimeoutError as exc:
        raise ConsoleUnavailable(f"the agent of host {link.host} did not hand over the VNC session within "
                                 f"{HANDSHAKE_DEADLINE_S:.0f} s", remedy="check the VM's QEMU on that host",
                                 details={"host": link.host}) from exc


async def _server_init(link: Link) -> rfb.ServerInit:
    while (msg := await link.recv()) is not None:
        if isinstance(msg, dict) and msg.get("event") == "attached" and msg.get("server_init"):
            return rfb.ServerInit.parse(bytes.fromhex(str(msg["server_init"])))
        if isinstance(msg, bytes):
            break
    raise ConsoleUnavailable(f"the agent of host {link.host} did not hand over a VNC session",
                             remedy="update kvmotion-agent on that host to this version",
                             details={"host": link.host})

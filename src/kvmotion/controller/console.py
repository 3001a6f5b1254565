"""Console sessions through the controller: a client's websocket relayed to the agent of the VM's owner.

A serial session follows its VM. When the agent's side closes (the source QEMU quits at the end of a move), the
relay waits for the VM's owner to change (the engine changes it last, at RELEASE), attaches to the new owner's
agent asking for ``replay`` (what the guest printed there before the relay attached, from its serial.log) and
carries on. The gap (the last byte from the source to the first from the destination) is sent to the client as
a ``moved`` event and kept in the session, whose summary ends the session and goes to the audit log.

Serial protocol to the client: binary frames are console bytes both ways; text frames from the controller are
JSON events: ``attached``, ``moved``, ``error``, ``end`` (the session record); a text frame ``{"op": "end"}``
from the client ends the session with that record. VNC sessions carry RFB bytes only and follow their VM too
(:mod:`kvmotion.controller.console_vnc`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from kvmotion.common.errors import KvmotionError
from kvmotion.controller.auth import Audit, Principal
from kvmotion.controller.console_link import Connector, Link
from kvmotion.controller.inventory import Inventory
from kvmotion.models.api import VMOut
from kvmotion.models.console import (CLOSE_ENDED, CLOSE_NORMAL, ConsoleKind, ConsoleMove,
                                     ConsoleSession, close_code)

log = logging.getLogger(__name__)

FOLLOW_DEADLINE_S = 60.0      # how long a session waits for its VM to show up on another host
POLL_S = 0.05
SAME_HOST_RETRY_S = 2.0       # the owner did not change: re-attach there (its agent restarted)
SEND_DEADLINE_S = 10.0


class SessionEnded(Exception):
    """The session cannot go on (the VM powered off, or never reappeared); ``code`` is the close code."""

    def __init__(self, reason: str, code: int = CLOSE_ENDED) -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


def new_session(principal: Principal, vm: VMOut, kind: ConsoleKind, client: str) -> ConsoleSession:
    return ConsoleSession(id=secrets.token_hex(6), who=principal.name, role=str(principal.role), vm=vm.name,
                          uuid=vm.uuid, kind=kind, client=client, started_at=time.time(), hosts=[vm.host])


def audit_session(audit: Audit, s: ConsoleSession, event: str, status: int) -> None:
    """One audit row at the start and one at the end of each session (who, VM, kind, hosts, gaps)."""
    path = f"/api/v1/vms/{s.vm}/console/{s.kind} {event} session={s.id}"
    if event == "end":
        gaps = ",".join(f"{m.from_host}->{m.to_host}:{m.gap_ms:.0f}ms(reconnect {m.reconnect_ms:.0f}ms)"
                        for m in s.moves)
        path += (f" hosts={','.join(s.hosts)} moves={gaps or 'none'} out={s.bytes_to_client} "
                 f"in={s.bytes_from_client} reason={s.end_reason}")
    audit.record(s.who, s.role, "CONSOLE", path, status, s.client)


def op_of(text: str) -> str:
    try:
        msg = json.loads(text)
    except ValueError:
        return ""
    return str(msg.get("op", "")) if isinstance(msg, dict) else ""


class ConsoleRelay:
    """One session: the client's websocket, the current agent link, and the record."""

    def __init__(self, ws: WebSocket, inv: Inventory, connect: Connector, session: ConsoleSession) -> None:
        self.ws, self.inv, self.connect, self.s = ws, inv, connect, session
        self.link: Link | None = None
        self.last_byte_at = 0.0
        self.pending: ConsoleMove | None = None
        self.end_requested = False      # the client asked for the end (it then gets the session record)
        self.stopping = False

    async def run(self) -> int:
        """Relay until the client leaves or the session cannot go on; returns the close code."""
        up: asyncio.Task[None] | None = None
        try:
            await self._open()
            up = asyncio.create_task(self._upstream())
            return await self._follow()
        except SessionEnded as end:
            self.s.end_reason = end.reason
            return end.code
        finally:
            if up is not None:
                up.cancel()
                await asyncio.wait([up], timeout=2)      # not gather: the caller's own cancellation stays its own
            if self.link is not None:
                await self.link.close()

    async def _open(self) -> None:
        self.link = await self.connect(self.s.hosts[0], self.s.uuid, self.s.kind, False)
        await self._event({"event": "attached", "session": self.s.id, "vm": self.s.vm, "host": self.link.host})

    async def _follow(self) -> int:
        while True:
            assert self.link is not None
            await self._downstream(self.link)
            if self.stopping:
                self.s.end_reason = "client ended the session" if self.end_requested else "client closed"
                return CLOSE_NORMAL
            old, closed_at = self.link.host, time.time()
            await self.link.close()
            host = await self._next_owner(old)
            self.link = await self.connect(host, self.s.uuid, self.s.kind, host != old)
            if host != old:
                self.s.hosts.append(host)
                self.pending = ConsoleMove(from_host=old, to_host=host, at=time.time(), gap_ms=-1.0,
                                           reconnect_ms=round((time.time() - closed_at) * 1000, 1))
                self.s.moves.append(self.pending)
            log.info("console %s of %s follows to %s", self.s.id, self.s.vm, host)

    async def _downstream(self, link: Link) -> None:
        while (msg := await link.recv()) is not None:
            if isinstance(msg, dict):
                if self.pending is not None and msg.get("event") == "attached":
                    self.pending.replayed_bytes = int(msg.get("replayed_bytes") or 0)
                    self.pending.uncertain_bytes = int(msg.get("uncertain_bytes") or 0)
                continue
            now = time.time()
            if self.pending is not None:
                self.pending.gap_ms = round((now - (self.last_byte_at or self.pending.at)) * 1000, 1)
                await self._event({"event": "moved", **self.pending.model_dump()})
                self.pending = None
            self.last_byte_at = now
            self.s.bytes_to_client += len(msg)
            try:
                await asyncio.wait_for(self.ws.send_bytes(msg), SEND_DEADLINE_S)
            except (WebSocketDisconnect, RuntimeError, asyncio.TimeoutError):
                self.stopping = True
                return

    async def _upstream(self) -> None:
        """The client's bytes to the current link (dropped, and counted, while following)."""
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if msg.get("text") is not None:          # control: {"op": "end"} ends with the session record
                    if op_of(msg["text"]) == "end":
                        self.end_requested = True
                        break
                    continue
                data = msg.get("bytes") or b""
                self.s.bytes_from_client += len(data)
                if self.link is None or self.pending is not None:
                    self.s.input_dropped += len(data)
                    continue
                await self.link.send(data)
        except (WebSocketDisconnect, RuntimeError):
            pass
        self.stopping = True
        if self.link is not None:
            await self.link.close()

    async def _next_owner(self, old: str) -> str:
        """The host the VM runs on now: a new owner as soon as the inventory names one."""
        start = time.monotonic()
        while time.monotonic() - start < FOLLOW_DEADLINE_S:
            if self.stopping:
                raise SessionEnded("client closed", CLOSE_NORMAL)
            vm = await asyncio.to_thread(self.inv.get_vm, self.s.uuid)
            if vm.power_state != "poweredOn":
                raise SessionEnded(f"VM {self.s.vm} is {vm.power_state}")
            if vm.host != old or time.monotonic() - start > SAME_HOST_RETRY_S:
                return vm.host
            await asyncio.sleep(POLL_S)
        raise SessionEnded(f"VM {self.s.vm} did not reappear within {FOLLOW_DEADLINE_S:.0f} s")

    async def _event(self, event: dict[str, Any]) -> None:
        if self.s.kind is ConsoleKind.SERIAL and self.ws.client_state is WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, asyncio.TimeoutError):
                await asyncio.wait_for(self.ws.send_text(json.dumps(event)), SEND_DEADLINE_S)


async def serve(ws: WebSocket, inv: Inventory, audit: Audit, connect: Connector, session: ConsoleSession,
                subprotocol: str | None, relay_type: type[ConsoleRelay] = ConsoleRelay) -> None:
    """Accept, relay, then end the session with its record (an ``end`` event, the close code, the audit)."""
    await ws.accept(subprotocol=subprotocol)
    await asyncio.to_thread(audit_session, audit, session, "start", 101)
    relay = relay_type(ws, inv, connect, session)
    code = CLOSE_NORMAL
    try:
        code = await relay.run()
    except KvmotionError as exc:
        session.end_reason = exc.message
        code = close_code(exc.http_status)
        await relay._event({"event": "error", "error": exc.to_dict()})
    finally:
        session.ended_at = time.time()
        await relay._event({"event": "end", "session": session.model_dump(mode="json")})
        await asyncio.to_thread(audit_session, audit, session, "end", code)   # before the client sees the close
        if relay.ws.client_state is WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await ws.close(code=code, reason=session.end_reason[:120])
        log.info("console %s of %s by %s ended: %s", session.id, session.vm, session.who, session.end_reason)

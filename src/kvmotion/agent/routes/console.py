"""Console websockets: the controller (its handshake signed like every request) reaches a VM's console socket."""
from __future__ import annotations

import logging

from fastapi import APIRouter, WebSocket
from starlette.responses import JSONResponse

from kvmotion.agent import vnc
from kvmotion.agent.console import ConsoleSessions, checked_socket, relay
from kvmotion.agent.service import Agent
from kvmotion.common.errors import InvalidInputError, KvmotionError
from kvmotion.models.console import ConsoleKind, close_code

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/vms")


async def refuse(ws: WebSocket, exc: KvmotionError) -> None:
    """Refuse a handshake with the error in the usual shape (an HTTP answer where the server can send one)."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()}))
    else:
        await ws.close(code=close_code(exc.http_status), reason=exc.message[:120])


@router.websocket("/{uuid}/console/{kind}")
async def console(ws: WebSocket, uuid: str, kind: str, replay: bool = False) -> None:
    agent: Agent = ws.app.state.agent
    sessions: ConsoleSessions = ws.app.state.consoles
    try:
        if kind not in ConsoleKind.__members__.values():
            raise InvalidInputError(f"no console kind {kind!r}", remedy="use serial or vnc")
        k = ConsoleKind(kind)
        sock = checked_socket(agent.console_socket(uuid, k), uuid, k)
        with sessions.hold(uuid, k):
            log.info("console %s of %s opened", k, uuid)
            if k is ConsoleKind.VNC:
                await vnc.relay(ws, agent.hv, uuid, sock, sessions.vnc_lock(uuid))
            else:
                await relay(ws, sock, sock.parent / "serial.log" if replay else None)
            log.info("console %s of %s closed", k, uuid)
    except KvmotionError as exc:
        if ws.client_state.name == "CONNECTING":
            await refuse(ws, exc)
        else:
            log.warning("console %s of %s ended: %s", kind, uuid, exc.message)

"""Remote consoles (websockets): ``/vms/{ref}/console/serial`` and ``/vms/{ref}/console/vnc``; operator role.

The token comes in the ``Authorization: Bearer`` header, or, for a browser (noVNC cannot set headers), as the
subprotocol ``kvmotion.bearer.TOKEN`` offered beside ``binary``. A refused handshake is an HTTP error in the
usual shape (401/403/404/409) and is audited like every session.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, WebSocket
from starlette.responses import JSONResponse

from kvmotion.common.errors import ConflictError, InvalidInputError, KvmotionError
from kvmotion.controller.auth import Principal, Role, authenticate_bearer, require_role
from kvmotion.controller.console import ConsoleRelay, new_session, serve
from kvmotion.controller.console_vnc import VNCRelay
from kvmotion.controller.console_link import Connector, agent_connector
from kvmotion.controller.service import Controller
from kvmotion.models.console import ConsoleKind

router = APIRouter()
TOKEN_PROTOCOL = "kvmotion.bearer."


def bearer_of(ws: WebSocket) -> tuple[str | None, str | None]:
    """(the token, the subprotocol to answer with) of a handshake."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    answer = "binary" if "binary" in offered else (offered[0] if offered else None)
    header = ws.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip(), answer
    for p in offered:
        if p.startswith(TOKEN_PROTOCOL):
            return p[len(TOKEN_PROTOCOL):], answer
    return None, answer


async def refuse(ws: WebSocket, ctl: Controller, exc: KvmotionError, who: Principal | None) -> None:
    client = ws.client.host if ws.client else "?"
    await asyncio.to_thread(ctl.audit.record, who.name if who else "-", str(who.role) if who else "-", "CONSOLE",
                            f"{ws.url.path} refused", exc.http_status, client)
    await ws.send_denial_response(JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()}))


@router.websocket("/vms/{ref}/console/{kind}")
async def console(ws: WebSocket, ref: str, kind: str) -> None:
    ctl: Controller = ws.app.state.controller
    connect: Connector = getattr(ws.app.state, "console_connector", None) or agent_connector(ctl.inventory)
    token, subprotocol = bearer_of(ws)
    what = f"console {ws.url.path}"
    principal: Principal | None = None
    try:
        principal = await asyncio.to_thread(authenticate_bearer, ctl.tokens, token, what)
        require_role(principal, Role.OPERATOR, what)
        if kind not in ConsoleKind.__members__.values():
            raise InvalidInputError(f"no console kind {kind!r}", remedy="use serial or vnc")
        vm = await asyncio.to_thread(ctl.inventory.get_vm, ref)
        if vm.power_state != "poweredOn":
            raise ConflictError(f"VM {vm.name} is {vm.power_state}: it has no console",
                                remedy=f"power it on first: kvmotion vm start {vm.name}")
    except KvmotionError as exc:
        await refuse(ws, ctl, exc, principal)
        return
    session = new_session(principal, vm, ConsoleKind(kind), ws.client.host if ws.client else "?")
    await serve(ws, ctl.inventory, ctl.audit, connect, session, subprotocol,
                VNCRelay if session.kind is ConsoleKind.VNC else ConsoleRelay)

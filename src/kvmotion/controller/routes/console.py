"""Remote consoles (websockets): ``/vms/{ref}/console/serial`` and ``/vms/{ref}/console/vnc``; operator role.

The token comes in the ``Authorization: Bearer`` header, or, for a browser (noVNC cannot set headers), as the
subprotocol ``kvmotion.bearer.TOKEN`` offered beside ``binary``, or from the web client's session cookie (only
from the controller's own origin). A refused handshake is an HTTP error in the
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
from kvmotion.controller.webui.sessions import UiSessions, check_csrf, cookie_of
from kvmotion.models.console import ConsoleKind

router = APIRouter()
TOKEN_PROTOCOL = "kvmotion.bearer."


def bearer_of(ws: WebSocket) -> tuple[str | None, str | None]:
    """(the token, the subprotocol to answer with) of a handshake; a web-client session's token when neither the
    header nor a subprotocol carries one (its origin checked: ``CsrfRejected`` from another site)."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    answer = "binary" if "binary" in offered else (offered[0] if offered else None)
    header = ws.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip(), answer
    for p in offered:
        if p.startswith(TOKEN_PROTOCOL):
            return p[len(TOKEN_PROTOCOL):], answer
    sessions: UiSessions | None = getattr(ws.app.state, "ui_sessions", None)
    session = sessions.find(cookie_of(ws.scope)) if sessions is not None else None
    if session is not None:
        check_csrf(ws.scope, session, f"console {ws.url.path}")
        return session.token, answer
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
    what = f"console {ws.url.path}"
    principal: Principal | None = None
    subprotocol: str | None = None
    try:
        token, subprotocol = bearer_of(ws)
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

"""Cross-controller moves (``controller.incoming``, docs/cross-controller.md).

``/peer/moves…`` are the calls of another controller of the domain (a member), authenticated by its pinned client
certificate only (``Domain.authenticate``); each is audited under that controller's name.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Request

from kvmotion.controller.auth import Peer
from kvmotion.controller.routes.deps import Ctl
from kvmotion.controller.routes.domain import _peer
from kvmotion.models.api import TaskOut
from kvmotion.models.crossmove import MOVE_ID_PATTERN, CrossOffer, CrossVerdict, IncomingOut, PeerHostCall

peer_router = APIRouter()
MoveId = Path(pattern=MOVE_ID_PATTERN)


def _member(request: Request, ctl: Any) -> Peer:
    peer = _peer(request)
    ctl.domain.require_member(peer, "a cross-controller move")
    return peer


@peer_router.post("/peer/moves/validate")
async def move_validate(offer: CrossOffer, request: Request, ctl: Ctl) -> CrossVerdict:
    """This controller's checker on one of its hosts for another controller's VM; nothing is held."""
    return await ctl.incoming.judge(_member(request, ctl), offer, reserve=False)


@peer_router.post("/peer/moves")
async def move_reserve(offer: CrossOffer, request: Request, ctl: Ctl) -> CrossVerdict:
    """The same, and without a blocker a place is held (``reserved``): the VM is here as ``incoming``."""
    return await ctl.incoming.judge(_member(request, ctl), offer, reserve=True)


@peer_router.get("/peer/moves/{move_id}/state")
async def move_status(request: Request, ctl: Ctl, move_id: str = MoveId) -> IncomingOut:
    return await ctl.incoming.status(_member(request, ctl), move_id)


@peer_router.post("/peer/moves/{move_id}/host")
async def move_host_call(call: PeerHostCall, request: Request, ctl: Ctl, move_id: str = MoveId) -> Any:
    """One call of the move on the destination host's agent (its VM only; this controller fills in the rest)."""
    return await ctl.incoming.host_call(_member(request, ctl), move_id, call)


@peer_router.post("/peer/moves/{move_id}/commit")
async def move_commit(request: Request, ctl: Ctl, move_id: str = MoveId) -> IncomingOut:
    return await ctl.incoming.commit(_member(request, ctl), move_id)


@peer_router.post("/peer/moves/{move_id}/cancel")
async def move_cancel(request: Request, ctl: Ctl, move_id: str = MoveId) -> TaskOut:
    """The destination controller's admin cancelled the move there: this controller (its source) cancels it."""
    return ctl.cancel_outgoing(_member(request, ctl), move_id)


@peer_router.get("/peer/moves/{move_id}/outgoing")
async def move_outgoing(request: Request, ctl: Ctl, move_id: str = MoveId) -> TaskOut:
    """How this controller's move to the caller ended (the caller reconciles a reservation nobody touched)."""
    return ctl.outgoing(_member(request, ctl), move_id)


@peer_router.post("/peer/moves/{move_id}/abort")
async def move_abort(request: Request, ctl: Ctl, move_id: str = MoveId) -> IncomingOut:
    return await ctl.incoming.abort(_member(request, ctl), move_id)

"""The trust domain of controllers (``controller.domain``).

- ``/domain…``: this controller's admin (its own admin token; a token of another controller is unknown here).
- ``/peer/…``: the other controllers, authenticated by their pinned client certificate only (``ApiGate`` asks
  ``Domain.authenticate``; bearer tokens are ignored there). Every call is audited with the caller's controller
  name. None of them changes this controller's hosts or VMs.
"""
from __future__ import annotations

from fastapi import APIRouter, Query, Request

from kvmotion.common.errors import UnauthorizedError
from kvmotion.controller.auth import Peer, Role
from kvmotion.controller.routes.deps import Ctl, role
from kvmotion.models.domain import (DomainCreate, DomainJoin, DomainLeave, DomainOut, Forgotten, JoinReply,
                                    JoinRequest, LeaveOut, MemberApprove, MemberOut, MemberState, PeerCa, PeerHello,
                                    Welcome)

router = APIRouter()
peer_router = APIRouter()


def _admin(request: Request) -> str:
    return request.state.principal.name


@router.get("/domain", dependencies=role(Role.ADMIN))
async def domain_show(ctl: Ctl) -> DomainOut:
    return ctl.domain.show()


@router.post("/domain", status_code=201, dependencies=role(Role.ADMIN))
async def domain_create(req: DomainCreate, request: Request, ctl: Ctl) -> DomainOut:
    return ctl.domain.create(req, _admin(request))


@router.post("/domain/join", status_code=202, dependencies=role(Role.ADMIN))
async def domain_join(req: DomainJoin, request: Request, ctl: Ctl) -> MemberOut:
    """Ask the controller at ``url`` (whose fingerprint the admin read there) to let this one in."""
    return await ctl.domain.join(req, _admin(request))


@router.post("/domain/leave", dependencies=role(Role.ADMIN))
async def domain_leave(req: DomainLeave, ctl: Ctl) -> LeaveOut:
    return await ctl.domain.leave(req.force)


@router.get("/domain/members", dependencies=role(Role.ADMIN))
async def domain_members(ctl: Ctl) -> list[MemberOut]:
    return ctl.domain.members()


@router.post("/domain/members/{name}/approve", dependencies=role(Role.ADMIN))
async def domain_approve(name: str, req: MemberApprove, request: Request, ctl: Ctl) -> MemberOut:
    return await ctl.domain.approve(name, req.fingerprint, _admin(request))


@router.post("/domain/members/{name}/ping", dependencies=role(Role.ADMIN))
async def domain_ping(name: str, ctl: Ctl) -> PeerHello:
    return await ctl.domain.ping(name)


@router.delete("/domain/members/{name}", dependencies=role(Role.ADMIN))
async def domain_remove(name: str, ctl: Ctl, force: bool = Query(default=False)) -> LeaveOut:
    return await ctl.domain.remove(name, force)


@router.delete("/domain/pending/{name}", dependencies=role(Role.ADMIN))
async def domain_reject(name: str, ctl: Ctl) -> LeaveOut:
    return await ctl.domain.reject(name)


def _peer(request: Request) -> Peer:
    """The caller ``ApiGate`` found by its client certificate."""
    peer = getattr(request.state, "principal", None)
    if not isinstance(peer, Peer) or peer.role != "peer":
        raise UnauthorizedError(f"{request.url.path} needs a domain controller's client certificate",
                                remedy="only the controllers of this controller's domain call it")
    return peer


@peer_router.get("/peer/ca")
async def peer_ca(ctl: Ctl) -> PeerCa:
    """This controller's CA certificate and domain (public: the joiner checks it against a fingerprint)."""
    return ctl.domain.ca_info()


@peer_router.post("/peer/join", status_code=202)
async def peer_join(req: JoinRequest, request: Request, ctl: Ctl) -> JoinReply:
    request.state.principal = Peer(req.name, MemberState.PENDING, role="join-request")    # named in the audit
    return ctl.domain.receive_join(req)


@peer_router.post("/peer/welcome")
async def peer_welcome(req: Welcome, request: Request, ctl: Ctl) -> PeerHello:
    return ctl.domain.receive_welcome(_peer(request), req)


@peer_router.get("/peer/hello")
async def peer_hello(request: Request, ctl: Ctl) -> PeerHello:
    return ctl.domain.hello(_peer(request))


@peer_router.post("/peer/leave")
async def peer_leave(request: Request, ctl: Ctl) -> Forgotten:
    return ctl.domain.receive_leave(_peer(request))

"""A trust domain of controllers (``kvmotion domain …``; docs/domains.md): the admin's requests and what
controllers send each other under ``/api/v1/peer/…``.

A controller's identity is its CA certificate; its fingerprint is the SHA-256 of that certificate, as
colon-separated hex pairs (``kvmotion domain show`` prints it; the other side's admin compares it).
"""
from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints

from kvmotion.models.agent import NAME_PATTERN
from kvmotion.models.api import Request

CONTROLLER_URL_PATTERN = r"^https://[^\s/?#@]{1,255}/?$"
FINGERPRINT_PATTERN = r"^[0-9A-Fa-f: ]{64,100}$"
MAX_PEM_CHARS = 16 << 10
ControllerUrl = Annotated[str, StringConstraints(pattern=CONTROLLER_URL_PATTERN, max_length=264)]


class MemberState(StrEnum):
    PENDING = "pending"      # it asked to join this controller: waits for `kvmotion domain approve` here
    JOINING = "joining"      # this controller asked to join it: waits for its admin's approval there
    MEMBER = "member"        # both sides have each other pinned


class Identity(Request):
    """How this controller appears to the others; asked for when it enters a domain (kept until it leaves)."""
    controller_name: str | None = Field(default=None, pattern=NAME_PATTERN,
                                        description="this controller's name in the domain (default: its host name)")
    public_url: ControllerUrl | None = Field(default=None,
                                             description="where the other controllers reach this one (HTTPS)")


class DomainCreate(Identity):
    name: str = Field(pattern=NAME_PATTERN, description="the domain's name")


class DomainJoin(Identity):
    url: ControllerUrl = Field(description="a controller of the domain")
    fingerprint: str = Field(pattern=FINGERPRINT_PATTERN,
                             description="that controller's fingerprint, as `kvmotion domain show` prints it there")


class MemberApprove(Request):
    fingerprint: str = Field(pattern=FINGERPRINT_PATTERN,
                             description="the joining controller's fingerprint, read there (`kvmotion domain show`)")


class DomainLeave(Request):
    force: bool = Field(default=False, description="forget the others here even when some cannot be told")


class DomainOut(BaseModel):
    name: str | None = Field(description="this controller's name in its domain")
    url: str | None
    fingerprint: str = Field(description="SHA-256 of this controller's CA certificate")
    domain_id: str | None
    domain_name: str | None
    members: int = 0


class MemberOut(BaseModel):
    name: str
    url: str
    fingerprint: str
    state: MemberState
    since: float
    last_contact: float = 0.0
    approved_by: str = ""
    version: str = ""


class LeaveOut(BaseModel):
    forgotten: list[str] = Field(default_factory=list, description="controllers no longer pinned here")
    not_told: dict[str, str] = Field(default_factory=dict,
                                     description="controllers that could not be told (they still pin this one)")


class PeerCa(BaseModel):
    """``GET /peer/ca`` (no authentication: public): the joiner checks it against the fingerprint it was given."""
    name: str | None
    ca_pem: str
    domain_id: str | None
    domain_name: str | None


class JoinRequest(Request):
    name: str = Field(pattern=NAME_PATTERN)
    url: ControllerUrl
    ca_pem: str = Field(max_length=MAX_PEM_CHARS)
    client_pem: str = Field(max_length=MAX_PEM_CHARS, description="its peer client certificate, issued by ca_pem")
    version: str = Field(default="", max_length=64)


class JoinReply(BaseModel):
    name: str
    domain_id: str
    domain_name: str
    client_pem: str = Field(description="the peer client certificate of the controller joined, issued by its CA")
    state: MemberState = MemberState.PENDING


class Welcome(Request):
    """Sent by the controller that approved a join, to the joiner, over mutual TLS."""
    name: str = Field(pattern=NAME_PATTERN)
    domain_id: str = Field(max_length=64)


class PeerHello(BaseModel):
    """A controller's view of itself, as one of its peers gets it (``GET /peer/hello``)."""
    name: str
    domain_id: str
    domain_name: str
    version: str


class Forgotten(BaseModel):
    name: str

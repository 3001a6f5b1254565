"""Host onboarding: a registration waits for an admin's approval; removal revokes the host's certificates."""
from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from kvmotion.models.api import Request


class Registration(StrEnum):
    PENDING = "pending"        # waits for `kvmotion host approve NAME --fingerprint FP`
    ENROLLED = "enrolled"      # already enrolled with this secret: nothing to do


class RegistrationOut(BaseModel):
    name: str
    state: Registration
    fingerprint: str = Field(description="the host's fingerprint; its agent logs the same one at start")
    remedy: str = ""


class PendingHostOut(BaseModel):
    name: str
    address: str
    fingerprint: str
    requested_at: float
    token: str = Field(description="the enrolment token it used (now used up)")
    migration_addresses: list[str] = Field(default_factory=list,
                                           description="what its certificates will name once approved")
    datastores: list[str] = Field(default_factory=list)
    version: str = ""


class HostApprove(Request):
    fingerprint: str = Field(min_length=32, max_length=64, pattern=r"^[0-9A-Fa-f: ]+$",
                             description="the fingerprint the host's agent shows (kvmotion-agent --fingerprint)")


class HostRemoved(BaseModel):
    name: str
    revoked_serials: list[str] = Field(default_factory=list)
    crl_installed_on: list[str] = Field(default_factory=list)
    crl_failed: dict[str, str] = Field(default_factory=dict,
                                       description="hosts that did not take the new CRL (they get it at refresh)")

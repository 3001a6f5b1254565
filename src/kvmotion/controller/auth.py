"""API authentication: bearer tokens with roles, stored only as hashes, and the audit log.

Roles, lowest to highest: ``viewer`` (read), ``operator`` (power and migrate), ``admin`` (everything). An
``enrol`` token can only register hosts (``kvmotion host enrol-token``; it expires). At first start, when no
token exists, an admin token is made and written once, mode 0600, to ``admin.token``; it is never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common import confined
from kvmotion.common.errors import ConflictError, ForbiddenError, NotFoundError, UnauthorizedError
from kvmotion.common.private import keep_private
from kvmotion.controller.db import ApiToken, AuditEntry

ADMIN_TOKEN_FILE = "admin.token"
AUDIT_KEEP = 10000
_TOKEN_RE = re.compile(r"^kvm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"
    ENROL = "enrol"


_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3, Role.ENROL: 0}


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role

    def allows(self, needed: Role) -> bool:
        if needed is Role.ENROL:                  # registration: an enrolment token, or an admin
            return self.role in (Role.ENROL, Role.ADMIN)
        return self.role is not Role.ENROL and _RANK[self.role] >= _RANK[needed]


@dataclass(frozen=True)
class Peer:
    """Another controller of the trust domain, known by its pinned client certificate (never by a token;
    ``controller.domain``), or one asking to join (``role`` join-request), or nobody yet (``role`` anonymous)."""
    name: str
    state: str = ""          # pending | joining | member (models.domain.MemberState)
    role: str = "peer"


class TokenCreate(BaseModel):
    model_config = {"extra": "forbid"}
    name: str = Field(pattern=NAME_PATTERN)
    role: Role
    ttl_s: int | None = Field(default=None, ge=60, le=10 * 365 * 86400, description="lifetime (default: no expiry; "
                              "enrol tokens: 24 h)")


class TokenOut(BaseModel):
    name: str
    role: Role
    created_at: float
    expires_at: float = 0.0
    revoked: bool = False
    last_used: float = 0.0


class TokenCreated(TokenOut):
    token: str = Field(description="shown once; only its hash is kept")


class AuditOut(BaseModel):
    at: float
    who: str
    role: str
    method: str
    path: str
    status: int
    client: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _out(t: ApiToken) -> TokenOut:
    return TokenOut(name=t.name, role=Role(t.role), created_at=t.created_at, expires_at=t.expires_at,
                    revoked=bool(t.revoked_at), last_used=t.last_used)


class Tokens:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def create(self, req: TokenCreate) -> TokenCreated:
        tid = secrets.token_hex(6)
        token = f"kvm_{tid}_{secrets.token_urlsafe(32)}"
        ttl = req.ttl_s if req.ttl_s is not None else (86400 if req.role is Role.ENROL else None)
        row = ApiToken(id=tid, name=req.name, role=str(req.role), hash=hash_token(token), created_at=time.time(),
                       expires_at=time.time() + ttl if ttl else 0.0)
        try:
            with self.sessions.begin() as s:
                s.add(row)
        except IntegrityError as exc:
            raise ConflictError(f"a token named {req.name!r} exists", remedy="pick another name, or revoke it "
                                f"first: `kvmotion token revoke {req.name}`") from exc
        return TokenCreated(**_out(row).model_dump(), token=token)

    def list(self) -> list[TokenOut]:
        with self.sessions() as s:
            return [_out(t) for t in s.scalars(select(ApiToken).order_by(ApiToken.created_at)).all()]

    def revoke(self, name: str) -> TokenOut:
        with self.sessions.begin() as s:
            t = s.scalars(select(ApiToken).where(ApiToken.name == name)).first()
            if t is None:
                raise NotFoundError(f"no token named {name!r}", remedy="see `kvmotion token list`")
            t.revoked_at = t.revoked_at or time.time()
            return _out(t)

    def authenticate(self, token: str) -> Principal:
        remedy = "use a valid token (KVMOTION_TOKEN or KVMOTION_TOKEN_FILE); an admin makes one with " \
                 "`kvmotion token create NAME --role ROLE`"
        m = _TOKEN_RE.match(token)
        if not m:
            raise UnauthorizedError("the bearer token is malformed", remedy=remedy)
        now = time.time()
        with self.sessions.begin() as s:
            t = s.get(ApiToken, m.group(1))
            if t is None or not hmac.compare_digest(t.hash, hash_token(token)):
                raise UnauthorizedError("the bearer token is not known", remedy=remedy)
            if t.revoked_at:
                raise UnauthorizedError(f"token {t.name!r} was revoked", remedy=remedy)
            if t.expires_at and t.expires_at < now:
                raise UnauthorizedError(f"token {t.name!r} expired", remedy=remedy)
            if now - t.last_used > 60:          # coarse, to keep reads cheap
                t.last_used = now
            return Principal(t.name, Role(t.role))

    def bootstrap_admin(self, directory: Path) -> Path | None:
        """At first start (no tokens at all), make an admin token and write it once, mode 0600."""
        path = directory / ADMIN_TOKEN_FILE
        keep_private(path)                     # written before, and loosened since: tightened again
        with self.sessions() as s:
            if s.scalar(select(func.count()).select_from(ApiToken)):
                return None
        directory.mkdir(parents=True, exist_ok=True)
        created = self.create(TokenCreate(name="admin", role=Role.ADMIN))
        confined.write_in(directory, path.name, (created.token + "\n").encode())     # 0600, never through a link
        return path


def _fit(text: str, length: int) -> str:
    """``text`` as an audit column takes it: at most ``length`` characters, a NUL shown as ``\\0`` (a refused
    request's path may hold one; PostgreSQL stores none)."""
    return text.replace("\x00", "\\0")[:length]


def authenticate_bearer(tokens: Tokens, token: str | None, what: str) -> Principal:
    if not token:
        raise UnauthorizedError(f"{what} needs a bearer token", remedy="set KVMOTION_TOKEN or KVMOTION_TOKEN_FILE "
                                "(an admin makes tokens with `kvmotion token create NAME --role ROLE`)")
    return tokens.authenticate(token.strip())


def require_role(principal: Principal, needed: Role, what: str) -> None:
    if not principal.allows(needed):
        raise ForbiddenError(f"token {principal.name!r} has role {principal.role}; {what} needs role {needed}",
                             remedy=f"ask an admin for a token with role {needed}")


class Audit:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._writes = 0

    def record(self, who: str, role: str, method: str, path: str, status: int, client: str) -> None:
        with self.sessions.begin() as s:
            s.add(AuditEntry(at=time.time(), who=_fit(who, 64), role=_fit(role, 16), method=_fit(method, 8),
                             path=_fit(path, 512), status=status, client=_fit(client, 64)))
            self._writes += 1
            if self._writes % 100 == 0:      # bounded: keep the newest AUDIT_KEEP rows
                cutoff = s.scalar(select(AuditEntry.id).order_by(AuditEntry.id.desc()).offset(AUDIT_KEEP).limit(1))
                if cutoff is not None:
                    s.execute(delete(AuditEntry).where(AuditEntry.id <= cutoff))

    def list(self, limit: int) -> list[AuditOut]:
        with self.sessions() as s:
            rows = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)).all()
            return [AuditOut(at=r.at, who=r.who, role=r.role, method=r.method, path=r.path, status=r.status,
                             client=r.client) for r in rows]

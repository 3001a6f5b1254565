"""Inventory and task storage (SQLAlchemy; SQLite by default)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Float, ForeignKey, Integer, String, Text, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from kvmotion.common.private import create_private, keep_private

DB_TIMEOUT_S = 5.0
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


class Base(DeclarativeBase):
    pass



class Host(Base):
    __tablename__ = "hosts"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(32), default="connected")   # connected | disconnected
    facts_json: Mapped[str] = mapped_column(Text, default="{}")
    last_seen: Mapped[float] = mapped_column(Float, default=0.0)
    added_at: Mapped[float] = mapped_column(Float, default=time.time)
    last_error: Mapped[str] = mapped_column(Text, default="")
    maintenance: Mapped[int] = mapped_column(Integer, default=0)
    cluster: Mapped[str | None] = mapped_column(String(64), nullable=True)
    secret_wrapped: Mapped[str] = mapped_column(Text, default="")    # the agent's enrolment secret, wrapped

    @property
    def facts(self) -> dict[str, Any]:
        return json.loads(self.facts_json or "{}")


class PendingHost(Base):
    """A host that registered itself with an enrolment token and waits for an admin's ``host approve``: not in
    ``hosts``, so nothing places, evacuates to, certifies or trusts it; its facts are kept only to be shown."""

    __tablename__ = "pending_hosts"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(256))
    secret_wrapped: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    facts_json: Mapped[str] = mapped_column(Text, default="{}")
    token: Mapped[str] = mapped_column(String(64))          # the enrolment token's name (used up by this)
    requested_at: Mapped[float] = mapped_column(Float, default=time.time)


class HostIdentity(Base):
    """What an admin approved for a host: its fingerprint and the addresses its certificates may name; the
    serials of the certificates issued to it (revoked when it is removed)."""

    __tablename__ = "host_identities"
    host: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    addresses_json: Mapped[str] = mapped_column(Text, default="[]")
    serials_json: Mapped[str] = mapped_column(Text, default="[]")
    approved_by: Mapped[str] = mapped_column(String(64), default="")
    approved_at: Mapped[float] = mapped_column(Float, default=time.time)


class AgentPin(Base):
    """The certificates a host's agent API may present (PEM, newest last; ``kvmotion.common.pinning``)."""

    __tablename__ = "agent_pins"
    host: Mapped[str] = mapped_column(String(64), primary_key=True)
    pems_json: Mapped[str] = mapped_column(Text, default="[]")
    pinned_at: Mapped[float] = mapped_column(Float, default=time.time)


class RevokedCert(Base):
    """A certificate serial the CA revoked (a removed host's); every host's ca-crl.pem lists them."""

    __tablename__ = "revoked_certs"
    serial: Mapped[str] = mapped_column(String(64), primary_key=True)      # hex
    host: Mapped[str] = mapped_column(String(64))
    revoked_at: Mapped[float] = mapped_column(Float, default=time.time)


class Cluster(Base):
    """A group of hosts; with an EVC baseline every VM powered on in it gets that CPU model."""

    __tablename__ = "clusters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    evc_mode: Mapped[str | None] = mapped_column(String(64), nullable=True)
    policy_json: Mapped[str] = mapped_column(Text, default="{}")      # default migration policy


class Datastore(Base):
    __tablename__ = "datastores"
    uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32), default="directory")
    shared: Mapped[int] = mapped_column(Integer, default=0)


class HostDatastore(Base):
    __tablename__ = "host_datastores"
    host: Mapped[str] = mapped_column(ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True)
    datastore: Mapped[str] = mapped_column(ForeignKey("datastores.uuid", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    accessible: Mapped[int] = mapped_column(Integer, default=1)
    free_mb: Mapped[int] = mapped_column(Integer, default=0)


class Network(Base):
    __tablename__ = "networks"
    host: Mapped[str] = mapped_column(ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    bridge: Mapped[str] = mapped_column(String(32))


class VM(Base):
    __tablename__ = "vms"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    host: Mapped[str] = mapped_column(ForeignKey("hosts.name"))
    power_state: Mapped[str] = mapped_column(String(16), default="poweredOff")   # poweredOff | poweredOn
    spec_json: Mapped[str] = mapped_column(Text)
    policy_json: Mapped[str] = mapped_column(Text, default="{}")      # the VM's migration policy (overrides)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    vm_uuid: Mapped[str] = mapped_column(String(36), index=True)
    vm_name: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(64), default="")
    destination: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), default="running")   # queued | running | success | error
    phase: Mapped[str] = mapped_column(String(32), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    phases_json: Mapped[str] = mapped_column(Text, default="[]")
    progress_json: Mapped[str] = mapped_column(Text, default="{}")
    options_json: Mapped[str] = mapped_column(Text, default="{}")
    result_json: Mapped[str] = mapped_column(Text, default="{}")
    error_json: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)
    started_at: Mapped[float] = mapped_column(Float, default=0.0)     # when admission let it run
    finished_at: Mapped[float] = mapped_column(Float, default=0.0)


class Image(Base):
    """A library image: stored as qcow2 in the ``images/`` folder of each datastore that holds a copy."""

    __tablename__ = "images"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="importing")   # importing | ready
    source_format: Mapped[str] = mapped_column(String(16), default="")
    format: Mapped[str] = mapped_column(String(16), default="qcow2")
    virtual_bytes: Mapped[int] = mapped_column(Integer, default=0)
    file_bytes: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    copies_json: Mapped[str] = mapped_column(Text, default="[]")     # [{"datastore": DS, "path": images/NAME.qcow2}]
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class ApiToken(Base):
    """An API bearer token; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    expires_at: Mapped[float] = mapped_column(Float, default=0.0)      # 0: never
    revoked_at: Mapped[float] = mapped_column(Float, default=0.0)      # 0: valid
    last_used: Mapped[float] = mapped_column(Float, default=0.0)


class AuditEntry(Base):
    """Who did what and when: one row per state-changing API call (bounded, oldest pruned)."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    who: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    status: Mapped[int] = mapped_column(Integer)
    client: Mapped[str] = mapped_column(String(64))


class DomainSelf(Base):
    """This controller in its trust domain (``controller.domain``): one row, id 1, while it is in a domain."""

    __tablename__ = "domain_self"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain_id: Mapped[str] = mapped_column(String(64))
    domain_name: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))          # this controller's name in the domain
    url: Mapped[str] = mapped_column(String(264))          # where the others reach it
    since: Mapped[float] = mapped_column(Float, default=time.time)


class DomainMember(Base):
    """Another controller of the domain, or one asking to join (state pending | joining | member): its pinned CA
    certificate and peer client certificate (PEM)."""

    __tablename__ = "domain_members"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(String(264))
    state: Mapped[str] = mapped_column(String(16))
    ca_pem: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(100))
    client_pem: Mapped[str] = mapped_column(Text)
    client_sha256: Mapped[str] = mapped_column(String(64), index=True)
    since: Mapped[float] = mapped_column(Float, default=time.time)
    approved_by: Mapped[str] = mapped_column(String(64), default="")
    last_contact: Mapped[float] = mapped_column(Float, default=0.0)
    version: Mapped[str] = mapped_column(String(64), default="")


def _private_sqlite(url: str) -> None:
    """The SQLite file holds wrapped secrets and token hashes: created 0600 before SQLite opens it (SQLite gives
    its -wal and -shm files the database's mode), and an existing one and its companions tightened."""
    database = make_url(url).database
    if not url.startswith("sqlite") or not database or database == ":memory:" or database.startswith("file:"):
        return
    create_private(Path(database))
    for suffix in SQLITE_COMPANIONS:
        keep_private(Path(database + suffix))


def make_engine(url: str) -> Engine:
    connect_args: dict[str, Any] = {}
    if url.startswith("sqlite"):
        connect_args = {"timeout": DB_TIMEOUT_S, "check_same_thread": False}
        _private_sqlite(url)
    engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    Base.metadata.create_all(engine)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)

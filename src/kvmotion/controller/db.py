"""Inventory and task storage (SQLAlchemy; SQLite by default, or PostgreSQL): the tables as they are now.
Every change to them is an Alembic revision too (``controller/migrations/versions``; docs/deploy.md, "Schema
changes")."""
from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from kvmotion.common.errors import DatabaseUnusable
from kvmotion.controller import dbengine, schema


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
    drs_json: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")   # models.drs.DrsConfig


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
    total_mb: Mapped[int] = mapped_column(Integer, default=0, server_default="0")   # 0: an older agent's report


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
    state: Mapped[str] = mapped_column(String(16), default="running", index=True)   # queued | running | success | error
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
    # the metrics read what finished since their last read, in this order (controller/metrics.py), and retention
    # deletes the oldest finished first (controller/retention.py); GET /tasks pages newest first (listing.py)
    __table_args__ = (Index("ix_tasks_finished_at_id", "finished_at", "id"),
                      Index("ix_tasks_created_at_id", "created_at", "id"))


class Image(Base):
    """A library image: stored as qcow2 in the ``images/`` folder of each datastore that holds a copy."""

    __tablename__ = "images"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="importing")   # importing | ready
    source_format: Mapped[str] = mapped_column(String(16), default="")
    format: Mapped[str] = mapped_column(String(16), default="qcow2")
    virtual_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    file_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
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


class ControllerLeader(Base):
    """The controller that leads the controllers of this database (``controller.leader``): one row, id 1, written
    by each new leader while it holds the leader lock; the others forward state-changing calls to its ``url``."""

    __tablename__ = "controller_leader"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))          # the leader's controller_name
    url: Mapped[str] = mapped_column(String(264))          # its advertised URL
    term: Mapped[int] = mapped_column(Integer, default=1)  # +1 at every takeover
    since: Mapped[float] = mapped_column(Float, default=time.time)


def too_long(row: Base) -> list[str]:
    """The columns of ``row`` whose text is longer than the column allows: PostgreSQL refuses such a row (SQLite
    would keep it), so what an agent reports is checked with this before it is stored."""
    return [c.key for c in row.__table__.columns if isinstance(getattr(c.type, "length", None), int)
            and isinstance(value := getattr(row, c.key, None), str) and len(value) > c.type.length]


def make_engine(url: str) -> Engine:
    """An engine on the controller's database (SQLite or PostgreSQL, ``dbengine``), its schema brought to the
    newest revision first (``schema.upgrade``: Alembic; a database made before the migrations is adopted)."""
    engine = dbengine.create(url)
    try:
        schema.upgrade(engine)
    except OperationalError as exc:
        engine.dispose()
        raise DatabaseUnusable(f"cannot use the database {dbengine.shown(url)}: {exc.orig}",
                               remedy="check that its server runs and that database_url's host, port, user, "
                                      "password and database are right (docs/deploy.md, The database)",
                               details={"database": dbengine.shown(url)}) from exc
    except BaseException:
        engine.dispose()
        raise
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)

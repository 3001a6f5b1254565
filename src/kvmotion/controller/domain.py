"""The trust domain of controllers (issue 20, first part; docs/domains.md): which other controllers this one
trusts, and how that trust is made and undone.

- **Identity**: this controller's CA certificate (its fingerprint is what admins compare) and a peer client
  certificate (clientAuth) its CA issued once (``peer-client-cert.pem``/``-key.pem`` in the PKI directory).
- **Create** (``kvmotion domain create NAME``): this controller founds a domain with a random id.
- **Join** (``kvmotion domain join URL --fingerprint FP`` on B, FP read on A): B fetches A's CA certificate and
  checks it against FP, then sends its join request over HTTPS trusting only that CA: its CA certificate, peer
  client certificate, name and URL. A keeps it *pending* (bounded); B pins A (*joining*).
- **Approve** (``kvmotion domain approve B --fingerprint FP_B`` on A, FP_B read on B): A calls B back over mutual
  TLS (B's CA pinned; A's client certificate, which B pinned at join) and B marks A a member; then A pins B. If
  B cannot be reached, nothing changes on A: approve again later.
- **Leave / remove**: the other side is told over mutual TLS and both forget the pins; one that cannot be told is
  forgotten here only with ``force`` (it keeps its pins until its admin removes this controller).

Calls under ``/api/v1/peer/`` are authenticated by the client certificate alone (``authenticate``). Nothing
here touches hosts or VMs: each controller decides for its own hosts.
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion import __version__
from kvmotion.common import hostid, pinning
from kvmotion.common.errors import (ConflictError, ForbiddenError, InvalidInputError, KvmotionError, NotFoundError,
                                    UnauthorizedError)
from kvmotion.controller import peertls
from kvmotion.controller.auth import Peer
from kvmotion.controller.db import DomainMember, DomainSelf
from kvmotion.controller.peerclient import PeerClient
from kvmotion.controller.pki import CertificateAuthority, ensure_client_cert
from kvmotion.models.agent import NAME_PATTERN
from kvmotion.models.domain import (DomainCreate, DomainJoin, DomainOut, Forgotten, Identity, JoinReply,
                                    JoinRequest, LeaveOut, MemberOut, MemberState, PeerCa, PeerHello, Welcome)

log = logging.getLogger(__name__)
CERT_FILE, KEY_FILE = "peer-client-cert.pem", "peer-client-key.pem"
CLIENT_CN = "kvmotion controller (peer client)"
MAX_JOIN_REQUESTS = 16           # pending: more are refused, not kept
MAX_MEMBERS = 64
PEER_CALLS = frozenset({("POST", "/api/v1/peer/welcome"), ("GET", "/api/v1/peer/hello"),
                        ("POST", "/api/v1/peer/leave")})       # the others (GET ca, POST join) are open
_ID = "[0-9a-f-]{36}"
PEER_MOVE_CALLS = tuple((m, re.compile(f"^/api/v1/peer/moves{p}$")) for m, p in (   # controller.incoming
    ("POST", "/validate"), ("POST", ""), ("GET", f"/{_ID}/(state|outgoing)"), ("POST", f"/{_ID}/(host|commit|abort|cancel)")))
PENDING, JOINING, MEMBER = MemberState.PENDING, MemberState.JOINING, MemberState.MEMBER


def _out(m: DomainMember) -> MemberOut:
    return MemberOut(name=m.name, url=m.url, fingerprint=m.fingerprint, state=MemberState(m.state), since=m.since,
                     last_contact=m.last_contact, approved_by=m.approved_by, version=m.version)


def _host_name() -> str:
    name = socket.gethostname().split(".")[0]
    if not re.match(NAME_PATTERN, name):
        raise InvalidInputError(f"this machine's host name {name!r} is no valid controller name",
                                remedy="name the controller: --name NAME (letters, digits, '.', '_', '-')")
    return name


class Domain:
    def __init__(self, sessions: sessionmaker[Session], ca: CertificateAuthority, pki_dir: Path) -> None:
        self.sessions, self.ca = sessions, ca
        self.cert_file, self.key_file = ensure_client_cert(ca, pki_dir, CERT_FILE, KEY_FILE, CLIENT_CN)
        self.client_pem = self.cert_file.read_text()
        self.fingerprint = pinning.fingerprint(ca.cert_pem)
        self.server = peertls.ServerTrust(ca)

    def serving(self, cert: tuple[Path, Path]) -> dict[str, Any]:
        """uvicorn options for the HTTPS listener serving ``cert``: the pinned controllers may present theirs."""
        with self.sessions() as s:
            pems = list(s.scalars(select(DomainMember.ca_pem).where(DomainMember.state != PENDING)))
        return peertls.serving(self.server, cert, pems)

    def _tls(self, ca_pem: str) -> pinning.ClientTls:
        return pinning.ClientTls(self.cert_file, self.key_file, (ca_pem,))

    @staticmethod
    def _get(s: Session, name: str, *states: MemberState) -> DomainMember:
        row = s.get(DomainMember, name)
        if row is None or row.state not in states:
            what = "a join request" if states == (PENDING,) else "a controller of this domain"
            raise NotFoundError(f"{name!r} is not {what} here", remedy="see `kvmotion domain list`")
        return row

    @staticmethod
    def _me(s: Session) -> DomainSelf:
        me = s.get(DomainSelf, 1)
        if me is None:
            raise ConflictError("this controller is in no domain", remedy="create one (`kvmotion domain create "
                                "NAME`) or join one (`kvmotion domain join URL --fingerprint FP`)")
        return me

    # -- what an admin reads ----------------------------------------------------------------------------------
    def show(self) -> DomainOut:
        with self.sessions() as s:
            me = s.get(DomainSelf, 1)
            count = s.scalar(select(func.count()).select_from(DomainMember).where(DomainMember.state == MEMBER))
            return DomainOut(name=me.name if me else None, url=me.url if me else None, fingerprint=self.fingerprint,
                             domain_id=me.domain_id if me else None, domain_name=me.domain_name if me else None,
                             members=count or 0)

    def members(self) -> list[MemberOut]:
        with self.sessions() as s:
            return [_out(m) for m in s.scalars(select(DomainMember).order_by(DomainMember.name))]

    def member(self, name: str) -> MemberOut:
        with self.sessions() as s:
            return _out(self._get(s, name, PENDING, JOINING, MEMBER))

    # -- what an admin does -----------------------------------------------------------------------------------
    @staticmethod
    def _identity(me: DomainSelf | None, req: Identity) -> tuple[str, str]:
        """(name, URL) of this controller in the domain: kept while it is in one (a request may only repeat
        them), else the request's (the name defaults to the host name)."""
        if me is not None:
            for given, kept in ((req.controller_name, me.name), (req.public_url, me.url)):
                if given is not None and given.rstrip("/") != kept:
                    raise ConflictError(f"this controller is {me.name!r} at {me.url} in domain {me.domain_name!r}; "
                                        "its name and URL stay while it is in the domain",
                                        remedy="leave --name/--public-url out, or leave the domain first")
            return me.name, me.url
        if req.public_url is None:
            raise InvalidInputError("where the other controllers reach this one is not known",
                                    remedy="pass --public-url https://HOST:PORT")
        return req.controller_name or _host_name(), req.public_url.rstrip("/")

    def create(self, req: DomainCreate, who: str) -> DomainOut:
        self.server.require_serving()
        with self.sessions.begin() as s:
            me = s.get(DomainSelf, 1)
            if me is not None:
                raise ConflictError(f"this controller is already in domain {me.domain_name!r} ({me.domain_id})",
                                    remedy="leave it first: `kvmotion domain leave`")
            name, url = self._identity(None, req)
            s.add(DomainSelf(id=1, domain_id=str(uuid.uuid4()), domain_name=req.name, name=name, url=url,
                             since=time.time()))
        log.info("domain %s created by %s; this controller is %s at %s", req.name, who, name, url)
        return self.show()

    async def join(self, req: DomainJoin, who: str) -> MemberOut:
        """Ask the controller at ``req.url`` to let this one in (see the module); it is pinned here as joining."""
        self.server.require_serving()
        with self.sessions() as s:
            me = s.get(DomainSelf, 1)
            name, url = self._identity(me, req)
            domain_id = me.domain_id if me else None
        target = req.url.rstrip("/")
        if target == url:
            raise ConflictError(f"{target} is this controller's own URL", remedy="join another controller's URL")
        ca = await PeerClient(target, None).call("GET", "/peer/ca", PeerCa)
        self._check_target(target, ca, req.fingerprint, name, domain_id)
        ask = JoinRequest(name=name, url=url, ca_pem=self.ca.cert_pem, client_pem=self.client_pem,
                          version=__version__)
        reply = await PeerClient(target, pinning.ClientTls(None, None, (ca.ca_pem,))).call(
            "POST", "/peer/join", JoinReply, ask)
        fp, sha = peertls.check_identity(ca.ca_pem, reply.client_pem)
        if (reply.name, reply.domain_id) != (ca.name, ca.domain_id):
            raise ConflictError(f"the controller at {target} changed while this one joined",
                                remedy="join again; its admin rejects the request it has now")
        with self.sessions.begin() as s:
            if s.get(DomainSelf, 1) is None:
                s.add(DomainSelf(id=1, domain_id=reply.domain_id, domain_name=reply.domain_name, name=name, url=url,
                                 since=time.time()))
            s.merge(DomainMember(name=reply.name, url=target, state=JOINING, ca_pem=ca.ca_pem, fingerprint=fp,
                                 client_pem=reply.client_pem, client_sha256=sha, since=time.time(),
                                 approved_by=who, last_contact=time.time()))
        self.server.trust(ca.ca_pem)
        log.info("asked %s at %s (fingerprint %s) to join domain %s", reply.name, target, fp, reply.domain_name)
        return self.member(reply.name)

    def _check_target(self, target: str, ca: PeerCa, fingerprint: str, name: str, domain_id: str | None) -> None:
        """The controller at ``target`` is the one the admin named (its fingerprint), in a domain this one may
        join, under another name than this one's."""
        try:
            got = pinning.fingerprint(ca.ca_pem)
        except ValueError as exc:
            raise ConflictError(f"{target} sent no CA certificate", remedy="check that the URL is a kvmotion "
                                "controller's") from exc
        if not hostid.same(fingerprint, got, size=32):
            raise ConflictError(f"the controller at {target} has fingerprint {got}, not {fingerprint}",
                                remedy="read its fingerprint there (`kvmotion domain show`) and pass it with "
                                       "--fingerprint; if it shows the one you gave, something between the two "
                                       "controllers intercepts the connection. Nothing was sent or kept",
                                details={"url": target})
        if ca.domain_id is None or ca.name is None:
            raise ConflictError(f"the controller at {target} is in no domain",
                                remedy="its admin creates one there first: `kvmotion domain create NAME`")
        if domain_id not in (None, ca.domain_id):
            raise ConflictError(f"this controller is in another domain than the one of {target}",
                                remedy="leave it first: `kvmotion domain leave`")
        if ca.name == name:
            raise ConflictError(f"the controller at {target} is also named {name!r}",
                                remedy="join under another name: --name NAME")
        with self.sessions() as s:
            known = s.get(DomainMember, ca.name)
            if known is not None and known.state == MEMBER:
                raise ConflictError(f"{ca.name} is already a member here", remedy="nothing to do; "
                                    f"`kvmotion domain ping {ca.name}` checks the channel")
            if known is None and (s.scalar(select(func.count()).select_from(DomainMember)) or 0) >= MAX_MEMBERS:
                raise ConflictError(f"this controller already knows {MAX_MEMBERS} controllers",
                                    remedy="remove some first: `kvmotion domain remove NAME`")

    async def approve(self, name: str, fingerprint: str, who: str) -> MemberOut:
        """Admit a pending controller whose fingerprint the admin read on it; it is told over mutual TLS first."""
        with self.sessions() as s:
            row, me = self._get(s, name, PENDING), self._me(s)
            fp, url, ca_pem, domain_id = row.fingerprint, row.url, row.ca_pem, me.domain_id
            welcome = Welcome(name=me.name, domain_id=me.domain_id)
        if not hostid.same(fingerprint, fp, size=32):
            raise ConflictError(f"fingerprint {fingerprint} is not controller {name}'s",
                                remedy=f"compare with `kvmotion domain show` on {name}; its join request has {fp}. "
                                       f"A different one means another controller asked to join as {name}: "
                                       f"reject it with `kvmotion domain reject {name}`")
        hello = await PeerClient(url, self._tls(ca_pem)).call("POST", "/peer/welcome", PeerHello, welcome)
        self._check_hello(url, hello, name, domain_id)
        with self.sessions.begin() as s:
            row = self._get(s, name, PENDING)
            row.state, row.approved_by, row.last_contact, row.version = MEMBER, who, time.time(), hello.version
        self.server.trust(ca_pem)
        log.info("controller %s at %s (fingerprint %s) admitted to the domain by %s", name, url, fp, who)
        return self.member(name)

    @staticmethod
    def _check_hello(url: str, hello: PeerHello, name: str, domain_id: str) -> None:
        if (hello.name, hello.domain_id) != (name, domain_id):
            raise ConflictError(f"the controller at {url} is {hello.name!r} in domain {hello.domain_id}, not "
                                f"{name!r} in {domain_id}", remedy=f"see `kvmotion domain list` on both; remove "
                                f"{name} and let it join again")

    async def reject(self, name: str) -> LeaveOut:
        """Refuse a join request; the controller that sent it is told (if it answers), so it forgets this one."""
        with self.sessions.begin() as s:
            row = self._get(s, name, PENDING)
            told = (name, row.url, row.ca_pem)
            s.execute(delete(DomainMember).where(DomainMember.name == name))
        log.info("join request of %s rejected", name)
        return LeaveOut(forgotten=[name], not_told=await self._tell_leaving([told]))

    async def ping(self, name: str) -> PeerHello:
        """Prove the channel to a member: its ``/peer/hello`` over mutual TLS, both identities pinned."""
        with self.sessions() as s:
            row, me = self._get(s, name, MEMBER), self._me(s)
            url, ca_pem, domain_id = row.url, row.ca_pem, me.domain_id
        hello = await PeerClient(url, self._tls(ca_pem)).call("GET", "/peer/hello", PeerHello)
        self._check_hello(url, hello, name, domain_id)
        self._touch(name, hello.version)
        return hello

    def client(self, name: str) -> PeerClient:
        """The channel to a member for a cross-controller move (mutual TLS, both identities pinned)."""
        with self.sessions() as s:
            row = self._get(s, name, MEMBER)
            return PeerClient(row.url, self._tls(row.ca_pem))

    def my_name(self) -> str:
        with self.sessions() as s:
            return self._me(s).name

    def member_cas(self) -> dict[str, str]:
        """Every member's CA certificate: the hosts trust them for migration streams (``agent.tls``)."""
        with self.sessions() as s:
            return {m.name: m.ca_pem for m in s.scalars(select(DomainMember).where(DomainMember.state == MEMBER))}

    def require_member(self, peer: Peer, what: str) -> None:
        self._require(peer, MEMBER, what)

    async def remove(self, name: str, force: bool) -> LeaveOut:
        """Forget a member (or a controller this one asked to join), after telling it."""
        with self.sessions() as s:
            row = self._get(s, name, MEMBER, JOINING)
            told = (name, row.url, row.ca_pem)
        not_told = await self._tell_leaving([told])
        if not_told and not force:
            raise ConflictError(f"could not tell {name} that it is removed: {not_told[name]}",
                                remedy="try again when it answers, or pass --force to forget it here anyway (it "
                                       "keeps this controller pinned until its admin runs `kvmotion domain leave`)")
        self._forget([name])
        return LeaveOut(forgotten=[name], not_told=not_told)

    async def leave(self, force: bool) -> LeaveOut:
        """Leave the domain: every controller pinned here is told, then forgotten, and so is the domain."""
        with self.sessions() as s:
            self._me(s)
            rows = [(m.name, m.url, m.ca_pem) for m in s.scalars(select(DomainMember)
                                                                  .where(DomainMember.state != PENDING))]
        not_told = await self._tell_leaving(rows)
        told = [r[0] for r in rows if r[0] not in not_told]
        self._forget(told)            # they forgot this one: each pair stays consistent
        if not_told and not force:
            raise ConflictError(f"could not tell {', '.join(sorted(not_told))} that this controller leaves; they "
                                "still pin it", details={"forgotten": told, "not_told": not_told},
                                remedy="try again when they answer, or pass --force to leave anyway (then remove "
                                       "this controller there: `kvmotion domain remove NAME`)")
        with self.sessions.begin() as s:
            names = list(s.scalars(select(DomainMember.name)))
            s.execute(delete(DomainMember))
            s.execute(delete(DomainSelf))
        log.info("left the domain; forgot %s", ", ".join(told + names) or "nobody")
        return LeaveOut(forgotten=sorted(told + names), not_told=not_told)

    async def _tell_leaving(self, rows: list[tuple[str, str, str]]) -> dict[str, str]:
        """Tell each controller (name, URL, CA) that this one forgets it; returns those that could not be told. One
        that answers refusing this controller's certificate (401) does not pin it: nothing to tell."""
        async def tell(url: str, ca_pem: str) -> str | None:
            try:
                await PeerClient(url, self._tls(ca_pem)).call("POST", "/peer/leave", Forgotten)
            except KvmotionError as exc:
                return None if exc.details.get("status") == 401 else exc.message
            return None
        results = await asyncio.gather(*(tell(url, ca) for _, url, ca in rows))
        return {name: why for (name, _, _), why in zip(rows, results) if why is not None}

    def _forget(self, names: list[str]) -> None:
        with self.sessions.begin() as s:
            s.execute(delete(DomainMember).where(DomainMember.name.in_(names)))
        if names:
            log.info("forgot controller(s) %s", ", ".join(names))

    def _touch(self, name: str, version: str | None = None) -> None:
        with self.sessions.begin() as s:
            row = s.get(DomainMember, name)
            if row is not None:
                row.last_contact = time.time()
                row.version = version if version is not None else row.version

    # -- what the other controllers call (/api/v1/peer/…) -----------------------------------------------------
    def authenticate(self, der: bytes | None, method: str, path: str) -> Peer:
        """Who makes a peer call (``PEER_CALLS``): the controller whose pinned peer client certificate the
        connection presented. Bearer tokens count for nothing here. Any other request under /api/v1/peer/ is
        anonymous: the open calls, or a method or path no route has (404 or 405)."""
        call = ("GET" if method == "HEAD" else method, path)
        if call not in PEER_CALLS and not any(m == call[0] and p.match(path) for m, p in PEER_MOVE_CALLS):
            return Peer("-", role="anonymous")
        remedy = ("only the controllers of this controller's domain call /api/v1/peer/, with their pinned client "
                  "certificate (tokens count for nothing there): `kvmotion domain join` first")
        if der is None:
            raise UnauthorizedError(f"{path} needs the client certificate of a controller of this domain; none was "
                                    "presented", remedy=remedy)
        with self.sessions() as s:
            row = s.scalars(select(DomainMember).where(DomainMember.client_sha256 == peertls.der_sha256(der),
                                                       DomainMember.state != PENDING)).first()
            if row is None:
                raise UnauthorizedError("the client certificate presented is not pinned for a controller of this "
                                        "domain (it left, was removed, or never joined)", remedy=remedy)
            return Peer(row.name, row.state)

    @staticmethod
    def _require(peer: Peer, state: MemberState, what: str) -> None:
        if peer.state != state:
            raise ForbiddenError(f"controller {peer.name} is {peer.state} here; {what} needs {state}",
                                 remedy="see `kvmotion domain list` on both controllers")

    def ca_info(self) -> PeerCa:
        with self.sessions() as s:
            me = s.get(DomainSelf, 1)
            return PeerCa(name=me.name if me else None, ca_pem=self.ca.cert_pem,
                          domain_id=me.domain_id if me else None, domain_name=me.domain_name if me else None)

    def receive_join(self, req: JoinRequest) -> JoinReply:
        """A controller asks to join this one: kept pending for an admin's `kvmotion domain approve` (bounded)."""
        fp, sha = peertls.check_identity(req.ca_pem, req.client_pem)
        with self.sessions.begin() as s:
            me = self._me(s)
            self._check_joiner(s, me, req.name, fp)
            s.merge(DomainMember(name=req.name, url=req.url.rstrip("/"), state=PENDING, ca_pem=req.ca_pem,
                                 fingerprint=fp, client_pem=req.client_pem, client_sha256=sha, since=time.time(),
                                 version=req.version))
            reply = JoinReply(name=me.name, domain_id=me.domain_id, domain_name=me.domain_name,
                              client_pem=self.client_pem)
        log.info("controller %s at %s asks to join (fingerprint %s); pending approval", req.name, req.url, fp)
        return reply

    def _check_joiner(self, s: Session, me: DomainSelf, name: str, fp: str) -> None:
        if name == me.name or hostid.same(fp, self.fingerprint, size=32):
            raise ConflictError(f"the controller asking to join is named {name!r} or has this controller's "
                                "fingerprint", remedy="join under another name (--name), from another controller")
        known = s.get(DomainMember, name)
        if known is not None and known.state != PENDING:
            raise ConflictError(f"a controller named {name!r} is already {known.state} here",
                                remedy=f"its admin here removes it first (`kvmotion domain remove {name}`), or "
                                       "join under another name (--name)")
        if s.scalars(select(DomainMember.name).where(DomainMember.fingerprint == fp,
                                                      DomainMember.name != name)).first() is not None:
            raise ConflictError("a controller with this fingerprint is known here under another name",
                                remedy="see `kvmotion domain list` on the controller joined")
        others = select(func.count()).select_from(DomainMember).where(DomainMember.name != name)
        if (s.scalar(others.where(DomainMember.state == PENDING)) or 0) >= MAX_JOIN_REQUESTS \
                or (s.scalar(others) or 0) >= MAX_MEMBERS:
            raise ConflictError(f"too many join requests wait here (at most {MAX_JOIN_REQUESTS}), or the domain "
                                f"is full ({MAX_MEMBERS})", remedy="its admin approves or rejects them first: "
                                                                   "`kvmotion domain list`")

    def receive_welcome(self, peer: Peer, req: Welcome) -> PeerHello:
        """The controller this one asked to join approved it: it is a member from now on."""
        self._require(peer, JOINING, "a welcome")
        with self.sessions.begin() as s:
            me = self._me(s)
            if (req.name, req.domain_id) != (peer.name, me.domain_id):
                raise ConflictError(f"the welcome names {req.name!r} in domain {req.domain_id}, not {peer.name!r} "
                                    f"in {me.domain_id}", remedy="let the joining controller leave and join again")
            row = self._get(s, peer.name, JOINING)
            row.state, row.last_contact = MEMBER, time.time()
            hello = PeerHello(name=me.name, domain_id=me.domain_id, domain_name=me.domain_name, version=__version__)
        log.info("controller %s admitted this one to domain %s", peer.name, hello.domain_name)
        return hello

    def hello(self, peer: Peer) -> PeerHello:
        """This controller's view of itself, for a member (proves the channel both ways)."""
        self._require(peer, MEMBER, "hello")
        self._touch(peer.name)
        with self.sessions() as s:
            me = self._me(s)
            return PeerHello(name=me.name, domain_id=me.domain_id, domain_name=me.domain_name, version=__version__)

    def receive_leave(self, peer: Peer) -> Forgotten:
        """The caller leaves (or removed this controller): it is forgotten here."""
        if peer.state not in (MEMBER, JOINING):
            raise ForbiddenError(f"controller {peer.name} is not pinned here", remedy="nothing to forget")
        self._forget([peer.name])
        return Forgotten(name=peer.name)

"""Host onboarding and removal.

- **Registration** (an agent with an enrolment token): the controller checks that an agent answers at the address
  with the secret it sent, then keeps the host *pending*: not in the inventory, so nothing places VMs on it,
  evacuates to it, certifies it or reads its datastores. The token is used up in the same transaction (an
  enrolment token is single-use; it also expires).
- **Approval** (an admin, ``kvmotion host approve NAME --fingerprint FP``): the fingerprint must be the one the
  host's agent shows on the host; the agent must still answer with that secret; the migration addresses its
  certificate will name are the ones shown to the admin, and none of them may belong to another host.
- **Removal** (``kvmotion host remove NAME``): refused while VMs are registered on the host or a task involves
  it; its certificates are revoked and every other host gets the new CRL (QEMU checks it on each TLS handshake);
  its secret and records are deleted, so the controller never calls it again.
"""
from __future__ import annotations

import json
import logging
import time

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common import hostid
from kvmotion.common.errors import ConflictError, KvmotionError, NotFoundError, UnauthorizedError
from kvmotion.controller.certs import HostCertificates, migration_addresses
from kvmotion.controller.db import (AgentPin, ApiToken, Host, HostDatastore, HostIdentity, Network, PendingHost,
                                    RevokedCert, Task)
from kvmotion.controller.inventory import Inventory
from kvmotion.models.agent import HostFacts
from kvmotion.models.api import HostAdd, HostOut
from kvmotion.models.onboarding import HostRemoved, PendingHostOut, Registration, RegistrationOut

log = logging.getLogger(__name__)
MAX_PENDING = 256
ACTIVE_TASK_STATES = ("queued", "running", "unknown")


def _pending_out(p: PendingHost) -> PendingHostOut:
    facts = HostFacts.model_validate_json(p.facts_json)
    return PendingHostOut(name=p.name, address=p.address, fingerprint=p.fingerprint, requested_at=p.requested_at,
                          token=p.token, migration_addresses=migration_addresses(facts),
                          datastores=[d.name for d in facts.datastores], version=facts.agent_version)


class Onboarding:
    def __init__(self, sessions: sessionmaker[Session], inv: Inventory, certs: HostCertificates) -> None:
        self.sessions, self.inv, self.certs = sessions, inv, certs

    async def register(self, req: HostAdd, token: str) -> RegistrationOut:
        address, facts, _ = await self.inv.probe_agent(req.address, req.secret, req.name)
        fp = hostid.fingerprint(req.secret)
        known = self.inv.secret_matches(facts.name, req.secret)
        if known is True:
            return RegistrationOut(name=facts.name, state=Registration.ENROLLED, fingerprint=fp)
        if known is False:
            raise ConflictError(f"host {facts.name!r} is already enrolled with another secret",
                                remedy="an admin can re-enrol it: `kvmotion host add URL --secret-file FILE`")
        assert self.inv.keys is not None
        with self.sessions.begin() as s:
            if s.get(PendingHost, facts.name) is None and \
                    (s.scalar(select(PendingHost.name).offset(MAX_PENDING - 1).limit(1)) is not None):
                raise ConflictError(f"{MAX_PENDING} hosts already wait for approval",
                                    remedy="approve or reject them first: `kvmotion host pending`")
            used = s.execute(update(ApiToken).where(ApiToken.name == token, ApiToken.revoked_at == 0.0)
                             .values(revoked_at=time.time()))
            if used.rowcount != 1:      # type: ignore[attr-defined]
                raise UnauthorizedError(f"enrolment token {token!r} was already used",
                                        remedy="an admin makes a new one: `kvmotion host enrol-token`")
            s.merge(PendingHost(name=facts.name, address=address, fingerprint=fp, token=token,
                                secret_wrapped=self.inv.keys.wrap(req.secret, f"pending/{facts.name}"),
                                facts_json=facts.model_dump_json(), requested_at=time.time()))
        log.info("host %s at %s registered with token %s; pending approval (fingerprint %s)", facts.name,
                 address, token, fp)
        return RegistrationOut(name=facts.name, state=Registration.PENDING, fingerprint=fp,
                               remedy=f"an admin checks the fingerprint on the host and approves it: "
                                      f"kvmotion host approve {facts.name} --fingerprint {fp}")

    def pending(self) -> list[PendingHostOut]:
        with self.sessions() as s:
            return [_pending_out(p) for p in s.scalars(select(PendingHost).order_by(PendingHost.requested_at))]

    def _get_pending(self, s: Session, name: str) -> PendingHost:
        p = s.get(PendingHost, name)
        if p is None:
            raise NotFoundError(f"no host named {name!r} waits for approval",
                                remedy="see `kvmotion host pending`; the host's agent registers at its start")
        return p

    async def approve(self, name: str, fingerprint: str, who: str) -> HostOut:
        assert self.inv.keys is not None
        with self.sessions() as s:
            p = self._get_pending(s, name)
            address, fp, wrapped = p.address, p.fingerprint, p.secret_wrapped
            shown = migration_addresses(HostFacts.model_validate_json(p.facts_json))
        if not hostid.same(fingerprint, fp):
            raise ConflictError(f"fingerprint {fingerprint} is not host {name}'s",
                                remedy=f"compare with what the host's agent shows "
                                       f"(`kvmotion-agent --config FILE --fingerprint` on {name}); its registration "
                                       f"has {fp}. A different one means another machine registered as {name}: "
                                       f"reject it with `kvmotion host reject {name}`")
        secret = self.inv.keys.unwrap(wrapped, f"pending/{name}")
        address, facts, cert = await self.inv.probe_agent(address, secret, name)
        addresses = [a for a in migration_addresses(facts) if a in shown]
        self._check_addresses_free(name, addresses)
        self.inv.enrol(address, secret, facts, replace=False, cert_pem=cert)
        with self.sessions.begin() as s:
            s.merge(HostIdentity(host=name, fingerprint=fp, addresses_json=json.dumps(addresses),
                                 approved_by=who, approved_at=time.time()))
            s.execute(delete(PendingHost).where(PendingHost.name == name))
        log.info("host %s approved by %s (fingerprint %s, addresses %s)", name, who, fp, addresses)
        try:
            await self.certs.ensure(name)
        except KvmotionError as exc:
            log.warning("could not issue certificates to %s: %s", name, exc.message)
        return self.inv.get_host(name)

    def _check_addresses_free(self, name: str, addresses: list[str]) -> None:
        with self.sessions() as s:
            for ident in s.scalars(select(HostIdentity).where(HostIdentity.host != name)):
                taken = sorted(set(addresses) & set(json.loads(ident.addresses_json)))
                if taken:
                    raise ConflictError(f"host {name} reports migration address(es) {', '.join(taken)} that "
                                        f"belong to host {ident.host}",
                                        remedy="fix the host's migration interface addresses, then let it "
                                               "register again")

    def reject(self, name: str) -> PendingHostOut:
        with self.sessions.begin() as s:
            p = self._get_pending(s, name)
            out = _pending_out(p)
            s.delete(p)
        return out

    async def remove(self, name: str) -> HostRemoved:
        self.inv.get_host(name)
        on_it = sorted(v.name for v in self.inv.list_vms() if v.host == name)
        if on_it:
            raise ConflictError(f"host {name} still has VM(s) {', '.join(on_it[:10])}",
                                remedy="move them away (`kvmotion host maintenance enter NAME --wait`) or delete "
                                       "them first")
        with self.sessions() as s:
            busy = s.scalars(select(Task.id).where(Task.state.in_(ACTIVE_TASK_STATES),
                                                      (Task.source == name) | (Task.destination == name))
                             ).first()
        if busy is not None:
            raise ConflictError(f"task {busy} involves host {name}", remedy="wait for it or cancel it first")
        try:
            await self.certs.remove(name)             # best effort: its own files (the CRL is what counts)
        except KvmotionError as exc:
            log.warning("host %s did not remove its certificates: %s", name, exc.message)
        serials = self._forget(name)
        out = HostRemoved(name=name, revoked_serials=serials)
        crl = self.certs.ca.crl_pem(self.certs.revoked())
        for h in self.inv.list_hosts():
            try:
                await self.inv.agent(h.name).tls_crl(crl)
                out.crl_installed_on.append(h.name)
            except KvmotionError as exc:
                out.crl_failed[h.name] = exc.message
        log.info("host %s removed; revoked %s", name, ", ".join(serials) or "no certificates")
        return out

    def _forget(self, name: str) -> list[str]:
        """Revoke the host's certificate serials and delete its records; returns the serials."""
        with self.sessions.begin() as s:
            ident = s.get(HostIdentity, name)
            serials = list(json.loads(ident.serials_json)) if ident is not None else []
            for serial in serials:
                s.merge(RevokedCert(serial=serial, host=name, revoked_at=time.time()))
            for table, col in ((HostDatastore, HostDatastore.host), (Network, Network.host), (AgentPin, AgentPin.host),
                               (HostIdentity, HostIdentity.host), (Host, Host.name)):
                s.execute(delete(table).where(col == name))
        return serials

"""Host certificates for encrypted vMotion: issued when a host is added or approved, renewed or removed on request.

A server certificate names only the addresses an admin approved for the host (its ``HostIdentity``), never what
its facts claim later; every serial issued is recorded, so removing the host revokes them all (the CRL).
"""
from __future__ import annotations

import json
import logging

from sqlalchemy import select

from kvmotion.common import hostid
from kvmotion.common.errors import ConflictError
from kvmotion.controller.db import HostIdentity, RevokedCert
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.pki import CertificateAuthority, client_cn, serial_of
from kvmotion.models.agent import HostFacts, TlsFact

log = logging.getLogger(__name__)
MAX_SERIALS = 64          # bounded: the newest serials issued to a host (older ones have expired or been replaced)


def migration_addresses(facts: HostFacts) -> list[str]:
    return [i.address for i in facts.migration_interfaces if i.address]


class HostCertificates:
    def __init__(self, inv: Inventory, ca: CertificateAuthority) -> None:
        self.inv = inv
        self.ca = ca

    def approved_addresses(self, host: str, facts: HostFacts) -> list[str]:
        """What the host's server certificate may name: its approved addresses (a host enrolled before approvals
        existed gets its current ones recorded, once, as approved by its enrolment)."""
        with self.inv.sessions.begin() as s:
            ident = s.get(HostIdentity, host)
            if ident is None:
                ident = HostIdentity(host=host, fingerprint=hostid.fingerprint(self.inv.host_secret(host)),
                                     addresses_json=json.dumps(migration_addresses(facts)), approved_by="enrolment")
                s.add(ident)
            return list(json.loads(ident.addresses_json))

    async def issue(self, host: str) -> TlsFact:
        """The agent makes its keys and CSRs; the CA signs: server (SAN = approved addresses), client."""
        facts = self.inv.host_facts(host)
        if facts is None:
            raise ConflictError(f"host {host} has not reported its facts", remedy="reconnect its agent")
        approved = self.approved_addresses(host, facts)
        unapproved = sorted(set(migration_addresses(facts)) - set(approved))
        if unapproved:
            log.warning("host %s reports migration addresses %s that no admin approved: left out of its certificate",
                        host, ", ".join(unapproved))
        agent = self.inv.agent(host)
        csrs = await agent.tls_csr()
        server = self.ca.sign(csrs["server_csr"], "server", f"{host}-server", approved + [host])
        client = self.ca.sign(csrs["client_csr"], "client", client_cn(host), [])
        self._record(host, [serial_of(server), serial_of(client)])
        result = await agent.tls_install(self.ca.cert_pem, server, client)
        revoked = self.revoked()
        if revoked:
            await agent.tls_crl(self.ca.crl_pem(revoked))
        await self.inv.refresh_host(host)
        return result

    def _record(self, host: str, serials: list[str]) -> None:
        with self.inv.sessions.begin() as s:
            ident = s.get(HostIdentity, host)
            if ident is not None:
                ident.serials_json = json.dumps((json.loads(ident.serials_json) + serials)[-MAX_SERIALS:])

    def revoked(self) -> list[str]:
        with self.inv.sessions() as s:
            return list(s.scalars(select(RevokedCert.serial)).all())

    async def secure_api(self, host: str) -> str:
        """Mutual TLS with the host's agent: it pins our client certificate, our CA issues the certificate its API
        serves (pinned here before the agent serves it, so the old and the new one both pass meanwhile)."""
        tls = self.inv.agent_tls
        assert tls is not None
        agent = self.inv.agent(host)
        await agent.pin_controller(tls.cert_pem)
        cert = tls.issue_api_cert(host, self.inv.get_host(host).address, await agent.api_tls_csr())
        self._record(host, [serial_of(cert)])
        tls.pin(host, cert)
        return await agent.api_tls_install(cert, self.ca.cert_pem)

    async def ensure(self, host: str) -> None:
        if self.inv.agent_tls is not None:
            await self.secure_api(host)
        facts = self.inv.host_facts(host)
        if facts is not None and (facts.tls is None or not facts.tls.supported):
            await self.issue(host)

    async def remove(self, host: str) -> TlsFact:
        result = await self.inv.agent(host).tls_remove()
        await self.inv.refresh_host(host)
        return result

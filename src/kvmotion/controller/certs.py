"""Host certificates for encrypted vMotion: issued when a host is added, renewed or removed on request."""
from __future__ import annotations

from kvmotion.common.errors import ConflictError
from kvmotion.models.agent import TlsFact
from kvmotion.controller.inventory import Inventory
from kvmotion.controller.pki import CertificateAuthority, client_cn


class HostCertificates:
    def __init__(self, inv: Inventory, ca: CertificateAuthority) -> None:
        self.inv = inv
        self.ca = ca

    async def issue(self, host: str) -> TlsFact:
        """The agent makes its keys and CSRs; the CA signs: server (SAN = migration addresses), client."""
        facts = self.inv.host_facts(host)
        if facts is None:
            raise ConflictError(f"host {host} has not reported its facts", remedy="reconnect its agent")
        san = [i.address for i in facts.migration_interfaces if i.address] + [host]
        agent = self.inv.agent(host)
        csrs = await agent.tls_csr()
        server = self.ca.sign(csrs["server_csr"], "server", f"{host}-server", san)
        client = self.ca.sign(csrs["client_csr"], "client", client_cn(host), [])
        result = await agent.tls_install(self.ca.cert_pem, server, client)
        await self.inv.refresh_host(host)
        return result

    async def ensure(self, host: str) -> None:
        facts = self.inv.host_facts(host)
        if facts is not None and (facts.tls is None or not facts.tls.supported):
            await self.issue(host)

    async def remove(self, host: str) -> TlsFact:
        result = await self.inv.agent(host).tls_remove()
        await self.inv.refresh_host(host)
        return result

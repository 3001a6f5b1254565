"""Host routes: liveness, facts, TLS material, CPU models."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from kvmotion.agent import tls
from kvmotion.agent.routes.deps import AgentDep
from kvmotion.common.errors import InvalidInputError
from kvmotion.models.agent import MAX_CPU_FEATURES, HostFacts, Name, TlsFact

MAX_PEM = 16384

router = APIRouter(prefix="/v1")


class TlsInstall(BaseModel):
    ca_cert: str = Field(max_length=MAX_PEM)
    server_cert: str = Field(max_length=MAX_PEM)
    client_cert: str = Field(max_length=MAX_PEM)


class ApiCertInstall(BaseModel):
    cert: str = Field(max_length=MAX_PEM)
    ca_cert: str = Field(max_length=MAX_PEM)


class ControllerPin(BaseModel):
    cert: str = Field(max_length=MAX_PEM)


class CrlInstall(BaseModel):
    crl: str = Field(max_length=4 * 1024 * 1024)


class PeerCas(BaseModel):
    cas: dict[Name, str] = Field(default_factory=dict, max_length=tls.MAX_PEER_CAS)


class CpuExpandRequest(BaseModel):
    model: Name
    mask: list[Name] = Field(default_factory=list, max_length=MAX_CPU_FEATURES)


@router.get("/health")
async def health(agent: AgentDep) -> dict[str, Any]:
    return {"ok": True, "name": agent.cfg.name, "accelerator": agent.accel.accelerator}


@router.get("/facts")
async def facts(agent: AgentDep) -> HostFacts:
    return agent.facts()


@router.post("/tls/csr")
async def tls_csr(agent: AgentDep) -> dict[str, str]:
    return agent.tls_csrs()


@router.post("/tls/install")
async def tls_install(req: TlsInstall, agent: AgentDep) -> TlsFact:
    return agent.tls_install(req.ca_cert, req.server_cert, req.client_cert)


@router.post("/api-tls/csr")
async def api_tls_csr(agent: AgentDep) -> dict[str, str]:
    """A CSR for this API's own key (the controller's CA issues the certificate the API then serves)."""
    return {"csr": agent.api.csr()}


@router.post("/api-tls/install")
async def api_tls_install(req: ApiCertInstall, agent: AgentDep) -> dict[str, str]:
    return {"sha256": agent.api.install(req.cert, req.ca_cert)}


@router.put("/api-tls/controller")
async def api_tls_controller(req: ControllerPin, agent: AgentDep) -> dict[str, bool]:
    """Pin the controller's client certificate: from now on no other client completes a TLS handshake."""
    return {"pinned": agent.api.pin_controller(req.cert)}


@router.post("/tls/crl")
async def tls_crl(req: CrlInstall, agent: AgentDep) -> dict[str, int]:
    """The controller's revocation list (a removed host's certificates): checked on every TLS handshake."""
    return {"revoked": tls.install_crl(agent.tls_dir, req.crl)}


@router.put("/tls/peer-cas")
async def tls_peer_cas(req: PeerCas, agent: AgentDep) -> dict[str, list[str]]:
    """The CAs of the other controllers of the domain (cross-controller moves): trusted for migration streams."""
    for pem in req.cas.values():
        if len(pem) > MAX_PEM:
            raise InvalidInputError("a peer CA certificate is too long", remedy="send the controller's CA only")
    return {"trusted": tls.set_peer_cas(agent.tls_dir, req.cas)}


@router.delete("/tls")
async def tls_remove(agent: AgentDep) -> TlsFact:
    return agent.tls_remove()


@router.post("/cpu/expand")
async def cpu_expand(req: CpuExpandRequest, agent: AgentDep) -> list[str]:
    return agent.cpu_expand(req.model, req.mask)

"""The controller's side of mutual TLS with its agents (``kvmotion.common.pinning``).

- Its **client certificate** (``agent-client-cert.pem``/``-key.pem`` in the PKI directory, 0600 key), issued by its
  CA once and kept: every agent pins it, so it is not renewed behind their backs (valid 10 years).
- Each host's **pinned certificates** (``AgentPin``): set at enrolment from the certificate the agent presented on
  the connection whose signed facts name it; replaced by the one the CA issues for the agent's API key.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common import pinning
from kvmotion.common.errors import InvalidInputError
from kvmotion.controller.db import AgentPin
from kvmotion.controller.pki import CertificateAuthority, ensure_client_cert
from kvmotion.models.agent import HostFacts

CERT_FILE, KEY_FILE = "agent-client-cert.pem", "agent-client-key.pem"
CLIENT_CN = "kvmotion controller (agent client)"


class AgentTls:
    def __init__(self, sessions: sessionmaker[Session], ca: CertificateAuthority, directory: Path) -> None:
        self.sessions, self.ca = sessions, ca
        self.cert_file, self.key_file = ensure_client_cert(ca, directory, CERT_FILE, KEY_FILE, CLIENT_CN)
        self.cert_pem = self.cert_file.read_text()

    def first_contact(self) -> pinning.ClientTls:
        return pinning.ClientTls(self.cert_file, self.key_file, ())

    def pins(self, host: str) -> list[str]:
        with self.sessions() as s:
            row = s.get(AgentPin, host)
            return list(json.loads(row.pems_json)) if row is not None else []

    def client(self, host: str) -> pinning.ClientTls:
        """How to reach ``host``: only a certificate pinned for it (none pinned yet: a first contact)."""
        return pinning.ClientTls(self.cert_file, self.key_file, tuple(self.pins(host)))

    def pin(self, host: str, pem: str, replace: bool = False) -> None:
        with self.sessions.begin() as s:
            row = s.get(AgentPin, host)
            old = [] if row is None or replace else list(json.loads(row.pems_json))
            s.merge(AgentPin(host=host, pems_json=json.dumps(pinning.newest(old, pem)), pinned_at=time.time()))

    def forget(self, host: str) -> None:
        with self.sessions.begin() as s:
            s.execute(delete(AgentPin).where(AgentPin.host == host))

    def issue_api_cert(self, host: str, address: str, csr: str) -> str:
        """The agent API's certificate for its key: names the address the controller reaches it on."""
        name = urlsplit(address).hostname or host
        return self.ca.sign(csr, "server", f"{host}-api", [name, host])


def check_presented(address: str, facts: HostFacts, peer_pem: str | None) -> None:
    """A first contact: the certificate presented on the connection must be the one the agent's signed facts
    name (so nothing between us and the agent can have its own certificate pinned)."""
    if peer_pem is None or facts.api_cert_sha256 is None:
        raise InvalidInputError(f"the agent at {address} did not name its TLS certificate",
                                remedy="upgrade kvmotion-agent on the host to the controller's version")
    if pinning.sha256_of(peer_pem) != facts.api_cert_sha256:
        raise InvalidInputError(f"the TLS certificate presented at {address} is not the agent's own (its signed facts "
                                "name another): something between the controller and the host intercepts the "
                                "connection", remedy="check the management network between the controller and "
                                                     "the host; nothing was pinned or enrolled")

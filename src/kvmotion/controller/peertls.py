"""Mutual TLS between the controllers of a trust domain, on each controller's own HTTPS listener.

- The listener asks for a client certificate only once another controller is pinned (``ServerTrust``): its trust
  store then holds exactly the pinned controllers' CA certificates (``CERT_OPTIONAL``). A client that presents
  none (the CLI, a browser, an agent) is served as before; one that presents a certificate no pinned CA issued
  fails the handshake. Which certificate of a pinned CA may call is decided per request (``domain.Domain
  .authenticate``: the SHA-256 of a current member's peer client certificate), so a member removed is refused at
  once although its CA stays in the store until the controller restarts.
- ``PeerCertProtocol`` hands the app that certificate: uvicorn gives each request a copy of ``app_state``, so the
  copy this protocol makes per connection carries the connection's client certificate (DER) to every request of
  that connection, and to no other.
- As a client, a controller trusts only the peer's pinned CA certificate, and only a certificate that names
  itself a controller's API (``apicert.SERVER_CN``), not one of the hosts the same CA certified.
"""
from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvmotion.common import pinning
from kvmotion.common.errors import ConflictError, InvalidInputError
from kvmotion.controller.apicert import SERVER_CN
from kvmotion.controller.pki import CertificateAuthority

PEER_CERT = "kvmotion.peer_cert"          # key in scope["state"]: the connection's client certificate (DER) or None


class PeerCertProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus the connection's client certificate in ``scope["state"]``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sslobj = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        self.app_state = {**self.app_state, PEER_CERT: der or None}


class ServerTrust:
    """The client certificates the controller's listener lets through the handshake (see the module)."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.ctx: ssl.SSLContext | None = None
        self.serves_ca_cert = False
        self._trusted: set[str] = set()

    def attach(self, ctx: ssl.SSLContext, cert_file: Path, ca_pems: list[str]) -> ssl.SSLContext:
        """Adopt the listener's context (before it serves): no client certificate asked for until a CA is
        trusted; the served certificate is noted (peers can pin only one this controller's CA issued)."""
        self.ctx = ctx
        ctx.verify_mode = ssl.CERT_NONE
        try:
            served = x509.load_pem_x509_certificate(cert_file.read_bytes())
            served.verify_directly_issued_by(self.ca.cert)
            self.serves_ca_cert = True
        except (OSError, ValueError, TypeError, InvalidSignature):
            self.serves_ca_cert = False
        for pem in ca_pems:
            self.trust(pem)
        return ctx

    def trust(self, ca_pem: str) -> None:
        """Let certificates ``ca_pem`` issued through the handshake of new connections (changed in place)."""
        if self.ctx is None or ca_pem in self._trusted:
            return
        self.ctx.load_verify_locations(cadata=ca_pem)
        self.ctx.verify_mode = ssl.CERT_OPTIONAL
        self._trusted.add(ca_pem)

    def require_serving(self) -> None:
        """Other controllers can reach this one only over HTTPS with a certificate from its own CA."""
        if self.ctx is None:
            raise ConflictError("this controller does not serve HTTPS (tls = off), so no other controller can reach "
                                "it with a pinned identity", remedy="start kvmotion-server with tls = auto (the "
                                                                    "default)")
        if not self.serves_ca_cert:
            raise ConflictError("this controller serves an HTTPS certificate its own CA did not issue (--tls-cert); "
                                "the other controllers of a domain pin its CA",
                                remedy="start kvmotion-server with tls = auto (without --tls-cert/--tls-key)")


def serving(trust: ServerTrust, cert: tuple[Path, Path], ca_pems: list[str]) -> dict[str, Any]:
    """uvicorn options for the controller's HTTPS listener: ``cert`` (certificate, key) served, the client
    certificates of the domain's controllers accepted (``trust``), and handed to the app (``PEER_CERT``)."""
    def context(_: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return trust.attach(default(), cert[0], ca_pems)
    return {"http": PeerCertProtocol, "ssl_certfile": str(cert[0]), "ssl_keyfile": str(cert[1]),
            "ssl_context_factory": context}


def check_identity(ca_pem: str, client_pem: str) -> tuple[str, str]:
    """A controller's identity as it presents it: a CA certificate and a client certificate (clientAuth) that CA
    issued. Returns (the CA's fingerprint, the client certificate's SHA-256)."""
    remedy = "upgrade that controller to this one's version of kvmotion"
    try:
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        client = x509.load_pem_x509_certificate(client_pem.encode())
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        client.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound) as exc:
        raise InvalidInputError(f"not a controller's identity (a CA certificate and a client certificate it "
                                f"issued): {type(exc).__name__}", remedy=remedy) from exc
    if not is_ca or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise InvalidInputError("not a controller's identity: the CA certificate is no CA, or the client "
                                "certificate is not for client authentication", remedy=remedy)
    return pinning.fingerprint(ca_pem), pinning.sha256_of(client_pem)


def is_controller_api(pem: str | None) -> bool:
    """Whether a server certificate is a controller's API certificate (``apicert``), not a host's."""
    if pem is None:
        return False
    names = x509.load_pem_x509_certificate(pem.encode()).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return [n.value for n in names] == [SERVER_CN]


def der_sha256(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()

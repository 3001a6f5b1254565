"""Pinned TLS identities between the controller and its agents (mutual TLS).

Each side trusts exactly the certificate(s) it pinned, not a CA: the trust store of a connection holds only the
pinned certificates, with OpenSSL's partial-chain flag, so a handshake with any other certificate fails before a
byte of the request is sent -- even one the same CA issued (another host's, or a removed host's).

- The **agent** serves its API over HTTPS with its own key (``agent.apitls``): a self-signed certificate until the
  controller's CA issues one for the same key. It pins the controller's client certificate once the controller
  hands it over in a signed request; from then on a client without that certificate fails the handshake.
- The **controller** pins each agent's certificates: at enrolment the certificate the agent presented on the very
  connection whose signed facts name its SHA-256, later the one its CA issued for the agent's key.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MAX_PINS = 3               # a host's pinned certificates: the current one and those being replaced
SELF_SIGNED_DAYS = 3650


@dataclass(frozen=True)
class ClientTls:
    """How the controller connects to one agent: its client certificate, and the agent's pinned certificates
    (PEM). No pins: a first contact, which accepts any certificate and reports it (``peer_sha256``) for the
    caller to check against the agent's signed facts before pinning it."""
    cert_file: Path | None = None
    key_file: Path | None = None
    pins: tuple[str, ...] = ()


@lru_cache(maxsize=256)
def client_context(tls: ClientTls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False          # the pin is the identity, stronger than a name
    if tls.pins:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.load_verify_locations(cadata="".join(tls.pins))
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None and tls.key_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


def pin_client(ctx: ssl.SSLContext, pem: str | None) -> None:
    """A server context that requires the client certificate ``pem`` (None: does not ask for one)."""
    if pem is None:
        ctx.verify_mode = ssl.CERT_NONE
        return
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=pem)
    ctx.verify_mode = ssl.CERT_REQUIRED


def sha256_of(pem: str) -> str:
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def fingerprint(pem: str) -> str:
    """The certificate's SHA-256 (of its DER) as colon-separated hex pairs, what admins compare by eye."""
    digest = sha256_of(pem).upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def der_to_pem(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def peer_certificate(extensions: dict[str, Any]) -> str | None:
    """The certificate the far end presented on an httpx response's connection (PEM), if it was TLS."""
    stream = extensions.get("network_stream")
    sslobj = stream.get_extra_info("ssl_object") if stream is not None else None
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    return der_to_pem(der) if der else None


def same_key(cert_pem: str, key: ec.EllipticCurvePrivateKey) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def self_signed(key: ec.EllipticCurvePrivateKey, cn: str, names: list[str]) -> str:
    """A server certificate for ``key`` signed by itself, naming ``names`` (host names or addresses)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    sans: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=SELF_SIGNED_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def csr_for(key: ec.EllipticCurvePrivateKey, cn: str) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def newest(pins: list[str], pem: str) -> list[str]:
    """``pins`` with ``pem`` added last (once), bounded to the newest MAX_PINS."""
    return ([p for p in pins if p != pem] + [pem])[-MAX_PINS:]

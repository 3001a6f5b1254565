"""The host's TLS material for encrypted migration, in the layout QEMU's tls-creds-x509 expects.

Keys are made here and never leave the host; the controller's CA signs the CSRs.
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvmotion.common.errors import InvalidInputError
from kvmotion.models.agent import TlsFact

FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return key


def make_csrs(directory: Path, host: str) -> dict[str, str]:
    """New key pairs (pending until installed) and their CSRs."""
    pending = directory / "pending"
    pending.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = {}
    for usage in ("server", "client"):
        key = _key(pending / f"{usage}-key.pem")
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{host}-{usage}")]))
               .sign(key, hashes.SHA256()))
        out[f"{usage}_csr"] = csr.public_bytes(serialization.Encoding.PEM).decode()
    return out


def install(directory: Path, ca_cert: str, server_cert: str, client_cert: str) -> TlsFact:
    """Put the signed certificates next to their pending keys, atomically."""
    pending = directory / "pending"
    for usage, pem in (("server", server_cert), ("client", client_cert)):
        cert = x509.load_pem_x509_certificate(pem.encode())
        key = serialization.load_pem_private_key((pending / f"{usage}-key.pem").read_bytes(), password=None)
        if cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
                key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise InvalidInputError(f"the {usage} certificate does not match this host's pending key",
                                    remedy="renew the host's certificate")
    (pending / OWN_CA).write_text(ca_cert)
    (pending / "ca-cert.pem").write_text(ca_cert + _peer_pems(directory))
    (pending / "server-cert.pem").write_text(server_cert)
    (pending / "client-cert.pem").write_text(client_cert)
    os.replace(pending / OWN_CA, directory / OWN_CA)
    for name in FILES:
        os.replace(pending / name, directory / name)
    ensure_dh_params(directory)
    return status(directory)


# Cross-controller moves (docs/cross-controller.md): the peer hosts' certificates come from the CAs of the other
# controllers of the domain. QEMU's tls-creds-x509 reads every certificate of ``ca-cert.pem``, so that file is
# this host's own CA (first: the CRL is checked against it) followed by the domain's CAs its controller sent.
# Which peer host may connect is still decided per move: ``tls-authz`` admits exactly that host's identity.
OWN_CA = "ca-own.pem"
PEER_CAS = "ca-peers.pem"
MAX_PEER_CAS = 64


def _peer_pems(directory: Path) -> str:
    try:
        return (directory / PEER_CAS).read_text()
    except FileNotFoundError:
        return ""


def set_peer_cas(directory: Path, cas: dict[str, str]) -> list[str]:
    """Trust exactly these controllers' CAs (name -> PEM) for migration streams, beside this host's own CA.
    Returns the names trusted. Refused (nothing changed) when a PEM is not one CA certificate."""
    if len(cas) > MAX_PEER_CAS:
        raise InvalidInputError(f"{len(cas)} peer CAs; at most {MAX_PEER_CAS}", remedy="leave unused domains")
    own = directory / OWN_CA
    if not own.exists():
        if not (directory / "ca-cert.pem").exists():
            raise InvalidInputError("this host has no TLS certificate yet",
                                    remedy="renew the host's certificate: kvmotion host cert renew HOST")
        own_pem = (directory / "ca-cert.pem").read_text()      # installed before peer CAs existed: all its own
        first = own_pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
        _write(directory, OWN_CA, first)
    bundle = []
    for name, pem in sorted(cas.items()):
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError as exc:
            raise InvalidInputError(f"the CA of {name} is not a PEM certificate",
                                    remedy="send the controller's pki/ca-cert.pem") from exc
        if pem.count("BEGIN CERTIFICATE") != 1 or not _is_ca(cert):
            raise InvalidInputError(f"the CA of {name} is not exactly one CA certificate",
                                    remedy="send the controller's pki/ca-cert.pem")
        bundle.append(cert.public_bytes(serialization.Encoding.PEM).decode())
    _write(directory, PEER_CAS, "".join(bundle))
    _write(directory, "ca-cert.pem", own.read_text() + "".join(bundle))
    return sorted(cas)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _write(directory: Path, name: str, text: str) -> None:
    tmp = directory / f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, directory / name)


# RFC 7919 ffdhe2048, public and standard. Without a dh-params.pem QEMU's server credentials generate
# Diffie-Hellman parameters at every object-add (tens of ms, in the shadow VM's start).
DH_PARAMS_PEM = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def ensure_dh_params(directory: Path) -> None:
    path = directory / "dh-params.pem"
    if not path.exists():
        tmp = directory / "dh-params.pem.tmp"
        tmp.write_text(DH_PARAMS_PEM)
        os.replace(tmp, path)


CRL_FILE = "ca-crl.pem"


def install_crl(directory: Path, crl_pem: str) -> int:
    """The CA's revocation list, atomically; QEMU reads it with the certificates. Returns how many it revokes."""
    crl = x509.load_pem_x509_crl(crl_pem.encode())
    ca = directory / "ca-cert.pem"
    if ca.exists():
        issuer = x509.load_pem_x509_certificate(ca.read_bytes())
        if not crl.is_signature_valid(issuer.public_key()):    # type: ignore[arg-type]
            raise InvalidInputError("the revocation list is not signed by this host's CA",
                                    remedy="renew the host's certificate from its controller")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = directory / f"{CRL_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(crl_pem)
    os.replace(tmp, directory / CRL_FILE)
    return len(list(crl))


def remove(directory: Path) -> None:
    for name in (*FILES, OWN_CA, PEER_CAS):
        (directory / name).unlink(missing_ok=True)


def status(directory: Path) -> TlsFact:
    """Supported when every file is present and both certificates are valid now."""
    try:
        certs = {u: x509.load_pem_x509_certificate((directory / f"{u}-cert.pem").read_bytes())
                 for u in ("server", "client")}
        if not all((directory / f).exists() for f in FILES):
            return TlsFact(supported=False, reason="incomplete certificate files")
    except (OSError, ValueError):
        return TlsFact(supported=False, reason="no host certificate installed")
    now = dt.datetime.now(dt.timezone.utc)
    expired = [u for u, c in certs.items() if not (c.not_valid_before_utc <= now <= c.not_valid_after_utc)]
    if expired:
        return TlsFact(supported=False, reason=f"{', '.join(expired)} certificate not valid now")
    return TlsFact(supported=True, reason="certificates installed and valid", directory=str(directory),
                   client_subject=certs["client"].subject.rfc4514_string(),
                   not_after=certs["server"].not_valid_after_utc.isoformat())

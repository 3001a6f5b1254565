"""The controller is the trust root: a CA created at first start, host certificates issued from CSRs.

The CA key never leaves the controller and is kept with mode 0600. Hosts keep their own keys (the agent
makes them and sends only CSRs).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvmotion.common import confined
from kvmotion.common.errors import InvalidInputError
from kvmotion.common.private import keep_private, private_dir

CA_DAYS = 3650
HOST_DAYS = 365


MAX_PEM_BYTES = 64 << 10


class CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def load_or_create(cls, directory: Path) -> "CertificateAuthority":
        directory.mkdir(parents=True, exist_ok=True)
        key_file, cert_file = directory / "ca-key.pem", directory / "ca-cert.pem"
        if key_file.exists() and cert_file.exists():
            keep_private(key_file)
            key = serialization.load_pem_private_key(confined.read_in(directory, key_file.name, MAX_PEM_BYTES),
                                                     password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return cls(key, x509.load_pem_x509_certificate(cert_file.read_bytes()))
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvmotion"),
                          # unique: a client that trusts two controllers' CAs tells them apart by name as well
                          x509.NameAttribute(NameOID.COMMON_NAME, f"kvmotion controller CA {secrets.token_hex(4)}")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        confined.write_in(directory, key_file.name, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert)

    @property
    def key_id(self) -> x509.AuthorityKeyIdentifier:
        """Names this CA's key in what it signs (clients trusting several CAs find the issuer by it)."""
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def sign(self, csr_pem: str, usage: str, subject_cn: str, san: list[str], days: int = HOST_DAYS) -> str:
        """Issue a server (serverAuth, SAN = the host's migration addresses) or client (clientAuth) certificate.

        The subject is set here, not taken from the CSR: a host cannot ask for another host's identity.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise InvalidInputError(f"the agent sent an unreadable CSR: {exc}", remedy="renew the host's certificate") from exc
        if not csr.is_signature_valid:
            raise InvalidInputError("the CSR signature is invalid", remedy="renew the host's certificate")
        return self.issue(csr.public_key(), usage, subject_cn, san if usage == "server" else [], days)  # type: ignore[arg-type]

    def issue(self, public_key: ec.EllipticCurvePublicKey, usage: str, subject_cn: str, san: list[str],
              days: int = HOST_DAYS) -> str:
        """A certificate (PEM) for ``public_key``: serverAuth (naming ``san``) or clientAuth, signed by this CA."""
        now = dt.datetime.now(dt.timezone.utc)
        eku = ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
                   .issuer_name(self.cert.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(self.key_id, critical=False)
                   .add_extension(x509.ExtendedKeyUsage([eku]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([general_name(n) for n in san]),
                                            critical=False)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()

    def crl_pem(self, serials: list[str]) -> str:
        """A CRL of the revoked serials (hex), signed by the CA; every host installs it as ca-crl.pem, which QEMU's
        tls-creds-x509 checks on every TLS handshake of a migration or NBD stream."""
        now = dt.datetime.now(dt.timezone.utc)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=CA_DAYS))
                   .add_extension(self.key_id, critical=False))
        for serial in sorted(set(serials)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(now).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def ensure_client_cert(ca: CertificateAuthority, directory: Path, cert_name: str, key_name: str,
                       cn: str) -> tuple[Path, Path]:
    """(certificate, key) files of a client certificate (clientAuth) the CA issues once for the controller itself
    and keeps (valid 10 years): the far ends pin it, so it is not renewed behind their backs. Key 0600."""
    cert_path, key_path = private_dir(directory) / cert_name, directory / key_name
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(key.public_key(), "client", cn, [], days=CA_DAYS)
    confined.write_in(directory, key_name, key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    confined.write_in(directory, cert_name + ".tmp", cert.encode(), 0o644)
    confined.replace_in(directory, cert_name + ".tmp", cert_name)
    return cert_path, key_path


def general_name(name: str) -> x509.GeneralName:
    """A subject alternative name: an IP address when it parses as one, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def serial_of(cert_pem: str) -> str:
    return format(x509.load_pem_x509_certificate(cert_pem.encode()).serial_number, "x")


def client_identity(host: str) -> str:
    """The distinguished name QEMU's tls-authz compares against (as GnuTLS prints it)."""
    return f"CN={client_cn(host)}"


def client_cn(host: str) -> str:
    return f"kvmotion-host-{host}"

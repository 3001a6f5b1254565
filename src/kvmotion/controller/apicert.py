"""The controller's HTTPS certificate: issued by its own CA (``--tls auto``, the default) unless the admin brings
one (``--tls-cert``/``--tls-key``). Clients trust the CA's certificate (``pki/ca-cert.pem``): the CLI's config
``ca_file`` or ``$KVMOTION_CA_FILE``, an agent's ``controller_ca_file``.

It names the listen address (unless it is a wildcard), this machine's host name, the loopback names and the
configured ``tls_names``; it is issued again at start when those change or when it has less than 30 days left.
"""
from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kvmotion.common import confined
from kvmotion.controller.pki import CertificateAuthority, general_name

CERT_FILE, KEY_FILE = "api-cert.pem", "api-key.pem"
RENEW_BEFORE = dt.timedelta(days=30)
SERVER_CN = "kvmotion controller"       # no host is named so (names have no spaces): peers check it


def names_for(listen_host: str, extra: list[str]) -> list[str]:
    wildcard = listen_host in ("0.0.0.0", "::", "")
    names = ([] if wildcard else [listen_host]) + [socket.gethostname(), "localhost", "127.0.0.1", "::1"] + extra
    return list(dict.fromkeys(n for n in names if n))


def _current(cert_path: Path, ca: CertificateAuthority, names: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    return (cert.issuer == ca.cert.subject and set(san) == {general_name(n) for n in names}
            and cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) > RENEW_BEFORE)


def ensure(ca: CertificateAuthority, directory: Path, names: list[str]) -> tuple[Path, Path]:
    """(certificate, key) files of the controller's HTTPS certificate for ``names``, issued when needed."""
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if key_path.exists() and _current(cert_path, ca, names):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(key.public_key(), "server", SERVER_CN, names)
    confined.write_in(directory, KEY_FILE, key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    tmp = cert_path.with_suffix(".tmp")
    tmp.write_text(cert)
    tmp.replace(cert_path)
    return cert_path, key_path

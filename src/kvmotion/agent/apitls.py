"""The agent API's TLS identity (``kvmotion.common.pinning``): HTTPS always, mutual once the controller is pinned.

Files in ``STATE_DIR/api`` (0700; keys 0600, opened without following symbolic links):
- ``api-key.pem``: the agent's API key, made at first start; it never leaves the host.
- ``api-cert.pem``: the certificate served: self-signed until the controller's CA issues one for the same key
  (``install``); replaced atomically, and new connections use it at once.
- ``controller-cert.pem``: the controller's client certificate, pinned by a signed request (``pin_controller``);
  from then on a client that does not present it fails the TLS handshake. To move the host to another controller,
  delete this file and restart the agent (as with SSH's known_hosts).
"""
from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kvmotion.common import confined, pinning
from kvmotion.common.errors import ConflictError, InvalidInputError
from kvmotion.common.private import private_dir

API_DIR = "api"
KEY, CERT, CONTROLLER = "api-key.pem", "api-cert.pem", "controller-cert.pem"
MAX_PEM = 64 << 10
REPIN_REMEDY = ("to move this host to another controller, delete {path} on the host and restart kvmotion-agent, "
                "then add the host to the new controller")


class ApiIdentity:
    def __init__(self, state_dir: Path, host: str, names: list[str]) -> None:
        self.dir = private_dir(state_dir / API_DIR)
        self.host, self.names = host, names
        self.key = self._load_or_create_key()
        cert = self._read(CERT)
        if cert is None or not pinning.same_key(cert, self.key):
            cert = pinning.self_signed(self.key, f"{host}-api", names)
            confined.write_in(self.dir, CERT, cert.encode(), 0o644)
        self.cert_pem = cert
        self.controller_pem = self._read(CONTROLLER)
        self._ctx: ssl.SSLContext | None = None

    def _read(self, name: str) -> str | None:
        try:
            return confined.read_in(self.dir, name, MAX_PEM).decode()
        except FileNotFoundError:
            return None

    def _load_or_create_key(self) -> ec.EllipticCurvePrivateKey:
        raw = self._read(KEY)
        if raw is not None:
            key = serialization.load_pem_private_key(raw.encode(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return key
        key = ec.generate_private_key(ec.SECP256R1())
        confined.write_in(self.dir, KEY, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()), exclusive=True)
        return key

    @property
    def cert_sha256(self) -> str:
        return pinning.sha256_of(self.cert_pem)

    def server_context(self) -> ssl.SSLContext:
        """The context the API's server uses for every connection (kept: ``install`` and ``pin_controller``
        change it in place, for new connections)."""
        if self._ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(self.dir / CERT), str(self.dir / KEY))
            pinning.pin_client(ctx, self.controller_pem)
            self._ctx = ctx
        return self._ctx

    def csr(self) -> str:
        return pinning.csr_for(self.key, f"{self.host}-api")

    def install(self, cert_pem: str, ca_pem: str) -> str:
        """Serve ``cert_pem`` (issued by ``ca_pem`` for this host's API key) from now on; returns its SHA-256."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
            ca = x509.load_pem_x509_certificate(ca_pem.encode())
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise InvalidInputError("the API certificate is not one the given CA issued",
                                    remedy="renew the host's certificates from its controller") from exc
        if not pinning.same_key(cert_pem, self.key):
            raise InvalidInputError("the API certificate is not for this host's API key",
                                    remedy="renew the host's certificates from its controller")
        confined.write_in(self.dir, CERT + ".new", cert_pem.encode(), 0o644)
        confined.replace_in(self.dir, CERT + ".new", CERT)
        self.cert_pem = cert_pem
        if self._ctx is not None:
            self._ctx.load_cert_chain(str(self.dir / CERT), str(self.dir / KEY))
        return self.cert_sha256

    def pin_controller(self, pem: str) -> bool:
        """Require ``pem`` of every client from now on; True if newly pinned, False if it already was."""
        try:
            pinning.sha256_of(pem)
        except ValueError as exc:
            raise InvalidInputError("the controller's certificate does not parse",
                                    remedy="check that the controller and this agent run the same kvmotion") from exc
        if self.controller_pem is not None:
            if pinning.sha256_of(self.controller_pem) == pinning.sha256_of(pem):
                return False
            raise ConflictError("this host is already pinned to another controller's certificate",
                                remedy=REPIN_REMEDY.format(path=self.dir / CONTROLLER))
        confined.write_in(self.dir, CONTROLLER, pem.encode(), 0o644)
        self.controller_pem = pem
        if self._ctx is not None:
            pinning.pin_client(self._ctx, pem)
        return True

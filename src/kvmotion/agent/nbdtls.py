"""TLS for the NBD streams between hosts: no NBD server or client here runs without it.

Every builder of an NBD server or client (``qemu-nbd`` for a cold copy, ``qemu-img`` reading it, the shadow's
``nbd-server-start``, the source's mirror target) takes its credentials from here (x509 inside a VM's QEMU: the
memory stream's own objects, ``migration.tls_object`` and ``kvm-authz``), and :func:`server_creds` /
:func:`client_creds` refuse to make none. Two kinds, chosen by the controller per move (x509 when the move would
encrypt a live migration between the two hosts, else PSK):

- **x509**: the host's migration certificates (the tls directory). The server verifies the client's
  certificate and admits exactly one identity, the peer host's client certificate DN (``authz-simple`` as
  ``tls-authz``); the client verifies the server's certificate against the address it dials (``tls-hostname``).
- **PSK**: a random 256-bit key the controller made for this one move and gave to its two agents. It is written
  as ``keys.psk`` (``username:hexkey``, 0600) into a fresh 0700 directory and removed when the stream ends. QEMU
  7.2 applies ``tls-authz`` to x509 peers only (``qcrypto_tls_session_check_credentials`` is a no-op for PSK
  credentials; a PSK server given an authz that names nobody still admits the key's holder), so no authz is
  set for PSK: the key itself is the authorization. The server's file holds this move's username alone and a
  client without the key fails the TLS handshake.

The QOM objects are built as dictionaries: the same shape is ``object-add``'s argument (QMP) and, as JSON,
``--object``'s (``qemu-nbd``, ``qemu-img``), so no value is ever pasted into a comma-separated option string.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmotion.agent.tls import DH_PARAMS_PEM
from kvmotion.common.errors import ConflictError, InvalidInputError
from kvmotion.common.keywrap import HostKey
from kvmotion.models.nbd import TLS_PSK, TLS_X509, NbdPsk

KEY_DIR = "nbd-keys"          # under the agent's state directory: one fresh directory per stream end
PSK_FILE = "keys.psk"         # the name QEMU's tls-creds-psk reads in its ``dir``
CREDS_ID = "kvm-nbd-tls"      # qemu-nbd / qemu-img: their own process, one stream each
AUTHZ_ID = "kvm-nbd-authz"
NO_CERT_REMEDY = "renew the host's certificate: kvmotion host cert renew HOST"
# A TLS 1.3 external PSK is bound to SHA-256, which leaves TLS_AES_128_GCM_SHA256 and
# TLS_CHACHA20_POLY1305_SHA256; GnuTLS's NORMAL prefers ChaCha20, a third of AES-GCM's speed on CPUs with AES-NI
# (measured: 110-200 MiB/s against 630-670 MiB/s for one qemu-img copy over 127.0.0.1). Both ends prefer AES-GCM.
PSK_PRIORITY = "NORMAL:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305"


def key_root(state_dir: Path) -> Path:
    return state_dir / KEY_DIR


class PskDir:
    """A fresh 0700 directory with one ``keys.psk`` (0600): one stream end's copy of the move's key."""

    def __init__(self, path: Path, username: str) -> None:
        self.path, self.username = path, username

    @classmethod
    def create(cls, root: Path, psk: NbdPsk) -> PskDir:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="psk-", dir=root))       # mode 0700, a name nobody else has
        try:
            fd = os.open(path / PSK_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{psk.username}:{psk.key}\n")
            # A PSK server without dh-params.pem generates Diffie-Hellman parameters when it is made (slow).
            (path / "dh-params.pem").write_text(DH_PARAMS_PEM)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, psk.username)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def sweep(root: Path) -> list[str]:
    """At agent start: key directories a previous agent run left (its streams are gone with it)."""
    if not root.is_dir():
        return []
    left = [p for p in root.iterdir() if p.name.startswith("psk-")]
    for p in left:
        shutil.rmtree(p, ignore_errors=True)
    return [str(p) for p in left]


@dataclass
class NbdCreds:
    """One end's TLS credentials for one NBD stream: x509 (``x509_dir``) or a PSK directory, never neither."""

    endpoint: str                         # "server" | "client"
    x509_dir: str | None = None
    authz_identity: str | None = None     # x509 server: the one client identity admitted
    tls_hostname: str | None = None       # x509 client: the name the server's certificate must carry
    psk: PskDir | None = None

    @property
    def mode(self) -> str:
        return TLS_PSK if self.psk is not None else TLS_X509

    def objects(self, creds_id: str = CREDS_ID, authz_id: str = AUTHZ_ID) -> list[dict[str, Any]]:
        """The QOM objects: the credentials, and for an x509 server its authorization."""
        if self.psk is not None:
            obj = {"qom-type": "tls-creds-psk", "id": creds_id, "dir": str(self.psk.path), "endpoint": self.endpoint,
                   "priority": PSK_PRIORITY}
            return [obj | {"username": self.psk.username}] if self.endpoint == "client" else [obj]
        creds = {"qom-type": "tls-creds-x509", "id": creds_id, "dir": self.x509_dir, "endpoint": self.endpoint,
                 "verify-peer": True}
        if self.endpoint == "client":
            return [creds]
        return [creds, {"qom-type": "authz-simple", "id": authz_id, "identity": self.authz_identity}]

    def release(self) -> None:
        """Remove the key directory (PSK); nothing to do for x509."""
        if self.psk is not None:
            self.psk.remove()


def server_creds(key_root_dir: Path, x509_dir: str | None, authz_identity: str | None,
                 psk: NbdPsk | None) -> NbdCreds:
    """An NBD server's credentials: x509 admitting ``authz_identity`` only, or the move's PSK."""
    return _creds("server", key_root_dir, x509_dir, authz_identity, psk)


def client_creds(key_root_dir: Path, x509_dir: str | None, tls_hostname: str | None,
                 psk: NbdPsk | None) -> NbdCreds:
    """An NBD client's credentials: x509 checking the server's name, or the move's PSK."""
    return _creds("client", key_root_dir, x509_dir, tls_hostname, psk)


def _creds(endpoint: str, key_root_dir: Path, x509_dir: str | None, x509_peer: str | None,
           psk: NbdPsk | None) -> NbdCreds:
    """Exactly one of ``x509_peer`` (the server: the client identity it admits; the client: the name the
    server's certificate must carry) and ``psk``; refused otherwise, before any key is written."""
    if (x509_peer is None) == (psk is None):
        peer = "tls_authz_identity" if endpoint == "server" else "tls_hostname"
        raise InvalidInputError(f"an NBD {endpoint} needs exactly one of: {peer} (x509), the move's PSK",
                                remedy=f"send {peer} or psk; NBD never runs without TLS")
    if psk is not None:
        return NbdCreds(endpoint, psk=PskDir.create(key_root_dir, psk))
    if x509_dir is None:
        raise ConflictError("this host has no TLS certificate for an x509 NBD stream", remedy=NO_CERT_REMEDY)
    if endpoint == "server":
        return NbdCreds(endpoint, x509_dir=x509_dir, authz_identity=x509_peer)
    return NbdCreds(endpoint, x509_dir=x509_dir, tls_hostname=x509_peer)


def qemu_nbd_tls_argv(creds: NbdCreds) -> list[str]:
    """The TLS part of a ``qemu-nbd`` command line (``--tls-authz`` for x509: see the module docstring)."""
    assert creds.endpoint == "server"
    argv = [a for obj in creds.objects() for a in ("--object", json.dumps(obj))] + ["--tls-creds", CREDS_ID]
    return argv if creds.psk is not None else argv + ["--tls-authz", AUTHZ_ID]


def qemu_img_source(creds: NbdCreds, host: str, port: int, export: str) -> tuple[list[str], str]:
    """(``--object`` arguments, filename) with which ``qemu-img`` reads an NBD export over TLS, as raw data."""
    assert creds.endpoint == "client"
    nbd: dict[str, Any] = {"driver": "nbd", "server": {"type": "inet", "host": host, "port": str(port)},
                           "export": export, "tls-creds": CREDS_ID}
    if creds.tls_hostname:
        nbd["tls-hostname"] = creds.tls_hostname
    objects = [a for obj in creds.objects() for a in ("--object", json.dumps(obj))]
    return objects, "json:" + json.dumps({"driver": "raw", "file": nbd})


def open_psk(key: HostKey, psk: NbdPsk | None) -> NbdPsk | None:
    """The move's key as the controller sent it (wrapped to this host: common.keywrap), unwrapped for QEMU."""
    if psk is None:
        return None
    return NbdPsk(username=psk.username, key=key.unwrap(psk.wrap_label, psk.key))

"""Disk passphrases reach QEMU encrypted (cookbook §6): never as plaintext on a command line or over QMP.

Each QEMU process gets its own random master secret in a 0600 file (removed once QEMU has read it); each
disk passphrase is AES-256-CBC encrypted under it and given as a ``secret`` object with ``keyid`` and ``iv``.
"""
from __future__ import annotations

import base64
import os
import secrets as pyrandom
from pathlib import Path

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MASTER_ID = "kvm-master"


def write_master(path: Path) -> bytes:
    """A new master secret in a new 0600 file (a leftover one is replaced; a link there is never followed)."""
    key = pyrandom.token_bytes(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(key).decode())
    return key


def encrypted_secret_args(secret_id: str, passphrase: str, master: bytes) -> str:
    """The ``-object secret,...`` option value carrying ``passphrase`` encrypted under ``master``."""
    iv = pyrandom.token_bytes(16)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(passphrase.encode()) + padder.finalize()
    enc = Cipher(algorithms.AES(master), modes.CBC(iv)).encryptor()
    data = enc.update(plain) + enc.finalize()
    return (f"secret,id={secret_id},data={base64.b64encode(data).decode()},keyid={MASTER_ID},"
            f"iv={base64.b64encode(iv).decode()},format=base64")


def master_object(path: Path) -> str:
    return f"secret,id={MASTER_ID},file={path},format=base64"


def disk_secret_id(node: str) -> str:
    return f"sec-{node}"

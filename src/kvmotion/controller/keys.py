"""Key provider for encrypted VMs: per-disk keys, stored only wrapped (AES-GCM) with a master key.

The master key lives with the controller's CA (mode 0600) and never leaves the controller. A disk key is
unwrapped only to be handed to the agent that starts the VM's QEMU, which passes it on encrypted (cookbook §6).
"""
from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvmotion.common.errors import ConflictError
from kvmotion.common.private import keep_private

MASTER_FILE = "master.key"


class KeyProvider:
    def __init__(self, master: bytes) -> None:
        self._aead = AESGCM(master)

    @classmethod
    def load_or_create(cls, directory: Path) -> "KeyProvider":
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MASTER_FILE
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(AESGCM.generate_key(bit_length=256))
        keep_private(path)
        return cls(path.read_bytes())

    def new_key(self, context: str) -> tuple[str, str]:
        """A fresh disk passphrase and its wrapped form (bound to ``context``, e.g. the VM and disk)."""
        passphrase = secrets.token_hex(32)
        return passphrase, self.wrap(passphrase, context)

    def wrap(self, passphrase: str, context: str) -> str:
        nonce = secrets.token_bytes(12)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, passphrase.encode(), context.encode())).decode()

    def unwrap(self, wrapped: str, context: str) -> str:
        raw = base64.b64decode(wrapped)
        try:
            return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except Exception as exc:  # noqa: BLE001 - InvalidTag: wrong master key or tampered record
            raise ConflictError(f"the key of {context} cannot be unwrapped", remedy="restore the controller's "
                                "master key (pki/master.key) from backup") from exc

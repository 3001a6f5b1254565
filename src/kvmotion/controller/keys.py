"""Key provider for encrypted VMs: per-disk keys, stored only wrapped (AES-GCM) with a master key.

The master key lives with the controller's CA (mode 0600) and never leaves the controller. A disk key is
unwrapped only to be handed to the agent that starts the VM's QEMU, which passes it on encrypted (cookbook §6).
The key file is created exclusively and read without following a symbolic link (:mod:`kvmotion.common.confined`).
"""
from __future__ import annotations

import base64
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvmotion.common import confined
from kvmotion.common.errors import ConflictError
from kvmotion.common.private import keep_private

MASTER_FILE = "master.key"
MASTER_BYTES = 32


class KeyProvider:
    def __init__(self, master: bytes) -> None:
        self._aead = AESGCM(master)

    @classmethod
    def load_or_create(cls, directory: Path) -> "KeyProvider":
        directory.mkdir(parents=True, exist_ok=True)
        try:
            confined.write_in(directory, MASTER_FILE, AESGCM.generate_key(bit_length=8 * MASTER_BYTES), exclusive=True)
        except FileExistsError:
            pass                               # the key made at first start (a link there is refused when read)
        keep_private(directory / MASTER_FILE)
        master = confined.read_in(directory, MASTER_FILE, MASTER_BYTES)
        if len(master) != MASTER_BYTES:
            raise ConflictError(f"{directory / MASTER_FILE} holds {len(master)} bytes, not a {MASTER_BYTES}-byte key",
                                remedy="restore the controller's master key (pki/master.key) from backup")
        return cls(master)

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

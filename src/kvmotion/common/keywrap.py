"""Disk passphrases wrapped to the host that uses them: no log, proxy or core dump on the way holds them in clear.

Each agent has its own X25519 key (``keywrap.key`` in its state directory, 0600, made at first start) and
publishes the public half in its facts. The controller wraps each passphrase it sends for that host: an
ephemeral X25519 key, HKDF-SHA256 to an AES-256-GCM key, the host and the disk node as associated data (a value
wrapped for one host or disk is refused for another). On the wire a value reads
``kvw1.<ephemeral public>.<nonce>.<ciphertext>`` (base64url). Only the agent's request handler unwraps it,
just before use; the controller keeps disk keys wrapped with its own master key at rest (``controller.keys``).
"""
from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kvmotion.common.errors import InvalidInputError

PREFIX = "kvw1."
KEY_FILE = "keywrap.key"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _aead(shared: bytes, host: str, node: str) -> AESGCM:
    key = HKDF(hashes.SHA256(), 32, salt=None, info=f"kvmotion disk key v1|{host}|{node}".encode()).derive(shared)
    return AESGCM(key)


def wrap(public_b64: str, host: str, node: str, passphrase: str) -> str:
    """``passphrase`` for disk ``node`` of a VM on ``host``, readable only with that host's key."""
    eph = X25519PrivateKey.generate()
    shared = eph.exchange(X25519PublicKey.from_public_bytes(_unb64(public_b64)))
    nonce = secrets.token_bytes(12)
    ct = _aead(shared, host, node).encrypt(nonce, passphrase.encode(), f"{host}|{node}".encode())
    eph_pub = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PREFIX + ".".join(_b64(x) for x in (eph_pub, nonce, ct))


def is_wrapped(value: str) -> bool:
    return value.startswith(PREFIX)


class HostKey:
    """The agent's key-wrapping key."""

    def __init__(self, key: X25519PrivateKey, host: str) -> None:
        self._key, self.host = key, host

    @classmethod
    def load_or_create(cls, state_dir: Path, host: str) -> "HostKey":
        path = state_dir / KEY_FILE
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                return cls(X25519PrivateKey.from_private_bytes(_unb64(fh.read().decode().strip())), host)
        except FileNotFoundError:
            pass
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(_b64(raw) + "\n")
        return cls(key, host)

    @property
    def public_b64(self) -> str:
        return _b64(self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def unwrap(self, node: str, value: str) -> str:
        """The passphrase; a value not wrapped (an older controller's) is taken as it is."""
        if not is_wrapped(value):
            return value
        try:
            eph, nonce, ct = (_unb64(p) for p in value[len(PREFIX):].split("."))
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(eph))
            return _aead(shared, self.host, node).decrypt(nonce, ct, f"{self.host}|{node}".encode()).decode()
        except (ValueError, InvalidTag) as exc:
            raise InvalidInputError(f"the key of disk {node} was not wrapped for host {self.host}",
                                    remedy="the controller wraps disk keys with each host's published key; "
                                           "refresh the host (`kvmotion host show`) and retry",
                                    details={"disk": node}) from exc

    def unwrap_all(self, keys: dict[str, str]) -> dict[str, str]:
        return {node: self.unwrap(node, value) for node, value in keys.items()}


def _is_psk(d: dict[str, Any]) -> bool:
    return set(d) == {"username", "key"} and isinstance(d["key"], str) and not is_wrapped(d["key"])


def has_secrets(payload: Any) -> bool:
    """Whether a request body carries a secret to wrap (a ``disk_keys`` value or an NBD pre-shared key)."""
    if isinstance(payload, list):
        return any(has_secrets(v) for v in payload)
    if not isinstance(payload, dict):
        return False
    return bool(payload.get("disk_keys")) or _is_psk(payload) or any(has_secrets(v) for v in payload.values())


def wrap_payload(public_b64: str | None, host: str, payload: Any) -> Any:
    """A request body with every secret in it wrapped for ``host``: ``disk_keys`` values, and the ``key`` of each
    NBD pre-shared key (``{"username": …, "key": …}``, wrapped for ``nbd-psk:USERNAME``), wherever they are."""
    if isinstance(payload, list):
        return [wrap_payload(public_b64, host, v) for v in payload]
    if not isinstance(payload, dict):
        return payload
    out = {k: wrap_payload(public_b64, host, v) for k, v in payload.items()}
    if isinstance(out.get("disk_keys"), dict):
        out["disk_keys"] = wrap_all(public_b64, host, out["disk_keys"])
    if public_b64 and _is_psk(out):
        out["key"] = wrap(public_b64, host, f"nbd-psk:{out['username']}", out["key"])
    return out


def wrap_all(public_b64: str | None, host: str, keys: dict[str, str]) -> dict[str, str]:
    """Every passphrase wrapped for ``host`` (as they are when the host publishes no key: an older agent)."""
    if not public_b64:
        return dict(keys)
    return {node: v if is_wrapped(v) else wrap(public_b64, host, node, v) for node, v in keys.items()}

"""NBD between hosts: addresses, and the per-move pre-shared key that secures a stream when x509 does not fit.

Every NBD stream between two hosts runs over TLS (docs/security.md, "Disk streams"): x509 with the hosts'
migration certificates when the move encrypts, else TLS-PSK with a key the controller makes for that move.
"""
from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import urlparse

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

MAX_URL_CHARS = 2048
PSK_USERNAME_PATTERN = r"^kvmotion-move-[0-9a-f]{16}$"
PSK_KEY_PATTERN = r"^[0-9a-f]{64}$"     # 256 bits, hex: the form QEMU's keys.psk holds
PSK_WIRE_PATTERN = r"^([0-9a-f]{64}|kvw1\.[A-Za-z0-9_.-]{20,400})$"   # on the wire: wrapped to the host (keywrap)
TLS_X509, TLS_PSK = "tls-x509", "tls-psk"     # how an NBD stream is secured (there is no third way)


def nbd_problem(url: object) -> str | None:
    """What is wrong with an NBD address nbd://HOST[:PORT]/EXPORT (None: nothing)."""
    if not isinstance(url, str) or not url:
        return "is empty"
    if len(url) > MAX_URL_CHARS:
        return f"is longer than {MAX_URL_CHARS} characters"
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        return "contains a space or a control character"
    if not url.startswith("nbd://"):
        return "is not an nbd:// address"
    try:
        parsed = urlparse(url)
        parsed.port             # raises on a port that is not a number in 0..65535
    except ValueError as exc:
        return f"is not a valid address ({exc})"
    if not parsed.hostname:
        return "names no host"
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        return "may not carry a user, a query or a fragment"
    return None


def parse_nbd(url: str) -> tuple[str, int, str]:
    """(host, port, export) of a valid NBD address (see :func:`nbd_problem`)."""
    parsed = urlparse(url)
    return parsed.hostname or "", parsed.port or 10809, parsed.path.lstrip("/")


def _valid_nbd(url: str) -> str:
    problem = nbd_problem(url)
    if problem is not None:
        raise ValueError(f"NBD address {url!r} {problem} (write it like nbd://HOST:PORT/EXPORT)")
    return url


NbdUrl = Annotated[str, StringConstraints(max_length=MAX_URL_CHARS), AfterValidator(_valid_nbd)]


class NbdPsk(BaseModel):
    """A TLS pre-shared key for one move's NBD streams.

    The controller makes it for that move and hands it to the move's two agents only; each writes it to a 0600
    ``keys.psk`` in a fresh 0700 directory while its end of the stream needs it. It is never stored in a task,
    and ``repr`` hides the key (log lines that print a request do not carry it).
    """

    model_config = ConfigDict(frozen=True)

    username: str = Field(pattern=PSK_USERNAME_PATTERN)
    key: str = Field(pattern=PSK_WIRE_PATTERN, repr=False)

    @property
    def wrap_label(self) -> str:
        """What the key is wrapped for (common.keywrap's associated data, with the host)."""
        return f"nbd-psk:{self.username}"

    @classmethod
    def new(cls) -> NbdPsk:
        return cls(username=f"kvmotion-move-{secrets.token_hex(8)}", key=secrets.token_hex(32))

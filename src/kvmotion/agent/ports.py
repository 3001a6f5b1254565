"""Ports this host listens on for moves (migration streams, NBD exports), handed out one at a time."""
from __future__ import annotations

import socket
import time

from kvmotion.common.errors import ConflictError

PORT_RANGE = range(49152, 49408)
RESERVE_S = 60.0
_handed_out: dict[int, float] = {}      # port -> when: bounded by PORT_RANGE


def pick_port(address: str) -> int:
    """A free port to listen on (QEMU or qemu-nbd). A port handed out stays reserved for ``RESERVE_S``: between this
    check and QEMU's own bind, a concurrent preparation (several incoming VMs at once) must not get it too."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    now = time.monotonic()
    for port in PORT_RANGE:
        if now - _handed_out.get(port, -RESERVE_S) < RESERVE_S:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
        _handed_out[port] = now
        return port
    raise ConflictError(f"no free migration port on {address} in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}",
                        remedy="wait for running migrations to finish")

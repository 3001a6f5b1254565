"""Which addresses a host agent may have: the controller calls whatever address a host is enrolled with, so an
address is an allow-list decision, not free text (else enrolment is a way to make the controller call anything).

With ``host_networks`` configured (``kvmotion-server --host-networks 198.18.0.0/24,2001:2::/64``) every address
the agent's name resolves to must be inside one of them. Without it the controller refuses what is never a
hypervisor's management address: loopback (an all-in-one install allows it explicitly), link-local (cloud
metadata services live there), multicast, unspecified and reserved addresses.
"""
from __future__ import annotations

import ipaddress
import socket
import urllib.parse

from kvmotion.common.errors import InvalidInputError

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Addr = ipaddress.IPv4Address | ipaddress.IPv6Address
RESOLVE_LIMIT = 8


def networks(cidrs: list[str]) -> list[Net]:
    out: list[Net] = []
    for c in cidrs:
        try:
            out.append(ipaddress.ip_network(c.strip(), strict=False))
        except ValueError as exc:
            raise InvalidInputError(f"host network {c!r} is not a CIDR", remedy="use e.g. 198.18.0.0/24") from exc
    return out


def resolve(host: str) -> list[Addr]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise InvalidInputError(f"host address {host!r} does not resolve", remedy="give the agent's IP address"
                                ) from exc
    return sorted({ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos})[:RESOLVE_LIMIT]


def refusal(addr: Addr, nets: list[Net]) -> str | None:
    """Why ``addr`` may not be a host agent's (None: allowed)."""
    if nets:
        return None if any(addr in n for n in nets) else "outside the controller's host networks"
    for what, bad in (("loopback", addr.is_loopback), ("link-local", addr.is_link_local),
                      ("multicast", addr.is_multicast), ("unspecified", addr.is_unspecified),
                      ("reserved", addr.is_reserved)):
        if bad:
            return f"a {what} address"
    return None


def check_address(url: str, nets: list[Net]) -> None:
    """Refuse an agent URL whose host is not allowed (every address it resolves to)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    for addr in resolve(host):
        why = refusal(addr, nets)
        if why is not None:
            allowed = ", ".join(str(n) for n in nets)
            raise InvalidInputError(
                f"host address {url} ({addr}) is {why}",
                remedy=(f"enrol hosts only from {allowed}, or add the network to --host-networks" if nets else
                        f"start kvmotion-server with --host-networks naming your management network(s), e.g. "
                        f"--host-networks {addr}/32 for this host"),
                details={"address": str(addr)})

"""Multi-host lab network topology built from Linux network namespaces.

Everything the lab creates is written to a JSON *record* (the state file)
**before** it is created, so :func:`lab_down` can always remove exactly what
the lab made -- also after a crash half way through :func:`lab_up` -- and
nothing else.

Topology (``P`` = prefix, host ``i`` = 1..N)::

    root ns:   P-mgmt 198.18.0.1/24 (+ 2001:2::1/64)  <->  root-mgmt @ br-mgmt
    P-sw:      bridges br-mgmt, br-vm ("physical switch"), br-mig
    P-cl:      eth0 198.18.1.2/24                     <->  cl-vm     @ br-vm
    P-hi:      mgmt0 198.18.0.(10+i)/24 (or 2001:2::(10+i)/64)
                                                      <->  hi-mgmt   @ br-mgmt
               vmnet (bridge, alias "VM Network", no IP)
                 uplink0 (port of vmnet)              <->  hi-vm     @ br-vm
               mig0 198.19.0.(10+i)/24 (alias "migration")
                                                      <->  hi-mig    @ br-mig

Only addresses from 198.18.0.0/15 (IPv4) and 2001:2::/48 (IPv6, RFC 5180
benchmarking range) are used.  No work happens at import time.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from kvmotion_lab.netdown import lab_down
from kvmotion_lab.netns import LabError, ip_cmd, list_netns, root_link_exists, run, sysctl_get, sysctl_set
from kvmotion_lab.netrecord import Record

__all__ = ["HostNet", "LabNet", "lab_up", "load_lab"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# constants

STATE_VERSION = 1

LAB_V4 = ipaddress.ip_network("198.18.0.0/15")
LAB_V6 = ipaddress.ip_network("2001:2::/48")

CONTROLLER_IP = "198.18.0.1"       # slot 0; slot k > 0 uses 198.18.(128+k).0/24 and 2001:2:0:k::/64
CONTROLLER_IP6 = "2001:2::1"
MAX_SLOTS = 64                      # labs that can be up at once (each has its own management subnet)
SLOT_LOCK = Path("/run/lock/kvmotion-lab-slots.lock")
MGMT_PREFIXLEN = 24
MGMT6_PREFIXLEN = 64
MIG_PREFIXLEN = 24
VM_SUBNET = "198.18.1.0/24"
CLIENT_IP = "198.18.1.2"

SWITCH_BRIDGES = ("br-mgmt", "br-vm", "br-mig")
VM_BRIDGE = "vmnet"
VM_BRIDGE_ALIAS = "VM Network"
MIG_ALIAS = "migration"

MAX_HOSTS = 99
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")  # f"{prefix}-mgmt" <= 15 chars
_IFNAME_MAX = 15

# bridge-netfilter switches; set to 0 inside the lab namespaces that have
# bridges (they are per-netns on current kernels), never in the root ns.
_BRIDGE_NF_KEYS = (
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
)



# --------------------------------------------------------------------------
# public data


@dataclass(frozen=True)
class HostNet:
    name: str  # "h1"
    netns: str  # f"{prefix}-h1"
    mgmt_ip: str  # 198.18.0.(10+i) on "mgmt0"; "" for IPv6-managed hosts
    mgmt_ip6: str | None  # 2001:2::(10+i) on "mgmt0" for IPv6-managed hosts
    mig_ip: str  # 198.19.0.(10+i) on "mig0"
    vm_bridge: str  # "vmnet"


@dataclass(frozen=True)
class LabNet:
    prefix: str
    switch_netns: str
    client_netns: str
    controller_ip: str
    vm_subnet: str
    hosts: list[HostNet] = field(default_factory=list)
    slot: int = 0          # which management subnet of the root namespace this lab uses (labs side by side)

    def host(self, name: str) -> HostNet:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def controller_ip6(self) -> str:
        return mgmt_v6_base(self.slot) + "1"

    @property
    def client_ip(self) -> str:
        return CLIENT_IP

    @property
    def root_veth(self) -> str:
        return root_veth_name(self.prefix)

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_netns, self.client_netns, *(h.netns for h in self.hosts)]


def mgmt_v4_base(slot: int) -> str:
    """The first three octets of a slot's management subnet (root namespace leg, hosts' mgmt0)."""
    return "198.18.0" if slot == 0 else f"198.18.{128 + slot}"


def mgmt_v6_base(slot: int) -> str:
    return "2001:2::" if slot == 0 else f"2001:2:0:{slot:x}::"


def slot_networks(slot: int) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
    return (ipaddress.ip_network(f"{mgmt_v4_base(slot)}.0/{MGMT_PREFIXLEN}"),
            ipaddress.ip_network(f"{mgmt_v6_base(slot)}/{MGMT6_PREFIXLEN}"))


def free_slot() -> int:
    """The first slot whose management subnets no address of the root namespace uses."""
    used = [ipaddress.ip_address(a) for _, a in _root_lab_addresses()]
    for slot in range(MAX_SLOTS):
        v4, v6 = slot_networks(slot)
        if not any(a in v4 or a in v6 for a in used):
            return slot
    raise LabError(f"all {MAX_SLOTS} lab slots are in use in the root namespace; run `kvmotion lab down` for one")


def root_veth_name(prefix: str) -> str:
    return f"{prefix}-mgmt"


# --------------------------------------------------------------------------
# planning


def _plan(prefix: str, n_hosts: int, ipv6_hosts: Iterable[str], slot: int = 0) -> LabNet:
    v6 = set(ipv6_hosts)
    hosts = []
    for i in range(1, n_hosts + 1):
        name = f"h{i}"
        hosts.append(
            HostNet(
                name=name,
                netns=f"{prefix}-{name}",
                mgmt_ip="" if name in v6 else f"{mgmt_v4_base(slot)}.{10 + i}",
                # "2001:2::11" for h1 mirrors 198.18.0.11 (digits read as hex group)
                mgmt_ip6=f"{mgmt_v6_base(slot)}{10 + i}" if name in v6 else None,
                mig_ip=f"198.19.0.{10 + i}",
                vm_bridge=VM_BRIDGE,
            )
        )
    lab = LabNet(
        prefix=prefix,
        switch_netns=f"{prefix}-sw",
        client_netns=f"{prefix}-cl",
        controller_ip=f"{mgmt_v4_base(slot)}.1",
        vm_subnet=VM_SUBNET,
        hosts=hosts,
        slot=slot,
    )
    # Hard rule: nothing outside the benchmarking ranges.
    for h in hosts:
        for a in (h.mgmt_ip, h.mig_ip):
            if a:
                assert ipaddress.ip_address(a) in LAB_V4, a
        if h.mgmt_ip6:
            assert ipaddress.ip_address(h.mgmt_ip6) in LAB_V6, h.mgmt_ip6
    assert ipaddress.ip_network(VM_SUBNET).subnet_of(LAB_V4)  # type: ignore[arg-type]
    return lab


def _validate(prefix: str, n_hosts: int, ipv6_hosts: set[str]) -> None:
    if not _PREFIX_RE.match(prefix):
        raise LabError(
            f"invalid lab prefix {prefix!r}: use 1-10 lowercase letters/digits starting with a letter "
            f"(the root veth {prefix}-mgmt must fit in {_IFNAME_MAX} chars)"
        )
    if not 1 <= n_hosts <= MAX_HOSTS:
        raise LabError(f"n_hosts must be 1..{MAX_HOSTS}, got {n_hosts}")
    unknown = sorted(set(ipv6_hosts) - {f"h{i}" for i in range(1, n_hosts + 1)})
    if unknown:
        raise LabError(f"ipv6_hosts names unknown hosts {unknown}; hosts are h1..h{n_hosts}")


def _root_lab_addresses() -> list[tuple[str, str]]:
    """(ifname, address) of root-ns addresses inside the lab ranges."""
    cp = run(["ip", "-j", "addr", "show"])
    out = []
    for link in json.loads(cp.stdout or "[]"):
        for a in link.get("addr_info", []):
            try:
                ip = ipaddress.ip_address(a.get("local", ""))
            except ValueError:
                continue
            if (ip.version == 4 and ip in LAB_V4) or (ip.version == 6 and ip in LAB_V6):
                out.append((link.get("ifname", "?"), str(ip)))
    return out


def _preflight(prefix: str, state_file: Path, slot: int = 0) -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veths); run as root")
    if state_file.exists():
        raise LabError(f"lab already up (state file {state_file}); run `kvmotion lab down` first")
    clash = [ns for ns in list_netns() if ns.startswith(f"{prefix}-")]
    if clash:
        raise LabError(
            f"network namespace(s) {', '.join(clash)} already exist but are not recorded in "
            f"{state_file}; remove them (`ip netns del NAME`) or choose another prefix"
        )
    rv = root_veth_name(prefix)
    if root_link_exists(rv):
        raise LabError(f"interface {rv} already exists in the root namespace; remove it (`ip link del {rv}`) or choose another prefix")
    v4, v6 = slot_networks(slot)
    used = [(i, a) for i, a in _root_lab_addresses() if ipaddress.ip_address(a) in v4 or ipaddress.ip_address(a) in v6]
    if used:
        desc = ", ".join(f"{a} on {i}" for i, a in used)
        raise LabError(
            f"lab slot {slot}'s addresses are already in use in the root namespace ({desc}); another lab is "
            f"probably up: run `kvmotion lab down` for it first, or let the lab pick a free slot"
        )


# --------------------------------------------------------------------------
# lab_up


def _add_netns(rec: Record, name: str) -> None:
    obj = {"kind": "netns", "name": name}
    rec.add(obj)  # record first: a crash right after creation still leaves a record
    cp = ip_cmd(None, "netns", "add", name, check=False)
    if cp.returncode != 0:
        if "exist" in cp.stderr.lower():
            rec.discard(obj)  # somebody else's namespace: never remove it
        raise LabError(f"cannot create network namespace {name}: {cp.stderr.strip()}")
    ip_cmd(name, "link", "set", "dev", "lo", "up")


def _disable_bridge_nf(rec: Record, netns: str) -> None:
    for key in _BRIDGE_NF_KEYS:
        old = sysctl_get(netns, key)
        if old is None or old == "0":  # br_netfilter not loaded, or already off
            continue
        rec.add({"kind": "sysctl", "netns": netns, "key": key, "old": old})
        sysctl_set(netns, key, "0")


def _add_bridge(netns: str, name: str) -> None:
    # No STP, ports forward at once.  MAC learning stays on (default), so a
    # RARP/GARP from a migrated VM moves its fdb entry.  Multicast snooping
    # is off: otherwise MLD state (e.g. a VM's IPv6 solicited-node group)
    # would keep pointing at the old port after a migration.
    ip_cmd(netns, "link", "add", "name", name, "type", "bridge",
        "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")
    ip_cmd(netns, "link", "set", "dev", name, "addrgenmode", "none")  # no IP at all, not even IPv6 LL


def _veth_to_switch(netns: str, ifname: str, sw: str, peer: str, bridge: str) -> None:
    """veth *ifname* in *netns* <-> *peer* in switch ns *sw*, enslaved to *bridge*."""
    ip_cmd(netns, "link", "add", "name", ifname, "type", "veth", "peer", "name", peer, "netns", sw)
    ip_cmd(sw, "link", "set", "dev", peer, "addrgenmode", "none")  # switch ports carry no addresses
    ip_cmd(sw, "link", "set", "dev", peer, "master", bridge)
    ip_cmd(sw, "link", "set", "dev", peer, "up")


def _build(rec: Record, lab: LabNet) -> None:
    sw = lab.switch_netns

    # the "physical switch"
    _add_netns(rec, sw)
    _disable_bridge_nf(rec, sw)
    for br in SWITCH_BRIDGES:
        _add_bridge(sw, br)
        ip_cmd(sw, "link", "set", "dev", br, "up")

    # the client on the VM network
    cl = lab.client_netns
    _add_netns(rec, cl)
    _veth_to_switch(cl, "eth0", sw, "cl-vm", "br-vm")
    ip_cmd(cl, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
    ip_cmd(cl, "link", "set", "dev", "eth0", "up")

    _build_root_leg(rec, lab)
    for i, h in enumerate(lab.hosts, start=1):
        _build_host(rec, sw, i, h)


def _build_root_leg(rec: Record, lab: LabNet) -> None:
    """The controller's leg in the root namespace: a veth into the switch's management bridge."""
    sw = lab.switch_netns
    rv = lab.root_veth
    obj = {"kind": "link", "netns": None, "name": rv}
    rec.add(obj)
    cp = ip_cmd(None, "link", "add", "name", rv, "type", "veth", "peer", "name", "root-mgmt", "netns", sw, check=False)
    if cp.returncode != 0:
        if "exist" in cp.stderr.lower():
            rec.discard(obj)
        raise LabError(f"cannot create root veth {rv}: {cp.stderr.strip()}")
    ip_cmd(sw, "link", "set", "dev", "root-mgmt", "addrgenmode", "none")
    ip_cmd(sw, "link", "set", "dev", "root-mgmt", "master", "br-mgmt")
    ip_cmd(sw, "link", "set", "dev", "root-mgmt", "up")
    ip_cmd(None, "addr", "add", f"{lab.controller_ip}/{MGMT_PREFIXLEN}", "dev", rv)
    cp = ip_cmd(None, "-6", "addr", "add", f"{lab.controller_ip6}/{MGMT6_PREFIXLEN}", "dev", rv, "nodad", check=False)
    if cp.returncode != 0:
        if any(h.mgmt_ip6 for h in lab.hosts):
            raise LabError(f"cannot add {lab.controller_ip6} to {rv} (is IPv6 disabled?): {cp.stderr.strip()}")
        log.warning("no IPv6 on %s: %s", rv, cp.stderr.strip())
    ip_cmd(None, "link", "set", "dev", rv, "up")


def _build_host(rec: Record, sw: str, i: int, h: HostNet) -> None:
    """Host ``i``: its namespace with a management leg, the VM network's bridge, and a migration leg."""
    ns = h.netns
    _add_netns(rec, ns)
    _disable_bridge_nf(rec, ns)

    # management
    _veth_to_switch(ns, "mgmt0", sw, f"h{i}-mgmt", "br-mgmt")
    if h.mgmt_ip6:
        ip_cmd(ns, "-6", "addr", "add", f"{h.mgmt_ip6}/{MGMT6_PREFIXLEN}", "dev", "mgmt0", "nodad")
    else:
        ip_cmd(ns, "addr", "add", f"{h.mgmt_ip}/{MGMT_PREFIXLEN}", "dev", "mgmt0")
    ip_cmd(ns, "link", "set", "dev", "mgmt0", "up")

    # VM network: bridge vmnet, uplinked to br-vm
    _add_bridge(ns, VM_BRIDGE)
    ip_cmd(ns, "link", "set", "dev", VM_BRIDGE, "alias", VM_BRIDGE_ALIAS)
    ip_cmd(ns, "link", "set", "dev", VM_BRIDGE, "up")
    _veth_to_switch(ns, "uplink0", sw, f"h{i}-vm", "br-vm")
    ip_cmd(ns, "link", "set", "dev", "uplink0", "addrgenmode", "none")
    ip_cmd(ns, "link", "set", "dev", "uplink0", "master", VM_BRIDGE)
    ip_cmd(ns, "link", "set", "dev", "uplink0", "up")

    # migration network
    _veth_to_switch(ns, "mig0", sw, f"h{i}-mig", "br-mig")
    ip_cmd(ns, "link", "set", "dev", "mig0", "alias", MIG_ALIAS)
    ip_cmd(ns, "addr", "add", f"{h.mig_ip}/{MIG_PREFIXLEN}", "dev", "mig0")
    ip_cmd(ns, "link", "set", "dev", "mig0", "up")


def lab_up(prefix: str, n_hosts: int, state_file: Path, ipv6_hosts: set[str] = frozenset(),  # type: ignore[assignment]
           slot: int | None = None) -> LabNet:
    """Create the lab in ``slot`` (None: the first free one); on any failure remove what was made and re-raise."""
    state_file = Path(state_file)
    ipv6_hosts = set(ipv6_hosts)
    _validate(prefix, n_hosts, ipv6_hosts)
    with _slot_lock():      # two labs coming up at once must not pick the same slot
        slot = free_slot() if slot is None else slot
        if not 0 <= slot < MAX_SLOTS:
            raise LabError(f"lab slot must be 0..{MAX_SLOTS - 1}, got {slot}")
        _preflight(prefix, state_file, slot)
        return _create(prefix, n_hosts, ipv6_hosts, slot, state_file)


@contextlib.contextmanager
def _slot_lock() -> Iterator[None]:
    SLOT_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(SLOT_LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _create(prefix: str, n_hosts: int, ipv6_hosts: set[str], slot: int, state_file: Path) -> LabNet:
    lab = _plan(prefix, n_hosts, ipv6_hosts, slot)
    rec = Record.create(
        state_file,
        {
            "version": STATE_VERSION,
            "prefix": prefix,
            "n_hosts": n_hosts,
            "ipv6_hosts": sorted(ipv6_hosts),
            "complete": False,
            "created_at": time.time(),
            "lab": asdict(lab),
            "objects": [],
        },
    )
    try:
        _build(rec, lab)
        rec.data["complete"] = True
        rec.save()
    except BaseException as exc:
        log.error("lab_up failed (%s); removing what was created", exc)
        try:
            lab_down(state_file)
        except Exception as e2:  # keep the original error; report the cleanup one
            log.error("cleanup after failed lab_up also failed: %s", e2)
            if isinstance(exc, Exception):
                raise LabError(f"{exc}; cleanup also failed: {e2} -- run `kvmotion lab down`") from exc
        raise
    log.info("lab %s up: %d hosts", prefix, n_hosts)
    return lab


# --------------------------------------------------------------------------
# load_lab


def _lab_from_dict(d: dict[str, Any]) -> LabNet:
    hosts = [HostNet(**h) for h in d.get("hosts", [])]
    return LabNet(**{**d, "hosts": hosts})


def load_lab(state_file: Path) -> LabNet | None:
    """The lab described by *state_file*; None if there is none.

    Raises LabError if the record shows a lab that did not finish coming up
    (a crashed lab_up): run lab_down to clean it.
    """
    rec = Record.load(Path(state_file))
    if rec is None:
        return None
    if not rec.data.get("complete"):
        raise LabError(f"lab in {state_file} is only half up (lab_up did not finish); run `kvmotion lab down` and retry")
    try:
        return _lab_from_dict(rec.data["lab"])
    except (KeyError, TypeError) as e:
        raise LabError(f"state file {state_file} has no usable lab description ({e}); run `kvmotion lab down`") from e

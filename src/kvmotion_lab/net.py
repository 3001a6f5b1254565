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
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = [
    "HostNet",
    "LabError",
    "LabNet",
    "lab_down",
    "lab_up",
    "link_speed_mbps",
    "load_lab",
    "netns_exec_argv",
    "netns_pids",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# constants

STATE_VERSION = 1
CMD_TIMEOUT = 15.0  # seconds, deadline for every external command
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL in lab_down

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


class LabError(Exception):
    """A lab operation failed; the message names the problem and the fix."""


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
# command helpers


def netns_exec_argv(netns: str, argv: list[str]) -> list[str]:
    """argv that runs *argv* inside network namespace *netns*."""
    return ["ip", "netns", "exec", netns, *argv]


def _run(argv: list[str], *, check: bool = True, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    log.debug("run: %s", " ".join(argv))
    try:
        cp = subprocess.run(argv, check=False, timeout=timeout, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise LabError(f"command not found: {argv[0]!r}; install it (iproute2/procps) and retry") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"command timed out after {timeout:.0f}s: {' '.join(argv)}") from e
    if check and cp.returncode != 0:
        msg = (cp.stderr or cp.stdout).strip()
        raise LabError(f"command failed (rc={cp.returncode}): {' '.join(argv)}: {msg}")
    return cp


def _ip(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return _run(argv, check=check)


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    cp = _run(["ip", "netns", "list"])
    names = []
    for line in cp.stdout.splitlines():
        line = line.strip()
        if line:
            names.append(line.split()[0])
    return names


def netns_exists(netns: str) -> bool:
    return os.path.exists(f"/run/netns/{netns}") or netns in list_netns()


def netns_pids(netns: str) -> list[int]:
    """PIDs of processes in *netns* (``ip netns pids``); [] if it does not exist."""
    cp = _run(["ip", "netns", "pids", netns], check=False)
    if cp.returncode != 0:
        if not netns_exists(netns):
            return []
        raise LabError(f"`ip netns pids {netns}` failed: {cp.stderr.strip()}")
    return sorted({int(x) for x in cp.stdout.split() if x.isdigit()})


def _root_link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def link_speed_mbps(netns: str, ifname: str) -> int | None:
    """Link speed of *ifname* in *netns* in Mbit/s (veth: 10000); None if unknown/down."""
    cp = _run(netns_exec_argv(netns, ["cat", f"/sys/class/net/{ifname}/speed"]), check=False)
    if cp.returncode != 0:
        return None
    try:
        speed = int(cp.stdout.strip())
    except ValueError:
        return None
    return speed if speed > 0 else None


def _sysctl_get(netns: str | None, key: str) -> str | None:
    argv = ["sysctl", "-n", key]
    cp = _run(netns_exec_argv(netns, argv) if netns else argv, check=False)
    if cp.returncode != 0:
        return None
    return cp.stdout.strip()


def _sysctl_set(netns: str | None, key: str, value: str) -> None:
    argv = ["sysctl", "-q", "-w", f"{key}={value}"]
    _run(netns_exec_argv(netns, argv) if netns else argv)


# --------------------------------------------------------------------------
# the record


class _Record:
    """The JSON state file; every change is written atomically at once."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def create(cls, path: Path, data: dict[str, Any]) -> "_Record":
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: two concurrent lab_up calls cannot both own the record.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise LabError(f"lab already up (state file {path}); run `kvmotion lab down` first") from None
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        return cls(path, data)

    @classmethod
    def load(cls, path: Path) -> "_Record | None":
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
                raise ValueError("not a lab record")
        except ValueError as e:
            raise LabError(
                f"state file {path} is not a readable lab record ({e}); inspect it, remove the "
                f"listed namespaces/links by hand and delete the file"
            ) from e
        return cls(path, data)

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @property
    def objects(self) -> list[dict[str, Any]]:
        return self.data["objects"]

    def add(self, obj: dict[str, Any]) -> None:
        self.objects.append(obj)
        self.save()

    def discard(self, obj: dict[str, Any]) -> None:
        if obj in self.objects:
            self.objects.remove(obj)
            self.save()


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
    cp = _run(["ip", "-j", "addr", "show"])
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
    if _root_link_exists(rv):
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


def _add_netns(rec: _Record, name: str) -> None:
    obj = {"kind": "netns", "name": name}
    rec.add(obj)  # record first: a crash right after creation still leaves a record
    cp = _ip(None, "netns", "add", name, check=False)
    if cp.returncode != 0:
        if "exist" in cp.stderr.lower():
            rec.discard(obj)  # somebody else's namespace: never remove it
        raise LabError(f"cannot create network namespace {name}: {cp.stderr.strip()}")
    _ip(name, "link", "set", "dev", "lo", "up")


def _disable_bridge_nf(rec: _Record, netns: str) -> None:
    for key in _BRIDGE_NF_KEYS:
        old = _sysctl_get(netns, key)
        if old is None or old == "0":  # br_netfilter not loaded, or already off
            continue
        rec.add({"kind": "sysctl", "netns": netns, "key": key, "old": old})
        _sysctl_set(netns, key, "0")


def _add_bridge(netns: str, name: str) -> None:
    # No STP, ports forward at once.  MAC learning stays on (default), so a
    # RARP/GARP from a migrated VM moves its fdb entry.  Multicast snooping
    # is off: otherwise MLD state (e.g. a VM's IPv6 solicited-node group)
    # would keep pointing at the old port after a migration.
    _ip(netns, "link", "add", "name", name, "type", "bridge",
        "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")
    _ip(netns, "link", "set", "dev", name, "addrgenmode", "none")  # no IP at all, not even IPv6 LL


def _veth_to_switch(netns: str, ifname: str, sw: str, peer: str, bridge: str) -> None:
    """veth *ifname* in *netns* <-> *peer* in switch ns *sw*, enslaved to *bridge*."""
    _ip(netns, "link", "add", "name", ifname, "type", "veth", "peer", "name", peer, "netns", sw)
    _ip(sw, "link", "set", "dev", peer, "addrgenmode", "none")  # switch ports carry no addresses
    _ip(sw, "link", "set", "dev", peer, "master", bridge)
    _ip(sw, "link", "set", "dev", peer, "up")


def _build(rec: _Record, lab: LabNet) -> None:
    sw = lab.switch_netns

    # the "physical switch"
    _add_netns(rec, sw)
    _disable_bridge_nf(rec, sw)
    for br in SWITCH_BRIDGES:
        _add_bridge(sw, br)
        _ip(sw, "link", "set", "dev", br, "up")

    # the client on the VM network
    cl = lab.client_netns
    _add_netns(rec, cl)
    _veth_to_switch(cl, "eth0", sw, "cl-vm", "br-vm")
    _ip(cl, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
    _ip(cl, "link", "set", "dev", "eth0", "up")

    # the controller's leg in the root namespace
    rv = lab.root_veth
    obj = {"kind": "link", "netns": None, "name": rv}
    rec.add(obj)
    cp = _ip(None, "link", "add", "name", rv, "type", "veth", "peer", "name", "root-mgmt", "netns", sw, check=False)
    if cp.returncode != 0:
        if "exist" in cp.stderr.lower():
            rec.discard(obj)
        raise LabError(f"cannot create root veth {rv}: {cp.stderr.strip()}")
    _ip(sw, "link", "set", "dev", "root-mgmt", "addrgenmode", "none")
    _ip(sw, "link", "set", "dev", "root-mgmt", "master", "br-mgmt")
    _ip(sw, "link", "set", "dev", "root-mgmt", "up")
    _ip(None, "addr", "add", f"{lab.controller_ip}/{MGMT_PREFIXLEN}", "dev", rv)
    cp = _ip(None, "-6", "addr", "add", f"{lab.controller_ip6}/{MGMT6_PREFIXLEN}", "dev", rv, "nodad", check=False)
    if cp.returncode != 0:
        if any(h.mgmt_ip6 for h in lab.hosts):
            raise LabError(f"cannot add {lab.controller_ip6} to {rv} (is IPv6 disabled?): {cp.stderr.strip()}")
        log.warning("no IPv6 on %s: %s", rv, cp.stderr.strip())
    _ip(None, "link", "set", "dev", rv, "up")

    for i, h in enumerate(lab.hosts, start=1):
        ns = h.netns
        _add_netns(rec, ns)
        _disable_bridge_nf(rec, ns)

        # management
        _veth_to_switch(ns, "mgmt0", sw, f"h{i}-mgmt", "br-mgmt")
        if h.mgmt_ip6:
            _ip(ns, "-6", "addr", "add", f"{h.mgmt_ip6}/{MGMT6_PREFIXLEN}", "dev", "mgmt0", "nodad")
        else:
            _ip(ns, "addr", "add", f"{h.mgmt_ip}/{MGMT_PREFIXLEN}", "dev", "mgmt0")
        _ip(ns, "link", "set", "dev", "mgmt0", "up")

        # VM network: bridge vmnet, uplinked to br-vm
        _add_bridge(ns, VM_BRIDGE)
        _ip(ns, "link", "set", "dev", VM_BRIDGE, "alias", VM_BRIDGE_ALIAS)
        _ip(ns, "link", "set", "dev", VM_BRIDGE, "up")
        _veth_to_switch(ns, "uplink0", sw, f"h{i}-vm", "br-vm")
        _ip(ns, "link", "set", "dev", "uplink0", "addrgenmode", "none")
        _ip(ns, "link", "set", "dev", "uplink0", "master", VM_BRIDGE)
        _ip(ns, "link", "set", "dev", "uplink0", "up")

        # migration network
        _veth_to_switch(ns, "mig0", sw, f"h{i}-mig", "br-mig")
        _ip(ns, "link", "set", "dev", "mig0", "alias", MIG_ALIAS)
        _ip(ns, "addr", "add", f"{h.mig_ip}/{MIG_PREFIXLEN}", "dev", "mig0")
        _ip(ns, "link", "set", "dev", "mig0", "up")


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
    rec = _Record.create(
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
    rec = _Record.load(Path(state_file))
    if rec is None:
        return None
    if not rec.data.get("complete"):
        raise LabError(f"lab in {state_file} is only half up (lab_up did not finish); run `kvmotion lab down` and retry")
    try:
        return _lab_from_dict(rec.data["lab"])
    except (KeyError, TypeError) as e:
        raise LabError(f"state file {state_file} has no usable lab description ({e}); run `kvmotion lab down`") from e


# --------------------------------------------------------------------------
# lab_down


def _kill_netns_processes(netns: str) -> list[int]:
    """SIGTERM the processes in *netns*, wait up to KILL_GRACE, then SIGKILL (by PID)."""
    me = os.getpid()
    pids = [p for p in netns_pids(netns) if p != me]
    if not pids:
        return []
    log.info("netns %s: terminating pids %s", netns, pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + KILL_GRACE
    remaining = set(pids)
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        # Only PIDs still *in this netns* count (a zombie has left it; a reused
        # PID is elsewhere), so we never signal an unrelated process.
        remaining &= set(netns_pids(netns))
    for pid in sorted(remaining):
        log.warning("netns %s: pid %d ignored SIGTERM; sending SIGKILL", netns, pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if remaining:
        deadline = time.monotonic() + 2.0
        while remaining and time.monotonic() < deadline:
            time.sleep(0.05)
            remaining &= set(netns_pids(netns))
    return pids


def _remove(obj: dict[str, Any], own_netns: set[str]) -> str | None:
    """Remove one recorded object; return a description if it existed."""
    kind = obj.get("kind")
    if kind == "netns":
        name = obj["name"]
        if not netns_exists(name):
            return None
        killed = _kill_netns_processes(name)
        cp = _ip(None, "netns", "del", name, check=False)
        if cp.returncode != 0 and netns_exists(name):
            raise LabError(f"cannot delete netns {name}: {cp.stderr.strip()}")
        return f"netns {name}" + (f" (killed pids {killed})" if killed else "")
    if kind == "link":
        name, ns = obj["name"], obj.get("netns")
        if ns is not None:
            if ns in own_netns:
                return None  # goes away with its namespace
            if not netns_exists(ns):
                return None
            cp = _ip(ns, "link", "del", "dev", name, check=False)
        else:
            if not _root_link_exists(name):
                return None
            cp = _ip(None, "link", "del", "dev", name, check=False)
        if cp.returncode != 0:
            if "cannot find" in cp.stderr.lower() or "does not exist" in cp.stderr.lower():
                return None
            raise LabError(f"cannot delete link {name}: {cp.stderr.strip()}")
        return f"link {name}" + (f" (netns {ns})" if ns else "")
    if kind == "sysctl":
        ns, key, old = obj.get("netns"), obj["key"], str(obj["old"])
        if ns is not None and (ns in own_netns or not netns_exists(ns)):
            return None  # per-netns setting disappears with the namespace
        cur = _sysctl_get(ns, key)
        if cur is None or cur == old:
            return None
        _sysctl_set(ns, key, old)
        return f"sysctl {key}={old}" + (f" (netns {ns})" if ns else "")
    raise LabError(f"unknown object in lab record: {obj!r}; remove it by hand")


def lab_down(state_file: Path) -> list[str]:
    """Remove exactly what *state_file* records, newest first; idempotent.

    Returns descriptions of what was actually removed/restored.  The state
    file is deleted when everything is gone; if something could not be
    removed the record keeps just those objects and LabError is raised.
    """
    state_file = Path(state_file)
    rec = _Record.load(state_file)
    if rec is None:
        return []
    own_netns = {o["name"] for o in rec.objects if o.get("kind") == "netns"}
    removed: list[str] = []
    failed: list[dict[str, Any]] = []
    errors: list[str] = []
    for obj in reversed(list(rec.objects)):
        try:
            what = _remove(obj, own_netns)
        except LabError as e:
            failed.append(obj)
            errors.append(str(e))
            continue
        if what:
            removed.append(what)
            log.info("removed %s", what)
    if failed:
        rec.data["objects"] = list(reversed(failed))
        rec.data["complete"] = False
        rec.save()
        raise LabError("lab_down could not remove everything: " + "; ".join(errors) + f" (record kept in {state_file})")
    try:
        state_file.unlink()
    except FileNotFoundError:
        pass
    state_file.with_name(state_file.name + ".tmp").unlink(missing_ok=True)
    return removed

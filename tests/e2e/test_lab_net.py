"""Real network-namespace tests for kvmotion_lab.net and kvmotion_lab.probe.

Needs root and iproute2; every lab gets a unique prefix and is always torn
down with lab_down, even when a test fails.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import string
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvmotion_lab import net
from kvmotion_lab.net import lab_up, load_lab
from kvmotion_lab.netdown import lab_down
from kvmotion_lab.netns import LabError, link_speed_mbps, netns_exec_argv, netns_pids
from kvmotion_lab.probe import ClientProbe
from labtools import record_figure, wait_for

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]


def _prefix() -> str:
    return "kvt" + "".join(random.choices(string.ascii_lowercase + string.digits, k=3))


def _run(argv: list[str], timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _ns_run(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return _run(netns_exec_argv(ns, list(argv)))


def _ping(ns: str | None, ip: str) -> bool:
    argv = ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", ip]
    cp = _run(netns_exec_argv(ns, argv) if ns else argv)
    return cp.returncode == 0


def _namespaces(prefix: str) -> list[str]:
    return [n for n in net.list_netns() if n.startswith(prefix + "-")]


def _assert_gone(prefix: str, state_file: Path) -> None:
    assert _namespaces(prefix) == []
    assert not Path(f"/sys/class/net/{prefix}-mgmt").exists()
    assert not state_file.exists()


def _slot_addresses(slot: int) -> list[tuple[str, str]]:
    """(ifname, address) in the root namespace that belong to a lab slot's management subnets."""
    import ipaddress
    v4, v6 = net.slot_networks(slot)
    return [(i, a) for i, a in net._root_lab_addresses() if ipaddress.ip_address(a) in v4 or ipaddress.ip_address(a) in v6]


@pytest.fixture(scope="class")
def lab(tmp_path_factory):
    prefix = _prefix()
    state_file = tmp_path_factory.mktemp("lab") / "lab.json"
    try:
        labnet = lab_up(prefix, 3, state_file, ipv6_hosts={"h3"})
        yield labnet, state_file
    finally:
        lab_down(state_file)
        _assert_gone(prefix, state_file)


class TestLab:
    def test_layout(self, lab):
        labnet, state_file = lab
        p = labnet.prefix
        assert labnet.switch_netns == f"{p}-sw"
        assert labnet.client_netns == f"{p}-cl"
        v4, v6 = net.mgmt_v4_base(labnet.slot), net.mgmt_v6_base(labnet.slot)
        assert 0 <= labnet.slot < net.MAX_SLOTS
        assert labnet.controller_ip == f"{v4}.1" and labnet.controller_ip6 == f"{v6}1"
        assert labnet.vm_subnet == "198.18.1.0/24"
        assert [h.name for h in labnet.hosts] == ["h1", "h2", "h3"]
        h1, h2, h3 = labnet.hosts
        assert (h1.netns, h1.mgmt_ip, h1.mgmt_ip6, h1.mig_ip, h1.vm_bridge) == (
            f"{p}-h1", f"{v4}.11", None, "198.19.0.11", "vmnet")
        assert h2.mgmt_ip == f"{v4}.12"
        assert (h3.mgmt_ip, h3.mgmt_ip6, h3.mig_ip) == ("", f"{v6}13", "198.19.0.13")
        # the root namespace's leg carries exactly this slot's controller addresses
        assert sorted(a for i, a in _slot_addresses(labnet.slot) if i == f"{p}-mgmt") == sorted(
            [labnet.controller_ip, labnet.controller_ip6])
        assert set(_namespaces(p)) == {f"{p}-sw", f"{p}-cl", f"{p}-h1", f"{p}-h2", f"{p}-h3"}
        assert Path(f"/sys/class/net/{p}-mgmt").exists()
        assert load_lab(state_file) == labnet

    def test_switch_bridges(self, lab):
        labnet, _ = lab
        cp = _run(["ip", "-n", labnet.switch_netns, "-j", "-d", "link", "show", "type", "bridge"])
        bridges = {b["ifname"]: b for b in json.loads(cp.stdout)}
        assert set(bridges) == {"br-mgmt", "br-vm", "br-mig"}
        for b in bridges.values():
            info = b["linkinfo"]["info_data"]
            assert info["stp_state"] == 0
            assert info["forward_delay"] == 0
        cp = _run(["ip", "-n", labnet.switch_netns, "-j", "link", "show", "master", "br-vm"])
        ports = {x["ifname"] for x in json.loads(cp.stdout)}
        assert ports == {"cl-vm", "h1-vm", "h2-vm", "h3-vm"}
        cp = _run(["ip", "-n", labnet.switch_netns, "-j", "link", "show", "master", "br-mgmt"])
        assert {x["ifname"] for x in json.loads(cp.stdout)} == {"root-mgmt", "h1-mgmt", "h2-mgmt", "h3-mgmt"}

    def test_host_interfaces(self, lab):
        labnet, _ = lab
        h1 = labnet.hosts[0]
        cp = _run(["ip", "-n", h1.netns, "-j", "-d", "link", "show", "dev", "vmnet"])
        vmnet = json.loads(cp.stdout)[0]
        assert vmnet["ifalias"] == "VM Network"
        assert vmnet["linkinfo"]["info_kind"] == "bridge"
        cp = _run(["ip", "-n", h1.netns, "-j", "addr", "show", "dev", "vmnet"])
        assert json.loads(cp.stdout)[0]["addr_info"] == []  # no IP on the VM bridge
        cp = _run(["ip", "-n", h1.netns, "-j", "link", "show", "master", "vmnet"])
        assert [x["ifname"] for x in json.loads(cp.stdout)] == ["uplink0"]
        cp = _run(["ip", "-n", h1.netns, "-j", "link", "show", "dev", "mig0"])
        assert json.loads(cp.stdout)[0]["ifalias"] == "migration"
        cp = _run(["ip", "-n", labnet.client_netns, "-j", "addr", "show", "dev", "eth0"])
        addrs = [(a["local"], a["prefixlen"]) for a in json.loads(cp.stdout)[0]["addr_info"] if a["family"] == "inet"]
        assert addrs == [("198.18.1.2", 24)]
        assert link_speed_mbps(h1.netns, "mig0") == 10000
        assert link_speed_mbps(h1.netns, "nonexistent0") is None

    def test_connectivity_v4(self, lab):
        labnet, _ = lab
        h1, h2, _h3 = labnet.hosts
        assert _ping(h1.netns, "198.19.0.12"), "h1 -> h2 over mig0"
        assert _ping(h2.netns, "198.19.0.11"), "h2 -> h1 over mig0"
        assert _ping(h1.netns, labnet.controller_ip), "h1 mgmt -> root veth (controller)"
        assert _ping(None, h2.mgmt_ip), "root (controller) -> h2 mgmt"
        assert _ping(h1.netns, h2.mgmt_ip), "h1 -> h2 over mgmt"

    def test_connectivity_v6_host(self, lab):
        labnet, _ = lab
        h3 = labnet.host("h3")
        cp = _run(["ip", "-n", h3.netns, "-j", "addr", "show", "dev", "mgmt0"])
        info = json.loads(cp.stdout)[0]["addr_info"]
        assert not [a for a in info if a["family"] == "inet"]  # IPv6-only management
        assert (h3.mgmt_ip6, 64) in [(a["local"], a["prefixlen"]) for a in info if a["family"] == "inet6"]
        assert _ping(h3.netns, labnet.controller_ip6), "h3 mgmt -> root veth over IPv6"
        assert _ping(None, h3.mgmt_ip6), "root -> h3 over IPv6"
        assert _ping(h3.netns, "198.19.0.11"), "h3 migration network is IPv4"

    def test_lab_up_twice_refuses(self, lab, tmp_path):
        labnet, state_file = lab
        with pytest.raises(LabError, match="already up"):
            lab_up(labnet.prefix, 2, state_file)
        # a different state file but the same prefix: the namespaces exist
        with pytest.raises(LabError, match="already exist"):
            lab_up(labnet.prefix, 2, tmp_path / "other.json")
        assert not (tmp_path / "other.json").exists()
        # a different prefix in the same slot: the slot's addresses are taken (preflight refuses, makes nothing)
        other = _prefix()
        with pytest.raises(LabError, match=f"slot {labnet.slot}'s addresses are already in use"):
            lab_up(other, 1, tmp_path / "third.json", slot=labnet.slot)
        assert not (tmp_path / "third.json").exists() and _namespaces(other) == []
        assert not Path(f"/sys/class/net/{other}-mgmt").exists()
        with pytest.raises(LabError, match="slot must be"):
            lab_up(other, 1, tmp_path / "fourth.json", slot=net.MAX_SLOTS)
        assert load_lab(state_file) == labnet  # the running lab is untouched

    def test_client_probe(self, lab, tmp_path):
        labnet, _ = lab
        ns = labnet.hosts[0].netns
        server = _standin_target(ns)
        try:
            out = tmp_path / "probe.jsonl"
            probe = ClientProbe(labnet.client_netns, "198.18.1.50", "http://198.18.1.50:8080/", interval_ms=10, out=out)
            with probe:
                assert probe.pid in netns_pids(labnet.client_netns)
                # the target answers pings and HTTP (however long the machine takes to show it)
                base = wait_for(lambda: (r := probe.snapshot()).received >= 20 and r.heartbeats and r, 30,
                                "answered pings and a heartbeat before the outage")
                record_figure("probe: pings lost before the outage", base.lost, "pings")
                # the outage lasts until the probe has seen it: at least one ping lost while the link is down
                subprocess.run(["ip", "-n", ns, "link", "set", "dev", "tgt0", "down"], check=True, timeout=10)
                try:
                    wait_for(lambda: probe.snapshot().lost > base.lost, 30, "a ping lost while the target is down")
                finally:
                    subprocess.run(["ip", "-n", ns, "link", "set", "dev", "tgt0", "up"], check=True, timeout=10)
                up_at = time.time()
                # and it ends: pings are answered again and HTTP heartbeats resume
                received_at_up = probe.snapshot().received
                wait_for(lambda: probe.snapshot().received >= received_at_up + 20, 30, "pings answered after the outage")
                wait_for(lambda: any(h["t"] >= up_at for h in probe.snapshot().heartbeats), 30,
                         "a heartbeat after the outage")
                report = probe.stop()
            _check_probe_report(report, base.lost, received_at_up)
            assert probe.proc.poll() is not None  # stopped
        finally:
            server.terminate()
            server.wait(timeout=10)


STANDIN_SERVER = textwrap.dedent(
    """
    import http.server, json, itertools
    seq = itertools.count()
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"seq": next(seq), "boot_id": "boot-1"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.ThreadingHTTPServer(("198.18.1.50", 8080), H).serve_forever()
    """
)


def _standin_target(ns: str) -> subprocess.Popen:
    """A stand-in "VM": 198.18.1.50 on a veth whose peer is a port of the host's vmnet, serving heartbeats."""
    for args in (
        ["link", "add", "name", "tgt0", "type", "veth", "peer", "name", "tgt0p"],
        ["link", "set", "dev", "tgt0p", "master", "vmnet"],
        ["link", "set", "dev", "tgt0p", "up"],
        ["addr", "add", "198.18.1.50/24", "dev", "tgt0"],
        ["link", "set", "dev", "tgt0", "up"],
    ):
        subprocess.run(["ip", "-n", ns, *args], check=True, timeout=10)
    server = subprocess.Popen(netns_exec_argv(ns, [sys.executable, "-c", STANDIN_SERVER]))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "198.18.1.50:8080" in _run(["ip", "netns", "exec", ns, "ss", "-ltnH"]).stdout:
            break
        time.sleep(0.05)
    return server


def _check_probe_report(report, lost_before: int, received_at_up: int) -> None:
    assert report.complete
    assert report.sent == report.received + report.lost
    assert report.received >= received_at_up + 20 and report.lost > lost_before
    assert report.outages, "the outage is reported"
    assert sum(o["lost"] for o in report.outages) == report.lost
    assert math.isfinite(report.max_gap_ms) and report.max_gap_ms > 0
    assert report.max_gap_ms == max(o["gap_ms"] for o in report.outages)
    assert report.heartbeats, "HTTP heartbeats seen"
    assert all("t" in h for h in report.heartbeats)
    assert report.boot_ids() == {"boot-1"}
    assert report.seq_monotonic()
    for name, value, unit in (("probe: pings lost", report.lost, "pings"),
                              ("probe: outages", len(report.outages), "outages"),
                              ("probe: longest ping gap", report.max_gap_ms, "ms"),
                              ("probe: HTTP errors", report.http_errors, "requests")):
        record_figure(name, value, unit)


def test_two_labs_side_by_side(tmp_path):
    """Two labs up at once: each in its own slot (management subnet), both reachable, both torn down cleanly;
    a third asking for a slot in use is refused before it makes anything."""
    prefixes = [_prefix(), _prefix()]
    while prefixes[1] == prefixes[0]:
        prefixes[1] = _prefix()
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    try:
        a = lab_up(prefixes[0], 2, files[0])
        b = lab_up(prefixes[1], 2, files[1], ipv6_hosts={"h2"})
        assert a.slot != b.slot
        for labnet in (a, b):
            v4, v6 = net.mgmt_v4_base(labnet.slot), net.mgmt_v6_base(labnet.slot)
            assert labnet.controller_ip == f"{v4}.1" and labnet.controller_ip6 == f"{v6}1"
            assert sorted(addr for _, addr in _slot_addresses(labnet.slot)) == sorted(
                [labnet.controller_ip, labnet.controller_ip6])
        assert a.controller_ip != b.controller_ip and a.controller_ip6 != b.controller_ip6
        # both reachable from the root namespace (the controller's side), and each host reaches its controller
        for labnet in (a, b):
            h1, h2 = labnet.hosts
            assert _ping(None, h1.mgmt_ip), f"root -> {labnet.prefix} h1"
            assert _ping(h1.netns, labnet.controller_ip), f"{labnet.prefix} h1 -> its controller"
            assert _ping(h1.netns, "198.19.0.12"), f"{labnet.prefix} h1 -> h2 over mig0"
        assert _ping(None, b.host("h2").mgmt_ip6), "root -> the second lab's IPv6 host"
        assert _ping(b.host("h2").netns, b.controller_ip6), "the second lab's IPv6 host -> its controller"
        # a third lab may not take a slot in use
        third = _prefix()
        with pytest.raises(LabError, match="already in use"):
            lab_up(third, 1, tmp_path / "c.json", slot=b.slot)
        assert _namespaces(third) == [] and not (tmp_path / "c.json").exists()
        # tearing one down leaves the other intact and reachable
        lab_down(files[0])
        _assert_gone(prefixes[0], files[0])
        assert _slot_addresses(a.slot) == []
        assert load_lab(files[1]) == b
        assert _ping(None, b.hosts[0].mgmt_ip), "the second lab survives the first one's teardown"
        lab_down(files[1])
        _assert_gone(prefixes[1], files[1])
        assert _slot_addresses(b.slot) == []
    finally:
        for f in files:
            lab_down(f)
    for prefix, f in zip(prefixes, files):
        _assert_gone(prefix, f)


def test_lab_down_kills_processes_and_is_idempotent(tmp_path):
    prefix = _prefix()
    state_file = tmp_path / "lab.json"
    sleeper = None
    try:
        labnet = lab_up(prefix, 2, state_file)
        sleeper = subprocess.Popen(netns_exec_argv(labnet.hosts[1].netns, ["sleep", "300"]))
        deadline = time.monotonic() + 5
        while sleeper.pid not in netns_pids(labnet.hosts[1].netns) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sleeper.pid in netns_pids(labnet.hosts[1].netns)
        removed = lab_down(state_file)
        assert removed[0].startswith(f"netns {prefix}-h2") and str(sleeper.pid) in removed[0]
        assert [r.split(" (")[0] for r in removed] == [
            f"netns {prefix}-h2", f"netns {prefix}-h1", f"link {prefix}-mgmt", f"netns {prefix}-cl", f"netns {prefix}-sw"]
        assert sleeper.wait(timeout=5) is not None
        _assert_gone(prefix, state_file)
        assert lab_down(state_file) == []
        assert load_lab(state_file) is None
        assert netns_pids(f"{prefix}-h1") == []
    finally:
        lab_down(state_file)
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    _assert_gone(prefix, state_file)


def test_failed_lab_up_cleans_up(tmp_path, monkeypatch):
    prefix = _prefix()
    state_file = tmp_path / "lab.json"
    real_ip = net.ip_cmd

    def failing_ip(netns, *args, **kw):
        if netns == f"{prefix}-h2" and "mig0" in args and "addr" in args:
            raise LabError("injected failure")
        return real_ip(netns, *args, **kw)

    monkeypatch.setattr(net, "ip_cmd", failing_ip)
    try:
        with pytest.raises(LabError, match="injected failure"):
            lab_up(prefix, 2, state_file)
        _assert_gone(prefix, state_file)
    finally:
        lab_down(state_file)


def test_crash_leaves_record_that_lab_down_cleans(tmp_path, monkeypatch):
    """Simulate a crash mid lab_up (no automatic cleanup): the record suffices."""
    prefix = _prefix()
    state_file = tmp_path / "lab.json"
    real_ip = net.ip_cmd

    def failing_ip(netns, *args, **kw):
        if netns == f"{prefix}-h1" and "uplink0" in args:
            raise LabError("crash")
        return real_ip(netns, *args, **kw)

    monkeypatch.setattr(net, "ip_cmd", failing_ip)
    monkeypatch.setattr(net, "lab_down", lambda sf: [])  # the "crash": no cleanup in lab_up
    try:
        with pytest.raises(LabError, match="crash"):
            lab_up(prefix, 2, state_file)
        monkeypatch.undo()
        assert state_file.exists()
        assert set(_namespaces(prefix)) == {f"{prefix}-sw", f"{prefix}-cl", f"{prefix}-h1"}
        with pytest.raises(LabError, match="half up"):
            load_lab(state_file)
        with pytest.raises(LabError, match="already up"):
            lab_up(prefix, 2, state_file)
        removed = lab_down(state_file)
        assert removed == [f"netns {prefix}-h1", f"link {prefix}-mgmt", f"netns {prefix}-cl", f"netns {prefix}-sw"]
        _assert_gone(prefix, state_file)
        assert lab_down(state_file) == []
    finally:
        monkeypatch.undo()
        lab_down(state_file)
    _assert_gone(prefix, state_file)


def test_refuses_unrecorded_namespace_and_bad_input(tmp_path):
    prefix = _prefix()
    with pytest.raises(LabError, match="invalid lab prefix"):
        lab_up("Bad_Prefix", 1, tmp_path / "x.json")
    with pytest.raises(LabError, match="unknown hosts"):
        lab_up(prefix, 1, tmp_path / "x.json", ipv6_hosts={"h5"})
    assert not (tmp_path / "x.json").exists()
    # a namespace with our prefix that the lab did not make: refuse, and leave it alone
    foreign = f"{prefix}-h1"
    subprocess.run(["ip", "netns", "add", foreign], check=True, timeout=10)
    try:
        with pytest.raises(LabError, match="already exist"):
            lab_up(prefix, 1, tmp_path / "x.json")
        assert foreign in net.list_netns()
        assert not (tmp_path / "x.json").exists()
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=False, timeout=10)

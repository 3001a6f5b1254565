"""Real network-namespace tests for kvmotion.lab.net and kvmotion.lab.probe.

Needs root and iproute2; every lab gets a unique prefix and is always torn
down with lab_down, even when a test fails.
"""

from __future__ import annotations

import json
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

from kvmotion.lab import net
from kvmotion.lab.net import LabError, lab_down, lab_up, link_speed_mbps, load_lab, netns_exec_argv, netns_pids
from kvmotion.lab.probe import ClientProbe

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]


def _prefix() -> str:
    return "kvt" + "".join(random.choices(string.ascii_lowercase + string.digits, k=3))


def _skip_if_other_lab() -> None:
    used = net._root_lab_addresses()
    if used:
        pytest.skip(f"another lab is up in the root namespace ({used}); cannot run a second one")


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


@pytest.fixture(scope="class")
def lab(tmp_path_factory):
    _skip_if_other_lab()
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
        assert labnet.controller_ip == "198.18.0.1"
        assert labnet.vm_subnet == "198.18.1.0/24"
        assert [h.name for h in labnet.hosts] == ["h1", "h2", "h3"]
        h1, h2, h3 = labnet.hosts
        assert (h1.netns, h1.mgmt_ip, h1.mgmt_ip6, h1.mig_ip, h1.vm_bridge) == (
            f"{p}-h1", "198.18.0.11", None, "198.19.0.11", "vmnet")
        assert (h3.mgmt_ip, h3.mgmt_ip6, h3.mig_ip) == ("", "2001:2::13", "198.19.0.13")
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
        assert _ping(h1.netns, "198.18.0.1"), "h1 mgmt -> root veth (controller)"
        assert _ping(None, "198.18.0.12"), "root (controller) -> h2 mgmt"
        assert _ping(h1.netns, "198.18.0.12"), "h1 -> h2 over mgmt"

    def test_connectivity_v6_host(self, lab):
        labnet, _ = lab
        h3 = labnet.host("h3")
        cp = _run(["ip", "-n", h3.netns, "-j", "addr", "show", "dev", "mgmt0"])
        info = json.loads(cp.stdout)[0]["addr_info"]
        assert not [a for a in info if a["family"] == "inet"]  # IPv6-only management
        assert ("2001:2::13", 64) in [(a["local"], a["prefixlen"]) for a in info if a["family"] == "inet6"]
        assert _ping(h3.netns, "2001:2::1"), "h3 mgmt -> root veth over IPv6"
        assert _ping(None, "2001:2::13"), "root -> h3 over IPv6"
        assert _ping(h3.netns, "198.19.0.11"), "h3 migration network is IPv4"

    def test_lab_up_twice_refuses(self, lab, tmp_path):
        labnet, state_file = lab
        with pytest.raises(LabError, match="already up"):
            lab_up(labnet.prefix, 2, state_file)
        # a different state file but the same prefix: the namespaces exist
        with pytest.raises(LabError, match="already exist"):
            lab_up(labnet.prefix, 2, tmp_path / "other.json")
        assert not (tmp_path / "other.json").exists()
        # a different prefix: the lab addresses are taken
        with pytest.raises(LabError, match="already in use"):
            lab_up(_prefix(), 1, tmp_path / "third.json")
        assert load_lab(state_file) == labnet  # the running lab is untouched

    def test_client_probe(self, lab, tmp_path):
        labnet, _ = lab
        ns = labnet.hosts[0].netns
        # a stand-in "VM": 198.18.1.50 on a veth whose peer is a port of h1's vmnet
        for args in (
            ["link", "add", "name", "tgt0", "type", "veth", "peer", "name", "tgt0p"],
            ["link", "set", "dev", "tgt0p", "master", "vmnet"],
            ["link", "set", "dev", "tgt0p", "up"],
            ["addr", "add", "198.18.1.50/24", "dev", "tgt0"],
            ["link", "set", "dev", "tgt0", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *args], check=True, timeout=10)
        server_code = textwrap.dedent(
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
        server = subprocess.Popen(netns_exec_argv(ns, [sys.executable, "-c", server_code]))
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if "198.18.1.50:8080" in _run(["ip", "netns", "exec", ns, "ss", "-ltnH"]).stdout:
                    break
                time.sleep(0.05)
            out = tmp_path / "probe.jsonl"
            probe = ClientProbe(labnet.client_netns, "198.18.1.50", "http://198.18.1.50:8080/", interval_ms=10, out=out)
            with probe:
                assert probe.pid in netns_pids(labnet.client_netns)
                time.sleep(1.5)
                base = probe.snapshot()
                assert base.lost == 0, base
                assert base.received > 50, base
                subprocess.run(["ip", "-n", ns, "link", "set", "dev", "tgt0", "down"], check=True, timeout=10)
                time.sleep(0.3)
                subprocess.run(["ip", "-n", ns, "link", "set", "dev", "tgt0", "up"], check=True, timeout=10)
                time.sleep(1.0)
                report = probe.stop()
            assert report.complete
            assert report.sent == report.received + report.lost
            assert report.received > 150
            assert report.lost > 0
            assert 0 < report.max_gap_ms < 2000
            assert len(report.outages) == 1
            assert report.heartbeats, "HTTP heartbeats seen"
            assert all("t" in h for h in report.heartbeats)
            assert report.boot_ids() == {"boot-1"}
            assert report.seq_monotonic()
            assert report.http_errors <= 3  # a request may hit the short outage
            assert probe.proc.poll() is not None  # stopped
        finally:
            server.terminate()
            server.wait(timeout=10)


def test_lab_down_kills_processes_and_is_idempotent(tmp_path):
    _skip_if_other_lab()
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
    _skip_if_other_lab()
    prefix = _prefix()
    state_file = tmp_path / "lab.json"
    real_ip = net._ip

    def failing_ip(netns, *args, **kw):
        if netns == f"{prefix}-h2" and "mig0" in args and "addr" in args:
            raise LabError("injected failure")
        return real_ip(netns, *args, **kw)

    monkeypatch.setattr(net, "_ip", failing_ip)
    try:
        with pytest.raises(LabError, match="injected failure"):
            lab_up(prefix, 2, state_file)
        _assert_gone(prefix, state_file)
    finally:
        lab_down(state_file)


def test_crash_leaves_record_that_lab_down_cleans(tmp_path, monkeypatch):
    """Simulate a crash mid lab_up (no automatic cleanup): the record suffices."""
    _skip_if_other_lab()
    prefix = _prefix()
    state_file = tmp_path / "lab.json"
    real_ip = net._ip

    def failing_ip(netns, *args, **kw):
        if netns == f"{prefix}-h1" and "uplink0" in args:
            raise LabError("crash")
        return real_ip(netns, *args, **kw)

    monkeypatch.setattr(net, "_ip", failing_ip)
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
        net.lab_down(state_file)
    _assert_gone(prefix, state_file)


def test_refuses_unrecorded_namespace_and_bad_input(tmp_path):
    _skip_if_other_lab()
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

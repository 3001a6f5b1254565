"""The lab with two controllers (`kvmotion lab up --controllers 2`), what can be checked without a lab: which
controller each host belongs to, controller B's files and argv as kvmotion-server reads them, a B host's agent
configuration as the real `kvmotion-agent init` writes it, what lab.json records and what load, status and down
make of it. No namespaces, no QEMU, no root."""
from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from kvmotion.agent.config import AgentConfig
from kvmotion.cli.config import load_config, write_config
from kvmotion.controller import main as controller_main
from kvmotion.controller.config import DB_ENV, ControllerConfig
from kvmotion_lab import lab, net, procs, services, sites
from kvmotion_lab.netns import LabError

IP = "198.18.0.1"


def test_hosts_split_evenly_first_half_to_a():
    assert sites.split_hosts(["h1", "h2", "h3", "h4"], 2) == {"h1": "a", "h2": "a", "h3": "b", "h4": "b"}
    assert sites.split_hosts(["h1", "h2", "h3"], 1) == {"h1": "a", "h2": "a", "h3": "a"}
    with pytest.raises(LabError, match="do not split evenly"):
        sites.split_hosts(["h1", "h2", "h3"], 2)


@pytest.mark.parametrize("count", [0, 3])
def test_a_lab_has_one_or_two_controllers(count, tmp_path):
    with pytest.raises(LabError, match="--controllers 2"):
        sites.plan(tmp_path, IP, count)
    with pytest.raises(LabError, match="1 or 2 controllers"):
        lab.up(2, tmp_path / "lab", controllers=count)
    assert not (tmp_path / "lab").exists()         # refused before anything is made


def test_b_shares_as_address_on_its_own_port_with_its_own_folder(tmp_path):
    a, b = sites.plan(tmp_path, IP, 2)
    assert (a.name, a.url, a.root, a.process, a.member) == ("a", f"https://{IP}:8760", tmp_path, "controller", "ctl-a")
    assert (b.name, b.url, b.root, b.process, b.member) == ("b", f"https://{IP}:8761", tmp_path / "controllers" / "b",
                                                            "controller-b", "ctl-b")
    assert b.log == tmp_path / "controllers" / "b" / "logs" / "controller.log"
    assert [s.name for s in sites.plan(tmp_path, IP, 1)] == ["a"]
    assert lab.site_cli_config(tmp_path, b) == b.root / "cli.json"
    assert lab.site_cli_config(tmp_path, a) == lab.cli_config_path(tmp_path) == tmp_path / "cli.json"


def test_bs_controller_toml_is_what_kvmotion_server_runs_with(tmp_path, monkeypatch):
    """B's settings read back by kvmotion-server's own parser from the argv the lab starts it with: its own port,
    database, CA and admin token in ROOT/controllers/b, and VM addresses A never leases."""
    monkeypatch.delenv(DB_ENV, raising=False)
    b = sites.plan(tmp_path, IP, 2)[1]
    b.root.mkdir(parents=True)
    path = services.controller_config_path(b.root)
    services.write_controller_config(path, sites.controller_settings(b.root, IP, True, b.name))
    argv = services.service_argv(services.CONTROLLER_SCRIPT, path)
    assert argv == [sys.executable, "-m", "kvmotion.controller.main", "--config", str(b.root / "controller.toml")]
    args = vars(controller_main.build_parser().parse_args(argv[3:]))
    cfg = ControllerConfig.resolve(args.pop("config"), args)
    assert (cfg.listen_host, cfg.listen_port) == (IP, 8761)
    assert cfg.sqlite_file == b.root / "controller.db" and cfg.pki == b.root / "pki" and cfg.tokens == b.root
    assert b.admin_token_path.parent == cfg.tokens and b.ca_path.parent == cfg.pki
    pools = [ipaddress.ip_interface(p.split("-")[1]) for p in sites.VM_IP_POOLS.values()]
    first = [ipaddress.ip_address(p.split("-")[0]) for p in sites.VM_IP_POOLS.values()]
    assert cfg.vm_ip_pool == sites.VM_IP_POOLS["b"] and all(i.network == ipaddress.ip_network(net.VM_SUBNET)
                                                             for i in pools)
    assert pools[0].ip < first[1]                 # A's last address comes before B's first


def test_a_b_host_is_initialised_for_controller_b(tmp_path):
    """`kvmotion-agent init` for h3 of a 2 × 2 lab: B's URL and CA, the lab's shared datastore (one marker for all
    hosts) and its own local one."""
    a, b = sites.plan(tmp_path, IP, 2)
    h3 = net._plan("kvut", 4, []).hosts[2]
    services.make_datastore(tmp_path / "ds" / "shared", "shared", shared=True)
    services.make_datastore(tmp_path / "ds" / "h3-local", "h3-local", shared=False)
    enrol = tmp_path / "hosts" / "h3" / "enrol.token"
    services.agent_setup(*lab.agent_init_args(tmp_path, h3, b, None, enrol, None))
    cfg = AgentConfig.load(services.agent_config_path(tmp_path, "h3"))
    assert (cfg.controller_url, cfg.controller_ca_file, cfg.enrol_token_file) == (b.url, b.ca_path, enrol)
    assert cfg.datastores == [tmp_path / "ds" / "shared", tmp_path / "ds" / "h3-local"]
    assert cfg.state_dir == tmp_path / "hosts" / "h3" and cfg.controller_ca_file != a.ca_path


def _record(root: Path, state_extra: dict) -> None:
    a, b = sites.plan(root, IP, 2)
    root.mkdir(parents=True, exist_ok=True)
    procs.write_state(root, {"controller_url": a.url, "pids": {}, "argv": {}, "prefix": "kvut",
                             "controllers": {"a": a.record(), "b": b.record()},
                             "hosts": sites.split_hosts(["h1", "h2", "h3", "h4"], 2), **state_extra})


def test_load_names_each_hosts_controller_and_keeps_a_as_controller_url(tmp_path, monkeypatch):
    _record(tmp_path, {})
    monkeypatch.setattr(lab.net, "load_lab", lambda _: net._plan("kvut", 4, []))
    info = lab.load(tmp_path)
    assert info is not None and info.controller_url == "https://198.18.0.1:8760"
    assert {n: (s.url, s.root) for n, s in info.controllers.items()} == {
        "a": ("https://198.18.0.1:8760", tmp_path), "b": ("https://198.18.0.1:8761", tmp_path / "controllers" / "b")}
    assert [info.controller_of(h).name for h in ("h1", "h2", "h3", "h4")] == ["a", "a", "b", "b"]
    assert (info.hosts_of("a"), info.hosts_of("b")) == (["h1", "h2"], ["h3", "h4"])
    assert info.controllers["b"].admin_token_path == tmp_path / "controllers" / "b" / "admin.token"
    assert info.controllers["b"].ca_path == tmp_path / "controllers" / "b" / "pki" / "ca-cert.pem"
    st = lab.status(tmp_path)
    assert st["controllers"]["b"]["hosts"] == ["h3", "h4"] and st["controllers"]["b"]["process"] == "controller-b"
    assert [h["controller"] for h in st["hosts"]] == ["ctl-a", "ctl-a", "ctl-b", "ctl-b"]


def test_a_single_controller_record_still_loads(tmp_path, monkeypatch):
    """A lab.json from before B existed (no controllers, no hosts): A alone, at controller_url, owns every host."""
    procs.write_state(tmp_path, {"controller_url": "https://198.18.0.1:8760", "pids": {}, "argv": {}})
    monkeypatch.setattr(lab.net, "load_lab", lambda _: net._plan("kvut", 2, []))
    info = lab.load(tmp_path)
    assert info is not None and list(info.controllers) == ["a"] and info.controllers["a"].root == tmp_path
    assert info.controller_of("h2").url == info.controller_url and info.hosts_of("a") == ["h1", "h2"]


def test_an_agent_is_called_with_its_own_controllers_client_certificate(tmp_path):
    _record(tmp_path, {})
    for host in ("h1", "h3"):
        (tmp_path / "hosts" / host / "api").mkdir(parents=True)
        (tmp_path / "hosts" / host / "api" / "api-cert.pem").write_text(f"PEM of {host}")
    assert lab.agent_tls(tmp_path, "h1").cert_file.parent == tmp_path / "pki"
    assert lab.agent_tls(tmp_path, "h3").cert_file.parent == tmp_path / "controllers" / "b" / "pki"
    assert lab.agent_tls(tmp_path, "h3").pins == ("PEM of h3",)


def test_restart_knows_controller_b_by_its_recorded_argv(tmp_path):
    _record(tmp_path, {"argv": {"controller": ["x"], "controller-b": ["y"]}})
    with pytest.raises(LabError, match="known: controller, controller-b"):
        lab.restart(tmp_path, "controller-c")


def test_down_stops_both_controllers_by_recorded_pid_and_nothing_else(tmp_path):
    """down kills the processes lab.json records (both controllers) and removes the lab's folder with B's in it
    and A's CLI config; a kvmotion process it did not record keeps running."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)", "kvmotion-lab-unit"]
    started = {n: subprocess.Popen(sleeper) for n in ("controller", "controller-b", "stranger")}
    try:
        cli = tmp_path / "elsewhere" / "cli.json"
        root = tmp_path / "lab"
        _record(root, {"pids": {n: p.pid for n, p in started.items() if n != "stranger"}, "cli_config": str(cli)})
        (root / "controllers" / "b" / "pki").mkdir(parents=True)
        write_config(cli, "https://198.18.0.1:8760", sites.admin_token_path(root))
        removed = lab.down(root)
        assert started["controller"].wait(10) is not None and started["controller-b"].wait(10) is not None
        assert started["stranger"].poll() is None
        assert not root.exists() and not cli.exists() and load_config(cli).url is None
        assert {f"process controller-b (pid {started['controller-b'].pid})", f"folder {root}"} <= set(removed)
        assert lab.down(root) == []                                                     # twice is safe
    finally:
        for p in started.values():
            p.kill()
            p.wait(10)

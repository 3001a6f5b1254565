"""The lab is a deployment: its controller and agents start with the argv of the packaged units' ExecStart (the
same entry point, ``--config FILE``, nothing else), from files the products' own commands and models write and
read: controller.toml checked by kvmotion-server's parser, each agent.toml written by the real `kvmotion-agent
init` (datastores marked by `kvmotion-agent datastore init`), and the lab's host settings rewritten through the
renderer init uses, so every one of them survives its TOML form. No namespaces, no QEMU."""
from __future__ import annotations

import ast
import configparser
import importlib.util
import shlex
import stat
import sys
import tomllib
from pathlib import Path

import pytest

from kvmotion.agent import setup_cmd
from kvmotion.agent.config import AgentConfig, VlanPortGroup
from kvmotion.agent.facts import read_datastore
from kvmotion.controller import main as controller_main
from kvmotion.controller.config import DB_ENV, ControllerConfig
from kvmotion_lab import lab, net, services, sites
from kvmotion_lab.netns import LabError

ROOT = Path(__file__).resolve().parents[2]
UNITS = {services.CONTROLLER_SCRIPT: ROOT / "packaging" / "systemd" / "kvmotion-controller.service",
         services.AGENT_SCRIPT: ROOT / "packaging" / "systemd" / "kvmotion-agent.service"}
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def exec_start(unit: Path) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str        # systemd keys are case-sensitive
    parser.read(unit)
    return shlex.split(parser["Service"]["ExecStart"])


def runs_main_as_module(module: str, func: str) -> bool:
    """``python -m MODULE`` calls ``func()`` (an ``if __name__ == "__main__": func()`` at the module's end)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    last = tree.body[-1]
    return (isinstance(last, ast.If) and ast.unparse(last.test) in ('__name__ == "__main__"', "__name__ == '__main__'")
            and [ast.unparse(s) for s in last.body] == [f"{func}()"])


@pytest.mark.parametrize("script", [services.CONTROLLER_SCRIPT, services.AGENT_SCRIPT])
def test_the_lab_starts_each_service_with_its_units_execstart(script, tmp_path):
    """ExecStart with its console script replaced by this interpreter running the script's module, and the
    packaged config path by the lab's: nothing else differs."""
    unit = exec_start(UNITS[script])
    assert Path(unit[0]).name == script
    module, func = SCRIPTS[script].split(":")
    assert runs_main_as_module(module, func)
    packaged = unit[unit.index("--config") + 1]
    mine = services.controller_config_path(tmp_path) if script == services.CONTROLLER_SCRIPT else \
        services.agent_config_path(tmp_path, "h1")
    assert mine.name == Path(packaged).name          # the lab's files are named as the packaged ones
    expected = [sys.executable, "-m", module] + [str(mine) if a == packaged else a for a in unit[1:]]
    assert services.service_argv(script, mine) == expected


def test_the_controller_toml_is_what_kvmotion_server_runs_with(tmp_path, monkeypatch):
    """The lab's settings, read back by kvmotion-server's own parser from the argv the lab starts it with; a
    developer's $KVMOTION_DB is kept out of the lab's services (it would win over database_url)."""
    monkeypatch.delenv(DB_ENV, raising=False)
    path = services.controller_config_path(tmp_path)
    services.write_controller_config(path, sites.controller_settings(tmp_path, "198.18.0.2", admission=False))
    argv = services.service_argv(services.CONTROLLER_SCRIPT, path)[3:]
    args = vars(controller_main.build_parser().parse_args(argv))
    cfg = ControllerConfig.resolve(args.pop("config"), args)
    assert (cfg.listen_host, cfg.listen_port, cfg.admission) == ("198.18.0.2", sites.CONTROLLER_PORT, False)
    assert cfg.sqlite_file == tmp_path / "controller.db" and cfg.pki == tmp_path / "pki"
    assert cfg.tokens == tmp_path and lab.admin_token_path(tmp_path).parent == tmp_path
    assert (cfg.vm_ip_pool, cfg.host_networks) == (sites.VM_IP_POOL, list(sites.HOST_NETWORKS))
    monkeypatch.setenv(DB_ENV, "sqlite:////elsewhere.db")
    assert DB_ENV not in services.service_env() and services.service_env({"X": "1"})["X"] == "1"


def test_bad_controller_settings_are_refused_before_a_file_is_written(tmp_path):
    path = services.controller_config_path(tmp_path)
    with pytest.raises(LabError, match="vm_ip_pool"):
        services.write_controller_config(path, {**sites.controller_settings(tmp_path, "198.18.0.2", True),
                                                "vm_ip_pool": "198.18.1.100/24"})
    assert not path.exists()


def _host(name: str, v6: bool = False) -> net.HostNet:
    n = int(name[1:])
    return net.HostNet(name=name, netns=f"kvut-{name}", mgmt_ip="" if v6 else f"198.18.0.{10 + n}",
                       mgmt_ip6=f"2001:2::{10 + n}" if v6 else None, mig_ip=f"198.19.0.{10 + n}", vm_bridge="vmnet")


def _set_up(root: Path, h: net.HostNet, image_dir: Path | None, link: str | None) -> AgentConfig:
    """What lab up does on disk for one host, through the real commands (subprocesses)."""
    services.make_datastore(root / "ds" / "shared", "shared", shared=True)
    services.make_datastore(root / "ds" / f"{h.name}-local", f"{h.name}-local", shared=False)
    services.agent_setup(*lab.agent_init_args(root, h, sites.Site("a", "https://198.18.0.2:8760", root), image_dir,
                                              root / "hosts" / h.name / "enrol.token", link))
    return AgentConfig.load(services.agent_config_path(root, h.name))


def test_kvmotion_agent_init_writes_the_labs_agent_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMOTION_ACCEL", "tcg")
    h1 = _set_up(tmp_path, _host("h1"), tmp_path / "image", "10g")
    assert h1.model_dump() == AgentConfig(
        name="h1", listen_host="198.18.0.11", listen_port=lab.AGENT_PORT, mgmt_address="198.18.0.11",
        state_dir=tmp_path / "hosts" / "h1", datastores=[tmp_path / "ds" / "shared", tmp_path / "ds" / "h1-local"],
        migration_interfaces=["mig0"], image_dir=tmp_path / "image", controller_url="https://198.18.0.2:8760",
        enrol_token_file=tmp_path / "hosts" / "h1" / "enrol.token", controller_ca_file=sites.ca_path(tmp_path),
        declared_link_mbps={"mig0": lab.LINK_RATES["10g"]}, accelerator="tcg").model_dump()
    assert stat.S_IMODE(h1.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(services.agent_config_path(tmp_path, "h1").stat().st_mode) == 0o600
    monkeypatch.delenv("KVMOTION_ACCEL")
    h2 = _set_up(tmp_path, _host("h2", v6=True), None, None)     # IPv6-managed: added by address, no enrolment
    assert (h2.mgmt_address, h2.controller_url, h2.enrol_token_file, h2.image_dir) == ("2001:2::12", None, None, None)
    assert (h2.accelerator, h2.declared_link_mbps) == ("auto", {})
    shared = {h: read_datastore(cfg.datastores[0]) for h, cfg in (("h1", h1), ("h2", h2))}
    assert shared["h1"].uuid == shared["h2"].uuid and shared["h1"].shared and shared["h1"].name == "shared"
    local = read_datastore(h2.datastores[1])
    assert (local.name, local.shared) == ("h2-local", False)


def test_a_failing_setup_command_is_a_lab_error_with_its_reason(tmp_path):
    with pytest.raises(LabError, match="kvmotion-agent datastore init failed: .*does not exist"):
        services.agent_setup("datastore", "init", tmp_path / "absent", "--name", "x")


def test_lab_settings_round_trip_through_the_agents_toml(tmp_path):
    """configure_host's rewrite: every lab setting the e2e tests use survives the TOML form, the file stays TOML
    an admin could have written (0600), and the original comes back unchanged."""
    path = services.agent_config_path(tmp_path, "h1")
    original = AgentConfig(name="h1", mgmt_address="198.18.0.11", state_dir=tmp_path / "hosts" / "h1",
                           datastores=[tmp_path / "ds" / "shared"], controller_ca_file=tmp_path / "pki" / "ca.pem")
    setup_cmd.write_config(path, original)
    changes = {"cpu_feature_mask": ["avx2", "sse4.2"], "declared_link_mbps": {"mig0": 100, "eno 2": 1},
               "block_devices": [tmp_path / "dev" / "lun 0"], "datastores": [tmp_path / "ds" / "a", tmp_path / "b"],
               "swap_dir": tmp_path / "swap", "migration_interfaces": ["mig9"], "import_dirs": [tmp_path / "in"],
               "vlan_portgroups": [VlanPortGroup(name="VLAN 7", bridge="vmnet", vlan=7, uplinks=["eno1"])]}
    changed = services.reconfigure_agent(path, changes)
    assert AgentConfig.load(path) == changed
    assert {k: getattr(changed, k) for k in changes} == changes
    assert changed.model_dump(exclude=set(changes)) == original.model_dump(exclude=set(changes))
    assert tomllib.loads(path.read_text())["cpu_feature_mask"] == ["avx2", "sse4.2"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert services.reconfigure_agent(path, original.model_dump()) == original == AgentConfig.load(path)


def test_a_bad_lab_setting_leaves_the_file_as_it_was(tmp_path):
    path = services.agent_config_path(tmp_path, "h1")
    setup_cmd.write_config(path, AgentConfig(name="h1", mgmt_address="10.0.0.1", state_dir=tmp_path))
    before = path.read_text()
    with pytest.raises(LabError, match="listen_port"):
        services.reconfigure_agent(path, {"listen_port": 0})
    with pytest.raises(LabError, match="cpu_feature_msk"):
        services.reconfigure_agent(path, {"cpu_feature_msk": ["avx2"]})
    assert path.read_text() == before

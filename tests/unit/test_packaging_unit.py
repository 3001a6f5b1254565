"""Packaged services: the sample configurations load through the real models and document every key; the systemd
units start real console scripts with options their parsers take; the wheel ships what docs/deploy.md installs."""
from __future__ import annotations

import argparse
import configparser
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from kvmotion.agent import main as agent_main
from kvmotion.agent.config import AgentConfig, VlanPortGroup
from kvmotion.common.configfile import dump_toml, load_config, read_config_file
from kvmotion.common.errors import ConfigInvalid
from kvmotion.controller import main as controller_main
from kvmotion.controller.config import DB_ENV, ControllerConfig

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
AGENT_SAMPLE = PACKAGING / "config" / "agent.toml"
CONTROLLER_SAMPLE = PACKAGING / "config" / "controller.toml"
UNITS = PACKAGING / "systemd"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXAMPLE_LINE = re.compile(r"^# (\[\[[a-z_]+\]\]|[a-z_]+ = .*)$")


def uncommented(sample: Path) -> str:
    """The sample with every commented-out example key (and table) switched on."""
    return "\n".join(m.group(1) if (m := EXAMPLE_LINE.match(line)) else line
                     for line in sample.read_text().splitlines()) + "\n"


def controller_cfg(path: Path | None, *argv: str) -> ControllerConfig:
    """The configuration kvmotion-server would run with, through its own parser."""
    args = vars(controller_main.build_parser().parse_args((["--config", str(path)] if path else []) + list(argv)))
    args.pop("config")
    return ControllerConfig.resolve(path, args)


def paragraphs(sample: Path) -> dict[str, str]:
    """Each key's description in the sample: the comment paragraph that starts with ``# key:``."""
    found = {}
    for para in sample.read_text().split("\n\n"):
        m = re.match(r"# ([a-z_]+):", para)
        if m:
            found[m.group(1)] = para
    return found


# -- sample configurations --------------------------------------------------------------------------------------
def test_samples_load_through_the_models_with_the_values_they_show(monkeypatch):
    monkeypatch.delenv(DB_ENV, raising=False)
    agent = AgentConfig.load(AGENT_SAMPLE)
    assert agent.model_dump(mode="json", include=set(tomllib.loads(AGENT_SAMPLE.read_text()))) == \
        tomllib.loads(AGENT_SAMPLE.read_text())
    ctl = controller_cfg(CONTROLLER_SAMPLE)
    shown = tomllib.loads(CONTROLLER_SAMPLE.read_text())
    assert ctl.model_dump(mode="json", include=set(shown)) == shown


def test_commented_examples_are_valid_values_too(tmp_path, monkeypatch):
    """Every `# key = example` switched on still loads: an admin can uncomment any of them."""
    monkeypatch.delenv(DB_ENV, raising=False)
    agent_file, ctl_file = tmp_path / "agent.toml", tmp_path / "controller.toml"
    agent_file.write_text(uncommented(AGENT_SAMPLE))
    ctl_file.write_text(uncommented(CONTROLLER_SAMPLE))
    agent = AgentConfig.load(agent_file)
    assert [g.vlan for g in agent.vlan_portgroups] == [100] and agent.declared_link_mbps == {"mig0": 10000}
    ctl = ControllerConfig.resolve(ctl_file, {})
    assert ctl.vm_ip_pool == "198.18.1.100-198.18.1.199/24" and ctl.pki == Path("/var/lib/kvmotion/controller/pki")


@pytest.mark.parametrize("model,sample", [(AgentConfig, AGENT_SAMPLE), (VlanPortGroup, AGENT_SAMPLE),
                                          (ControllerConfig, CONTROLLER_SAMPLE)])
def test_every_key_is_documented_in_its_sample(model: type[BaseModel], sample: Path):
    text, described = sample.read_text(), paragraphs(sample)
    for key in model.model_fields:
        assert re.search(rf"^(# )?({key} = |\[\[{key}\]\])", text, re.M), f"{sample.name} shows no value for {key}"
        if model is not VlanPortGroup:      # its keys are described in vlan_portgroups' paragraph
            para = described.get(key, "")
            assert ("Default" in para or "Required" in para) and ("Example" in para or "[[" in para), \
                f"{sample.name} does not describe {key} (what, default, example)"
    assert set(described) <= set(model.model_fields) | set(AgentConfig.model_fields), "a described key is gone"


def test_every_init_option_is_named_where_its_key_is_described():
    """Each `kvmotion-agent init` option that sets a key is named in that key's paragraph of the sample."""
    init = next(a for a in agent_main.setup_cmd.build_parser()._actions
                if isinstance(a, argparse._SubParsersAction)).choices["init"]
    described = paragraphs(AGENT_SAMPLE)
    options = [a for a in init._actions if a.option_strings and a.dest not in ("help", "config", "force")]
    assert len(options) >= 14
    for action in options:
        key = next((k for k in (action.dest, f"{action.dest}s") if k in AgentConfig.model_fields),
                   {"shared_datastore": "datastores"}.get(action.dest, action.dest))
        opt = action.option_strings[0]
        assert re.search(rf"{re.escape(opt)}(?![a-z-])", " ".join(described[key].split())), \
            f"agent.toml: the paragraph of {key} does not name {opt}"


@pytest.mark.parametrize("model,sample,typo,meant", [(AgentConfig, AGENT_SAMPLE, "listen_prot", "listen_port"),
                                                     (ControllerConfig, CONTROLLER_SAMPLE, "databse_url",
                                                      "database_url")])
def test_an_unknown_key_is_named_with_its_fix(tmp_path, model, sample, typo, meant):
    bad = tmp_path / "bad.toml"
    bad.write_text(f"{typo} = 1\n" + sample.read_text())
    with pytest.raises(ConfigInvalid) as exc:
        load_config(model, bad, missing_remedy="")
    assert exc.value.details == {"file": str(bad), "keys": [typo]}
    assert f"unknown key {typo!r}" in exc.value.message and f"did you mean {meant!r}" in exc.value.remedy


def test_a_nested_unknown_key_and_a_bad_value_are_both_named(tmp_path):
    bad = tmp_path / "agent.toml"
    bad.write_text(uncommented(AGENT_SAMPLE).replace("vlan = 100", "vlan = 5000\nvid = 100"))
    with pytest.raises(ConfigInvalid) as exc:
        AgentConfig.load(bad)
    assert sorted(exc.value.details["keys"]) == ["vlan_portgroups.0.vid", "vlan_portgroups.0.vlan"]


def test_missing_or_broken_files_say_how_to_fix_them(tmp_path):
    with pytest.raises(ConfigInvalid) as exc:
        AgentConfig.load(tmp_path / "agent.toml")
    assert "kvmotion-agent init" in exc.value.remedy
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "h1"\nmgmt_address = \n')
    with pytest.raises(ConfigInvalid) as exc:
        AgentConfig.load(broken)
    assert "not valid TOML" in exc.value.message and "line 2" in exc.value.message


def test_json_agent_configs_still_load(tmp_path):
    """An agent configuration in JSON (the model's own dump) loads too, with or without the suffix."""
    cfg = AgentConfig(name="h1", mgmt_address="198.18.0.11", state_dir=tmp_path / "h1", datastores=[tmp_path],
                      declared_link_mbps={"mig0": 1000}, vlan_portgroups=[VlanPortGroup(name="VLAN 7", bridge="vmnet",
                                                                                        vlan=7)])
    (tmp_path / "agent.json").write_text(cfg.model_dump_json(indent=1))
    (tmp_path / "agent.conf").write_text(cfg.model_dump_json())
    assert AgentConfig.load(tmp_path / "agent.json") == cfg == AgentConfig.load(tmp_path / "agent.conf")


def test_toml_writer_round_trips_awkward_values():
    data = {"name": 'a "quoted" \\ back\nslash\ttab \x7f é', "n": 3, "f": 0.5, "on": False,
            "paths": ["/srv/ds/a b", "/x"], "speeds": {"mig0": 10000, "eno 2": 1}, "none": None,
            "groups": [{"name": "VLAN 100", "vlan": 100, "uplinks": ["eno1"]}, {"name": "g2", "vlan": 2}]}
    text = dump_toml(data, header="line one\nline two")
    expected = {k: v for k, v in data.items() if v is not None}
    assert tomllib.loads(text) == expected and text.startswith("# line one\n# line two\n")


# -- controller options over its file ---------------------------------------------------------------------------
def test_controller_options_override_the_file_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(DB_ENV, raising=False)
    f = tmp_path / "controller.toml"
    f.write_text('listen_port = 9000\nadmission = false\ndatabase_url = "sqlite:////srv/kv/c.db"\n')
    assert (controller_cfg(f).listen_port, controller_cfg(f).admission) == (9000, False)
    assert controller_cfg(f).pki == Path("/srv/kv/pki") and controller_cfg(f).tokens == Path("/srv/kv")
    cfg = controller_cfg(f, "--port", "9100", "--admission")
    assert (cfg.listen_port, cfg.admission) == (9100, True)
    monkeypatch.setenv(DB_ENV, "postgresql://db/kvmotion")
    with pytest.raises(ConfigInvalid) as exc:             # no SQLite file to keep the keys next to
        controller_cfg(f)
    assert exc.value.details["keys"] == ["pki_dir"]
    cfg = controller_cfg(f, "--pki-dir", "/srv/keys/pki")
    assert cfg.database_url == "postgresql://db/kvmotion" and (cfg.pki, cfg.tokens) == (Path("/srv/keys/pki"),
                                                                                        Path("/srv/keys"))
    cfg = controller_cfg(f, "--db", "sqlite:///rel.db", "--no-admission")
    assert (cfg.database_url, cfg.admission, cfg.tokens) == ("sqlite:///rel.db", False, Path("."))


@pytest.mark.parametrize("pool", ["198.18.1.100/24", "198.18.1.199-198.18.1.100/24", "10.0.0.1-fe80::1/24",
                                  "198.18.1.100-198.18.1.199/99", "a-b/24"])
def test_a_malformed_ip_pool_is_refused_at_start(pool):
    with pytest.raises(ConfigInvalid) as exc:
        ControllerConfig.resolve(None, {"vm_ip_pool": pool})
    assert exc.value.details["keys"] == ["vm_ip_pool"] and "FIRST-LAST/PREFIX" in exc.value.message


def test_the_controller_stops_with_the_error_and_its_fix(tmp_path, capsys):
    bad = tmp_path / "c.toml"
    bad.write_text("listen_host = 1\n")
    with pytest.raises(SystemExit) as exc:
        controller_main.main(["--config", str(bad)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "kvmotion-server: error:" in err and "kvmotion-server: fix:" in err


# -- systemd units ----------------------------------------------------------------------------------------------
def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str        # systemd keys are case-sensitive
    parser.read(UNITS / name)
    return parser


@pytest.mark.parametrize("name,script,sample,role", [
    ("kvmotion-controller.service", "kvmotion-server", CONTROLLER_SAMPLE, "controller"),
    ("kvmotion-agent.service", "kvmotion-agent", AGENT_SAMPLE, "agent")])
def test_units_start_a_console_script_with_options_it_takes(name, script, sample, role):
    svc = unit(name)["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert Path(argv[0]).name == script and script in PYPROJECT["project"]["scripts"]
    parser = controller_main.build_parser() if role == "controller" else agent_main.build_parser()
    args = parser.parse_args(argv[1:])
    assert args.config == Path(f"/etc/kvmotion/{role}.toml")
    assert f"/etc/kvmotion/{role}.toml" in sample.read_text().splitlines()[0]
    assert svc["Restart"] == "on-failure" and svc["StateDirectory"] == f"kvmotion/{role}"
    assert svc["StateDirectoryMode"] == "0700"


def test_the_units_state_directories_are_where_the_samples_keep_state(monkeypatch):
    monkeypatch.delenv(DB_ENV, raising=False)
    agent_state = Path("/var/lib") / unit("kvmotion-agent.service")["Service"]["StateDirectory"]
    ctl_state = Path("/var/lib") / unit("kvmotion-controller.service")["Service"]["StateDirectory"]
    assert AgentConfig.load(AGENT_SAMPLE).state_dir == agent_state
    ctl = controller_cfg(CONTROLLER_SAMPLE)
    assert ctl.sqlite_file.parent == ctl.pki.parent == ctl.tokens == ctl_state


def test_the_controller_is_confined_and_the_agent_keeps_what_qemu_needs():
    ctl = unit("kvmotion-controller.service")["Service"]
    assert ctl["User"] not in ("", "root") and ctl["CapabilityBoundingSet"] == ""
    assert {k: ctl[k] for k in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome")} == \
        {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes"}
    agent = unit("kvmotion-agent.service")["Service"]
    assert "User" not in agent                      # root: taps, bridges, /dev/kvm, QEMU
    assert agent["KillMode"] == "process"           # a restart ends the agent, not its VMs (re-adopted at start)
    # VMs outlive the agent: no mount namespace, device filter or W^X that QEMU would keep after a restart
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "DeviceAllow", "PrivateMounts",
                "MemoryDenyWriteExecute", "ReadWritePaths", "ProtectKernelModules"):
        assert key not in agent, key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path):
    """`systemd-analyze verify` wants the ExecStart binaries: the units are checked with /opt/kvmotion moved to a
    folder holding executable stand-ins of the console scripts."""
    prefix = tmp_path / "opt"
    (prefix / "bin").mkdir(parents=True)
    for script in ("kvmotion-server", "kvmotion-agent"):
        (prefix / "bin" / script).write_text("#!/bin/sh\n")
        (prefix / "bin" / script).chmod(0o755)
    copies = []
    for path in sorted(UNITS.glob("*.service")):
        copies.append(tmp_path / path.name)
        copies[-1].write_text(path.read_text().replace("/opt/kvmotion", str(prefix)))
    res = subprocess.run(["systemd-analyze", "verify", *map(str, copies)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


# -- the wheel ---------------------------------------------------------------------------------------------------
def test_the_wheel_ships_every_unit_and_sample_and_no_test_dependency():
    shipped = {f for files in PYPROJECT["tool"]["setuptools"]["data-files"].values() for f in files}
    on_disk = {str(p.relative_to(ROOT)) for p in PACKAGING.rglob("*") if p.is_file()}
    assert shipped == on_disk
    runtime = {re.split(r"[<>=!\[ ]", d)[0].lower() for d in PYPROJECT["project"]["dependencies"]}
    tests = {re.split(r"[<>=!\[ ]", d)[0].lower() for d in PYPROJECT["project"]["optional-dependencies"]["test"]}
    assert runtime and tests and not runtime & tests


def test_read_config_file_sniffs_json_without_a_suffix(tmp_path):
    f = tmp_path / "conf"
    f.write_text(json.dumps({"listen_port": 1}))
    assert read_config_file(f, "") == {"listen_port": 1}
    f.write_text("listen_port = 2\n")
    assert read_config_file(f, "") == {"listen_port": 2}

"""`kvmotion-agent init` and `kvmotion-agent datastore init`, run through the agent's own entry point on temporary
folders: markers the agent's fact reader agrees with, one UUID for a shared datastore on every host, a config the
agent loads, and nothing written when a check fails."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kvmotion.agent import markers
from kvmotion.agent.config import DATASTORE_ID_FILE, AgentConfig, DatastoreMarker
from kvmotion.agent.facts import read_datastore
from kvmotion.agent.main import main as agent_main


def run(*argv: str | Path) -> int:
    """kvmotion-agent ARGV; its exit status."""
    with pytest.raises(SystemExit) as exc:
        agent_main([str(a) for a in argv])
    return exc.value.code


def marker_of(path: Path) -> dict:
    return json.loads((path / DATASTORE_ID_FILE).read_text())


@pytest.fixture
def site(tmp_path) -> Path:
    for d in ("ds/local1", "ds/local2", "ds/shared"):
        (tmp_path / d).mkdir(parents=True)
    return tmp_path


def init(site: Path, host: str, *extra: str | Path) -> int:
    return run("init", "--config", site / host / "agent.toml", "--name", host, "--mgmt-address", f"10.0.0.{host[-1]}",
               "--state-dir", site / host / "state", *extra)


# -- datastore init -----------------------------------------------------------------------------------------------
def test_datastore_init_writes_a_marker_the_agent_reads(site, capsys):
    ds = site / "ds" / "shared"
    assert run("datastore", "init", ds, "--name", "shared", "--shared") == 0
    written = marker_of(ds)
    assert set(written) == {"uuid", "name", "kind", "shared"}
    assert (written["name"], written["kind"], written["shared"]) == ("shared", "directory", True)
    fact = read_datastore(ds)
    assert (fact.readable, fact.uuid, fact.name, fact.shared) == (True, written["uuid"], "shared", True)
    assert stat.S_IMODE((ds / DATASTORE_ID_FILE).stat().st_mode) == 0o644
    assert [p.name for p in ds.iterdir()] == [DATASTORE_ID_FILE]       # no temporary file left behind
    assert "marker written" in capsys.readouterr().out


def test_datastore_init_again_keeps_the_uuid_and_refuses_another_name(site, capsys):
    ds = site / "ds" / "local1"
    assert run("datastore", "init", ds, "--name", "h1-local") == 0
    first = marker_of(ds)
    assert run("datastore", "init", ds, "--name", "h1-local") == 0
    assert marker_of(ds) == first and "marker found" in capsys.readouterr().out
    assert run("datastore", "init", ds, "--name", "fast") == 2
    err = capsys.readouterr().err
    assert f"already datastore 'h1-local' (uuid {first['uuid']})" in err
    assert "pass --name h1-local" in err and "to rename it" in err and str(ds / DATASTORE_ID_FILE) in err
    assert run("datastore", "init", ds, "--name", "h1-local", "--shared") == 2
    assert "shared=false" in capsys.readouterr().err
    assert marker_of(ds) == first


@pytest.mark.parametrize("problem", ["symlink", "garbage", "missing-dir", "bad-name"])
def test_datastore_init_refuses_what_it_cannot_trust(site, capsys, problem):
    ds = site / "ds" / "local1"
    name = "ok"
    if problem == "symlink":
        (site / "elsewhere.json").write_text(json.dumps({"uuid": "x", "name": "evil"}))
        (ds / DATASTORE_ID_FILE).symlink_to(site / "elsewhere.json")
    elif problem == "garbage":
        (ds / DATASTORE_ID_FILE).write_text("{not json")
    elif problem == "missing-dir":
        ds = site / "ds" / "absent"
    else:
        name = "has space"
    before = sorted(p.name for p in ds.iterdir()) if ds.exists() else None
    assert run("datastore", "init", ds, "--name", name) == 2
    err = capsys.readouterr().err
    assert "kvmotion-agent: error:" in err and "kvmotion-agent: fix:" in err
    assert (sorted(p.name for p in ds.iterdir()) if ds.exists() else None) == before


def test_a_marker_that_appears_meanwhile_wins(site):
    """Two hosts marking one shared folder at once: the hard link refuses the second, which then reads the first."""
    ds = site / "ds" / "shared"
    theirs = DatastoreMarker(uuid="12345678-1234-1234-1234-123456789abc", name="shared", shared=True)
    (ds / DATASTORE_ID_FILE).write_text(theirs.model_dump_json())
    assert markers._link_in(ds, markers.new_marker("shared", True)) is False
    assert [p.name for p in ds.iterdir()] == [DATASTORE_ID_FILE]
    assert markers.ensure_marker(ds, "shared", True) == (theirs, False)


# -- init -----------------------------------------------------------------------------------------------------------
def test_init_writes_a_config_the_agent_loads_and_marks_missing_datastores(site, capsys):
    token = site / "enrol.token"
    assert init(site, "h1", "--datastore", site / "ds" / "local1", "--shared-datastore", site / "ds" / "shared",
                "--migration-interface", "eno2", "--controller-url", "http://10.0.0.2:8760",
                "--enrol-token-file", token) == 0
    cfg = AgentConfig.load(site / "h1" / "agent.toml")
    assert cfg.model_dump(include={"name", "mgmt_address", "datastores", "migration_interfaces", "controller_url",
                                   "enrol_token_file", "state_dir"}) == {
        "name": "h1", "mgmt_address": "10.0.0.1", "datastores": [site / "ds" / "local1", site / "ds" / "shared"],
        "migration_interfaces": ["eno2"], "controller_url": "http://10.0.0.2:8760", "enrol_token_file": token,
        "state_dir": site / "h1" / "state"}
    assert (marker_of(site / "ds" / "local1")["name"], marker_of(site / "ds" / "local1")["shared"]) == ("h1-local1",
                                                                                                       False)
    assert (marker_of(site / "ds" / "shared")["name"], marker_of(site / "ds" / "shared")["shared"]) == ("shared", True)
    assert stat.S_IMODE((site / "h1" / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((site / "h1" / "agent.toml").stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert f"{token} does not exist yet" in out            # a note, not an error: the token may come later


def test_init_sets_the_controllers_ca_link_speeds_accelerator_and_image_dir(site, capsys):
    ca = site / "ca-cert.pem"
    assert init(site, "h1", "--controller-ca-file", ca, "--declared-link-mbps", "mig0=10000",
                "--declared-link-mbps", "eno2=1000", "--accelerator", "tcg", "--image-dir", site / "image") == 0
    cfg = AgentConfig.load(site / "h1" / "agent.toml")
    assert (cfg.controller_ca_file, cfg.declared_link_mbps, cfg.accelerator, cfg.image_dir) == (
        ca, {"mig0": 10000, "eno2": 1000}, "tcg", site / "image")
    assert f"{ca} does not exist yet" in capsys.readouterr().out     # a note: the admin copies it there next


def test_two_hosts_read_one_uuid_for_the_shared_datastore(site):
    shared = site / "ds" / "shared"
    assert init(site, "h1", "--datastore", site / "ds" / "local1", "--shared-datastore", shared) == 0
    assert init(site, "h2", "--datastore", site / "ds" / "local2", "--shared-datastore", shared) == 0
    facts = {h: {read_datastore(p).name: read_datastore(p).uuid for p in AgentConfig.load(site / h / "agent.toml")
                 .datastores} for h in ("h1", "h2")}
    assert facts["h1"]["shared"] == facts["h2"]["shared"]
    assert set(facts["h1"]) == {"h1-local1", "shared"} and set(facts["h2"]) == {"h2-local2", "shared"}
    assert facts["h1"]["h1-local1"] != facts["h2"]["h2-local2"]


def test_init_refuses_to_replace_a_config_without_force(site, capsys):
    assert init(site, "h1", "--datastore", site / "ds" / "local1") == 0
    cfg_file = site / "h1" / "agent.toml"
    before = cfg_file.read_text()
    assert init(site, "h1", "--listen-port", "9999") == 2
    assert "pass --force" in capsys.readouterr().err and cfg_file.read_text() == before
    assert init(site, "h1", "--listen-port", "9999", "--force") == 0
    assert AgentConfig.load(cfg_file).listen_port == 9999


@pytest.mark.parametrize("extra,expect", [
    (["--datastore", "{site}/ds/absent"], "does not exist"),
    (["--mgmt-address", "https://10.0.0.1:8770"], "is a URL"),
    (["--controller-url", "10.0.0.2:8760"], "is not an http(s) URL"),
    (["--datastore", "{site}/ds/local1", "--datastore", "{site}/ds/local1"], "given twice"),
    (["--name", "h 1"], "'name'"),
    (["--listen-port", "70000"], "'listen_port'"),
    (["--declared-link-mbps", "mig0"], "is not IFACE=MBPS"),
    (["--declared-link-mbps", "mig0=0"], "is not IFACE=MBPS"),
    (["--declared-link-mbps", "mig0=fast"], "is not IFACE=MBPS"),
    (["--declared-link-mbps", "mig0=10", "--declared-link-mbps", "mig0=20"], "once per interface"),
])
def test_init_writes_nothing_when_a_check_fails(site, capsys, extra, expect):
    args = [a.format(site=site) for a in extra]
    assert init(site, "h1", "--datastore", site / "ds" / "local2", *args) == 2
    assert expect in capsys.readouterr().err
    assert not (site / "h1").exists()                              # no config, no state directory
    assert not (site / "ds" / "local2" / DATASTORE_ID_FILE).exists()     # and no marker


def test_init_refuses_two_datastores_of_one_name(site, capsys):
    for ds in ("local1", "local2"):
        (site / "ds" / ds / DATASTORE_ID_FILE).write_text(
            markers.new_marker("same", False).model_dump_json())
    assert init(site, "h1", "--datastore", site / "ds" / "local1", "--datastore", site / "ds" / "local2") == 2
    assert "both named 'same'" in capsys.readouterr().err and not (site / "h1").exists()


def test_the_agent_refuses_an_unknown_key_before_starting(site, capsys):
    assert init(site, "h1", "--datastore", site / "ds" / "local1") == 0
    cfg_file = site / "h1" / "agent.toml"
    with open(cfg_file, "a") as fh:
        fh.write("migration_interface = [\"eno2\"]\n")
    assert run("--config", cfg_file) == 2
    err = capsys.readouterr().err
    assert "unknown key 'migration_interface'" in err and "did you mean 'migration_interfaces'" in err
    assert os.listdir(site / "h1" / "state") == []                 # stopped before the agent made its secret

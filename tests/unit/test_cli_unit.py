"""The CLI without a controller: where it finds its URL and token, and the lab's commands as a plugin."""
from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kvmotion.cli import config, plugins
from kvmotion.cli.main import build_app


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in ("KVMOTION_URL", "KVMOTION_TOKEN", "KVMOTION_TOKEN_FILE", "KVMOTION_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(config, "USER_CONFIG", tmp_path / "user-cli.json")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "system-cli.json")
    monkeypatch.setattr(config, "USER_TOKEN", tmp_path / "user-token")
    return tmp_path


def test_no_config_means_the_local_default(clean_env: Path) -> None:
    assert config.default_url() == config.DEFAULT_URL and config.default_token() is None


def test_the_config_the_lab_writes_names_url_and_token_file(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = clean_env / "admin.token"
    token.write_text("kvm_secret\n")
    config.write_config(clean_env / "system-cli.json", "http://198.18.0.1:8760", token)
    assert json.loads((clean_env / "system-cli.json").read_text())["token_file"] == str(token)   # never the token
    assert config.default_url() == "http://198.18.0.1:8760" and config.default_token() == "kvm_secret"
    monkeypatch.setenv("KVMOTION_URL", "http://198.18.0.9:8760")
    monkeypatch.setenv("KVMOTION_TOKEN", "kvm_env")
    assert config.default_url() == "http://198.18.0.9:8760" and config.default_token() == "kvm_env"


def test_kvmotion_config_chooses_the_file(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config.write_config(clean_env / "system-cli.json", "http://198.18.0.1:8760", clean_env / "none")
    config.write_config(clean_env / "mine.json", "http://198.18.0.2:8760", clean_env / "none")
    monkeypatch.setenv("KVMOTION_CONFIG", str(clean_env / "mine.json"))
    assert config.default_url() == "http://198.18.0.2:8760"
    (clean_env / "mine.json").write_text("not json")
    assert config.default_url() == config.DEFAULT_URL                 # unreadable: as if absent


def test_the_lab_commands_come_from_the_plugin() -> None:
    names = {c.name for c in build_app().registered_commands} | {g.name for g in build_app().registered_groups}
    assert {"lab", "image", "bench", "demo", "vm", "host", "task", "cluster", "token", "audit"} <= names
    out = CliRunner().invoke(build_app(), ["bench", "--help"])
    assert out.exit_code == 0 and "soak" in out.output


def test_a_plugin_whose_package_is_absent_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugins, "KNOWN", {"lab": "kvmotion_lab_absent.cli:register"})
    monkeypatch.setattr(plugins, "entry_points", lambda group: [])
    app = typer.Typer()
    assert plugins.load_plugins(app) == []
    monkeypatch.setattr(plugins, "entry_points", lambda group: [
        EntryPoint(name="x", value="kvmotion_lab.cli:register", group=group)])
    assert plugins.load_plugins(app) == ["x"]                        # an installed entry point still loads

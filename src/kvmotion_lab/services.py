"""The lab's services start as the packaged systemd units start them (packaging/systemd): the same entry points
with ``--config FILE`` and no other option, reading the files an admin writes: ``controller.toml`` (keys of the
packaged sample) and each host's ``agent.toml`` (written by `kvmotion-agent init`, its datastores marked by
`kvmotion-agent datastore init`). tests/unit/test_lab_services_unit.py holds the argv to the units' ExecStart.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvmotion.agent.config import AgentConfig
from kvmotion.agent.setup_cmd import write_config
from kvmotion.common.configfile import dump_toml, validate_config
from kvmotion.common.errors import ConfigInvalid
from kvmotion.controller.config import DB_ENV, ControllerConfig
from kvmotion_lab.netns import LabError

CONTROLLER_SCRIPT = "kvmotion-server"
AGENT_SCRIPT = "kvmotion-agent"
ENTRY_MODULES = {CONTROLLER_SCRIPT: "kvmotion.controller.main", AGENT_SCRIPT: "kvmotion.agent.main"}
CONTROLLER_CONFIG = "controller.toml"
AGENT_CONFIG = "agent.toml"
SETUP_DEADLINE_S = 60.0
# the lab's files decide, as the units' do: a developer's $KVMOTION_DB would override the lab's database_url
SCRUBBED_ENV = (DB_ENV,)
LAB_WRITER = "the lab (`kvmotion lab`, a lab setting) with `kvmotion-agent init`'s renderer"


def command(script: str, *args: str | Path | int) -> list[str]:
    """``SCRIPT ARGS`` run by this interpreter: the console script's module (the lab also runs from a source tree,
    where no console script is installed)."""
    return [sys.executable, "-m", ENTRY_MODULES[script], *map(str, args)]


def service_argv(script: str, config: Path) -> list[str]:
    """The ExecStart of the script's unit, with the lab's configuration file."""
    return command(script, "--config", config)


def service_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a lab service: this one without ``SCRUBBED_ENV``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(extra or {})
    return env


def controller_config_path(root: Path) -> Path:
    return root / CONTROLLER_CONFIG


def agent_config_path(root: Path, host: str) -> Path:
    return root / "hosts" / host / AGENT_CONFIG


def write_controller_config(path: Path, settings: dict[str, Any]) -> ControllerConfig:
    """``settings`` checked by the controller's own model, then written as TOML an admin could have written."""
    try:
        cfg = validate_config(ControllerConfig, settings, "the lab's controller settings")
    except ConfigInvalid as exc:
        raise LabError(f"{exc.message} ({exc.remedy})") from None
    path.write_text(dump_toml(settings, header="kvmotion controller configuration, written by the lab.\n"
                                               "Every key is described in packaging/config/controller.toml."))
    return cfg


def agent_setup(*args: str | Path | int) -> str:
    """Run `kvmotion-agent ARGS` (``init``, ``datastore init``), the real command; its output."""
    argv = command(AGENT_SCRIPT, *args)
    what = "kvmotion-agent " + " ".join(str(a) for a in args[:2] if not str(a).startswith("-"))
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=SETUP_DEADLINE_S, env=service_env())
    except subprocess.TimeoutExpired:
        raise LabError(f"{what} did not finish within {SETUP_DEADLINE_S:.0f}s; run it by hand: "
                       f"{' '.join(argv)}") from None
    if res.returncode != 0:
        raise LabError(f"{what} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def make_datastore(path: Path, name: str, shared: bool) -> None:
    """A datastore folder marked by `kvmotion-agent datastore init` (kept when it is marked so already)."""
    path.mkdir(parents=True, exist_ok=True)
    agent_setup("datastore", "init", path, "--name", name, *(["--shared"] if shared else []))


def reconfigure_agent(path: Path, changes: dict[str, Any]) -> AgentConfig:
    """The agent configuration at ``path`` with ``changes``, rewritten through the renderer `kvmotion-agent init`
    uses (the file stays one an admin could have written); the new configuration."""
    try:
        cfg = validate_config(AgentConfig, {**AgentConfig.load(path).model_dump(), **changes}, "the lab's changes")
    except ConfigInvalid as exc:
        raise LabError(f"{exc.message} ({exc.remedy})") from None
    write_config(path, cfg, written_by=LAB_WRITER)
    return cfg

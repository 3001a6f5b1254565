"""Where the CLI finds its controller: a small JSON file, overridden by the environment.

The file (``$KVMOTION_CONFIG``, else ``~/.config/kvmotion/cli.json``, else ``/run/kvmotion/cli.json``) holds::

    {"url": "https://198.18.0.2:8760", "token_file": "/var/lib/kvmotion/lab/admin.token",
     "ca_file": "/var/lib/kvmotion/lab/pki/ca-cert.pem"}

Whoever sets up a controller writes it (the lab does, and records where). ``$KVMOTION_URL`` overrides the URL;
``$KVMOTION_TOKEN``, then ``$KVMOTION_TOKEN_FILE``, then ``~/.config/kvmotion/token`` override the token;
``$KVMOTION_CA_FILE`` overrides ``ca_file`` (the controller's CA, which issued its HTTPS certificate).
A token is never taken from the command line (process listings).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kvmotion.common.http import CA_ENV, trust

ENV_CONFIG = "KVMOTION_CONFIG"
USER_CONFIG = Path.home() / ".config" / "kvmotion" / "cli.json"
SYSTEM_CONFIG = Path("/run/kvmotion/cli.json")
USER_TOKEN = Path.home() / ".config" / "kvmotion" / "token"
DEFAULT_URL = "https://127.0.0.1:8760"


@dataclass(frozen=True)
class CliConfig:
    url: str | None = None
    token_file: Path | None = None
    ca_file: Path | None = None


def config_path() -> Path | None:
    """The config file in force: the one ``$KVMOTION_CONFIG`` names, else the first default that exists."""
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    return next((p for p in (USER_CONFIG, SYSTEM_CONFIG) if p.is_file()), None)


def load_config(path: Path | None = None) -> CliConfig:
    """The config file's contents; an absent or unreadable file is an empty config."""
    path = path or config_path()
    if path is None:
        return CliConfig()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return CliConfig()
    if not isinstance(data, dict):
        return CliConfig()
    token_file, ca_file = data.get("token_file"), data.get("ca_file")
    return CliConfig(url=data.get("url") or None, token_file=Path(token_file) if token_file else None,
                     ca_file=Path(ca_file) if ca_file else None)


def write_config(path: Path, url: str, token_file: Path, ca_file: Path | None = None) -> None:
    """Write a config (mode 0644: it names the token file, never holds the token), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    data = {"url": url, "token_file": str(token_file)} | ({"ca_file": str(ca_file)} if ca_file else {})
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def trust_configured_ca() -> None:
    """The CLI config's ``ca_file`` (the controller's CA) joins the CAs the clients trust ($KVMOTION_CA_FILE wins)."""
    ca = load_config().ca_file
    if ca is not None and ca.exists() and not os.environ.get(CA_ENV):
        trust(ca)


def default_url() -> str:
    return os.environ.get("KVMOTION_URL") or load_config().url or DEFAULT_URL


def default_token() -> str | None:
    """The API token: $KVMOTION_TOKEN, else the file $KVMOTION_TOKEN_FILE, else ~/.config/kvmotion/token, else
    the token file the config names."""
    if os.environ.get("KVMOTION_TOKEN"):
        return os.environ["KVMOTION_TOKEN"].strip()
    if os.environ.get("KVMOTION_TOKEN_FILE"):
        candidates = [Path(os.environ["KVMOTION_TOKEN_FILE"])]
    else:
        candidates = [USER_TOKEN] + [p for p in (load_config().token_file,) if p is not None]
    for path in candidates:
        try:
            return path.read_text().strip()
        except OSError:
            continue
    return None

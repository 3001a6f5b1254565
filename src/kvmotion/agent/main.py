"""kvmotion-agent: the host agent (hostd role)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import get_args

import uvicorn

from kvmotion.agent import setup_cmd
from kvmotion.agent.api import create_app
from kvmotion.agent.config import DEFAULT_CONFIG, AgentConfig
from kvmotion.agent.hv.qemu.driver import QemuHypervisor
from kvmotion.agent.service import Agent
from kvmotion.agent.registration import register
from kvmotion.common.configfile import LogLevel, fail
from kvmotion.common.errors import ConfigInvalid
from kvmotion.common.hostauth import load_or_create_secret
from kvmotion.common.hostid import fingerprint


log = logging.getLogger("kvmotion.agent")
PROG = "kvmotion-agent"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="kvmotion host agent", epilog=setup_cmd.EPILOG)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"agent configuration: TOML, or JSON (default {DEFAULT_CONFIG})")
    parser.add_argument("--log-level", default=None, type=str.lower, choices=get_args(LogLevel),
                        help="default: the configuration's log_level")
    parser.add_argument("--fingerprint", action="store_true",
                        help="print this host's fingerprint (what `kvmotion host approve` asks for) and exit")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in setup_cmd.COMMANDS:      # init, datastore init: local setup, no server
        raise SystemExit(setup_cmd.main(argv))
    args = build_parser().parse_args(argv)
    try:
        cfg = AgentConfig.load(args.config)
    except ConfigInvalid as exc:
        fail(PROG, exc)
    level = args.log_level or cfg.log_level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)   # connect retries are expected; failures are ours to report
    secret = load_or_create_secret(cfg.state_dir)
    if args.fingerprint:
        print(fingerprint(secret))
        return
    agent = Agent(cfg, QemuHypervisor(cfg.name, cfg.state_dir))
    app = create_app(agent, secret, after_start=lambda: register(cfg, secret),
                     state_dir=cfg.state_dir)
    serve(app, agent, level)


def serve(app: object, agent: Agent, level: str) -> None:
    """HTTPS with the agent's own TLS context (``kvmotion.agent.apitls``): mutual once a controller is pinned."""
    cfg = agent.cfg
    config = uvicorn.Config(app, host=cfg.listen_host, port=cfg.listen_port, log_level=level,  # type: ignore[arg-type]
                            access_log=False)
    config.load()
    config.ssl = agent.api.server_context()       # kept by the server: certificate and pin change in place
    log.info("API at %s (certificate SHA-256 %s; %s)", cfg.url, agent.api.cert_sha256,
             "mutual TLS with the pinned controller" if agent.api.controller_pem else "no controller pinned yet")
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()

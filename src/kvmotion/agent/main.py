"""kvmotion-agent: the host agent (hostd role)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import get_args

import httpx
import uvicorn

from kvmotion.agent import setup_cmd
from kvmotion.agent.api import create_app
from kvmotion.agent.config import DEFAULT_CONFIG, AgentConfig
from kvmotion.agent.hv.qemu.driver import QemuHypervisor
from kvmotion.agent.service import Agent
from kvmotion.common.configfile import LogLevel, fail
from kvmotion.common.errors import ConfigInvalid
from kvmotion.common.hostauth import load_or_create_secret


log = logging.getLogger("kvmotion.agent")
PROG = "kvmotion-agent"


async def register(cfg: AgentConfig, secret: str) -> None:
    """Enrol with the controller using an enrolment token (retrying briefly; the controller may start later).

    The request carries this host's secret once; afterwards the controller signs every call with it.
    """
    if not cfg.controller_url:
        return
    if cfg.enrol_token_file is None or not cfg.enrol_token_file.exists():
        log.warning("not registering with %s: no enrolment token file configured (enrol_token_file); "
                    "an admin can add this host with `kvmotion host add`", cfg.controller_url)
        return
    token = cfg.enrol_token_file.read_text().strip()
    for _ in range(30):
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                r = await client.post(f"{cfg.controller_url}/api/v1/hosts/register",
                                      json={"name": cfg.name, "address": cfg.url, "secret": secret},
                                      headers={"Authorization": f"Bearer {token}"})
            if r.status_code < 400:
                return
            if r.status_code < 500:
                log.error("the controller refused the registration of %s (%s): %s", cfg.name, r.status_code,
                          r.text[:300])
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="kvmotion host agent", epilog=setup_cmd.EPILOG)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"agent configuration: TOML, or JSON (default {DEFAULT_CONFIG})")
    parser.add_argument("--log-level", default=None, type=str.lower, choices=get_args(LogLevel),
                        help="default: the configuration's log_level")
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
    agent = Agent(cfg, QemuHypervisor(cfg.name, cfg.state_dir))
    secret = load_or_create_secret(cfg.state_dir)
    app = create_app(agent, secret, after_start=lambda: register(cfg, secret))

    uvicorn.run(app, host=cfg.listen_host, port=cfg.listen_port, log_level=level, access_log=False)


if __name__ == "__main__":
    main()

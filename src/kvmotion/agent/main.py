"""kvmotion-agent: the host agent (hostd role)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn

from kvmotion.agent.api import create_app
from kvmotion.agent.config import AgentConfig
from kvmotion.agent.hv.qemu.driver import QemuHypervisor
from kvmotion.agent.service import Agent
from kvmotion.agent.registration import register
from kvmotion.common.hostauth import load_or_create_secret
from kvmotion.common.hostid import fingerprint


log = logging.getLogger("kvmotion.agent")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvmotion-agent", description="kvmotion host agent")
    parser.add_argument("--config", type=Path, required=True, help="agent configuration (JSON)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--fingerprint", action="store_true",
                        help="print this host's fingerprint (what `kvmotion host approve` asks for) and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)   # connect retries are expected; failures are ours to report
    cfg = AgentConfig.load(args.config)
    secret = load_or_create_secret(cfg.state_dir)
    if args.fingerprint:
        print(fingerprint(secret))
        return
    agent = Agent(cfg, QemuHypervisor(cfg.name, cfg.state_dir))
    app = create_app(agent, secret, after_start=lambda: register(cfg, secret),
                     state_dir=cfg.state_dir)

    uvicorn.run(app, host=cfg.listen_host, port=cfg.listen_port, log_level=args.log_level.lower(),
                access_log=False)


if __name__ == "__main__":
    main()

"""kvmotion-agent: the host agent (hostd role)."""
from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import httpx
import uvicorn

from kvmotion.agent.api import create_app
from kvmotion.agent.config import AgentConfig
from kvmotion.agent.service import Agent


async def register(cfg: AgentConfig) -> None:
    """Announce this agent to its controller (retrying briefly; the controller may start later)."""
    if not cfg.controller_url:
        return
    for _ in range(30):
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                r = await client.post(f"{cfg.controller_url}/api/v1/hosts/register",
                                      json={"name": cfg.name, "address": cfg.url})
                if r.status_code < 500:
                    return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvmotion-agent", description="kvmotion host agent")
    parser.add_argument("--config", type=Path, required=True, help="agent configuration (JSON)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)   # connect retries are expected; failures are ours to report
    cfg = AgentConfig.load(args.config)
    agent = Agent(cfg)
    app = create_app(agent, after_start=lambda: register(cfg))

    uvicorn.run(app, host=cfg.listen_host, port=cfg.listen_port, log_level=args.log_level.lower(),
                access_log=False)


if __name__ == "__main__":
    main()

"""What every route receives: the agent the app was made for."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from kvmotion.agent.service import Agent


def get_agent(request: Request) -> Agent:
    agent: Agent = request.app.state.agent
    return agent


AgentDep = Annotated[Agent, Depends(get_agent)]

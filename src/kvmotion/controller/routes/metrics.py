"""Prometheus metrics (``/metrics``, outside ``/api/v1`` where Prometheus looks for them; a viewer's token)."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from kvmotion.controller.auth import Role
from kvmotion.controller.metrics import CONTENT_TYPE, Exposition
from kvmotion.controller.routes.deps import role

PATH = "/metrics"
router = APIRouter()


@router.get(PATH, dependencies=role(Role.VIEWER), response_class=Response, responses={200: {
    "description": "the Prometheus text exposition format 0.0.4 (docs/metrics.md)",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    """The controller's metrics: migrations, admission queue, hosts, VMs (docs/metrics.md)."""
    exposition: Exposition = request.app.state.metrics
    body = await asyncio.to_thread(exposition.render)        # database reads, off the event loop
    return Response(content=body, media_type=CONTENT_TYPE)

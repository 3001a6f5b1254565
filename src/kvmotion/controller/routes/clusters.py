"""Clusters: membership, EVC baselines, the default migration policy."""
from __future__ import annotations

from fastapi import APIRouter

from kvmotion.controller.auth import Role
from kvmotion.controller.routes.deps import Ctl, role
from kvmotion.models.api import ClusterCreate, ClusterOut, ClusterUpdate

router = APIRouter()


@router.get("/clusters", dependencies=role(Role.VIEWER))
async def clusters(ctl: Ctl) -> list[ClusterOut]:
    return ctl.clusters.list()


@router.post("/clusters", status_code=201, dependencies=role(Role.ADMIN))
async def cluster_create(req: ClusterCreate, ctl: Ctl) -> ClusterOut:
    return ctl.clusters.create(req.name, req.evc_mode)   # hosts joining later must support the baseline


@router.get("/clusters/{name}", dependencies=role(Role.VIEWER))
async def cluster_show(name: str, ctl: Ctl) -> ClusterOut:
    return ctl.clusters.get(name)


@router.post("/clusters/{name}/hosts/{host}", dependencies=role(Role.ADMIN))
async def cluster_add_host(name: str, host: str, ctl: Ctl) -> ClusterOut:
    return ctl.clusters.add_host(name, host)


@router.delete("/clusters/{name}/hosts/{host}", dependencies=role(Role.ADMIN))
async def cluster_remove_host(name: str, host: str, ctl: Ctl) -> ClusterOut:
    return ctl.clusters.remove_host(name, host)


@router.patch("/clusters/{name}", dependencies=role(Role.ADMIN))
async def cluster_update(name: str, req: ClusterUpdate, ctl: Ctl) -> ClusterOut:
    """The cluster's default migration policy (VMs and requests override it)."""
    return ctl.clusters.set_policy(name, req.migration_policy)


@router.get("/clusters/{name}/evc-modes", dependencies=role(Role.VIEWER))
async def cluster_evc_modes(name: str, ctl: Ctl) -> list[str]:
    return await ctl.clusters.evc_modes(name)


@router.put("/clusters/{name}/evc", dependencies=role(Role.ADMIN))
async def cluster_set_evc(name: str, req: ClusterCreate, ctl: Ctl) -> ClusterOut:
    return await ctl.clusters.set_evc(name, req.evc_mode)

"""Clusters and EVC baselines: a CPU model every host of the cluster supports, given to its VMs."""
from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common.errors import ConflictError, InvalidInputError, KvmotionError, NotFoundError
from kvmotion.controller.db import Cluster, Host
from kvmotion.controller.inventory import Inventory
from kvmotion.controller import policy
from kvmotion.models.api import ClusterOut, MigrationPolicy

NOT_BASELINES = {"max", "host", "base"}


class Clusters:
    def __init__(self, sessions: sessionmaker[Session], inv: Inventory) -> None:
        self.sessions = sessions
        self.inv = inv

    def get(self, name: str) -> ClusterOut:
        with self.sessions() as s:
            c = s.get(Cluster, name)
            if c is None:
                raise NotFoundError(f"cluster {name!r} does not exist", remedy="create it: kvmotion cluster create NAME")
            hosts = sorted(s.scalars(select(Host.name).where(Host.cluster == name)).all())
            return ClusterOut(name=c.name, evc_mode=c.evc_mode, hosts=hosts,
                              migration_policy=json.loads(c.policy_json or "{}"))

    def list(self) -> list[ClusterOut]:
        with self.sessions() as s:
            names = s.scalars(select(Cluster.name).order_by(Cluster.name)).all()
        return [self.get(n) for n in names]

    def create(self, name: str, evc_mode: str | None) -> ClusterOut:
        with self.sessions.begin() as s:
            if s.get(Cluster, name) is not None:
                raise ConflictError(f"cluster {name!r} already exists", remedy="choose another name")
            s.add(Cluster(name=name, evc_mode=evc_mode))
        return self.get(name)

    def _usable(self, host: str) -> set[str]:
        facts = self.inv.host_facts(host)
        if facts is None or facts.cpu is None:
            raise ConflictError(f"host {host} has not reported its CPU models", remedy="reconnect its agent")
        return set(facts.cpu.usable_models)

    def add_host(self, name: str, host: str) -> ClusterOut:
        cluster = self.get(name)
        self.inv.get_host(host)
        if cluster.evc_mode and cluster.evc_mode not in self._usable(host):
            raise ConflictError(
                f"host {host} does not support cluster {name}'s EVC baseline {cluster.evc_mode}",
                remedy=f"lower the baseline (kvmotion cluster evc-modes {name}) or use a host with a newer CPU")
        with self.sessions.begin() as s:
            h = s.get(Host, host)
            assert h is not None
            h.cluster = name
        return self.get(name)

    def remove_host(self, name: str, host: str) -> ClusterOut:
        with self.sessions.begin() as s:
            h = s.get(Host, host)
            if h is None or h.cluster != name:
                raise NotFoundError(f"host {host} is not in cluster {name}", remedy="check kvmotion cluster list")
            h.cluster = None
        return self.get(name)

    async def evc_modes(self, name: str) -> list[str]:
        """Baselines every host of the cluster supports, the richest (most CPU features) first."""
        cluster = self.get(name)
        if not cluster.hosts:
            return []
        common = set.intersection(*(self._usable(h) for h in cluster.hosts)) - NOT_BASELINES
        plain = {m for m in common if not any(m == f"{o}-v1" for o in common)}   # skip "-v1" aliases
        sizes: dict[str, int] = {}
        agent = self.inv.agent(cluster.hosts[0])
        for model in plain:
            try:
                sizes[model] = len(await agent.cpu_expand(model, []))
            except KvmotionError:
                sizes[model] = 0
        return sorted(plain, key=lambda m: (-sizes[m], m))

    async def set_evc(self, name: str, mode: str | None) -> ClusterOut:
        cluster = self.get(name)
        if mode is not None and mode not in await self.evc_modes(name) and cluster.hosts:
            raise InvalidInputError(f"{mode!r} is not a baseline every host of {name} supports",
                                    remedy=f"pick one of: kvmotion cluster evc-modes {name}")
        with self.sessions.begin() as s:
            c = s.get(Cluster, name)
            assert c is not None
            c.evc_mode = mode
        return self.get(name)

    def set_policy(self, name: str, change: MigrationPolicy) -> ClusterOut:
        """The cluster's default migration policy: the fields ``change`` sets replace the current ones."""
        current = self.get(name).migration_policy
        with self.sessions.begin() as s:
            c = s.get(Cluster, name)
            assert c is not None
            c.policy_json = json.dumps(policy.merge(current, change))
        return self.get(name)

    def policy_for_host(self, host: str) -> dict:
        cluster = self.inv.get_host(host).cluster
        return self.get(cluster).migration_policy if cluster else {}

    def evc_for_host(self, host: str) -> str | None:
        cluster = self.inv.get_host(host).cluster
        return self.get(cluster).evc_mode if cluster else None

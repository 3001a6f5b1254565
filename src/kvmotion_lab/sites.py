"""The lab's controllers ("sites"). Controller A is the lab's own: its state in the lab's root, port 8760. With
`kvmotion lab up --controllers 2`, controller B runs beside it, in the same namespace and at the same address, on
port 8761, with its own state in ``ROOT/controllers/b/`` (controller.toml, controller.db, pki/, admin token, logs,
CLI config ``cli.json``). Of the lab's 2N hosts, h1..hN belong to A and h(N+1)..h(2N) to B.

`up` makes A and B one trust domain (docs/domains.md) through their REST API with their admin tokens, as their
admins would with `kvmotion domain create/show/join/approve`.
"""
from __future__ import annotations

import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import httpx

from kvmotion.cli.config import write_config
from kvmotion.common.http import tls_context, trust
from kvmotion.controller.auth import ADMIN_TOKEN_FILE
from kvmotion_lab import procs, services
from kvmotion_lab.netns import LabError

CONTROLLER_PORT = 8760
VM_IP_POOL = "198.18.1.100-198.18.1.199/24"
HOST_NETWORKS = ("198.18.0.0/15", "2001:2::/48")   # the lab's management networks (net.py): agents only there
START_DEADLINE_S = 60.0
DOMAIN_NAME = "lab"
NAMES = ("a", "b")                                   # A, then B
PORTS = {"a": CONTROLLER_PORT, "b": CONTROLLER_PORT + 1}
VM_IP_POOLS = {"a": VM_IP_POOL, "b": "198.18.1.200-198.18.1.249/24"}   # one VM network: no address in both
DOMAIN_CALL_DEADLINE_S = 30.0
STANDBY_PORTS = {"a": CONTROLLER_PORT + 2, "b": CONTROLLER_PORT + 3}   # a site's second controller process


def admin_token_path(root: Path) -> Path:
    """The first admin token of the controller whose state is in ``root`` (written by it, mode 0600)."""
    return root / ADMIN_TOKEN_FILE


def ca_path(root: Path) -> Path:
    """The CA certificate of the controller whose state is in ``root`` (it issued its HTTPS certificate)."""
    return root / "pki" / "ca-cert.pem"


def trust_controller(root: Path) -> ssl.SSLContext:
    """This process trusts that controller's CA (the shared TLS context of kvmotion's clients)."""
    if ca_path(root).exists():
        trust(ca_path(root))
    return tls_context()


def admin_call(method: str, root: Path, url: str, timeout: float, **kw: Any) -> httpx.Response:
    """A call to a lab controller over HTTPS, as its admin (its token), trusting its CA."""
    path = admin_token_path(root)
    headers = {"Authorization": f"Bearer {path.read_text().strip()}"} if path.exists() else {}
    return httpx.request(method, url, headers=headers, timeout=timeout, verify=trust_controller(root), **kw)


@dataclass(frozen=True)
class Site:
    """One controller of the lab: ``name`` "a" or "b", its URL and the folder of its state."""
    name: str
    url: str
    root: Path

    @property
    def process(self) -> str:
        """Its name among the lab's processes (`restart`): "controller" (A), "controller-b"."""
        return "controller" if self.name == NAMES[0] else f"controller-{self.name}"

    @property
    def member(self) -> str:
        """Its name in the lab's domain."""
        return f"ctl-{self.name}"

    @property
    def admin_token_path(self) -> Path:
        return admin_token_path(self.root)

    @property
    def ca_path(self) -> Path:
        return ca_path(self.root)

    @property
    def log(self) -> Path:
        return self.root / "logs" / "controller.log"

    def admin_token(self) -> str:
        return self.admin_token_path.read_text().strip()

    def call(self, method: str, path: str, timeout: float = 10.0, **kw: Any) -> httpx.Response:
        """``METHOD URL/PATH`` as this controller's admin."""
        return admin_call(method, self.root, f"{self.url}{path}", timeout, **kw)

    def record(self) -> dict[str, str]:
        return {"url": self.url, "root": str(self.root), "process": self.process, "member": self.member}


def site_root(lab_root: Path, name: str) -> Path:
    return lab_root if name == NAMES[0] else lab_root / "controllers" / name


def check_count(controllers: int) -> None:
    if controllers not in range(1, len(NAMES) + 1):
        raise LabError(f"a lab has 1 or {len(NAMES)} controllers, not {controllers}; "
                       f"use --controllers 1 or --controllers {len(NAMES)}")


def plan(lab_root: Path, controller_ip: str, controllers: int) -> list[Site]:
    """The lab's controllers: A, and B with ``controllers=2``."""
    check_count(controllers)
    return [Site(n, f"https://{controller_ip}:{PORTS[n]}", site_root(lab_root, n)) for n in NAMES[:controllers]]


def split_hosts(hosts: Sequence[str], controllers: int) -> dict[str, str]:
    """Which controller each host belongs to: the first ``len(hosts) / controllers`` to A, the next to B."""
    if controllers < 1 or len(hosts) % controllers:
        raise LabError(f"{len(hosts)} hosts do not split evenly among {controllers} controllers")
    per = len(hosts) // controllers
    return {h: NAMES[i // per] for i, h in enumerate(hosts)}


def from_state(lab_root: Path, state: dict[str, Any]) -> dict[str, Site]:
    """The controllers ``up`` recorded (a record from before B existed: A alone, at ``controller_url``)."""
    recs = state.get("controllers") or {NAMES[0]: {"url": state.get("controller_url", ""), "root": str(lab_root)}}
    return {n: Site(n, r["url"], Path(r["root"])) for n, r in recs.items()}


def controller_settings(root: Path, listen_host: str, admission: bool, name: str = NAMES[0],
                        database_url: str | None = None) -> dict[str, Any]:
    """A lab controller's controller.toml: its database, CA (pki/) and admin token in its folder; agents only from
    the lab's management networks; B listens on its own port and leases VM addresses A does not. With
    ``database_url`` (PostgreSQL), that database, and pki/ and the token's folder named explicitly (a standby
    controller, ``start_standby``, shares them)."""
    settings = {"listen_host": listen_host, "listen_port": PORTS[name],
                "database_url": f"sqlite:///{root / 'controller.db'}", "vm_ip_pool": VM_IP_POOLS[name],
                "host_networks": list(HOST_NETWORKS), "admission": admission}
    if database_url is not None:
        settings |= {"database_url": database_url, "pki_dir": str(root / "pki"), "token_dir": str(root),
                     "controller_name": f"ctl-{name}"}
    return settings


def healthy(site: Site) -> bool:
    return site.call("GET", "/api/v1/health", 2).status_code == 200


def start_controller(site: Site, lab_root: Path, listen_host: str, admission: bool, state: dict[str, Any],
                     cli_config: Path, database_url: str | None = None) -> None:
    """Write its controller.toml, start it as kvmotion-server.service does (recorded in ``state`` before it is
    waited for: `down` stops it also when it never comes up), then write the CLI's config for it."""
    site.root.mkdir(parents=True, exist_ok=True)
    config = services.controller_config_path(site.root)
    services.write_controller_config(config, controller_settings(site.root, listen_host, admission, site.name,
                                                                 database_url))
    state.setdefault("controllers", {})[site.name] = site.record()
    state["argv"][site.process] = services.service_argv(services.CONTROLLER_SCRIPT, config)
    state["pids"][site.process] = procs.spawn(state["argv"][site.process], site.log)
    procs.write_state(lab_root, state)
    procs.wait_until(lambda: healthy(site), START_DEADLINE_S, site.process, site.log)
    write_config(cli_config, site.url, site.admin_token_path, site.ca_path)


@dataclass(frozen=True)
class Standby:
    """A second controller process of a site, on the site's PostgreSQL database with its keys (pki/) and admin
    token: the two elect a leader (docs/controllers.md). Its own port, folder (config, log) and name."""
    process: str             # among the lab's processes: "controller-a2"
    name: str                # its controller_name: "ctl-a2"
    url: str
    root: Path
    of: Site

    @property
    def log(self) -> Path:
        return self.root / "logs" / "controller.log"

    def call(self, method: str, path: str, timeout: float = 10.0, **kw: Any) -> httpx.Response:
        """``METHOD URL/PATH`` as the site's admin (one token, one CA for both processes)."""
        return admin_call(method, self.of.root, f"{self.url}{path}", timeout, **kw)


def start_standby(lab_root: Path, site: Site, state: dict[str, Any]) -> Standby:
    """Start another controller process of ``site`` (which must use PostgreSQL): its controller.toml is the site's
    with its own port and name; recorded in ``state`` (`down` stops it) before it is waited for."""
    settings = tomllib.loads(services.controller_config_path(site.root).read_text())
    if str(settings.get("database_url", "")).startswith("sqlite"):
        raise LabError(f"controller {site.member} uses SQLite: a standby needs a shared PostgreSQL database "
                       "(start the lab with a database_url)")
    port = STANDBY_PORTS[site.name]
    standby = Standby(f"{site.process}-2", f"{site.member}2", f"https://{settings['listen_host']}:{port}",
                      lab_root / "controllers" / f"{site.name}2", site)
    (standby.root / "logs").mkdir(parents=True, exist_ok=True)
    config = services.controller_config_path(standby.root)
    services.write_controller_config(config, settings | {"listen_port": port, "controller_name": standby.name})
    state["argv"][standby.process] = services.service_argv(services.CONTROLLER_SCRIPT, config)
    state["pids"][standby.process] = procs.spawn(state["argv"][standby.process], standby.log)
    procs.write_state(lab_root, state)
    procs.wait_until(lambda: standby.call("GET", "/api/v1/health", 2).status_code == 200, START_DEADLINE_S,
                     standby.process, standby.log)
    return standby


def _ok(resp: httpx.Response, what: str) -> dict[str, Any]:
    if resp.status_code >= 300:
        try:
            err = resp.json().get("error", {})
            why = f"{err.get('message')} (remedy: {err.get('remedy')})"
        except (ValueError, AttributeError):
            why = resp.text[:300]
        raise LabError(f"{what} failed: HTTP {resp.status_code}: {why}")
    return resp.json()


def form_domain(a: Site, b: Site) -> None:
    """A creates the domain, B asks to join it with A's fingerprint, A approves B with B's fingerprint; each
    fingerprint is read on its own controller (`domain show`), as two admins would."""
    t = DOMAIN_CALL_DEADLINE_S
    _ok(a.call("POST", "/api/v1/domain", t, json={"name": DOMAIN_NAME, "controller_name": a.member,
                                                  "public_url": a.url}), f"domain create on {a.member}")
    fp_a = _ok(a.call("GET", "/api/v1/domain", t), f"domain show on {a.member}")["fingerprint"]
    _ok(b.call("POST", "/api/v1/domain/join", t, json={"url": a.url, "fingerprint": fp_a, "controller_name": b.member,
                                                       "public_url": b.url}), f"domain join of {b.member}")
    fp_b = _ok(b.call("GET", "/api/v1/domain", t), f"domain show on {b.member}")["fingerprint"]
    _ok(a.call("POST", f"/api/v1/domain/members/{b.member}/approve", t, json={"fingerprint": fp_b}),
        f"domain approve {b.member} on {a.member}")

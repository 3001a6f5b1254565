"""The lab: hosts as network namespaces, shared and local datastores, a controller (or two: ``sites``) and one
agent per host.

The lab is a deployment: the controllers and the agents start as their systemd units start them, from the files
an admin writes (``services``). ``up`` records everything it starts (processes by PID, the network via ``net``);
``down`` removes exactly that and is safe to run twice.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from kvmotion.agent.config import AgentConfig
from kvmotion.cli.config import ENV_CONFIG, SYSTEM_CONFIG, load_config
from kvmotion.common.hostauth import SECRET_FILE, HostAuth
from kvmotion.common.hostid import fingerprint
from kvmotion.common.pinning import ClientTls, client_context
from kvmotion.agent.apitls import API_DIR, CERT as API_CERT
from kvmotion.controller.agenttls import CERT_FILE as CLIENT_CERT, KEY_FILE as CLIENT_KEY
from kvmotion_lab import net, netdown, services, sites
from kvmotion_lab.netns import LabError, netns_exec_argv
from kvmotion_lab.procs import kill, pid_is_ours, read_state, spawn, state_path, wait_until, write_state
from kvmotion_lab.sites import START_DEADLINE_S, Site, admin_token_path, trust_controller

DEFAULT_ROOT = Path(os.environ.get("KVMOTION_LAB_DIR", "/var/lib/kvmotion/lab"))
DEFAULT_PREFIX = os.environ.get("KVMOTION_LAB_PREFIX", "kvmo")
AGENT_PORT = 8770
LINK_RATES = {"1g": 1000, "10g": 10000}     # lab up --link: shape each host's migration link with tc


@dataclass(frozen=True)
class LabInfo:
    root: Path
    controller_url: str                     # controller A's
    net: net.LabNet
    pids: dict[str, int]
    controllers: dict[str, Site] = field(default_factory=dict)    # "a" (and "b"): URL, folder, token, CA
    host_controllers: dict[str, str] = field(default_factory=dict)   # host -> "a" or "b"

    def host_netns(self, host: str) -> str:
        return self.net.host(host).netns

    def admin_token(self) -> str:
        return admin_token_path(self.root).read_text().strip()

    def controller_of(self, host: str) -> Site:
        """The controller that manages ``host``."""
        return self.controllers[self.host_controllers.get(host, sites.NAMES[0])]

    def hosts_of(self, controller: str) -> list[str]:
        """The hosts controller ``controller`` ("a", "b") manages, in order."""
        return [h.name for h in self.net.hosts if self.host_controllers.get(h.name, sites.NAMES[0]) == controller]


def host_site(root: Path, host: str) -> Site:
    """The controller a lab host belongs to, from what ``up`` recorded."""
    state = read_state(root) or {}
    return sites.from_state(root, state)[state.get("hosts", {}).get(host, sites.NAMES[0])]


def agent_tls(root: Path, host: str) -> ClientTls:
    """Connect to a lab agent as its controller does: that controller's client certificate, and only the
    certificate the agent serves now (from its own state directory)."""
    pem = (root / "hosts" / host / API_DIR / API_CERT).read_text()
    pki = host_site(root, host).root / "pki"
    return ClientTls(pki / CLIENT_CERT, pki / CLIENT_KEY, (pem,))


def agent_http(root: Path, host: str, timeout: float = 10.0) -> httpx.Client:
    """An HTTPS client for one lab agent, signing like the controller does (lab tooling and tests; root only)."""
    info = load(root)
    assert info is not None, f"no lab at {root}"
    h = info.net.host(host)
    base = f"https://{h.mgmt_ip}:{AGENT_PORT}" if h.mgmt_ip else f"https://[{h.mgmt_ip6}]:{AGENT_PORT}"
    secret = (root / "hosts" / host / SECRET_FILE).read_text().strip()
    return httpx.Client(base_url=base, auth=HostAuth(secret), timeout=timeout,
                        verify=client_context(agent_tls(root, host)))


def _agent_healthy(root: Path, host: str) -> bool:
    if not (root / "hosts" / host / SECRET_FILE).exists() or not (root / "hosts" / host / API_DIR / API_CERT).exists():
        return False
    with agent_http(root, host, timeout=2) as c:
        return c.get("/v1/health").status_code == 200


def load(root: Path = DEFAULT_ROOT) -> LabInfo | None:
    data = read_state(root)
    if data is None:
        return None
    lab_net = net.load_lab(root / "net.json")
    if lab_net is None:
        return None
    controllers = sites.from_state(root, data)
    for site in controllers.values():
        trust_controller(site.root)
    return LabInfo(root=root, controller_url=data["controller_url"], net=lab_net, pids=data.get("pids", {}),
                   controllers=controllers, host_controllers=data.get("hosts", {}))


SHARED_IMAGE = "shared:images/debian.qcow2"


def stage_image(root: Path, disk: Path, name: str = "debian.qcow2") -> str:
    """Copy a guest disk image into the lab's shared datastore (``images/NAME``); its ``--image`` reference."""
    images = root / "ds" / "shared" / "images"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(disk, images / name)
    return f"shared:images/{name}"


def shape_link(netns: str, ifname: str, mbps: int) -> None:
    """A token bucket on the interface's egress: the link really carries at most ``mbps``."""
    burst = max(64_000, mbps * 125_000 // 100)          # 10 ms worth of bytes
    subprocess.run(netns_exec_argv(netns, ["tc", "qdisc", "replace", "dev", ifname, "root", "tbf", "rate",
                                               f"{mbps}mbit", "burst", str(burst), "latency", "50ms"]),
                   check=True, capture_output=True, timeout=10)


def up(n_hosts: int = 2, root: Path = DEFAULT_ROOT, prefix: str = DEFAULT_PREFIX, image_dir: Path | None = None,
       ipv6_hosts: set[str] = frozenset(), log: Callable[[str], None] = print, link: str | None = None,
       admission: bool = True, controllers: int = 1, database_url: str | None = None) -> LabInfo:
    """The lab: ``n_hosts`` hosts per controller; with ``controllers=2`` two controllers in one trust domain.
    ``database_url``: controller A's database is that PostgreSQL one (``start_standby`` adds a second process)."""
    if link is not None and link not in LINK_RATES:
        raise LabError(f"unknown link {link!r}; use one of {', '.join(LINK_RATES)}")
    sites.check_count(controllers)
    if state_path(root).exists():
        raise LabError(f"a lab is already up (state {state_path(root)}); run `kvmotion lab down` first")
    root.mkdir(parents=True, exist_ok=True)
    write_state(root, {"controller_url": "", "pids": {}, "prefix": prefix})
    try:
        return _up(n_hosts, root, prefix, image_dir, ipv6_hosts, log, link, admission, controllers, database_url)
    except BaseException:
        down(root)
        raise


def _up(n_hosts: int, root: Path, prefix: str, image_dir: Path | None, ipv6_hosts: set[str],
        log: Callable[[str], None], link: str | None, admission: bool, controllers: int,
        database_url: str | None = None) -> LabInfo:
    state: dict[str, Any] = {"controller_url": "", "pids": {}, "prefix": prefix, "argv": {}, "controllers": {}}
    lab_net = net.lab_up(prefix, n_hosts * controllers, root / "net.json", ipv6_hosts=set(ipv6_hosts))
    log(f"network: {len(lab_net.hosts)} host namespaces, switch {lab_net.switch_netns}, client {lab_net.client_netns}"
        + (f", migration links shaped to {link}" if link else ""))
    (root / "logs").mkdir(exist_ok=True)
    services.make_datastore(root / "ds" / "shared", "shared", shared=True)
    state["hosts"] = sites.split_hosts([h.name for h in lab_net.hosts], controllers)
    planned = {s.name: s for s in sites.plan(root, lab_net.controller_ip, controllers)}
    for site in planned.values():
        _start_controller(root, site, lab_net, state, admission, database_url if site.root == root else None)
        log(f"controller {site.member}: {site.url} (pid {state['pids'][site.process]}), admin token "
            f"{site.admin_token_path}; CLI config {site_cli_config(root, site)}")
    for h in lab_net.hosts:
        site = planned[state["hosts"][h.name]]
        _start_agent(root, h, site, state, image_dir, enrol_token(site, root / "hosts" / h.name), link)
    for h in lab_net.hosts:
        site = planned[state["hosts"][h.name]]
        _connect_agent(root, h, site)
        log(f"host {h.name}: mgmt {h.mgmt_ip or h.mgmt_ip6}, migration {h.mig_ip}, agent pid "
            f"{state['pids'][f'agent-{h.name}']}" + (f", controller {site.member}" if controllers > 1 else ""))
    if controllers > 1:
        sites.form_domain(planned["a"], planned["b"])
        log(f"domain {sites.DOMAIN_NAME}: {', '.join(s.member for s in planned.values())} are members")
    info = load(root)
    assert info is not None
    return info


def cli_config_path(root: Path) -> Path:
    """Where the lab writes the CLI's config: for the default lab where the CLI looks ($KVMOTION_CONFIG, else the
    system default), for any other lab inside it (`lab up` prints the KVMOTION_CONFIG to use)."""
    if root != DEFAULT_ROOT:
        return root / "cli.json"
    return Path(os.environ[ENV_CONFIG]) if os.environ.get(ENV_CONFIG) else SYSTEM_CONFIG


def site_cli_config(root: Path, site: Site) -> Path:
    """A's CLI config where the CLI looks (``cli_config_path``); B's always in its own folder."""
    return cli_config_path(root) if site.root == root else site.root / "cli.json"


def _start_controller(root: Path, site: Site, lab_net: net.LabNet, state: dict[str, Any], admission: bool,
                      database_url: str | None = None) -> None:
    """Start a controller (agents only from the lab's management networks) and write the CLI's config for it."""
    if site.root == root:
        state["controller_url"] = site.url
        state["cli_config"] = str(cli_config_path(root))       # recorded before it is written: `down` removes it
    sites.start_controller(site, root, lab_net.controller_ip, admission, state, site_cli_config(root, site),
                           database_url)
    write_state(root, state)


def enrol_token(site: Site, host_dir: Path) -> Path:
    """A single-use enrolment token of ``site`` for one host (as `kvmotion host enrol-token`), in a 0600 file in
    the host's state folder."""
    enrol = site.call("POST", "/api/v1/tokens", 10, json={"name": f"lab-enrol-{host_dir.name}-{secrets.token_hex(3)}",
                                                          "role": "enrol", "ttl_s": 3600})
    enrol.raise_for_status()
    host_dir.mkdir(parents=True, exist_ok=True)
    enrol_file = host_dir / "enrol.token"
    fd = os.open(enrol_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(enrol.json()["token"] + "\n")
    return enrol_file


def approve_when_pending(site: Site, host: str, state_dir: Path) -> bool:
    """The admin's part of a registration: once ``host`` is pending at ``site``, approve it with the fingerprint
    read on the host itself (its agent's secret, as `kvmotion-agent --fingerprint` prints it). False: not pending
    (yet)."""
    r = site.call("GET", "/api/v1/hosts/pending", 5)
    if r.status_code != 200 or host not in {p["name"] for p in r.json()}:
        return False
    fp = fingerprint((state_dir / SECRET_FILE).read_text().strip())
    site.call("POST", f"/api/v1/hosts/{host}/approve", 60, json={"fingerprint": fp}).raise_for_status()
    return True


def agent_init_args(root: Path, h: net.HostNet, site: Site, image_dir: Path | None, enrol_file: Path,
                    link: str | None) -> list[str]:
    """The `kvmotion-agent init` options that set a lab host up for its controller ``site`` (its datastores are
    marked already: the lab's shared one and its own local one).

    An IPv6-managed host cannot reach the IPv4 controller: it does not register (the lab adds it by address)."""
    mgmt = h.mgmt_ip or h.mgmt_ip6 or ""
    args = ["init", "--config", str(services.agent_config_path(root, h.name)), "--name", h.name,
            "--mgmt-address", mgmt, "--listen-host", mgmt, "--listen-port", str(AGENT_PORT),
            "--state-dir", str(root / "hosts" / h.name), "--datastore", str(root / "ds" / "shared"),
            "--datastore", str(root / "ds" / f"{h.name}-local"), "--migration-interface", "mig0",
            "--controller-ca-file", str(site.ca_path), "--accelerator", os.environ.get("KVMOTION_ACCEL", "auto")]
    if not h.mgmt_ip6:
        args += ["--controller-url", site.url, "--enrol-token-file", str(enrol_file)]
    if image_dir is not None:
        args += ["--image-dir", str(image_dir)]
    if link is not None:
        args += ["--declared-link-mbps", f"mig0={LINK_RATES[link]}"]
    return args


def _start_agent(root: Path, h: net.HostNet, site: Site, state: dict[str, Any], image_dir: Path | None,
                 enrol_file: Path, link: str | None) -> None:
    """Set the host up as an admin does (`kvmotion-agent datastore init`, `kvmotion-agent init`), then start its
    agent inside the host's namespace as kvmotion-agent.service does."""
    if link is not None:
        shape_link(h.netns, "mig0", LINK_RATES[link])
    services.make_datastore(root / "ds" / f"{h.name}-local", f"{h.name}-local", shared=False)
    services.agent_setup(*agent_init_args(root, h, site, image_dir, enrol_file, link))
    config = services.agent_config_path(root, h.name)
    argv = netns_exec_argv(h.netns, services.service_argv(services.AGENT_SCRIPT, config))
    state["argv"][f"agent-{h.name}"] = argv
    state["pids"][f"agent-{h.name}"] = spawn(argv, root / "logs" / f"agent-{h.name}.log")
    write_state(root, state)


def _connect_agent(root: Path, h: net.HostNet, site: Site) -> None:
    """Wait until its controller has the host connected (an IPv6-managed host is added by address)."""
    agent_log = root / "logs" / f"agent-{h.name}.log"
    if h.mgmt_ip6:   # an IPv6-managed host cannot reach the IPv4 controller: add it by address instead
        url6 = f"https://[{h.mgmt_ip6}]:{AGENT_PORT}"
        wait_until(lambda: _agent_healthy(root, h.name), START_DEADLINE_S, f"agent {h.name}", agent_log)
        secret = (root / "hosts" / h.name / SECRET_FILE).read_text().strip()
        site.call("POST", "/api/v1/hosts", 30, json={"address": url6, "secret": secret}).raise_for_status()
    else:          # it registers itself and waits for the admin (the lab) to approve it
        wait_until(lambda: approve_when_pending(site, h.name, root / "hosts" / h.name),
                   START_DEADLINE_S, f"agent {h.name} registration", agent_log)
    wait_until(lambda: _host_connected(site, h.name), START_DEADLINE_S, f"agent {h.name}", agent_log)


def restart(root: Path, name: str, crash: bool = False, deadline_s: float = START_DEADLINE_S,
            env: dict[str, str] | None = None) -> int:
    """Stop a lab process ("controller", "controller-b" or "agent-h1") by PID and start it again; returns the
    new PID.

    ``crash`` kills it with SIGKILL (no clean shutdown). A host's VMs keep running meanwhile. ``env`` adds
    environment variables for the new process only (fault injection in tests).
    """
    state = read_state(root) or {}
    if name not in state.get("argv", {}):
        raise LabError(f"no lab process named {name!r}; known: {', '.join(state.get('argv', {}))}")
    old = state["pids"].get(name)
    if old and pid_is_ours(old):
        if crash:
            os.kill(old, signal.SIGKILL)
        kill(old, grace_s=5.0)
    site = next((s for s in sites.from_state(root, state).values() if s.process == name), None)
    log = site.log if site is not None else root / "logs" / f"{name}.log"
    state["pids"][name] = spawn(state["argv"][name], log, env)
    write_state(root, state)
    if site is not None:
        wait_until(lambda: sites.healthy(site), deadline_s, name, log)
    else:
        wait_until(lambda: _agent_healthy(root, name.removeprefix("agent-")), deadline_s, name, log)
    return int(state["pids"][name])


def start_standby(root: Path, of: str = sites.NAMES[0]) -> sites.Standby:
    """A second controller process of controller ``of`` on its PostgreSQL database (``sites.start_standby``)."""
    state = read_state(root) or {}
    return sites.start_standby(root, sites.from_state(root, state)[of], state)


def configure_host(root: Path, host: str, **changes: Any) -> AgentConfig:
    """Change a host's agent configuration and restart its agent (its VMs keep running).

    Used for lab settings: hide a datastore, declare a link speed, present a LUN, mask CPU features.
    """
    cfg = services.reconfigure_agent(services.agent_config_path(root, host), changes)
    restart(root, f"agent-{host}")
    wait_until(lambda: _host_connected(host_site(root, host), host), START_DEADLINE_S, f"agent {host}")
    return cfg


def _host_connected(site: Site, name: str) -> bool:
    r = site.call("GET", f"/api/v1/hosts/{name}", 5)
    return r.status_code == 200 and r.json()["state"] == "connected"


def down(root: Path = DEFAULT_ROOT) -> list[str]:
    """Stop what `up` recorded: agents and their VMs die with their namespaces, then the controllers."""
    removed: list[str] = []
    state = read_state(root)
    if (root / "net.json").exists():
        removed += netdown.lab_down(root / "net.json")
    if state is not None and state.get("cli_config"):
        _remove_cli_config(Path(state["cli_config"]), root, removed)
    if state is not None:
        for name, pid in state.get("pids", {}).items():
            if pid_is_ours(pid) and kill(pid):
                removed.append(f"process {name} (pid {pid})")
    if root.exists() and state is not None:
        shutil.rmtree(root, ignore_errors=True)
        removed.append(f"folder {root}")
    return removed


def _remove_cli_config(path: Path, root: Path, removed: list[str]) -> None:
    """Remove the CLI config the lab wrote, unless another lab has written its own there since."""
    if load_config(path).token_file == admin_token_path(root):
        path.unlink(missing_ok=True)
        removed.append(f"CLI config {path}")


def status(root: Path = DEFAULT_ROOT) -> dict[str, Any]:
    info = load(root)
    if info is None:
        return {"up": False, "root": str(root)}
    procs = {name: {"pid": pid, "alive": pid_is_ours(pid)} for name, pid in info.pids.items()}
    return {"up": True, "root": str(root), "controller_url": info.controller_url, "processes": procs,
            "controllers": {n: {**s.record(), "hosts": info.hosts_of(n)} for n, s in info.controllers.items()},
            "namespaces": [h.netns for h in info.net.hosts] + [info.net.switch_netns, info.net.client_netns],
            "hosts": [{"name": h.name, "netns": h.netns, "mgmt": h.mgmt_ip or h.mgmt_ip6, "migration": h.mig_ip,
                       "controller": info.controller_of(h.name).member} for h in info.net.hosts]}

"""The lab: hosts as network namespaces, shared and local datastores, a controller and one agent per host.

The lab is a deployment: the controller and the agents start as their systemd units start them, from the files
an admin writes (``services``). ``up`` records everything it starts (processes by PID, the network via ``net``);
``down`` removes exactly that and is safe to run twice.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

from kvmotion.agent.config import AgentConfig
from kvmotion.cli.config import ENV_CONFIG, SYSTEM_CONFIG, load_config, write_config
from kvmotion.common.hostauth import SECRET_FILE, HostAuth
from kvmotion.common.hostid import fingerprint
from kvmotion.common.pinning import ClientTls, client_context
from kvmotion.agent.apitls import API_DIR, CERT as API_CERT
from kvmotion.controller.agenttls import CERT_FILE as CLIENT_CERT, KEY_FILE as CLIENT_KEY
from kvmotion.common.http import tls_context, trust
from kvmotion.controller.auth import ADMIN_TOKEN_FILE
from kvmotion_lab import net, netdown, services
from kvmotion_lab.netns import LabError, netns_exec_argv

DEFAULT_ROOT = Path(os.environ.get("KVMOTION_LAB_DIR", "/var/lib/kvmotion/lab"))
DEFAULT_PREFIX = os.environ.get("KVMOTION_LAB_PREFIX", "kvmo")
CONTROLLER_PORT = 8760
AGENT_PORT = 8770
VM_IP_POOL = "198.18.1.100-198.18.1.199/24"
HOST_NETWORKS = ("198.18.0.0/15", "2001:2::/48")   # the lab's management networks (net.py): agents only there
LINK_RATES = {"1g": 1000, "10g": 10000}     # lab up --link: shape each host's migration link with tc
START_DEADLINE_S = 60.0


@dataclass(frozen=True)
class LabInfo:
    root: Path
    controller_url: str
    net: net.LabNet
    pids: dict[str, int]

    def host_netns(self, host: str) -> str:
        return self.net.host(host).netns

    def admin_token(self) -> str:
        return admin_token_path(self.root).read_text().strip()


def admin_token_path(root: Path) -> Path:
    """The lab controller's first admin token (written by the controller, mode 0600)."""
    return root / ADMIN_TOKEN_FILE


def _admin_headers(root: Path) -> dict[str, str]:
    path = admin_token_path(root)
    return {"Authorization": f"Bearer {path.read_text().strip()}"} if path.exists() else {}


def agent_tls(root: Path, host: str) -> ClientTls:
    """Connect to a lab agent as its controller does: the controller's client certificate, and only the
    certificate the agent serves now (from its own state directory)."""
    pem = (root / "hosts" / host / API_DIR / API_CERT).read_text()
    return ClientTls(root / "pki" / CLIENT_CERT, root / "pki" / CLIENT_KEY, (pem,))


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


def state_path(root: Path) -> Path:
    return root / "lab.json"


def _write_state(root: Path, data: dict[str, Any]) -> None:
    tmp = root / "lab.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, state_path(root))


def load(root: Path = DEFAULT_ROOT) -> LabInfo | None:
    try:
        data = json.loads(state_path(root).read_text())
    except (OSError, ValueError):
        return None
    lab_net = net.load_lab(root / "net.json")
    if lab_net is None:
        return None
    trust_controller(root)
    return LabInfo(root=root, controller_url=data["controller_url"], net=lab_net, pids=data.get("pids", {}))


def ca_path(root: Path) -> Path:
    """The lab controller's CA certificate (it issued the controller's HTTPS certificate)."""
    return root / "pki" / "ca-cert.pem"


def trust_controller(root: Path) -> ssl.SSLContext:
    """This process trusts the lab controller's CA (the shared TLS context of kvmotion's clients)."""
    if ca_path(root).exists():
        trust(ca_path(root))
    return tls_context()


def _controller(method: str, root: Path, url: str, timeout: float, **kw: Any) -> httpx.Response:
    """A call to the lab's controller over HTTPS, as the admin (its token), trusting the lab's CA."""
    return httpx.request(method, url, headers=_admin_headers(root), timeout=timeout, verify=trust_controller(root),
                         **kw)


SHARED_IMAGE = "shared:images/debian.qcow2"


def stage_image(root: Path, disk: Path, name: str = "debian.qcow2") -> str:
    """Copy a guest disk image into the lab's shared datastore (``images/NAME``); its ``--image`` reference."""
    images = root / "ds" / "shared" / "images"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(disk, images / name)
    return f"shared:images/{name}"


def _spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True,
                                env=services.service_env(env))
    return proc.pid


def _wait(check: Callable[[], bool], deadline_s: float, what: str, log: Path | None = None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError, ValueError):
            pass
        time.sleep(0.2)
    tail = ""
    if log is not None and log.exists():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
    raise LabError(f"{what} did not come up within {deadline_s:.0f}s: {tail}")


def shape_link(netns: str, ifname: str, mbps: int) -> None:
    """A token bucket on the interface's egress: the link really carries at most ``mbps``."""
    burst = max(64_000, mbps * 125_000 // 100)          # 10 ms worth of bytes
    subprocess.run(netns_exec_argv(netns, ["tc", "qdisc", "replace", "dev", ifname, "root", "tbf", "rate",
                                               f"{mbps}mbit", "burst", str(burst), "latency", "50ms"]),
                   check=True, capture_output=True, timeout=10)


def up(n_hosts: int = 2, root: Path = DEFAULT_ROOT, prefix: str = DEFAULT_PREFIX, image_dir: Path | None = None,
       ipv6_hosts: set[str] = frozenset(), log: Callable[[str], None] = print, link: str | None = None,
       admission: bool = True) -> LabInfo:
    if link is not None and link not in LINK_RATES:
        raise LabError(f"unknown link {link!r}; use one of {', '.join(LINK_RATES)}")
    if state_path(root).exists():
        raise LabError(f"a lab is already up (state {state_path(root)}); run `kvmotion lab down` first")
    root.mkdir(parents=True, exist_ok=True)
    _write_state(root, {"controller_url": "", "pids": {}, "prefix": prefix})
    try:
        return _up(n_hosts, root, prefix, image_dir, ipv6_hosts, log, link, admission)
    except BaseException:
        down(root)
        raise


def _up(n_hosts: int, root: Path, prefix: str, image_dir: Path | None, ipv6_hosts: set[str],
        log: Callable[[str], None], link: str | None, admission: bool) -> LabInfo:
    state: dict[str, Any] = {"controller_url": "", "pids": {}, "prefix": prefix, "argv": {}}
    lab_net = net.lab_up(prefix, n_hosts, root / "net.json", ipv6_hosts=set(ipv6_hosts))
    log(f"network: {len(lab_net.hosts)} host namespaces, switch {lab_net.switch_netns}, client {lab_net.client_netns}"
        + (f", migration links shaped to {link}" if link else ""))
    (root / "logs").mkdir(exist_ok=True)
    services.make_datastore(root / "ds" / "shared", "shared", shared=True)
    _start_controller(root, lab_net, state, admission)
    log(f"controller: {state['controller_url']} (pid {state['pids']['controller']}), admin token "
        f"{admin_token_path(root)}; CLI config {state['cli_config']}")
    for h in lab_net.hosts:
        _start_agent(root, h, state, image_dir, enrol_token(root, state["controller_url"], h.name), link)
    for h in lab_net.hosts:
        _connect_agent(root, h, state["controller_url"])
        log(f"host {h.name}: mgmt {h.mgmt_ip or h.mgmt_ip6}, migration {h.mig_ip}, agent pid {state['pids'][f'agent-{h.name}']}")
    info = load(root)
    assert info is not None
    return info


def cli_config_path(root: Path) -> Path:
    """Where the lab writes the CLI's config: for the default lab where the CLI looks ($KVMOTION_CONFIG, else the
    system default), for any other lab inside it (`lab up` prints the KVMOTION_CONFIG to use)."""
    if root != DEFAULT_ROOT:
        return root / "cli.json"
    return Path(os.environ[ENV_CONFIG]) if os.environ.get(ENV_CONFIG) else SYSTEM_CONFIG


def controller_settings(root: Path, listen_host: str, admission: bool) -> dict[str, Any]:
    """The lab's controller.toml: its database, CA (pki/) and admin token in the lab's folder; agents only from
    the lab's management networks."""
    return {"listen_host": listen_host, "listen_port": CONTROLLER_PORT,
            "database_url": f"sqlite:///{root / 'controller.db'}", "vm_ip_pool": VM_IP_POOL,
            "host_networks": list(HOST_NETWORKS), "admission": admission}


def _start_controller(root: Path, lab_net: net.LabNet, state: dict[str, Any], admission: bool) -> None:
    """Start the controller (agents only from the lab's management networks) and write the CLI's config."""
    controller_url = f"https://{lab_net.controller_ip}:{CONTROLLER_PORT}"
    state["controller_url"] = controller_url
    config = services.controller_config_path(root)
    services.write_controller_config(config, controller_settings(root, lab_net.controller_ip, admission))
    state["argv"]["controller"] = services.service_argv(services.CONTROLLER_SCRIPT, config)
    log_file = root / "logs" / "controller.log"
    state["pids"]["controller"] = _spawn(state["argv"]["controller"], log_file)
    _write_state(root, state)
    _wait(lambda: _controller("GET", root, f"{controller_url}/api/v1/health", 2).status_code == 200,
          START_DEADLINE_S, "controller", log_file)
    state["cli_config"] = str(cli_config_path(root))
    _write_state(root, state)
    write_config(cli_config_path(root), controller_url, admin_token_path(root), ca_path(root))


def enrol_token(root: Path, controller_url: str, host: str) -> Path:
    """A single-use enrolment token for one host (as `kvmotion host enrol-token`), in a 0600 file."""
    enrol = _controller("POST", root, f"{controller_url}/api/v1/tokens", 10, json={"name": f"lab-enrol-{host}-{secrets.token_hex(3)}", "role": "enrol", "ttl_s": 3600})
    enrol.raise_for_status()
    (root / "hosts" / host).mkdir(parents=True, exist_ok=True)
    enrol_file = root / "hosts" / host / "enrol.token"
    fd = os.open(enrol_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(enrol.json()["token"] + "\n")
    return enrol_file


def approve_when_pending(root: Path, controller_url: str, host: str, state_dir: Path) -> bool:
    """The admin's part of a registration: once ``host`` is pending, approve it with the fingerprint read on the
    host itself (its agent's secret, as `kvmotion-agent --fingerprint` prints it). False: not pending (yet)."""
    r = _controller("GET", root, f"{controller_url}/api/v1/hosts/pending", 5)
    if r.status_code != 200 or host not in {p["name"] for p in r.json()}:
        return False
    fp = fingerprint((state_dir / SECRET_FILE).read_text().strip())
    _controller("POST", root, f"{controller_url}/api/v1/hosts/{host}/approve", 60,
                json={"fingerprint": fp}).raise_for_status()
    return True


def agent_init_args(root: Path, h: net.HostNet, controller_url: str, image_dir: Path | None, enrol_file: Path,
                    link: str | None) -> list[str]:
    """The `kvmotion-agent init` options that set a lab host up (its datastores are marked already).

    An IPv6-managed host cannot reach the IPv4 controller: it does not register (the lab adds it by address)."""
    mgmt = h.mgmt_ip or h.mgmt_ip6 or ""
    args = ["init", "--config", str(services.agent_config_path(root, h.name)), "--name", h.name,
            "--mgmt-address", mgmt, "--listen-host", mgmt, "--listen-port", str(AGENT_PORT),
            "--state-dir", str(root / "hosts" / h.name), "--datastore", str(root / "ds" / "shared"),
            "--datastore", str(root / "ds" / f"{h.name}-local"), "--migration-interface", "mig0",
            "--controller-ca-file", str(ca_path(root)), "--accelerator", os.environ.get("KVMOTION_ACCEL", "auto")]
    if not h.mgmt_ip6:
        args += ["--controller-url", controller_url, "--enrol-token-file", str(enrol_file)]
    if image_dir is not None:
        args += ["--image-dir", str(image_dir)]
    if link is not None:
        args += ["--declared-link-mbps", f"mig0={LINK_RATES[link]}"]
    return args


def _start_agent(root: Path, h: net.HostNet, state: dict[str, Any], image_dir: Path | None, enrol_file: Path,
                 link: str | None) -> None:
    """Set the host up as an admin does (`kvmotion-agent datastore init`, `kvmotion-agent init`), then start its
    agent inside the host's namespace as kvmotion-agent.service does."""
    if link is not None:
        shape_link(h.netns, "mig0", LINK_RATES[link])
    services.make_datastore(root / "ds" / f"{h.name}-local", f"{h.name}-local", shared=False)
    services.agent_setup(*agent_init_args(root, h, state["controller_url"], image_dir, enrol_file, link))
    config = services.agent_config_path(root, h.name)
    argv = netns_exec_argv(h.netns, services.service_argv(services.AGENT_SCRIPT, config))
    state["argv"][f"agent-{h.name}"] = argv
    state["pids"][f"agent-{h.name}"] = _spawn(argv, root / "logs" / f"agent-{h.name}.log")
    _write_state(root, state)


def _connect_agent(root: Path, h: net.HostNet, controller_url: str) -> None:
    """Wait until the controller has the host connected (an IPv6-managed host is added by address)."""
    agent_log = root / "logs" / f"agent-{h.name}.log"
    if h.mgmt_ip6:   # an IPv6-managed host cannot reach the IPv4 controller: add it by address instead
        url6 = f"https://[{h.mgmt_ip6}]:{AGENT_PORT}"
        _wait(lambda: _agent_healthy(root, h.name), START_DEADLINE_S, f"agent {h.name}", agent_log)
        secret = (root / "hosts" / h.name / SECRET_FILE).read_text().strip()
        _controller("POST", root, f"{controller_url}/api/v1/hosts", 30,
                    json={"address": url6, "secret": secret}).raise_for_status()
    else:          # it registers itself and waits for the admin (the lab) to approve it
        _wait(lambda: approve_when_pending(root, controller_url, h.name, root / "hosts" / h.name),
              START_DEADLINE_S, f"agent {h.name} registration", agent_log)
    _wait(lambda: _host_connected(root, controller_url, h.name), START_DEADLINE_S, f"agent {h.name}", agent_log)


def restart(root: Path, name: str, crash: bool = False, deadline_s: float = START_DEADLINE_S,
            env: dict[str, str] | None = None) -> int:
    """Stop a lab process ("controller" or "agent-h1") by PID and start it again; returns the new PID.

    ``crash`` kills it with SIGKILL (no clean shutdown). A host's VMs keep running meanwhile. ``env`` adds
    environment variables for the new process only (fault injection in tests).
    """
    state = json.loads(state_path(root).read_text())
    if name not in state.get("argv", {}):
        raise LabError(f"no lab process named {name!r}; known: {', '.join(state.get('argv', {}))}")
    old = state["pids"].get(name)
    if old and _pid_is_ours(old):
        if crash:
            os.kill(old, signal.SIGKILL)
            _kill(old, grace_s=5.0)
        else:
            _kill(old)
    log = root / "logs" / f"{name}.log"
    state["pids"][name] = _spawn(state["argv"][name], log, env)
    _write_state(root, state)
    info = load(root)
    assert info is not None
    if name == "controller":
        _wait(lambda: _controller("GET", root, f"{info.controller_url}/api/v1/health", 2).status_code == 200,
              deadline_s, name, log)
    else:
        _wait(lambda: _agent_healthy(root, name.removeprefix("agent-")), deadline_s, name, log)
    return int(state["pids"][name])


def configure_host(root: Path, host: str, **changes: Any) -> AgentConfig:
    """Change a host's agent configuration and restart its agent (its VMs keep running).

    Used for lab settings: hide a datastore, declare a link speed, present a LUN, mask CPU features.
    """
    cfg = services.reconfigure_agent(services.agent_config_path(root, host), changes)
    restart(root, f"agent-{host}")
    info = load(root)
    assert info is not None
    _wait(lambda: _host_connected(root, info.controller_url, host), START_DEADLINE_S, f"agent {host}")
    return cfg


def _host_connected(root: Path, url: str, name: str) -> bool:
    r = _controller("GET", root, f"{url}/api/v1/hosts/{name}", 5)
    return r.status_code == 200 and r.json()["state"] == "connected"


def _kill(pid: int, grace_s: float = 5.0) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break
        except (ProcessLookupError, OSError):
            break
        time.sleep(0.05)
    else:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


def down(root: Path = DEFAULT_ROOT) -> list[str]:
    """Stop what `up` recorded: agents and their VMs die with their namespaces, then the controller."""
    removed: list[str] = []
    try:
        state = json.loads(state_path(root).read_text())
    except (OSError, ValueError):
        state = None
    if (root / "net.json").exists():
        removed += netdown.lab_down(root / "net.json")
    if state is not None and state.get("cli_config"):
        _remove_cli_config(Path(state["cli_config"]), root, removed)
    if state is not None:
        for name, pid in state.get("pids", {}).items():
            if _pid_is_ours(pid) and _kill(pid):
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


def _pid_is_ours(pid: int) -> bool:
    """Only a kvmotion process we started (the PID may have been reused since)."""
    try:
        return b"kvmotion" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def status(root: Path = DEFAULT_ROOT) -> dict[str, Any]:
    info = load(root)
    if info is None:
        return {"up": False, "root": str(root)}
    procs = {name: {"pid": pid, "alive": _pid_is_ours(pid)} for name, pid in info.pids.items()}
    return {"up": True, "root": str(root), "controller_url": info.controller_url, "processes": procs,
            "namespaces": [h.netns for h in info.net.hosts] + [info.net.switch_netns, info.net.client_netns],
            "hosts": [{"name": h.name, "netns": h.netns, "mgmt": h.mgmt_ip or h.mgmt_ip6, "migration": h.mig_ip}
                      for h in info.net.hosts]}

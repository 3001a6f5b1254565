"""`kvmotion-agent init` and `kvmotion-agent datastore init`: set up a host on its own disk, before the agent runs.

These are local-disk commands, so they live with the agent's executable (the product CLI `kvmotion` speaks HTTP
to the controller only). Each one checks everything first and writes only when every check passed.
"""
from __future__ import annotations

import argparse
import os
import sysconfig
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from kvmotion.agent.config import DEFAULT_CONFIG, AgentConfig, DatastoreMarker
from kvmotion.agent.markers import ensure_marker, new_marker, read_marker
from kvmotion.common.configfile import dump_toml, fail, validate_config
from kvmotion.common.errors import ConflictError, InvalidInputError, KvmotionError

PROG = "kvmotion-agent"
COMMANDS = ("init", "datastore")
DEFAULT_STATE_DIR = Path("/var/lib/kvmotion/agent")
EPILOG = ("setup commands (run before the agent, as root): `kvmotion-agent init --name NAME --mgmt-address ADDR "
          "--datastore PATH …` writes this host's configuration; `kvmotion-agent datastore init PATH --name NAME "
          "[--shared]` marks a datastore. Each has --help.")


@dataclass(frozen=True)
class DatastorePlan:
    path: Path
    found: DatastoreMarker | None     # its marker, when it has one
    name: str                         # the name it has, or gets
    shared: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="set up a kvmotion host (run as root)")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write this host's agent configuration and its datastores' markers",
                          description="Write the agent's configuration (TOML) and the markers of datastores that "
                                      "have none; refuses to replace a configuration without --force.")
    init.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"file to write (default {DEFAULT_CONFIG})")
    init.add_argument("--name", required=True, help="this host's name in the inventory, e.g. h1")
    init.add_argument("--mgmt-address", required=True,
                      help="host name or address the controller reaches this agent on, e.g. 198.18.0.11")
    init.add_argument("--listen-host", default="0.0.0.0", help="address the agent listens on (default 0.0.0.0)")
    init.add_argument("--listen-port", type=int, default=8770, help="port (default 8770)")
    init.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help=f"default {DEFAULT_STATE_DIR}")
    init.add_argument("--datastore", type=Path, action="append", default=[], metavar="PATH",
                      help="a datastore mount point (repeat); one without a marker becomes local datastore "
                           "NAME-BASENAME")
    init.add_argument("--shared-datastore", type=Path, action="append", default=[], metavar="PATH",
                      help="a shared datastore (repeat); one without a marker becomes shared datastore BASENAME")
    init.add_argument("--migration-interface", action="append", default=[], metavar="IFACE",
                      help="interface that carries migrations (repeat; default mig0)")
    init.add_argument("--controller-url", default=None, help="register with this controller at start")
    init.add_argument("--enrol-token-file", type=Path, default=None,
                      help="file holding an enrolment token (`kvmotion host enrol-token`)")
    init.add_argument("--controller-ca-file", type=Path, default=None, metavar="FILE",
                      help="the controller's CA certificate (its pki/ca-cert.pem): the only CA trusted for it")
    init.add_argument("--declared-link-mbps", action="append", default=[], metavar="IFACE=MBPS",
                      help="an interface's link speed in Mbit/s, overriding what the NIC reports (repeat)")
    init.add_argument("--accelerator", choices=("auto", "kvm", "tcg"), default="auto",
                      help="auto (default: KVM when /dev/kvm works, else TCG), kvm or tcg")
    init.add_argument("--image-dir", type=Path, default=None, metavar="PATH",
                      help="the lab's test-guest kernel and initrd (`kvmotion image build`)")
    init.add_argument("--force", action="store_true", help="replace an existing configuration file")
    ds = sub.add_parser("datastore", help="datastore markers").add_subparsers(dest="ds_command", required=True)
    ds_init = ds.add_parser("init", help="write a datastore's marker (its identity)",
                            description="Write PATH/.kvmotion-datastore.json. A shared datastore is marked once, "
                                        "on one host; every host that mounts it then reads the same UUID.")
    ds_init.add_argument("path", type=Path, metavar="PATH", help="the datastore's mount point")
    ds_init.add_argument("--name", required=True, help="the datastore's name, e.g. shared or h1-local")
    ds_init.add_argument("--shared", action="store_true", help="mounted by several hosts (NFS, cluster FS)")
    ds_init.add_argument("--nfs", action="store_true",
                         help="kind nfs (implies --shared): PATH must be an NFS mount, now and whenever the agent "
                              "reads it, so an export that did not mount never takes VMs' files")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            init_host(args)
        else:
            marker, created = ensure_marker(_absolute(args.path), args.name, args.shared or args.nfs,
                                            "nfs" if args.nfs else "directory")
            print(_describe(_absolute(args.path), marker, created))
    except KvmotionError as exc:
        fail(PROG, exc)
    return 0


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))      # not resolve(): a mount point reached through a symlink stays as given


def _describe(path: Path, marker: DatastoreMarker, created: bool) -> str:
    return (f"datastore {path}: {marker.name} (uuid {marker.uuid}, {'shared' if marker.shared else 'local'}"
            f"{', nfs' if marker.kind == 'nfs' else ''}) - "
            f"{'marker written' if created else 'marker found'}")


# -- init ------------------------------------------------------------------------------------------------------
def plan_config(args: argparse.Namespace) -> AgentConfig:
    """The configuration ``init`` writes, checked by the agent's own model."""
    if "://" in args.mgmt_address:
        raise InvalidInputError(f"--mgmt-address {args.mgmt_address!r} is a URL",
                                remedy="give the host name or address only (e.g. 198.18.0.11); the port is "
                                       "--listen-port")
    url = args.controller_url.rstrip("/") if args.controller_url else None
    if url is not None and not url.startswith(("http://", "https://")):
        raise InvalidInputError(f"--controller-url {args.controller_url!r} is not an http(s) URL",
                                remedy="give the controller's URL, e.g. https://198.18.0.2:8760")
    data = {"name": args.name, "listen_host": args.listen_host, "listen_port": args.listen_port,
            "mgmt_address": args.mgmt_address, "state_dir": _absolute(args.state_dir),
            "datastores": [_absolute(p) for p in [*args.datastore, *args.shared_datastore]],
            "migration_interfaces": args.migration_interface or ["mig0"],
            "controller_url": url,
            "enrol_token_file": _absolute(args.enrol_token_file) if args.enrol_token_file else None,
            "controller_ca_file": _absolute(args.controller_ca_file) if args.controller_ca_file else None,
            "declared_link_mbps": _link_speeds(args.declared_link_mbps), "accelerator": args.accelerator,
            "image_dir": _absolute(args.image_dir) if args.image_dir else None}
    return validate_config(AgentConfig, data, "the command line")


def _link_speeds(values: list[str]) -> dict[str, int]:
    """``--declared-link-mbps IFACE=MBPS`` (repeated) as interface -> Mbit/s."""
    speeds: dict[str, int] = {}
    for value in values:
        iface, _, mbps = value.partition("=")
        if not iface or not mbps.isdigit() or int(mbps) == 0 or iface in speeds:
            raise InvalidInputError(f"--declared-link-mbps {value!r} is not IFACE=MBPS (once per interface)",
                                    remedy="give the interface and its speed in Mbit/s, e.g. mig0=10000")
        speeds[iface] = int(mbps)
    return speeds


def plan_datastores(cfg: AgentConfig, shared_paths: list[Path]) -> list[DatastorePlan]:
    """Each datastore with its marker (read) or the marker it gets; names must be valid and distinct."""
    plans = []
    shared = {_absolute(p) for p in shared_paths}
    for path in cfg.datastores:
        found = read_marker(path)
        if found is not None:
            plans.append(DatastorePlan(path, found, found.name, found.shared))
            continue
        name = path.name if path in shared else f"{cfg.name}-{path.name}"
        try:
            new_marker(name, path in shared)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{path} has no marker, and {name!r} cannot be its name", details=exc.details,
                                    remedy=f"mark it first: kvmotion-agent datastore init {path} --name NAME"
                                           f"{' --shared' if path in shared else ''}") from None
        plans.append(DatastorePlan(path, None, name, path in shared))
    by_name: dict[str, Path] = {}
    for p in plans:
        if p.path in by_name.values():
            raise InvalidInputError(f"datastore {p.path} is given twice", remedy="give each datastore once")
        if p.name in by_name:
            raise InvalidInputError(f"datastores {by_name[p.name]} and {p.path} are both named {p.name!r}",
                                    remedy="give them distinct names: kvmotion-agent datastore init PATH --name NAME")
        by_name[p.name] = p.path
    return plans


def precheck(cfg: AgentConfig, config_file: Path, force: bool) -> list[str]:
    """Read-only checks before anything is written; returns notes for the admin."""
    if config_file.exists() and not force:
        raise ConflictError(f"{config_file} exists", details={"file": str(config_file)},
                            remedy="pass --force to replace it, or --config to write another file")
    if cfg.state_dir.exists() and not cfg.state_dir.is_dir():
        raise InvalidInputError(f"state directory {cfg.state_dir} is not a directory", remedy="give --state-dir")
    notes = []
    if not cfg.datastores:
        notes.append("no datastore given: VMs need one (--datastore PATH or --shared-datastore PATH)")
    if cfg.controller_url and cfg.enrol_token_file is None:
        notes.append("no --enrol-token-file: the agent will not register itself; enrol it with `kvmotion host add`")
    elif cfg.enrol_token_file is not None and not cfg.enrol_token_file.exists():
        notes.append(f"{cfg.enrol_token_file} does not exist yet: write the token there (mode 0600) before the "
                     "agent starts")
    if cfg.controller_ca_file is not None and not cfg.controller_ca_file.exists():
        notes.append(f"{cfg.controller_ca_file} does not exist yet: copy the controller's pki/ca-cert.pem there "
                     "before the agent starts")
    return notes


def render_config(cfg: AgentConfig, written_by: str = "`kvmotion-agent init`") -> str:
    """The TOML ``init`` writes: the keys it was given (and the required ones); proven to load back as ``cfg``."""
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    data.update({k: v for k, v in cfg.model_dump(mode="json").items()
                 if k in ("name", "mgmt_address", "listen_port", "state_dir", "datastores", "migration_interfaces")})
    data = {k: data[k] for k in AgentConfig.model_fields if k in data}
    sample = Path(sysconfig.get_path("data")) / "share" / "kvmotion" / "config" / "agent.toml"
    text = dump_toml(data, header=f"kvmotion agent configuration, written by {written_by} on "
                                  f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}.\n"
                                  f"Every key is described in {sample}.")
    if validate_config(AgentConfig, tomllib.loads(text), "the rendered configuration") != cfg:
        raise InvalidInputError("the configuration does not survive its TOML form",
                                remedy="report this as a bug; write the file by hand from the sample meanwhile")
    return text


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_config(path: Path, cfg: AgentConfig, written_by: str = "`kvmotion-agent init`") -> None:
    """Replace the configuration file at ``path`` with ``cfg`` as ``init`` renders it (atomically, mode 0600)."""
    _write_private(path, render_config(cfg, written_by))


def init_host(args: argparse.Namespace) -> None:
    """Validate, check, then write: state directory (0700), missing datastore markers, the configuration."""
    config_file = _absolute(args.config)
    cfg = plan_config(args)
    plans = plan_datastores(cfg, args.shared_datastore)
    text = render_config(cfg)
    notes = precheck(cfg, config_file, args.force)
    try:
        cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(cfg.state_dir, 0o700)
        for p in plans:
            marker, created = (p.found, False) if p.found is not None else ensure_marker(p.path, p.name, p.shared)
            print(_describe(p.path, marker, created))
        _write_private(config_file, text)
    except OSError as exc:
        raise InvalidInputError(f"cannot write {exc.filename or config_file}: {exc.strerror}",
                                remedy="run as root, or choose --config and --state-dir you may write") from None
    print(f"state directory {cfg.state_dir} (mode 0700)")
    print(f"wrote {config_file}")
    for note in notes:
        print(f"note: {note}")
    print("next: systemctl enable --now kvmotion-agent")

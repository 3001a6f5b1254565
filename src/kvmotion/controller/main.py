"""kvmotion-server: the controller (vCenter role)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import get_args

import uvicorn

from kvmotion.common.configfile import LogLevel, fail
from kvmotion.common.errors import ConfigInvalid, DatabaseUnusable
from kvmotion.controller import apicert
from kvmotion.controller.api import create_app
from kvmotion.controller.config import DB_ENV, DEFAULT_DB, ControllerConfig
from kvmotion.controller.service import Controller

PROG = "kvmotion-server"
log = logging.getLogger("kvmotion.controller")


def build_parser() -> argparse.ArgumentParser:
    """The options; each one left out (None) keeps the value of --config's file, else the default."""
    parser = argparse.ArgumentParser(prog=PROG, description="kvmotion controller",
                                     epilog="Options override the --config file; every key of it is described "
                                            "in the packaged controller.toml (share/kvmotion/config/).")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="controller configuration (TOML)")
    parser.add_argument("--db", dest="database_url", default=None, metavar="URL",
                        help=f"SQLAlchemy URL (default: ${DB_ENV}, else {DEFAULT_DB})")
    parser.add_argument("--host", dest="listen_host", default=None, metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", dest="listen_port", type=int, default=None, metavar="PORT", help="port (default 8760)")
    parser.add_argument("--pki-dir", type=Path, default=None,
                        help="where the CA and master key live (default: pki/ next to a SQLite database; required "
                             "with PostgreSQL)")
    parser.add_argument("--token-dir", type=Path, default=None,
                        help="where the first admin token is written (default: next to a SQLite database, else "
                             "next to --pki-dir)")
    parser.add_argument("--vm-ip-pool", default=None, help="guest addresses to hand out, e.g. 198.18.1.100-198.18.1.199/24")
    parser.add_argument("--host-networks", default=None, metavar="CIDRS",
                        type=lambda v: [n.strip() for n in v.split(",") if n.strip()],
                        help="comma-separated CIDRs host agents may be enrolled from (default: any address but "
                             "loopback, link-local, multicast, unspecified and reserved ones)")
    parser.add_argument("--public-docs", action=argparse.BooleanOptionalAction, default=None,
                        help="serve /docs and /openapi.json without a token (default: a viewer's token is needed)")
    parser.add_argument("--tls", choices=("auto", "off"), default=None,
                        help="auto (default): HTTPS with a certificate from the controller's CA; off: plain HTTP")
    parser.add_argument("--tls-cert", dest="tls_cert_file", type=Path, default=None, metavar="FILE",
                        help="your own HTTPS certificate (PEM, with --tls-key)")
    parser.add_argument("--tls-key", dest="tls_key_file", type=Path, default=None, metavar="FILE")
    parser.add_argument("--tls-name", dest="tls_names", action="append", default=None, metavar="NAME",
                        help="another name or address for the auto certificate (repeatable)")
    parser.add_argument("--admission", action=argparse.BooleanOptionalAction, default=None,
                        help="admission control: slots and bandwidth shares (default on; --no-admission starts "
                             "every migration at once: benchmarks only)")
    parser.add_argument("--refresh-parallel", type=int, default=None, metavar="N",
                        help="hosts whose facts the monitor asks for at once (default 32)")
    parser.add_argument("--name", dest="controller_name", default=None, metavar="NAME",
                        help="this controller's name among those sharing its database (default: the host name)")
    parser.add_argument("--advertise-url", default=None, metavar="URL",
                        help="where the other controllers of the database reach this one's API (default: "
                             "https://LISTEN_HOST:PORT)")
    parser.add_argument("--log-level", default=None, type=str.lower, choices=get_args(LogLevel), help="default info")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    try:
        cfg = ControllerConfig.resolve(config_file, args)
    except ConfigInvalid as exc:
        fail(PROG, exc)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))   # schema says what ran
    db = cfg.sqlite_file
    if db is not None and db.is_absolute():
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        ctl = Controller(cfg.database_url, cfg.vm_ip_pool, admission_enabled=cfg.admission, pki_dir=cfg.pki,
                         token_dir=cfg.tokens, host_networks=cfg.host_networks, refresh_parallel=cfg.refresh_parallel,
                         name=cfg.name, advertised_url=cfg.advertised_url)
    except DatabaseUnusable as exc:
        fail(PROG, exc)
    ctl.retention.days, ctl.retention.max_finished = cfg.task_retention_days, cfg.task_retention_max
    cert = https_files(cfg, ctl)
    app = create_app(ctl, public_docs=cfg.public_docs)
    uvicorn.run(app, host=cfg.listen_host, port=cfg.listen_port, log_level=cfg.log_level, access_log=False,
                **(ctl.domain.serving(cert) if cert else {}))      # HTTPS; the domain's controllers may show theirs


def https_files(cfg: ControllerConfig, ctl: Controller) -> tuple[Path, Path] | None:
    """The HTTPS certificate and key the API serves with (None: plain HTTP, ``tls = "off"``)."""
    if cfg.own_certificate is not None:
        log.info("HTTPS with the certificate %s", cfg.own_certificate[0])
        return cfg.own_certificate
    if cfg.tls == "off":
        log.warning("plain HTTP (tls = off): tokens and enrolment secrets cross the network in clear")
        return None
    files = apicert.ensure(ctl.certs.ca, ctl.pki_dir, apicert.names_for(cfg.listen_host, cfg.tls_names))
    log.info("HTTPS with a certificate from this controller's CA; clients trust %s (CLI config ca_file, "
             "an agent's controller_ca_file)", ctl.pki_dir / "ca-cert.pem")
    return files

if __name__ == "__main__":
    main()

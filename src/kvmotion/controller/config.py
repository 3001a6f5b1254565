"""Controller configuration: a TOML file (``kvmotion-server --config FILE``; packaging/config/controller.toml
describes every key). Precedence: command-line option, then ``$KVMOTION_DB`` (database only), then the file, then
the defaults below. Unknown keys are errors."""
from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvmotion.common.configfile import LogLevel, read_config_file, validate_config
from kvmotion.common.errors import ConfigInvalid
from kvmotion.controller import dbengine

DEFAULT_DB = "sqlite:////var/lib/kvmotion/controller.db"
DB_ENV = "KVMOTION_DB"
DEFAULT_PKI = Path("/var/lib/kvmotion/pki")      # a controller made without a pki_dir or a SQLite file (tests, tools)
_SQLITE = "sqlite:///"


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen_host: str = "127.0.0.1"          # --host
    listen_port: int = Field(default=8760, ge=1, le=65535)    # --port
    database_url: str = Field(default=DEFAULT_DB, min_length=1)   # --db: sqlite:///FILE or postgresql+psycopg://…
    pki_dir: Path | None = None             # --pki-dir: the CA; default: next to a SQLite database (else required)
    token_dir: Path | None = None           # --token-dir: the first admin token; default: next to a SQLite database
    vm_ip_pool: str | None = None           # --vm-ip-pool: guest addresses to hand out, e.g. 198.18.1.100-198.18.1.199/24
    admission: bool = True                  # --admission / --no-admission: admission control (slots, bandwidth)
    host_networks: list[str] = Field(default_factory=list, max_length=64)   # --host-networks: agents only from these
    public_docs: bool = False               # --public-docs: /docs and /openapi.json without a token
    tls: Literal["auto", "off"] = "auto"    # --tls: HTTPS with a certificate from the controller's CA, or plain HTTP
    tls_cert_file: Path | None = None       # --tls-cert: bring your own certificate (with --tls-key): used as it is
    tls_key_file: Path | None = None        # --tls-key
    tls_names: list[str] = Field(default_factory=list, max_length=16)   # --tls-name: more names for the auto cert
    refresh_parallel: int = Field(default=32, ge=1, le=1024)   # --refresh-parallel: hosts the monitor asks at once
    controller_name: str | None = Field(default=None, min_length=1, max_length=64,
                                        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")   # --name; default: host name
    advertise_url: str | None = Field(default=None, max_length=264,
                                      pattern=r"^https?://[^/\s]+$")   # --advertise-url: followers forward to it
    task_retention_days: float = Field(default=30, gt=0, le=36500)   # finished tasks kept this long (days)
    task_retention_max: int = Field(default=100_000, ge=100, le=100_000_000)   # and at most this many
    log_level: LogLevel = "info"            # --log-level

    @field_validator("vm_ip_pool")
    @classmethod
    def _pool_shape(cls, pool: str | None) -> str | None:
        """FIRST-LAST/PREFIX of one address family, FIRST not after LAST (the inventory hands them out in order)."""
        if pool is None:
            return None
        rng, slash, prefix = pool.partition("/")
        first, dash, last = rng.partition("-")
        try:
            lo, hi = ipaddress.ip_address(first), ipaddress.ip_address(last)
            ipaddress.ip_network(f"{lo}/{prefix}", strict=False)
            ok = bool(slash and dash) and lo.version == hi.version and lo <= hi
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("expected FIRST-LAST/PREFIX, e.g. 198.18.1.100-198.18.1.199/24")
        return pool

    @classmethod
    def resolve(cls, path: Path | None, options: dict[str, Any]) -> "ControllerConfig":
        """The configuration in force: ``options`` (command line; None = not given) over ``$KVMOTION_DB`` over
        the file at ``path`` (when given) over the defaults."""
        data = read_config_file(path, missing_remedy="create it (every key is optional; see the packaged "
                                                      "controller.toml) or leave out --config") if path else {}
        if os.environ.get(DB_ENV):
            data["database_url"] = os.environ[DB_ENV]
        data.update({k: v for k, v in options.items() if v is not None})
        source = str(path) if path else "the command line"
        cfg = validate_config(cls, data, source)
        dbengine.parse(cfg.database_url, source)
        require_pki_dir(cfg.database_url, cfg.pki_dir, source)
        return cfg

    @property
    def sqlite_file(self) -> Path | None:
        """The database file of a SQLite URL, else None."""
        return Path(self.database_url[len(_SQLITE):]) if self.database_url.startswith(_SQLITE) else None

    @property
    def pki(self) -> Path | None:
        """Where the CA lives: ``pki_dir``, else ``pki/`` next to a SQLite database (None: the service's default)."""
        db = self.sqlite_file
        return self.pki_dir or (db.parent / "pki" if db is not None else None)

    @model_validator(mode="after")
    def _own_certificate_whole(self) -> "ControllerConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (a certificate and its key)")
        return self

    @property
    def name(self) -> str:
        """This controller's name among those of its database: ``controller_name``, else the machine's name."""
        return self.controller_name or socket.gethostname()

    @property
    def advertised_url(self) -> str:
        """Where the other controllers of the database reach this one's API: ``advertise_url``, else the listen
        address (the machine's name when it listens on every address)."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.listen_host if self.listen_host not in ("0.0.0.0", "::", "") else socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        scheme = "http" if self.tls == "off" and self.own_certificate is None else "https"
        return f"{scheme}://{host}:{self.listen_port}"

    @property
    def own_certificate(self) -> tuple[Path, Path] | None:
        """The certificate and key the admin brought, if any."""
        return (self.tls_cert_file, self.tls_key_file) if self.tls_cert_file and self.tls_key_file else None

    @property
    def tokens(self) -> Path:
        """Where the first admin token is written: ``token_dir``, else next to a SQLite database, else next to
        ``pki_dir`` (required then)."""
        db = self.sqlite_file
        beside = db.parent if db is not None else self.pki_dir.parent if self.pki_dir else Path("/var/lib/kvmotion")
        return self.token_dir or beside


def require_pki_dir(database_url: str, pki_dir: Path | None, source: str = "") -> None:
    """A database that is not a local SQLite file has no folder to keep the CA and master key next to: ``pki_dir``
    must be given (every controller of one database needs the same keys, so they are never made up)."""
    if pki_dir is None and not dbengine.is_sqlite(dbengine.parse(database_url, source)):
        raise ConfigInvalid(
            "pki_dir is required when database_url is not SQLite (the controller's CA and master key are kept "
            "there, not in the database)", details={"file": source, "keys": ["pki_dir"]},
            remedy='set pki_dir in the controller\'s configuration (e.g. pki_dir = "/var/lib/kvmotion/controller/pki") '
                   "or give --pki-dir (docs/deploy.md, The database)")

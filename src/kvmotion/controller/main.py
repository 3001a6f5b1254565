"""kvmotion-server: the controller (vCenter role)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import uvicorn

from kvmotion.controller.api import create_app
from kvmotion.controller.service import Controller


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvmotion-server", description="kvmotion controller")
    parser.add_argument("--db", default=os.environ.get("KVMOTION_DB", "sqlite:////var/lib/kvmotion/controller.db"),
                        help="SQLAlchemy URL (default: SQLite)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8760)
    parser.add_argument("--pki-dir", type=Path, default=None,
                        help="where the CA lives (default: next to a SQLite database, else /var/lib/kvmotion/pki)")
    parser.add_argument("--token-dir", type=Path, default=None,
                        help="where the first admin token is written (default: next to a SQLite database)")
    parser.add_argument("--vm-ip-pool", default=None, help="guest addresses to hand out, e.g. 198.18.1.100-198.18.1.199/24")
    parser.add_argument("--host-networks", default=os.environ.get("KVMOTION_HOST_NETWORKS", ""),
                        help="comma-separated CIDRs host agents may be enrolled from (default: any address but "
                             "loopback, link-local, multicast, unspecified and reserved ones)")
    parser.add_argument("--no-admission", action="store_true",
                        help="start every migration at once (benchmarks only: no slots, no bandwidth shares)")
    parser.add_argument("--public-docs", action="store_true",
                        help="serve /docs and /openapi.json without a token (default: a viewer's token is needed)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.db.startswith("sqlite:////"):
        os.makedirs(os.path.dirname(args.db[len("sqlite:///"):]), exist_ok=True)
    pki = args.pki_dir or (Path(args.db[len("sqlite:///"):]).parent / "pki" if args.db.startswith("sqlite:///")
                           else None)
    tokens = args.token_dir or (Path(args.db[len("sqlite:///"):]).parent if args.db.startswith("sqlite:///")
                                else Path("/var/lib/kvmotion"))
    app = create_app(Controller(args.db, args.vm_ip_pool, admission_enabled=not args.no_admission, pki_dir=pki,
                                token_dir=tokens,
                                host_networks=[n for n in args.host_networks.split(",") if n.strip()]),
                     public_docs=args.public_docs)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False)


if __name__ == "__main__":
    main()

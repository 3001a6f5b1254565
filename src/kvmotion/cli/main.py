"""kvmotion: the command line, over the controller's HTTP API only.

One module per command group; the lab's groups (`lab`, `image`, `bench`, `demo`) come from the ``kvmotion.cli``
plugins when the lab package is installed.
"""
from __future__ import annotations

import typer

from kvmotion.cli.clusters import cluster_app
from kvmotion.cli.console import console
from kvmotion.cli.domain import domain_app
from kvmotion.cli.vncproxy import vnc
from kvmotion.cli.hosts import host_app
from kvmotion.cli.images import image_app
from kvmotion.cli.plugins import load_plugins
from kvmotion.cli.tasks import task_app
from kvmotion.cli.tokens import audit, token_app
from kvmotion.cli.vms import vm_app


def build_app() -> typer.Typer:
    """The `kvmotion` app: the product's command groups and the installed plugins'."""
    app = typer.Typer(help="kvmotion: vMotion for QEMU/KVM", no_args_is_help=True, add_completion=False)
    for sub, name in ((host_app, "host"), (vm_app, "vm"), (task_app, "task"), (cluster_app, "cluster"),
                      (token_app, "token"), (image_app, "image"), (domain_app, "domain")):
        app.add_typer(sub, name=name)
    app.command("audit")(audit)
    vm_app.command("console")(console)
    vm_app.command("vnc")(vnc)
    load_plugins(app)
    return app


def main() -> None:
    build_app()()


if __name__ == "__main__":
    main()

"""`kvmotion cluster …`: clusters, EVC baselines and their default migration policy."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.drs import drs_app
from kvmotion.cli.output import URL, console, err_console, policy_of, run

cluster_app = typer.Typer(help="clusters and EVC baselines", no_args_is_help=True)


@cluster_app.command("create")
def cluster_create(name: str, evc: Optional[str] = typer.Option(None, help="EVC baseline CPU model"),
                   url: Optional[str] = URL) -> None:
    c = run(lambda: Client(url).create_cluster(name, evc))
    console.print(f"cluster {c['name']} created (EVC {c['evc_mode'] or 'off'})")


@cluster_app.command("add-host")
def cluster_add_host(name: str, host: str, url: Optional[str] = URL) -> None:
    c = run(lambda: Client(url).cluster_add_host(name, host))
    console.print(f"cluster {c['name']}: hosts {', '.join(c['hosts'])}")


@cluster_app.command("evc-modes")
def cluster_evc_modes(name: str, url: Optional[str] = URL) -> None:
    """EVC baselines every host of the cluster supports, richest first."""
    for m in run(lambda: Client(url).evc_modes(name)):
        console.print(m)


@cluster_app.command("set-evc")
def cluster_set_evc(name: str, mode: str, url: Optional[str] = URL) -> None:
    c = run(lambda: Client(url).set_evc(name, None if mode == "off" else mode))
    console.print(f"cluster {c['name']}: EVC {c['evc_mode'] or 'off'} (applies to VMs at their next power-on)")


@cluster_app.command("set-policy")
def cluster_setpolicy(name: str, downtime_ms: Optional[int] = typer.Option(None, help="switchover ceiling"),
                       progress_timeout_s: Optional[float] = None, completion_timeout_s_per_gib: Optional[float] = None,
                       auto_converge: Optional[bool] = typer.Option(None, "--auto-converge/--no-auto-converge"),
                       xbzrle: Optional[bool] = typer.Option(None, "--xbzrle/--no-xbzrle"),
                       allow_postcopy: Optional[bool] = typer.Option(None, "--allow-postcopy/--no-allow-postcopy"),
                       url: Optional[str] = URL) -> None:
    """The cluster's default migration policy (a VM's own policy and each request override it)."""
    policy = policy_of(downtime_ms, progress_timeout_s, completion_timeout_s_per_gib, auto_converge, xbzrle,
                     allow_postcopy)
    if policy is None:
        err_console.print("[red]error:[/] nothing to set; remedy: pass e.g. --downtime-ms 300 or --no-auto-converge")
        raise typer.Exit(2)
    out = run(lambda: Client(url).call("PATCH", f"/clusters/{name}", {"migration_policy": policy}))
    console.print(f"cluster [bold]{name}[/]: migration policy {out['migration_policy']}")


@cluster_app.command("list")
def cluster_list(url: Optional[str] = URL) -> None:
    table = Table("name", "EVC", "hosts")
    for c in run(lambda: Client(url).clusters()):
        table.add_row(c["name"], c["evc_mode"] or "off", ", ".join(c["hosts"]))
    console.print(table)


cluster_app.add_typer(drs_app, name="drs")

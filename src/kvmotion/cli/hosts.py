"""`kvmotion host …`: enrolment, inventory, maintenance mode and migration certificates."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kvmotion.cli import onboarding
from kvmotion.cli.client import Client
from kvmotion.cli.output import URL, console, err_console, print_json, run
from kvmotion.cli.progress import follow_evacuation, print_evacuation

host_app = typer.Typer(help="hosts (hypervisors with a kvmotion agent)", no_args_is_help=True)
maint_app = typer.Typer(help="maintenance mode", no_args_is_help=True)
cert_app = typer.Typer(help="host certificates for encrypted vMotion", no_args_is_help=True)
host_app.add_typer(maint_app, name="maintenance")
host_app.add_typer(cert_app, name="cert")
onboarding.register(host_app)


@host_app.command("add")
def host_add(address: str,
             secret_file: Path = typer.Option(..., "--secret-file", help="the agent's agent.secret (from its host)"),
             name: Optional[str] = typer.Option(None), url: Optional[str] = URL) -> None:
    """Enrol a host by its agent's address, e.g. https://198.18.0.11:8770, and the agent's secret."""
    try:
        secret = secret_file.read_text().strip()
    except OSError as exc:
        err_console.print(f"[red]error:[/] cannot read {secret_file}: {exc.strerror}")
        err_console.print("[yellow]fix:[/] copy agent.secret from the host's state directory (mode 0600)")
        raise typer.Exit(2)
    h = run(lambda: Client(url).add_host(address, secret, name))
    console.print(f"enrolled host [bold]{h['name']}[/] ({h['state']})")


@host_app.command("enrol-token")
def host_enrol_token(name: str = typer.Option("enrol", help="token name"),
                     ttl_hours: float = typer.Option(24.0, help="lifetime"), url: Optional[str] = URL) -> None:
    """A token one agent uses to register itself (its config's enrol_token_file): single-use, it expires; the
    host then waits for `kvmotion host approve`."""
    t = run(lambda: Client(url).create_token(name, "enrol", int(ttl_hours * 3600)))
    console.print(t["token"])


@host_app.command("list")
def host_list(cluster: Optional[str] = typer.Option(None, "--cluster", help="only the hosts of this cluster"),
              url: Optional[str] = URL) -> None:
    """Every host, by name (the controller's pages read one after the other)."""
    table = Table("name", "state", "address", "accel", "mem free/total MiB", "datastores", "migration if")
    for h in run(lambda: Client(url).hosts(cluster=cluster)):
        f = h.get("facts") or {}
        ds = ", ".join(d["name"] for d in f.get("datastores", []) if d.get("readable"))
        mig = ", ".join(f"{i['address']} {i.get('speed_mbps') or '?'}Mb" for i in f.get("migration_interfaces", []))
        table.add_row(h["name"], h["state"], h["address"], f.get("accelerator", "-"),
                      f"{f.get('mem_free_mb', '-')}/{f.get('mem_total_mb', '-')}", ds, mig)
    console.print(table)


@host_app.command("show")
def host_show(name: str, url: Optional[str] = URL) -> None:
    h = run(lambda: Client(url).host(name))
    facts = h.pop("facts", {})
    facts["cpu_features"] = f"{len(facts.get('cpu_features', []))} features"
    print_json(h | {"facts": facts})


@cert_app.command("renew")
def cert_renew(host: str, url: Optional[str] = URL) -> None:
    """Issue HOST new migration certificates from the controller's CA (its keys stay on the host)."""
    out = run(lambda: Client(url).cert_renew(host))
    console.print(f"host {host}: certificates {'valid' if out['supported'] else 'NOT valid'} until {out['not_after']}")


@cert_app.command("remove")
def cert_remove(host: str, url: Optional[str] = URL) -> None:
    """Remove HOST's migration certificates: it can no longer migrate encrypted."""
    run(lambda: Client(url).cert_remove(host))
    console.print(f"host {host}: certificates removed (encrypted vMotion unsupported)")


@maint_app.command("enter")
def maintenance_enter(host: str, wait: bool = typer.Option(False, "--wait", help="follow the evacuation"),
                      url: Optional[str] = URL) -> None:
    """Evacuate HOST (vMotion running VMs, re-register powered-off ones), then put it in maintenance."""
    client = Client(url)
    task = run(lambda: client.maintenance(host, True))
    console.print(f"host {host}: entering maintenance mode (task {task['id'][:8]}); nothing new is placed on it")
    if not wait:
        return
    task = run(lambda: follow_evacuation(client, task["id"], console))
    print_evacuation(task, console)
    if task["state"] != "success":
        raise typer.Exit(1)


@maint_app.command("exit")
def maintenance_exit(host: str, url: Optional[str] = URL) -> None:
    run(lambda: Client(url).maintenance(host, False))
    console.print(f"host {host} is back in service")

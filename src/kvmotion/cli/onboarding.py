"""`kvmotion host pending|approve|reject|remove`: admitting hosts that registered themselves, and removing hosts."""
from __future__ import annotations

import datetime as dt
from typing import Optional

import typer
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.output import URL, console, run


def pending(url: Optional[str] = URL) -> None:
    """Hosts that registered with an enrolment token and wait for approval."""
    table = Table("name", "address", "fingerprint", "migration addresses", "datastores", "registered", "token")
    for p in run(lambda: Client(url).pending_hosts()):
        when = dt.datetime.fromtimestamp(p["requested_at"]).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(p["name"], p["address"], p["fingerprint"], ", ".join(p["migration_addresses"]) or "-",
                      ", ".join(p["datastores"]) or "-", when, p["token"])
    console.print(table)


def approve(name: str = typer.Argument(..., help="the pending host"),
            fingerprint: str = typer.Option(..., "--fingerprint",
                                            help="as its agent shows it: kvmotion-agent --config FILE --fingerprint"),
            url: Optional[str] = URL) -> None:
    """Admit a pending host after checking its fingerprint on the host itself."""
    h = run(lambda: Client(url).approve_host(name, fingerprint))
    console.print(f"host [bold]{h['name']}[/] approved ({h['state']}); its certificates name only the addresses "
                  "shown in `kvmotion host pending`")


def reject(name: str = typer.Argument(..., help="the pending host"), url: Optional[str] = URL) -> None:
    """Refuse a pending registration (another may come with a new enrolment token)."""
    p = run(lambda: Client(url).reject_host(name))
    console.print(f"registration of [bold]{p['name']}[/] from {p['address']} rejected")


def remove(name: str = typer.Argument(..., help="the host"), url: Optional[str] = URL) -> None:
    """Remove a host without VMs: its certificates are revoked and every other host gets the new CRL."""
    out = run(lambda: Client(url).remove_host(name))
    console.print(f"host [bold]{out['name']}[/] removed; revoked certificate serials: "
                  f"{', '.join(out['revoked_serials']) or 'none'}; CRL installed on "
                  f"{', '.join(out['crl_installed_on']) or 'no other host'}")
    for host, why in out["crl_failed"].items():
        console.print(f"[yellow]warning:[/] {host} did not take the CRL ({why}); it gets it with its next certificate")


def register(app: typer.Typer) -> None:
    for fn, name in ((pending, "pending"), (approve, "approve"), (reject, "reject"), (remove, "remove")):
        app.command(name)(fn)

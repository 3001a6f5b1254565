"""`kvmotion domain …`: the trust domain of controllers (docs/domains.md). Every command needs this controller's
admin token; a join needs the other controller's fingerprint, read there with `kvmotion domain show`."""
from __future__ import annotations

import datetime as dt
from typing import Any, Optional

import typer
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.output import URL, console, run

domain_app = typer.Typer(help="the trust domain of controllers (admin)", no_args_is_help=True)
NAME = typer.Option(None, "--name", help="this controller's name in the domain (default: its host name)")
PUBLIC_URL = typer.Option(None, "--public-url", help="where the other controllers reach this one (default: the URL "
                                                     "this command reaches it at)")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _print_self(d: dict[str, Any]) -> None:
    console.print(f"controller   {d['name'] or '-'}  {d['url'] or ''}", soft_wrap=True)
    console.print(f"fingerprint  {d['fingerprint']}", soft_wrap=True)       # whole on one line: compared by eye
    if d["domain_id"]:
        console.print(f"domain       {d['domain_name']} ({d['domain_id']}), {d['members']} other member(s)",
                      soft_wrap=True)
    else:
        console.print("domain       none (`kvmotion domain create NAME`, or `kvmotion domain join URL`)")


def _public_url(client: Client, given: Optional[str]) -> Optional[str]:
    """The URL to announce: the one given, else (outside a domain) the one this command uses."""
    if given is not None:
        return given
    return client.url if client.domain()["domain_id"] is None else None


def _print_left(out: dict[str, Any]) -> None:
    console.print(f"forgot {', '.join(out['forgotten']) or 'nobody'}")
    for name, why in out["not_told"].items():
        console.print(f"[yellow]warning:[/] {name} was not told ({why}); it still pins this controller until its "
                      "admin removes it")


@domain_app.command("show")
def show(url: Optional[str] = URL) -> None:
    """This controller: its name and URL in the domain, its fingerprint (what other admins compare), the domain."""
    _print_self(run(lambda: Client(url).domain()))


@domain_app.command("create")
def create(name: str = typer.Argument(..., help="the domain's name"), controller_name: Optional[str] = NAME,
           public_url: Optional[str] = PUBLIC_URL, url: Optional[str] = URL) -> None:
    """Found a domain with this controller in it; others join it with its fingerprint."""
    client = Client(url)
    _print_self(run(lambda: client.create_domain(name, controller_name, public_url or client.url)))


@domain_app.command("join")
def join(controller: str = typer.Argument(..., metavar="URL", help="a controller of the domain, https://HOST:PORT"),
         fingerprint: str = typer.Option(..., "--fingerprint", help="that controller's, from `kvmotion domain show` "
                                                                    "there"),
         controller_name: Optional[str] = NAME, public_url: Optional[str] = PUBLIC_URL,
         url: Optional[str] = URL) -> None:
    """Ask the controller at URL to let this one in; its admin approves with this controller's fingerprint."""
    client = Client(url)
    m = run(lambda: client.join_domain(controller, fingerprint, controller_name, _public_url(client, public_url)))
    me = run(client.domain)
    console.print(f"asked [bold]{m['name']}[/] ({m['url']}) to join domain {me['domain_name']}; state {m['state']}.")
    console.print(f"On {m['name']}: kvmotion domain approve {me['name']} --fingerprint {me['fingerprint']}",
                  soft_wrap=True)


@domain_app.command("approve")
def approve(name: str = typer.Argument(..., help="the controller asking to join"),
            fingerprint: str = typer.Option(..., "--fingerprint", help="its fingerprint, from `kvmotion domain "
                                                                       "show` on it"),
            url: Optional[str] = URL) -> None:
    """Admit a controller that asked to join, after checking its fingerprint on it; it is told at once."""
    m = run(lambda: Client(url).approve_member(name, fingerprint))
    console.print(f"controller [bold]{m['name']}[/] ({m['url']}) is a member; both sides pin each other")


@domain_app.command("reject")
def reject(name: str = typer.Argument(..., help="the controller asking to join"), url: Optional[str] = URL) -> None:
    """Refuse a join request (the controller may ask again)."""
    out = run(lambda: Client(url).reject_member(name))
    console.print(f"join request of [bold]{name}[/] rejected")
    _print_left(out)


@domain_app.command("list")
def members(url: Optional[str] = URL) -> None:
    """The other controllers: members, join requests waiting here (pending), and those asked (joining)."""
    table = Table("name", "url", "state", "since", "last contact", "version")
    table.add_column("fingerprint", overflow="fold")            # whole, however narrow the terminal
    for m in run(lambda: Client(url).domain_members()):
        table.add_row(m["name"], m["url"], m["state"], _when(m["since"]), _when(m["last_contact"]),
                      m["version"] or "-", m["fingerprint"])
    console.print(table)


@domain_app.command("ping")
def ping(name: str = typer.Argument(..., help="a member"), url: Optional[str] = URL) -> None:
    """Call a member over mutual TLS and show what it says of itself."""
    h = run(lambda: Client(url).ping_member(name))
    console.print(f"{h['name']} answers: domain {h['domain_name']} ({h['domain_id']}), kvmotion {h['version']}")


@domain_app.command("remove")
def remove(name: str = typer.Argument(..., help="a member"),
           force: bool = typer.Option(False, "--force", help="forget it here even if it cannot be told"),
           url: Optional[str] = URL) -> None:
    """Remove a controller from this one's domain: it is told, and both forget each other's pins."""
    _print_left(run(lambda: Client(url).remove_member(name, force)))


@domain_app.command("leave")
def leave(force: bool = typer.Option(False, "--force", help="leave even if some controllers cannot be told"),
          url: Optional[str] = URL) -> None:
    """Leave the domain: every controller pinned here is told and forgotten."""
    _print_left(run(lambda: Client(url).leave_domain(force)))

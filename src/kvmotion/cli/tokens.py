"""`kvmotion token …` and `kvmotion audit`: API tokens and the audit log (admin)."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.output import URL, console, err_console, run

token_app = typer.Typer(help="API tokens (admin)", no_args_is_help=True)


@token_app.command("create")
def token_create(name: str, role: str = typer.Option(..., help="viewer | operator | admin"),
                 ttl_hours: Optional[float] = typer.Option(None, help="lifetime (default: no expiry)"),
                 url: Optional[str] = URL) -> None:
    """Make an API token; it is printed once (only its hash is kept)."""
    t = run(lambda: Client(url).create_token(name, role, int(ttl_hours * 3600) if ttl_hours else None))
    err_console.print(f"token [bold]{t['name']}[/] ({t['role']}); store it now, it is not shown again:")
    console.print(t["token"])


@token_app.command("list")
def token_list(url: Optional[str] = URL) -> None:
    import datetime as dt

    def when(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"
    table = Table("name", "role", "created", "expires", "last used", "state")
    for t in run(lambda: Client(url).tokens()):
        table.add_row(t["name"], t["role"], when(t["created_at"]), when(t["expires_at"]), when(t["last_used"]),
                      "revoked" if t["revoked"] else "valid")
    console.print(table)


@token_app.command("revoke")
def token_revoke(name: str, url: Optional[str] = URL) -> None:
    run(lambda: Client(url).revoke_token(name))
    console.print(f"revoked token [bold]{name}[/]")


def audit(limit: int = typer.Option(50, help="newest first"), url: Optional[str] = URL) -> None:
    """Who did what and when: every state-changing API call."""
    import datetime as dt

    table = Table("when", "who", "role", "call", "status", "from")
    for a in run(lambda: Client(url).audit(limit)):
        table.add_row(dt.datetime.fromtimestamp(a["at"]).strftime("%Y-%m-%d %H:%M:%S"), a["who"], a["role"],
                      f"{a['method']} {a['path']}", str(a["status"]), a["client"])
    console.print(table)

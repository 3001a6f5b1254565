"""`kvmotion task …`: list, show, cancel and force-complete migration tasks."""
from __future__ import annotations

from typing import Any, Optional

import typer
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.output import URL, console, print_json, run
from kvmotion.cli.progress import follow, print_outcome

task_app = typer.Typer(help="tasks (migrations)", no_args_is_help=True)


@task_app.command("list")
def task_list(limit: int = 20, url: Optional[str] = URL) -> None:
    table = Table("id", "kind", "vm", "source → dest", "state", "phase", "progress", "error")
    for t in run(lambda: Client(url).tasks(limit)):
        table.add_row(t["id"][:8], t["kind"], t["vm_name"], f"{t['source']} → {t['destination']}", t["state"],
                      t["phase"], f"{t['progress']:.0f}%", (t.get("error") or {}).get("message", "")[:60])
    console.print(table)


@task_app.command("show")
def task_show(task_id: str, as_json: bool = typer.Option(False, "--json"), url: Optional[str] = URL) -> None:
    task = run(lambda: Client(url).task(task_id))
    if as_json:
        print_json(task)
    else:
        print_outcome(task, console)


@task_app.command("cancel")
def task_cancel(task_id: str, url: Optional[str] = URL) -> None:
    """Cancel a running migration (before its switchover; the VM stays on the source)."""
    act_and_follow(url, lambda c: c.cancel_task(task_id))


def act_and_follow(url: Optional[str], act: Any) -> None:
    client = Client(url)
    t = run(lambda: act(client))
    t = run(lambda: follow(client, t["id"], console))
    print_outcome(t, console)


@task_app.command("force-complete")
def task_force_complete(task_id: str, url: Optional[str] = URL) -> None:
    """Switch a live migration over now: post-copy when its policy allows it, else the downtime limit is raised
    to cover what remains."""
    act_and_follow(url, lambda c: c.force_complete(task_id))

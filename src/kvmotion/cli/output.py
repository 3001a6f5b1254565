"""What every command group shares: the consoles, the --url option, errors as exit codes, findings tables."""
from __future__ import annotations

import json
from typing import Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from kvmotion.common.errors import KvmotionError

console = Console(emoji=False)                   # fingerprints are colon hex: ":CD:" must not become an emoji
err_console = Console(stderr=True, emoji=False)
URL = typer.Option(None, "--url", envvar="KVMOTION_URL", help="controller URL")
T = TypeVar("T")


def run(fn: Callable[[], T]) -> T:
    """Run a command; a kvmotion error becomes a clear message and a non-zero exit code."""
    try:
        return fn()
    except KvmotionError as exc:
        err_console.print(f"[red]error:[/] {exc.message}")
        if exc.remedy:
            err_console.print(f"[yellow]fix:[/] {exc.remedy}")
        for f in exc.details.get("findings", []):
            err_console.print(f"  [{f['severity']}] {f['code']} ({f['subject']}): {f['message']} — fix: {f['remedy']}")
        raise typer.Exit(3 if exc.code == "PRECHECK_FAILED" else
                         2 if exc.code in ("NOT_FOUND", "INVALID_INPUT", "CONFLICT") else
                         4 if exc.code in ("UNAUTHORIZED", "FORBIDDEN") else 1)




def print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


POLICY_HELP = "migration policy (unset: inherited from the cluster, then the defaults)"


def policy_of(downtime_ms: Optional[int], progress_timeout_s: Optional[float], completion_timeout_s_per_gib: Optional[float],
            auto_converge: Optional[bool], xbzrle: Optional[bool],
            allow_postcopy: Optional[bool] = None) -> dict[str, Any] | None:
    p = {"downtime_ms": downtime_ms, "progress_timeout_s": progress_timeout_s, "auto_converge": auto_converge,
         "completion_timeout_s_per_gib": completion_timeout_s_per_gib, "xbzrle": xbzrle,
         "allow_postcopy": allow_postcopy}
    p = {k: v for k, v in p.items() if v is not None}
    return p or None




SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def findings_table(findings: list[dict[str, Any]], title: str) -> Table:
    sided = any(f.get("side") for f in findings)      # a cross-controller move: which controller found it
    table = Table("severity", *(["side"] if sided else []), "code", "subject", "reason", "remedy", title=title)
    for f in findings:
        style = SEVERITY_STYLE.get(f["severity"], "")
        table.add_row(f"[{style}]{f['severity']}[/]", *([f.get("side") or "-"] if sided else []), f["code"],
                      f["subject"], f["message"], f["remedy"])
    return table

"""`kvmotion cluster drs …`: a cluster's DRS settings, rules, load, recommendations, and applying them."""
from __future__ import annotations

from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.output import URL, console, err_console, print_json, run
from kvmotion.cli.progress import follow, print_outcome

drs_app = typer.Typer(help="DRS: load balancing and placement rules of a cluster", no_args_is_help=True)
KINDS = ("affinity", "anti-affinity", "vm-host", "vm-not-host")


def _csv(value: Optional[str]) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@drs_app.command("set")
def drs_set(name: str,
            automation: Optional[str] = typer.Option(None, help="off | manual (recommend) | fully (apply)"),
            threshold: Optional[int] = typer.Option(None, min=1, max=5, help="1 conservative (rules only) … 5 "
                                                                               "aggressive"),
            interval_s: Optional[float] = typer.Option(None, help="how often DRS looks at the cluster"),
            cooldown_s: Optional[float] = typer.Option(None, help="a VM DRS moved is left alone this long"),
            url: Optional[str] = URL) -> None:
    """Automation level, migration threshold, interval and cooldown (the options given replace the current)."""
    change = {k: v for k, v in (("automation", automation), ("threshold", threshold), ("interval_s", interval_s),
                                ("cooldown_s", cooldown_s)) if v is not None}
    if not change:
        err_console.print("[red]error:[/] nothing to set; remedy: pass e.g. --automation manual --threshold 3")
        raise typer.Exit(2)
    cfg = run(lambda: Client(url).call("PATCH", f"/clusters/{name}/drs", change))
    console.print(f"cluster [bold]{name}[/]: DRS {cfg['automation']}, threshold {cfg['threshold']}, every "
                  f"{cfg['interval_s']:.0f} s, cooldown {cfg['cooldown_s']:.0f} s")


@drs_app.command("rule-add")
def drs_rule_add(name: str, rule: str,
                 kind: str = typer.Option(..., help="affinity | anti-affinity | vm-host | vm-not-host"),
                 vms: str = typer.Option(..., help="comma-separated VM names"),
                 hosts: Optional[str] = typer.Option(None, help="comma-separated hosts (vm-host, vm-not-host)"),
                 must: bool = typer.Option(False, "--must/--should", help="must: never broken; should: kept "
                                                                          "when a move allows"),
                 url: Optional[str] = URL) -> None:
    """A VM–VM affinity or anti-affinity rule, or a VM–host rule (the VMs run on / never on the hosts)."""
    body = {"name": rule, "kind": kind, "vms": _csv(vms), "hosts": _csv(hosts), "must": must}
    cfg = run(lambda: Client(url).call("POST", f"/clusters/{name}/drs/rules", body))
    console.print(f"cluster [bold]{name}[/]: {len(cfg['rules'])} rule(s); {rule} added")


@drs_app.command("rule-remove")
def drs_rule_remove(name: str, rule: str, url: Optional[str] = URL) -> None:
    """Remove a rule (nothing moves back by itself)."""
    cfg = run(lambda: Client(url).call("DELETE", f"/clusters/{name}/drs/rules/{rule}"))
    console.print(f"cluster [bold]{name}[/]: {len(cfg['rules'])} rule(s); {rule} removed")


def _recommendations(status: dict[str, Any]) -> Table:
    table = Table("id", "priority", "VM", "from", "to", "why", "gain", "cost", title="recommendations")
    for r in status["recommendations"]:
        cost = "-" if r["cost_s"] is None else f"{r['cost_s']:.1f} s, {r['cost_mb'] or 0:.0f} MB"
        why = f"rule {r['rule']}" if r["reason"] == "rule" else "balance"
        table.add_row(r["id"], str(r["priority"]), r["vm"], r["source"], r["destination"], why,
                      f"{r['gain']:.3f}", cost)
    return table


def _faults(status: dict[str, Any]) -> None:
    for f in status["faults"]:
        colour = "red" if f["must"] else "yellow"
        console.print(f"[{colour}]fault:[/] {escape(f['message'])}")
        console.print(f"[{colour}]fix:[/] {escape(f['remedy'])}")


@drs_app.command("show")
def drs_show(name: str, as_json: bool = typer.Option(False, "--json"), url: Optional[str] = URL) -> None:
    """Settings, rules, each host's load and the cluster's imbalance against the threshold's target."""
    status = run(lambda: Client(url).call("GET", f"/clusters/{name}/drs"))
    if as_json:
        print_json(status)
        return
    cfg = status["config"]
    target = "rules only" if status["target"] is None else f"target {status['target']:.2f}"
    console.print(f"cluster [bold]{name}[/]: DRS {cfg['automation']}, threshold {cfg['threshold']}; imbalance "
                  f"{status['imbalance']:.3f} ({target})")
    hosts = Table("host", "load", "CPU %", "memory MB", "VMs", "in service", title="hosts")
    for h in status["hosts"]:
        hosts.add_row(h["host"], f"{h['load']:.2f}", f"{h['cpu_pct']:.0f} / {h['cpu_capacity_pct']:.0f}",
                      f"{h['mem_mb']:.0f} / {h['mem_capacity_mb']:.0f}", ", ".join(h["vms"]),
                      "yes" if h["in_service"] else "no")
    console.print(hosts)
    rules = Table("rule", "kind", "VMs", "hosts", "must", title="rules")
    for r in cfg["rules"]:
        rules.add_row(r["name"], r["kind"], ", ".join(r["vms"]), ", ".join(r["hosts"]), "must" if r["must"] else
                      "should")
    console.print(rules)
    _faults(status)


@drs_app.command("recommendations")
def drs_recommendations(name: str, as_json: bool = typer.Option(False, "--json"), url: Optional[str] = URL) -> None:
    """What DRS would move now, and why (apply them with `kvmotion cluster drs apply`)."""
    status = run(lambda: Client(url).call("GET", f"/clusters/{name}/drs"))
    if as_json:
        print_json({k: status[k] for k in ("imbalance", "target", "recommendations", "faults")})
        return
    console.print(_recommendations(status))
    _faults(status)
    if not status["recommendations"]:
        console.print(f"nothing to move (imbalance {status['imbalance']:.3f})")


@drs_app.command("apply")
def drs_apply(name: str, ids: Optional[list[str]] = typer.Argument(None, help="recommendation ids (default: all)"),
              wait: bool = typer.Option(False, "--wait", help="follow the moves"), url: Optional[str] = URL) -> None:
    """Start the listed recommendations' moves (each checked again, through admission control)."""
    client = Client(url)
    out = run(lambda: client.call("POST", f"/clusters/{name}/drs/apply", {"ids": ids or None}))
    for s in out["skipped"]:
        console.print(f"[yellow]skipped {s['id']} ({s['vm']}):[/] {escape(str(s['error'].get('message')))}")
    console.print(f"{len(out['tasks'])} move(s) started: {', '.join(out['tasks']) or '-'}")
    for task_id in out["tasks"] if wait else []:
        print_outcome(run(lambda tid=task_id: follow(client, tid, console)), console)

"""Live progress of a migration task, and its final summary."""
from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvmotion.cli.client import Client

MB = 1024 * 1024


def describe(task: dict[str, Any]) -> str:
    live = task.get("live") or {}
    text = f"[bold]{task['phase'] or 'queued'}[/]"
    if task["phase"] == "precopy" and live:
        text += f"  pass {live.get('pass', 0)}  remaining {live.get('remaining', 0) / MB:7.1f} MB"
        if live.get("eta_s") is not None:
            text += f"  ETA {live['eta_s']:.1f}s"
        if live.get("mbps"):
            text += f"  {live['mbps']:.0f} Mbit/s"
    return text


def follow(client: Client, task_id: str, console: Console, poll_s: float = 0.2, timeout_s: float = 3600) -> dict[str, Any]:
    task = client.task(task_id)
    end = time.monotonic() + timeout_s
    with Progress(TextColumn("{task.fields[vm]} → {task.fields[dst]}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False) as bar:
        row = bar.add_task(describe(task), total=100, vm=task["vm_name"], dst=task["destination"])
        while task["state"] in ("queued", "running") and time.monotonic() < end:
            time.sleep(poll_s)
            task = client.task(task_id)
            bar.update(row, completed=task["progress"], description=describe(task))
        bar.update(row, completed=task["progress"], description=describe(task))
    return task


def summary_table(task: dict[str, Any]) -> Table:
    t0 = task["created_at"]
    table = Table(title=f"{task['kind']} {task['vm_name']}: {task['source']} → {task['destination']} "
                        f"[{'green' if task['state'] == 'success' else 'red'}]{task['state']}[/]")
    table.add_column("phase")
    table.add_column("status")
    table.add_column("start (+s)", justify="right")
    table.add_column("duration", justify="right")
    table.add_column("detail", overflow="fold")
    for p in task["phases"]:
        dur = (p["ended_at"] - p["started_at"]) * 1000 if p.get("ended_at") else None
        detail = ", ".join(f"{k}={v}" for k, v in p.get("detail", {}).items()
                           if not k.endswith("_at") and not isinstance(v, (list, dict)))
        table.add_row(p["name"], p["status"], f"{p['started_at'] - t0:.3f}",
                      f"{dur:.0f} ms" if dur is not None else "-", detail[:160])
    return table


def figures(task: dict[str, Any]) -> Table:
    r = task.get("result") or {}
    table = Table(show_header=False, title="figures")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [("total time", f"{r['total_time_s']:.3f} s" if r.get("total_time_s") is not None else "-"),
            ("QEMU downtime", f"{r['downtime_ms']} ms" if r.get("downtime_ms") is not None else "-"),
            ("guest paused (src stop → dst run)", f"{r['guest_pause_ms']:.0f} ms" if r.get("guest_pause_ms") is not None else "-"),
            ("parked at pre-switchover", f"{r['parked_ms']:.1f} ms" if r.get("parked_ms") is not None else "-"),
            ("bytes sent", f"{r.get('bytes_sent', 0) / MB:.1f} MiB"),
            ("sent ÷ RAM", f"{r['sent_ratio']:.2f}" if r.get("sent_ratio") is not None else "-"),
            ("pre-copy passes", str(r.get("passes", "-")))]
    for k, v in rows:
        table.add_row(k, v)
    return table


def print_outcome(task: dict[str, Any], console: Console) -> None:
    console.print(summary_table(task))
    if task.get("result"):
        console.print(figures(task))
    if task["state"] == "error" and task.get("error"):
        e = task["error"]
        console.print(f"[red]failed in phase {e.get('phase', task['phase'])}:[/] {e.get('message')}")
        if e.get("remedy"):
            console.print(f"[yellow]fix:[/] {e['remedy']}")
        rb = e.get("rollback") or {}
        if rb:
            console.print(f"rollback: source running={rb.get('source_running')}, shadow removed={rb.get('shadow_removed')}")

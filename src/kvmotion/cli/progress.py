"""Live progress of a migration task, and its final summary."""
from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.models.moves import MoveKind, Phase, TaskKind

MB = 1024 * 1024


def describe(task: dict[str, Any]) -> str:
    live = task.get("live") or {}
    if task["state"] == "queued":
        return f"[bold]queued[/] #{live.get('queue_position', '?')}: {live.get('waiting_for', 'waiting for a slot')}"
    text = f"[bold]{task['phase'] or 'starting'}[/]"
    if task["kind"] == TaskKind.IMAGE_IMPORT and live:
        return text + f"  {live.get('percent', 0):.0f}% of this phase"
    if task["phase"] in (Phase.MIRROR, Phase.DISKS) and live:
        done, total = live.get("bytes_done", live.get("disk_bytes_done", 0)), live.get("bytes_total",
                                                                                      live.get("disk_bytes_total", 0))
        text += f"  {done / MB:7.1f}/{total / MB:.1f} MB  {live.get('mbps', live.get('disk_mbps', 0)):.0f} Mbit/s"
        if live.get("eta_s") is not None:
            text += f"  ETA {live['eta_s']:.1f}s"
    if task["phase"] == Phase.COPY and live:
        text += f"  disk {live.get('disk_index', '?')}/{live.get('disks', '?')} {live.get('percent', 0):.0f}% " \
                f"({live.get('state', '')}, via {live.get('via', '?')})"
    if task["phase"] == Phase.POSTCOPY and live.get("postcopy"):
        pc = live["postcopy"]
        text += f"  {pc['status']}  remaining {live.get('remaining', 0) / MB:7.1f} MB  pauses {pc['pauses']}" \
                f"  recoveries {pc['recoveries']}"
        if pc.get("paused_since"):
            text += f"  [yellow]paused {time.time() - pc['paused_since']:.0f}s: waiting for the migration link[/]"
    if task["phase"] == Phase.PRECOPY and live:
        text += f"  pass {live.get('pass', 0)}  remaining {live.get('remaining', 0) / MB:7.1f} MB"
        if live.get("converging"):          # the estimate would rise: hold it, do not jump back
            text += "  converging…"
        elif live.get("eta_s") is not None:
            text += f"  ETA {live['eta_s']:.1f}s"
        if live.get("mbps"):
            text += f"  {live['mbps']:.0f}/{live.get('bandwidth_mbps', '?')} Mbit/s"
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
    if task["kind"] in (MoveKind.SVMOTION, MoveKind.COLD):
        copy = r.get("mirror") or r.get("copy") or {}
        rows = [("total time", f"{r['total_time_s']:.3f} s" if r.get("total_time_s") is not None else "-"),
                ("disk bytes copied", f"{copy.get('bytes', 0) / MB:.1f} MiB"),
                ("copy throughput", f"{copy.get('throughput_mbps', 0):.0f} Mbit/s"),
                ("guest write stall at the pivot", f"{r['write_stall_ms']:.1f} ms" if r.get("write_stall_ms")
                 is not None else "-"),
                ("verified", copy.get("verified") or ", ".join(f"{k}: qemu-img check {'ok' if v else 'FAILED'}"
                                                               for k, v in (r.get("qemu_img_check") or {}).items()) or "-"),
                ("encryption", (r.get("encryption") or {}).get("mode", "-"))]
        rows += guest_health_rows(r)
        for k, v in rows:
            table.add_row(k, v)
        return table
    rows = [("total time", f"{r['total_time_s']:.3f} s" if r.get("total_time_s") is not None else "-"),
            ("QEMU downtime", f"{r['downtime_ms']} ms" if r.get("downtime_ms") is not None else "-"),
            ("guest paused (src stop → dst run)", f"{r['guest_pause_ms']:.0f} ms" if r.get("guest_pause_ms") is not None else "-"),
            ("parked at pre-switchover", f"{r['parked_ms']:.1f} ms" if r.get("parked_ms") is not None else "-"),
            ("bytes sent", f"{r.get('bytes_sent', 0) / MB:.1f} MiB"),
            ("sent ÷ RAM", f"{r['sent_ratio']:.2f}" if r.get("sent_ratio") is not None else "-"),
            ("pre-copy passes", str(r.get("passes", "-"))),
            ("disk streams (shared-nothing)", f"{(r.get('disks') or {}).get('bytes', 0) / MB:.1f} MiB at "
             f"{(r.get('disks') or {}).get('throughput_mbps', 0):.0f} Mbit/s" if r.get("disks") else "-"),
            ("encryption", f"{(r.get('encryption') or {}).get('mode', '-')} ({(r.get('encryption') or {}).get('reason', '')})")]
    if r.get("max_cpu_throttle_pct"):
        rows.append(("auto-converge throttle reached", f"{r['max_cpu_throttle_pct']} %"))
    xb = r.get("xbzrle")
    if xb:
        rows.append(("xbzrle", f"{xb.get('pages', 0)} pages as deltas, {xb.get('cache_miss', 0)} cache misses, "
                               f"{xb.get('overflow', 0)} overflows"))
    pc = r.get("postcopy")
    if pc:
        rows.append(("post-copy", f"{(pc.get('bytes') or 0) / MB:.1f} MiB after the switchover, "
                                  f"{pc.get('page_requests', 0)} page requests, {pc.get('pauses', 0)} pauses, "
                                  f"{pc.get('recoveries', 0)} recoveries ({pc.get('why', '')})"))
    pva = r.get("predicted_vs_actual")
    if pva:
        err = pva.get("total_error_pct")
        rows.append(("predicted → actual", f"{_fmt(pva['total_s'][0], 's')} → {_fmt(pva['total_s'][1], 's')}"
                     + (f" ({err:+.0f} %)" if err is not None else "") + f"; downtime {_fmt(pva['downtime_ms'][0], 'ms')}"
                     f" → {_fmt(pva['downtime_ms'][1], 'ms')}; passes {pva['passes'][0]} → {pva['passes'][1]}"))
        rows.append(("prediction", (r.get("prediction") or {}).get("strategy", "-")))
    rows += guest_health_rows(r)
    rows += guest_clock_rows(r)
    for k, v in rows:
        table.add_row(k, v)
    return table


def guest_clock_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The guest's clock after a live move: its offset to the new host before and after, and whether it was set."""
    c = r.get("guest_clock")
    if not c:
        return []
    before, after = c.get("offset_before_ms"), c.get("offset_after_ms")
    if before is None:
        return [("guest clock", f"[yellow]not checked[/]: {escape(c.get('why') or '-')}")]
    text = f"{before:+.1f} ms → {after:+.1f} ms" if after is not None else f"{before:+.1f} ms → ?"
    state = "[green]set[/]" if c.get("set") else "left alone"
    return [("guest clock (guest − host)", f"{text}, {state}: {escape(c.get('why') or '')}")]


def guest_health_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The guest after the move: the verdict and why (kvmotion.agent.hv.qemu.health)."""
    h = r.get("guest_health")
    if not h:
        return []
    colour = {"healthy": "green", "unhealthy": "red"}.get(h.get("verdict", ""), "yellow")
    why = escape("; ".join(h.get("reasons") or []) or "-")     # console lines may hold [brackets]
    return [("guest after the move", f"[{colour}]{h.get('verdict')}[/] on {h.get('host', '?')} "
                                      f"({h.get('window_s', 0):.1f} s watched): {why}")]


def _fmt(v: Any, unit: str) -> str:
    return "-" if v is None else f"{v:.2f} {unit}" if unit == "s" else f"{v:.0f} {unit}"


def print_outcome(task: dict[str, Any], console: Console) -> None:
    console.print(summary_table(task))
    if task.get("result"):
        console.print(figures(task))
    for f in (task.get("result") or {}).get("findings") or []:
        colour = "yellow" if f.get("severity") == "warning" else "cyan"
        console.print(f"[{colour}]{f.get('severity')} {f.get('code')}:[/] {escape(str(f.get('message')))}")
        if f.get("remedy"):
            console.print(f"[{colour}]fix:[/] {escape(str(f['remedy']))}")
    if task["state"] == "error" and task.get("error"):
        e = task["error"]
        console.print(f"[red]failed in phase {e.get('phase', task['phase'])}:[/] {e.get('message')}")
        if e.get("remedy"):
            console.print(f"[yellow]fix:[/] {e['remedy']}")
        rb = e.get("rollback") or {}
        if rb:
            console.print(f"rollback: source running={rb.get('source_running')}, shadow removed={rb.get('shadow_removed')}")
    if task["state"] == "unknown":
        u = (task.get("live") or {}).get("unknown") or {}
        console.print(f"[yellow]unknown:[/] {u.get('reason', 'a host does not answer')} (source "
                      f"{u.get('source_seen', '?')}, destination {u.get('destination_seen', '?')}); nothing is "
                      "changed until both hosts answer, the controller re-checks every 10 s")


def follow_evacuation(client: Client, task_id: str, console: Console, poll_s: float = 0.3,
                      timeout_s: float = 7200) -> dict[str, Any]:
    """One progress row for the evacuation, and one per VM migration it started."""
    task = client.task(task_id)
    end = time.monotonic() + timeout_s
    rows: dict[str, Any] = {}
    with Progress(TextColumn("{task.fields[name]}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        top = bar.add_task("planning", total=100, name=task["vm_name"])
        while time.monotonic() < end:
            live = task.get("live") or {}
            for vm, child in (live.get("children") or {}).items():
                if vm not in rows:
                    rows[vm] = bar.add_task("", total=100, name=f"  {vm} → {child['destination']}")
                sub = client.task(child["task"])
                bar.update(rows[vm], completed=sub["progress"], description=describe(sub) + f" [{sub['state']}]")
            bar.update(top, completed=task["progress"], description=task["phase"] or "planning")
            if task["state"] not in ("queued", "running"):
                break
            time.sleep(poll_s)
            task = client.task(task_id)
    return task


def print_evacuation(task: dict[str, Any], console: Console) -> None:
    r = task.get("result") or {}
    table = Table("VM", "how", "destination", "state", "downtime ms", "reason", title=f"{task['vm_name']}: "
                  f"[{'green' if task['state'] == 'success' else 'red'}]{task['state']}[/]")
    for vm, res in (r.get("results") or {}).items():
        table.add_row(vm, "vMotion", res["destination"], res["state"], str(res.get("downtime_ms")), res.get("error") or "")
    for vm, host in (r.get("reregistered") or {}).items():
        table.add_row(vm, "re-registered (powered off)", host, "success", "-", "")
    for vm, findings in ((task.get("error") or {}).get("blocked") or {}).items():
        reason = "; ".join(f"{f['code']}: {f['message']} (fix: {f.get('remedy', '')})" for f in findings)
        table.add_row(vm, "cannot move", "-", "blocked", "-", reason)
    console.print(table)
    if task["state"] != "success" and task.get("error"):
        console.print(f"[red]{task['error']['message']}[/]")
        console.print(f"[yellow]fix:[/] {task['error'].get('remedy', '')}")

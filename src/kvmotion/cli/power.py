"""`kvmotion vm shutdown|reboot|guest`: graceful power operations and what the guest agent tells.

``vm stop`` stays the hard stop (QEMU quits at once). ``vm shutdown`` asks the guest: its guest agent
(``guest-shutdown``), else the ACPI power button, and waits until it powered off; ``--force`` hard-stops it after
the timeout. ``vm reboot`` asks the guest agent to reboot; QEMU has no ACPI reboot, so a guest without an agent is
reset (and the command says so).
"""
from __future__ import annotations

from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.output import URL, console, print_json, run

HTTP_SLACK_S = 60.0


def _power(vm: str, action: str, timeout: float, force: bool, url: Optional[str]) -> dict[str, Any]:
    client = Client(url, timeout=timeout + HTTP_SLACK_S)
    verb = "shutting down" if action == "shutdown" else "rebooting"
    with console.status(f"{verb} {vm} (up to {timeout:g}s)…", spinner="dots"):
        if action == "shutdown":
            return run(lambda: client.shutdown_vm(vm, timeout, force))
        return run(lambda: client.reboot_vm(vm, timeout, force))


def describe_power(out: dict[str, Any]) -> list[str]:
    """The lines that tell what happened (pure; tested)."""
    r, name = out["result"], out["vm"]["name"]
    how = {"guest-agent": "through its guest agent", "acpi": "by the ACPI power button",
           "reset": "by a reset"}.get(r["method"], r["method"])
    what = {"poweredOff": "powered off", "rebooted": "rebooted", "reset": "was reset",
            "forced-off": "did not power off in time and was hard-stopped (--force)",
            "forced-reset": "did not reboot in time and was reset (--force)"}.get(r["outcome"], r["outcome"])
    lines = [f"VM [bold]{name}[/] {what} after {r['seconds']:.1f}s (asked {how}); power state: "
             f"{out['vm']['power_state']}"]
    if r.get("guest_agent_error"):
        lines.append(f"[yellow]guest agent:[/] {escape(r['guest_agent_error'])}")
    if r.get("note"):
        lines.append(f"[yellow]note:[/] {escape(r['note'])}")
    return lines


def vm_shutdown(vm: str, timeout: float = typer.Option(120.0, "--timeout", help="seconds the guest may take"),
                force: bool = typer.Option(False, "--force", help="hard-stop it when the timeout passes"),
                url: Optional[str] = URL) -> None:
    """Shut the guest down cleanly: its guest agent (guest-shutdown), else the ACPI power button; waits until it
    powered off. Without --force a guest that does not power off in time is an error (it keeps running)."""
    for line in describe_power(_power(vm, "shutdown", timeout, force, url)):
        console.print(line)


def vm_reboot(vm: str, timeout: float = typer.Option(120.0, "--timeout", help="seconds the guest may take"),
              force: bool = typer.Option(False, "--force", help="reset it when the timeout passes"),
              url: Optional[str] = URL) -> None:
    """Reboot the guest cleanly through its guest agent; QEMU has no ACPI reboot, so a guest without one is
    reset (like its reset button), and this says so."""
    for line in describe_power(_power(vm, "reboot", timeout, force, url)):
        console.print(line)


def guest_table(facts: dict[str, Any]) -> Table:
    table = Table(show_header=False, title="guest")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    os_ = facts.get("os") or {}
    rows = [("guest agent", f"{facts.get('guest_agent')} (qemu-ga {facts.get('agent_version') or '?'})"),
            ("OS", os_.get("pretty_name") or os_.get("name") or "-"),
            ("kernel", os_.get("kernel_release") or "-"),
            ("hostname", facts.get("hostname") or "-"),
            ("IP addresses", ", ".join(facts.get("ip_addresses") or []) or "-")]
    for fs in facts.get("filesystems") or []:
        size = f"{(fs.get('used_bytes') or 0) / 2**30:.1f}/{(fs.get('total_bytes') or 0) / 2**30:.1f} GiB"
        rows.append((f"filesystem {fs['mountpoint']}", f"{fs.get('type')} on {fs.get('device')}, {size} used"))
    for cmd, err in (facts.get("errors") or {}).items():
        rows.append((f"{cmd} failed", err))
    for k, v in rows:
        table.add_row(k, escape(str(v)))
    return table


def vm_guest(vm: str, json_out: bool = typer.Option(False, "--json", help="print the facts as JSON"),
             url: Optional[str] = URL) -> None:
    """What the guest agent tells now: OS, hostname, IP addresses, file systems, agent version (an error naming
    the fix when no guest agent answers)."""
    facts = run(lambda: Client(url, timeout=30).guest(vm))
    if json_out:
        print_json(facts)
    else:
        console.print(guest_table(facts))


def register(app: typer.Typer) -> None:
    """Add the commands to `kvmotion vm`."""
    app.command("shutdown")(vm_shutdown)
    app.command("reboot")(vm_reboot)
    app.command("guest")(vm_guest)

"""`kvmotion demo`: a real live migration in the lab, with the numbers a user would ask for."""
from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.progress import print_outcome
from kvmotion.common.errors import KvmotionError
from kvmotion_lab import lab, scenario
from kvmotion_lab.image.build import build_image
from kvmotion_lab.netns import LabError


def run_demo(console: Console, memory_mb: int = 256, dirty: float = 0.0, keep: bool = False,
             root: Path = lab.DEFAULT_ROOT) -> int:
    console.rule("[bold]kvmotion demo: live vMotion h1 → h2")
    image = build_image(log=lambda m: console.print(f"[dim]{m}[/]"))
    if lab.load(root) is not None:
        console.print("[yellow]a lab is already up; taking it down first[/]")
        lab.down(root)
    info = None
    try:
        info = lab.up(2, root, image_dir=image.kernel.parent.parent, log=lambda m: console.print(f"  {m}"))
        client = Client(info.controller_url, token=info.admin_token())
        vm = client.create_vm(name="demo-vm", host="h1", memory_mb=memory_mb, dirty_mb_s=dirty)
        ip = vm["spec"]["guest_ip"]
        client.start_vm("demo-vm")
        console.print(f"VM demo-vm ({memory_mb} MiB, {ip}) powered on on h1; waiting for the guest to boot…")
        first = scenario.wait_guest(info.net.client_netns, ip)
        console.print(f"guest up: boot_id {first['boot_id'][:8]}…, heartbeat seq {first['seq']}")
        with tempfile.TemporaryDirectory() as tmp:
            console.print("client pings the guest every 10 ms and polls its HTTP heartbeat; migrating…")
            move = scenario.migrate_with_probe(client, info.net, "demo-vm", ip, "h2", Path(tmp) / "probe.jsonl")
        print_outcome(move.task, console)
        table = Table("", "before", "after", title="what the client saw")
        b, a = move.before or {}, move.after or {}
        table.add_row("heartbeat seq", str(b.get("seq")), str(a.get("seq")))
        table.add_row("uptime s", str(b.get("uptime")), str(a.get("uptime")))
        table.add_row("boot id", str(b.get("boot_id")), str(a.get("boot_id")))
        console.print(table)
        p = move.probe
        console.print(f"pings: {p.sent} sent, {p.lost} lost; client-observed gap {p.max_gap_ms:.0f} ms "
                      f"(longest silence {p.max_silence_ms:.0f} ms)")
        same_boot = bool(b) and b.get("boot_id") == a.get("boot_id") and a.get("seq", -1) > b.get("seq", 0)
        console.print("[green]same boot, counter continued[/]" if same_boot else "[red]guest state not continuous[/]")
        return 0 if move.ok and same_boot else 1
    except (KvmotionError, LabError, TimeoutError) as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    finally:
        if info is not None and not keep:
            lab.down(root)
            console.print("lab down")

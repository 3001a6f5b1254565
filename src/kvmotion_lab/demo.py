"""`kvmotion demo`: a real live migration in the lab, with the numbers a user would ask for."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion.cli.progress import print_outcome
from kvmotion.common.errors import KvmotionError
from kvmotion_lab import lab, scenario
from kvmotion_lab.image.build import build_image
from kvmotion_lab.image.debian import DebianImage, cached_debian_image
from kvmotion_lab.netns import LabError


def pick_guest(console: Console, guest: str) -> DebianImage | None:
    """The Debian guest when it is built (``auto``) or asked for (``debian``); None: the tiny kernel guest."""
    debian = cached_debian_image() if guest in ("auto", "debian") else None
    if debian is not None:
        console.print(f"guest: the Debian 12 disk image ({debian.kernel}, recipe {debian.recipe_hash[:12]}), "
                      "a linked clone booting its own disk under BIOS")
    elif guest == "debian":
        raise LabError("the Debian guest is not built on this machine; build it first: kvmotion image build --debian")
    else:
        console.print("guest: the tiny test guest (kernel + busybox initramfs)"
                      + ("; `kvmotion image build --debian` builds the Debian 12 disk guest (a few minutes), "
                         "which the demo then uses" if guest == "auto" else ""))
    return debian


def _create(client: Client, info: lab.LabInfo, debian: DebianImage | None, memory_mb: int,
            dirty: float) -> dict[str, Any]:
    if debian is None:
        return client.create_vm(name="demo-vm", host="h1", memory_mb=memory_mb, dirty_mb_s=dirty)
    image = lab.stage_image(Path(info.root), debian.disk)
    return client.create_vm(name="demo-vm", host="h1", memory_mb=max(memory_mb, 512), dirty_mb_s=dirty,
                            image=image, clone="linked", firmware="bios")


def settled(netns: str, ip: str, beat: dict[str, Any], wait_s: float = 180.0) -> dict[str, Any]:
    """The Debian guest once its first boot has settled (cloud-init done), so the move shows a running service,
    not a booting system; after ``wait_s`` the demo goes on anyway."""
    end = time.monotonic() + wait_s
    while beat.get("cloud_init") == "running" and time.monotonic() < end:
        time.sleep(2)
        beat = scenario.guest_heartbeat(netns, ip) or beat
    return beat


def run_demo(console: Console, memory_mb: int = 256, dirty: float = 0.0, keep: bool = False,
             root: Path = lab.DEFAULT_ROOT, guest: str = "auto") -> int:
    console.rule("[bold]kvmotion demo: live vMotion h1 → h2")
    image = build_image(log=lambda m: console.print(f"[dim]{m}[/]"))
    if lab.load(root) is not None:
        console.print("[yellow]a lab is already up; taking it down first[/]")
        lab.down(root)
    info = None
    try:
        debian = pick_guest(console, guest)
        info = lab.up(2, root, image_dir=image.kernel.parent.parent, log=lambda m: console.print(f"  {m}"))
        client = Client(info.controller_url, token=info.admin_token())
        vm = _create(client, info, debian, memory_mb, dirty)
        ip = vm["spec"]["guest_ip"]
        client.start_vm("demo-vm")
        console.print(f"VM demo-vm ({vm['spec']['memory_mb']} MiB, {ip}) powered on on h1; waiting for the guest "
                      "to boot…")
        first = scenario.wait_guest(info.net.client_netns, ip, 300 if debian else scenario.GUEST_BOOT_DEADLINE_S)
        if debian is not None:
            first = settled(info.net.client_netns, ip, first)
        console.print(f"guest up: boot_id {first['boot_id'][:8]}…, heartbeat seq {first['seq']}"
                      + (f", cloud-init {first.get('cloud_init')}" if debian else ""))
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

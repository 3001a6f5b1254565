"""Figures for live vMotion in the lab: total time, QEMU downtime, client gap, bytes sent ÷ RAM.

Run as root:  python3 benchmarks/vmotion_figures.py [--sizes 256,1024] [--dirty 0,20] [--repeat 1]
Prints a table; asserts nothing about speed (speed belongs here, not in tests).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvmotion.cli.client import Client
from kvmotion_lab.image.build import build_image
from kvmotion_lab import lab, scenario


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--dirty", default="0,20")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--encryption", default="opportunistic",
                    help="comma list of per-VM settings to compare, e.g. disabled,required")
    ap.add_argument("--root", type=Path, default=Path("/tmp/kvmotion-bench"))
    args = ap.parse_args()
    console = Console()
    image = build_image(log=lambda m: None)
    info = lab.up(2, args.root, prefix="kvb", image_dir=image.kernel.parent.parent, log=lambda m: None)
    table = Table("RAM MiB", "dirty MB/s", "encryption", "run", "Mbit/s", "total s", "QEMU downtime ms", "guest paused ms",
                  "client gap ms", "lost pings", "sent ÷ RAM", "passes", title="live vMotion h1 → h2 (lab)")
    try:
        client = Client(info.controller_url, token=info.admin_token())
        n = 0
        for size in (int(x) for x in args.sizes.split(",")):
            for dirty, enc in ((float(x), e) for x in args.dirty.split(",") for e in args.encryption.split(",")):
                n += 1
                name = f"bench{n}"
                vm = client.create_vm(name=name, host="h1", memory_mb=size, dirty_mb_s=dirty, encrypted_vmotion=enc)
                ip = vm["spec"]["guest_ip"]
                client.start_vm(name)
                scenario.wait_guest(info.net.client_netns, ip)
                host, gaps = "h2", []
                for run in range(args.repeat):
                    with tempfile.TemporaryDirectory() as tmp:
                        move = scenario.migrate_with_probe(client, info.net, name, ip, host, Path(tmp) / "p.jsonl",
                                                           settle_s=2.0)
                    r = move.task.get("result") or {}
                    gaps.append(move.probe.max_gap_ms)
                    passes = r.get("pass_log") or [{}]
                    table.add_row(str(size), f"{dirty:g}", (r.get("encryption") or {}).get("mode", "?"), str(run + 1),
                                  f"{max(p.get('mbps', 0) for p in passes):.0f}",
                                  f"{r.get('total_time_s', 0):.2f}", str(r.get("downtime_ms")),
                                  str(r.get("guest_pause_ms")), f"{move.probe.max_gap_ms:.0f}", str(move.probe.lost),
                                  str(r.get("sent_ratio")), str(r.get("passes")))
                    if not move.ok:
                        console.print(f"[red]{name} failed:[/] {move.task.get('error')}")
                    host = "h1" if host == "h2" else "h2"
                if args.repeat > 1:
                    console.print(f"{size} MiB, {dirty:g} MB/s: median client gap {statistics.median(gaps):.0f} ms")
                client.stop_vm(name)
                client.delete_vm(name)
        console.print(table)
    finally:
        lab.down(args.root)


if __name__ == "__main__":
    main()

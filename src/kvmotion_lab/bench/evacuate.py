"""`kvmotion bench evacuate`: evacuate N VMs over a shaped link, with and without admission control.

Prints the makespan, the lower bound (bytes that had to move ÷ link rate), their ratio, and each VM's downtime.
A benchmark, not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from kvmotion.cli.client import Client
from kvmotion_lab.image.build import build_image
from kvmotion_lab import lab, scenario


def evacuate_once(admission: bool, n_vms: int, memory_mb: int, link: str, root: Path,
                  log: Callable[[str], None]) -> dict[str, Any]:
    image = build_image(log=lambda m: None)
    info = lab.up(2, root, prefix="kvbe", image_dir=image.kernel.parent.parent, link=link, admission=admission,
                  log=lambda m: None)
    try:
        client = Client(info.controller_url, token=info.admin_token())
        names = [f"ev{i}" for i in range(n_vms)]
        for n in names:
            client.create_vm(name=n, host="h1", memory_mb=memory_mb)
            client.start_vm(n)
        for n in names:
            scenario.wait_guest(info.net.client_netns, client.vm(n)["spec"]["guest_ip"])
        log(f"{'with' if admission else 'without'} admission: evacuating {n_vms} × {memory_mb} MiB over {link}")
        task = client.maintenance("h1", True)
        while task["state"] in ("queued", "running"):
            time.sleep(0.2)
            task = client.task(task["id"])
        children = [client.task(r["task"]) for r in (task["result"].get("results") or {}).values()]
        started = min(c["created_at"] for c in children) if children else task["created_at"]
        makespan = max(c["finished_at"] for c in children) - started if children else 0.0
        moved = sum(c["result"].get("bytes_sent", 0) for c in children)
        bound = moved / (lab.LINK_RATES[link] * 125_000)
        return {"admission": admission, "state": task["state"], "makespan_s": round(makespan, 2),
                "bytes_moved": moved, "lower_bound_s": round(bound, 2),
                "ratio": round(makespan / bound, 2) if bound else None,
                "downtime_ms": {c["vm_name"]: c["result"].get("downtime_ms") for c in children},
                "max_concurrent": _max_concurrent(children)}
    finally:
        lab.down(root)


def _max_concurrent(children: list[dict[str, Any]]) -> int:
    spans = [(c["phases"][0]["started_at"], c["finished_at"]) for c in children if c["phases"]]
    return max((sum(1 for a, b in spans if a <= t < b) for t, _ in spans), default=0)


def run(n_vms: int = 4, memory_mb: int = 512, link: str = "1g", out: Path | None = None,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    results = [evacuate_once(adm, n_vms, memory_mb, link, Path("/tmp/kvmotion-bench-evacuate"), log)
               for adm in (True, False)]
    if out is not None:
        out.write_text(json.dumps(results, indent=1))
    return results

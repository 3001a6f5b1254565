"""benchmarks/scale.py at a tiny size: it runs the controller's real paths against fake agents and prints every
figure against its target (no figure is asserted: speed is for the benchmark itself)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"
FIGURES = ("seeded:", "validate: one VM, one host", "validate: one VM, every host (", "validate: one VM, every host, at once", "evacuation plan:",
           "facts round:", "GET /hosts?view=summary, one client alone", "GET /vms, every page", "API p99",
           "GET /hosts?view=summary p50", "GET /vms", "GET /tasks", "floor: GET /health", "controller RSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_scale_benchmark_runs_at_a_tiny_size_and_prints_every_figure(db_url: str) -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--db", db_url, "--hosts", "20", "--vms", "200",
                          "--tasks", "50", "--evac-vms", "10", "--unreachable-s", "0.2", "--latency-ms", "1",
                          "--clients", "4", "--api-s", "1", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=300, env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for figure in FIGURES:
        row = next((line for line in lines if line.lstrip().startswith(figure)), None)
        assert row is not None, f"no {figure!r} row in:\n{out.stdout}"
    targets = [line for line in lines if "< " in line]
    assert len(targets) == 5 and all(line.rstrip().endswith(("met", "GAP")) for line in targets), out.stdout
    assert "20 hosts, 1 silent" in out.stdout       # every 20th host does not answer, and the round says so

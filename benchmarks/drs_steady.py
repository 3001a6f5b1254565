"""DRS under a steady load (issue 22's "nothing ping-pongs"): DRS's own decisions (``controller.drs.model``, the
code the controller runs) applied every round, fully automated, to a cluster whose VMs keep a steady load measured
with noise. Counts the moves per round and times the planning. No QEMU and no controller: decisions only (the lab
test ``tests/e2e/test_drs_e2e.py`` shows the real loop on real guests).

Every VM starts on the first quarter of the hosts (a skewed cluster), its CPU a steady base (10–90 % of a CPU)
times a fresh noise factor each round (±``--noise``). Each round DRS plans on the noisy measurement and every
recommendation is applied; a VM DRS moved is settled for ``--cooldown`` rounds (the cooldown; 0 shows the model
alone). Prints: rounds until no move, moves in the settling rounds and after them, the imbalance at the start and
the end against the threshold's target, and the planning time per round.

Run:  python benchmarks/drs_steady.py [--hosts 16] [--vms 200] [--rounds 300] [--threshold 3] [--noise 0.1]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace

from kvmotion.controller.drs import model
from kvmotion.controller.drs.model import Cluster, HostLoad, VmLoad


def start(hosts: int, vms: int, rng: random.Random) -> tuple[Cluster, dict[str, float]]:
    names = [f"h{i:03d}" for i in range(hosts)]
    crowded = names[:max(1, hosts // 4)]
    base = {f"vm{i:04d}": rng.uniform(10.0, 90.0) for i in range(vms)}
    cluster = Cluster(hosts={h: HostLoad(h, 100.0 * 32, 256 * 1024.0, True) for h in names},
                      vms={n: VmLoad(n, crowded[i % len(crowded)], cpu, 2048.0, frozenset(names), cost_s=5.0,
                                     cost_mb=2048.0) for i, (n, cpu) in enumerate(base.items())})
    return cluster, base


def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    c, base = start(args.hosts, args.vms, rng)
    moved_at: dict[str, int] = {}
    moves, times = [], []
    first = None
    for rnd in range(args.rounds):
        noisy = Cluster(c.hosts, {n: replace(v, cpu_pct=base[n] * rng.uniform(1 - args.noise, 1 + args.noise),
                                             movable=True,
                                             settled=rnd - moved_at.get(n, -10 ** 9) < args.cooldown)
                                  for n, v in c.vms.items()})
        t0 = time.perf_counter()
        plan = model.plan(noisy, args.threshold)
        times.append(time.perf_counter() - t0)
        first = plan.imbalance if first is None else first
        for r in plan.recommendations:
            noisy = model.moved(noisy, r.vm, r.destination)
            moved_at[r.vm] = rnd
        c = noisy
        moves.append(len(plan.recommendations))
    settled = next((i for i in range(len(moves)) if not any(moves[i:])), None)
    end = model.imbalance(c)
    target = model.THRESHOLDS[args.threshold][0]
    print(f"DRS under a steady load: {args.hosts} hosts, {args.vms} VMs, threshold {args.threshold}, noise "
          f"±{args.noise:.0%}, cooldown {args.cooldown} rounds, {args.rounds} rounds")
    print(f"  imbalance            {first:.3f} at the start → {end:.3f} at the end (target {target})")
    print(f"  rounds until no move {settled if settled is not None else 'never'}")
    print(f"  moves while settling {sum(moves[:settled or len(moves)])}")
    after = sum(moves[settled:]) if settled is not None else sum(moves)
    print(f"  moves after settling {after}  ({'no ping-pong' if settled is not None else 'PING-PONG: still moving'})")
    print(f"  planning per round   median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=16)
    p.add_argument("--vms", type=int, default=200)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--threshold", type=int, default=3, choices=range(1, 6))
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--cooldown", type=int, default=0, help="rounds a moved VM is left alone (0: the model alone)")
    p.add_argument("--seed", type=int, default=1)
    run(p.parse_args())


if __name__ == "__main__":
    main()

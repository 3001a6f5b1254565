"""A transaction load on the Debian guest's bank (``POST /bank/tx``), run inside the client namespace.

``python3 -m kvmotion_lab.bench.loadgen URL --clients 4 --out FILE``: each client sends one transaction at a time,
as fast as the guest answers, each with its own ``(client, seq)``. A transaction that fails or times out is
retried with the same ``seq`` (the bank applies it once). Every committed transaction is one line of FILE
(``{"t": wall time, "c": client, "s": seq, "ms": latency}``), every failed attempt one ``{"t", "c", "s", "err"}``
line. SIGTERM ends it: the clients finish their transaction in flight and the last line is
``{"summary": {...}}`` with the acknowledged sequence numbers of each client.

:func:`windows` turns such a file into throughput before, during and after a move.
"""
from __future__ import annotations

import argparse
import http.client
import json
import signal
import threading
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

TX_TIMEOUT_S = 5.0
RETRY_PAUSE_S = 0.05


class Load:
    def __init__(self, url: str, clients: int, out: IO[str]) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "", parts.port or 80
        self.clients = clients
        self.out = out
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.acked: dict[str, int] = {}
        self.errors = 0

    def _write(self, rec: dict[str, Any]) -> None:
        with self.lock:
            self.out.write(json.dumps(rec) + "\n")

    def _one(self, client: str, seq: int) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TX_TIMEOUT_S)
        try:
            conn.request("POST", f"/bank/tx?client={client}&seq={seq}")
            resp = conn.getresponse()
            body = json.loads(resp.read() or b"{}")
            if resp.status != 200 or body.get("seq") != seq:
                raise OSError(f"HTTP {resp.status}: {body.get('error', body)}")
        finally:
            conn.close()

    def client(self, n: int) -> None:
        name, seq = f"c{n}", 1
        while not self.stop.is_set():
            t0 = time.time()
            try:
                self._one(name, seq)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                with self.lock:
                    self.errors += 1
                self._write({"t": time.time(), "c": name, "s": seq, "err": f"{type(exc).__name__}: {exc}"[:160]})
                self.stop.wait(RETRY_PAUSE_S)
                continue
            self._write({"t": time.time(), "c": name, "s": seq, "ms": round((time.time() - t0) * 1000, 1)})
            with self.lock:
                self.acked[name] = seq
            seq += 1

    def run(self) -> dict[str, Any]:
        threads = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(self.clients)]
        for t in threads:
            t.start()
        while not self.stop.is_set():
            self.stop.wait(0.2)
            with self.lock:
                self.out.flush()
        for t in threads:
            t.join(TX_TIMEOUT_S + 1)
        return {"clients": self.clients, "acked": dict(self.acked), "errors": self.errors}


def windows(path: Path, move_start: float, move_end: float, settle_s: float) -> dict[str, Any]:
    """Throughput (transactions/s) in the ``settle_s`` before the move, during it and in the ``settle_s`` after,
    the longest wall-clock stretch without a commit around the move, the slowest transaction and the failures."""
    commits: list[float] = []
    slowest, errors = 0.0, 0
    summary: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "summary" in rec:
            summary = rec["summary"]
        elif "err" in rec:
            errors += 1
        else:
            commits.append(rec["t"])
            if move_start - settle_s <= rec["t"] <= move_end + settle_s:
                slowest = max(slowest, rec["ms"])
    commits.sort()

    def rate(a: float, b: float) -> float:
        return round(sum(1 for t in commits if a <= t < b) / (b - a), 1) if b > a else 0.0

    around = [move_start - settle_s] + [t for t in commits if move_start - settle_s <= t <= move_end + settle_s] \
        + [move_end + settle_s]
    stall = max((b - a for a, b in zip(around, around[1:])), default=0.0)
    before = rate(move_start - settle_s, move_start)
    during = rate(move_start, move_end)
    return {"tx_per_s_before": before, "tx_per_s_during": during, "tx_per_s_after": rate(move_end, move_end + settle_s),
            "tx_during_pct": round(100 * during / before, 1) if before else None, "tx_stall_ms": round(stall * 1000),
            "tx_slowest_ms": slowest, "tx_errors": errors, "tx_committed": len(commits),
            "acked": summary.get("acked", {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    with args.out.open("w") as out:
        load = Load(args.url, args.clients, out)
        signal.signal(signal.SIGTERM, lambda *_: load.stop.set())
        signal.signal(signal.SIGINT, lambda *_: load.stop.set())
        summary = load.run()
        out.write(json.dumps({"summary": summary}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

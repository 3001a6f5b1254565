"""The parent side of the client probe: start it in a namespace, stop it by PID, read what it saw.

:class:`ClientProbe` runs :mod:`kvmotion_lab.pinger` (``python -m kvmotion_lab.pinger``) inside the lab's client
netns; :func:`parse_probe_file` turns its JSON lines into a :class:`ProbeReport`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmotion_lab.netns import netns_exec_argv
from kvmotion_lab.pinger import DEFAULT_REPLY_TIMEOUT_MS, HTTP_TIMEOUT_S

__all__ = ["ClientProbe", "ProbeReport", "parse_probe_file"]

START_TIMEOUT_S = 10.0

# --------------------------------------------------------------------------
# report (parent side)


@dataclass
class ProbeReport:
    sent: int
    received: int
    lost: int
    max_gap_ms: float  # longest run of consecutive lost pings x interval (0 if none lost)
    heartbeats: list[dict] = field(default_factory=list)  # every heartbeat JSON, with "t" added
    http_errors: int = 0
    # extras
    interval_ms: int = 10
    max_rtt_ms: float = 0.0
    max_silence_ms: float = 0.0  # longest wall-clock time between two consecutive replies
    outages: list[dict] = field(default_factory=list)  # runs of lost pings: {"t_start", "t_end", "lost", "gap_ms"}
    complete: bool = False  # the probe wrote its "end" record (clean stop)

    def boot_ids(self) -> set[str]:
        return {str(h["boot_id"]) for h in self.heartbeats if h.get("boot_id") is not None}

    def seq_monotonic(self) -> bool:
        """Heartbeat "seq" never decreases (heartbeats without "seq" are ignored)."""
        last = None
        for h in self.heartbeats:
            s = h.get("seq")
            if s is None:
                continue
            if last is not None and s < last:
                return False
            last = s
        return True


@dataclass
class _ProbeLines:
    """What a probe file holds, line by line."""

    pings: dict[int, tuple[float, float | None]] = field(default_factory=dict)   # n -> (sent at, rtt ms | None)
    heartbeats: list[dict] = field(default_factory=list)
    http_errors: int = 0
    interval_ms: int | None = None
    complete: bool = False

    def add(self, rec: dict) -> None:
        k = rec.get("k")
        if k == "ping":
            self.pings[int(rec["n"])] = (float(rec["t"]), rec.get("rtt_ms"))
        elif k == "hb":
            data = rec.get("data")
            hb = dict(data) if isinstance(data, dict) else {"value": data}
            hb["t"] = rec["t"]
            self.heartbeats.append(hb)
        elif k == "http_err":
            self.http_errors += 1
        elif k == "start":
            self.interval_ms = int(rec.get("interval_ms", 10))
        elif k == "end":
            self.complete = True


def _read_probe_file(path: Path) -> _ProbeLines:
    lines = _ProbeLines()
    try:
        f = open(path)
    except FileNotFoundError:
        return lines
    with f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by SIGKILL
            lines.add(rec)
    return lines


def _outages(pings: dict[int, tuple[float, float | None]], interval_ms: int) -> list[dict]:
    """Runs of consecutive lost pings: when each began and ended, how many, how long."""
    outages: list[dict] = []
    run: list[int] = []

    def close_run() -> None:
        if run:
            outages.append({"t_start": pings[run[0]][0], "t_end": pings[run[-1]][0], "lost": len(run),
                            "gap_ms": len(run) * interval_ms})
            run.clear()

    prev = None
    for n in sorted(pings):
        if prev is not None and n != prev + 1:
            close_run()  # unrecorded pings in between (should not happen)
        if pings[n][1] is None:
            run.append(n)
        else:
            close_run()
        prev = n
    close_run()
    return outages


def parse_probe_file(path: Path, interval_ms: int | None = None) -> ProbeReport:
    """Build a ProbeReport from a probe's JSON-lines file (tolerates a torn last line)."""
    lines = _read_probe_file(path)
    interval_ms = interval_ms if interval_ms is not None else lines.interval_ms or 10
    pings = lines.pings
    seqs = sorted(pings)
    answered = [(pings[n][0], pings[n][1]) for n in seqs if pings[n][1] is not None]
    rx_times = [t + rtt / 1000.0 for t, rtt in answered]
    max_silence = max((b - a for a, b in zip(rx_times, rx_times[1:])), default=0.0) * 1000.0
    outages = _outages(pings, interval_ms)
    return ProbeReport(
        sent=len(seqs),
        received=len(answered),
        lost=len(seqs) - len(answered),
        max_gap_ms=float(max((o["gap_ms"] for o in outages), default=0)),
        heartbeats=lines.heartbeats,
        http_errors=lines.http_errors,
        interval_ms=interval_ms,
        max_rtt_ms=float(max((rtt for _, rtt in answered), default=0.0)),
        max_silence_ms=max_silence,
        outages=outages,
        complete=lines.complete,
    )


class ClientProbe:
    """Runs the probe inside *netns*; use as a context manager.

    ``with ClientProbe(lab.client_netns, "198.18.1.100", url, out=p) as probe:
    ...; report = probe.stop()`` -- leaving the block stops it too (the report
    is then in ``probe.report``).
    """

    def __init__(
        self,
        netns: str,
        target_ip: str,
        http_url: str | None = None,
        interval_ms: int = 10,
        out: Path | None = None,
        reply_timeout_ms: int = DEFAULT_REPLY_TIMEOUT_MS,
    ):
        if interval_ms < 1:
            raise ValueError("interval_ms must be >= 1")
        self.netns = netns
        self.target_ip = target_ip
        self.http_url = http_url
        self.interval_ms = interval_ms
        self.reply_timeout_ms = reply_timeout_ms
        if out is None:
            fd, name = tempfile.mkstemp(prefix="kvmotion-probe-", suffix=".jsonl")
            os.close(fd)
            out = Path(name)
        self.out = Path(out)
        self.log_path = self.out.with_name(self.out.name + ".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.report: ProbeReport | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self) -> list[str]:


        inner = [
            sys.executable, "-m", "kvmotion_lab.pinger",
            "--target", self.target_ip,
            "--interval-ms", str(self.interval_ms),
            "--reply-timeout-ms", str(self.reply_timeout_ms),
            "--out", str(self.out),
        ]
        if self.http_url:
            inner += ["--http-url", self.http_url]
        return netns_exec_argv(self.netns, inner)

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("probe already started")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.unlink(missing_ok=True)
        with open(self.log_path, "wb") as log:
            # `ip netns exec` execs the command, so proc.pid is the probe itself.
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._started():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        rc = self.proc.poll()
        if rc is None:
            self._terminate()
        raise RuntimeError(f"probe did not start (rc={self.proc.returncode}): {self._log_tail()}")

    def _started(self) -> bool:
        try:
            with open(self.out) as f:
                first = f.readline()
        except FileNotFoundError:
            return False
        return first.endswith("\n") and '"start"' in first

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:].strip() or "(no output)"
        except OSError:
            return "(no log)"

    def _terminate(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.reply_timeout_ms / 1000.0 + HTTP_TIMEOUT_S + 5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5.0)

    def snapshot(self) -> ProbeReport:
        """Report so far, without stopping (pings in flight are not counted yet)."""
        return parse_probe_file(self.out, self.interval_ms)

    def stop(self) -> ProbeReport:
        if self.proc is not None:
            self._terminate()
        self.report = parse_probe_file(self.out, self.interval_ms)
        return self.report

    def __enter__(self) -> "ClientProbe":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.report is None or (self.proc is not None and self.proc.poll() is None):
            self.stop()

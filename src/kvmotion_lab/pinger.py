"""The probe process: what a user sees during a migration, measured from the lab's client namespace.

Runs as ``python -m kvmotion_lab.pinger --target IP --interval-ms 10
[--http-url URL] --out FILE.jsonl`` (normally inside the lab's client netns
via ``ip netns exec``; :class:`kvmotion_lab.probe.ClientProbe` starts it).  It

* pings *target* every ``interval-ms`` with a raw ICMP socket (root needed),
  on a fixed timetable (after a stall of the probe itself the overdue pings
  go out at once: it catches up, never skips),
  one JSON line per ping once it is answered or has timed out
  (``--reply-timeout-ms``, default 1000): ``{"k": "ping", "n": 17,
  "t": <wall time sent>, "rtt_ms": 0.05 | null}``;
* GETs *http-url* every 200 ms (timeout 1 s, no proxies) and writes
  ``{"k": "hb", "t": ..., "data": <JSON>}`` or ``{"k": "http_err", ...}``.

On SIGTERM/SIGINT it stops sending, waits (at most the reply timeout) for
the pings still in flight, writes ``{"k": "end", ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, TextIO

__all__ = ["due_sends", "main"]

HTTP_PERIOD_S = 0.2
HTTP_TIMEOUT_S = 1.0
DEFAULT_REPLY_TIMEOUT_MS = 1000
_SOL_RAW = 255  # linux/socket.h; not exported by the socket module
_ICMP_FILTER = 1  # linux/icmp.h



class _Writer:
    def __init__(self, f: TextIO):
        self.f = f
        self.lock = threading.Lock()

    def emit(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        with self.lock:
            self.f.write(line)
            self.f.flush()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def due_sends(start: float, interval_s: float, sent: int, now: float) -> int:
    """Pings due by ``now`` on the timetable ``start + n * interval_s`` (n = 0, 1, ...) beyond the ``sent`` ones:
    after a stall of the probe itself every overdue ping goes out at once (catch up, never skip)."""
    return max(0, int((now - start) / interval_s + 1e-9) + 1 - sent)


class _Pinger:
    PAYLOAD_PAD = b"kvmotion-probe".ljust(48, b".")

    def __init__(self, target: str, interval_s: float, reply_timeout_s: float, w: _Writer, stop: threading.Event):
        self.target = target
        self.addr = ipaddress.ip_address(target)
        self.v6 = self.addr.version == 6
        self.interval_s = interval_s
        self.reply_timeout_s = reply_timeout_s
        self.w = w
        self.stop = stop
        self.ident = os.getpid() & 0xFFFF
        self.lock = threading.Lock()
        self.outstanding: dict[int, tuple[int, float, float]] = {}  # icmp seq -> (n, mono, wall)
        self.sent = 0
        self.received = 0
        self.lost = 0
        if self.v6:
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            self.req_type, self.rep_type = 128, 129
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            self.req_type, self.rep_type = 8, 0
            try:  # ICMP_FILTER: pass only echo replies to this socket
                self.sock.setsockopt(_SOL_RAW, _ICMP_FILTER, struct.pack("I", ~(1 << 0) & 0xFFFFFFFF))
            except OSError:
                pass
        self.sock.settimeout(0.05)
        self.rx_thread = threading.Thread(target=self._rx_loop, name="icmp-rx", daemon=True)
        self.rx_stop = threading.Event()

    def _packet(self, seq: int) -> bytes:
        payload = struct.pack("!d", time.time()) + self.PAYLOAD_PAD
        hdr = struct.pack("!BBHHH", self.req_type, 0, 0, self.ident, seq)
        if self.v6:
            return hdr + payload  # kernel computes the ICMPv6 checksum
        csum = _checksum(hdr + payload)
        return struct.pack("!BBHHH", self.req_type, 0, csum, self.ident, seq) + payload

    def _resolve(self, n: int, wall: float, rtt_ms: float | None, err: str | None = None) -> None:
        rec: dict[str, Any] = {"k": "ping", "n": n, "t": wall, "rtt_ms": rtt_ms}
        if err:
            rec["err"] = err
        if rtt_ms is None:
            self.lost += 1
        else:
            self.received += 1
        self.w.emit(rec)

    def _rx_loop(self) -> None:
        while not self.rx_stop.is_set():
            try:
                data, src = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                if self.rx_stop.is_set():
                    return
                time.sleep(0.01)
                continue
            self._handle(data, src, time.monotonic())

    def _drain(self) -> None:
        """Read replies already queued in the socket, so a stalled probe never calls them lost."""
        while True:
            try:
                ready, _, _ = select.select([self.sock], [], [], 0)
                if not ready:
                    return
                data, src = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError, socket.timeout, OSError, ValueError):
                return
            self._handle(data, src, time.monotonic())

    def _handle(self, data: bytes, src: Any, now: float) -> None:
        try:
            if ipaddress.ip_address(src[0].split("%")[0]) != self.addr:
                return
        except ValueError:
            return
        off = 0 if self.v6 else (data[0] & 0x0F) * 4
        if len(data) < off + 8:
            return
        typ, _code, _cs, ident, seq = struct.unpack("!BBHHH", data[off : off + 8])
        if typ != self.rep_type or ident != self.ident:
            return
        with self.lock:
            entry = self.outstanding.pop(seq, None)
            if entry is None:
                return  # duplicate, or late after being declared lost
            n, mono, wall = entry
            self._resolve(n, wall, round((now - mono) * 1000.0, 3))

    def _expire(self, now: float, force: bool = False) -> None:
        self._drain()
        with self.lock:
            for seq, (n, mono, wall) in sorted(self.outstanding.items(), key=lambda kv: kv[1][0]):
                if force or now - mono >= self.reply_timeout_s:
                    del self.outstanding[seq]
                    self._resolve(n, wall, None)

    def _send(self, n: int, dest: tuple) -> None:
        seq = n & 0xFFFF
        pkt = self._packet(seq)
        mono, wall = time.monotonic(), time.time()
        with self.lock:
            self.outstanding[seq] = (n, mono, wall)
        self.sent += 1
        try:
            self.sock.sendto(pkt, dest)
        except OSError as e:
            # e.g. EHOSTUNREACH after failed ARP, ENOBUFS: the ping is lost
            with self.lock:
                if self.outstanding.pop(seq, None) is not None:
                    self._resolve(n, wall, None, errno.errorcode.get(e.errno or 0, str(e)))

    def run(self) -> None:
        self.rx_thread.start()
        dest = (self.target, 0, 0, 0) if self.v6 else (self.target, 0)
        n = 0
        start = time.monotonic()
        while not self.stop.is_set():
            for _ in range(due_sends(start, self.interval_s, n, time.monotonic())):
                self._send(n, dest)
                n += 1
            self._expire(time.monotonic())
            delay = start + n * self.interval_s - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
        # drain: give pings in flight their reply timeout, then declare them lost
        deadline = time.monotonic() + self.reply_timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if not self.outstanding:
                    break
            time.sleep(0.005)
        self._expire(time.monotonic(), force=True)
        self.rx_stop.set()
        self.rx_thread.join(timeout=1.0)
        self.sock.close()


def _http_loop(url: str, w: _Writer, stop: threading.Event) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    next_t = time.monotonic()
    while not stop.is_set():
        t = time.time()
        try:
            with opener.open(url, timeout=HTTP_TIMEOUT_S) as resp:
                body = resp.read()
            w.emit({"k": "hb", "t": t, "data": json.loads(body)})
        except Exception as e:  # noqa: BLE001 - every failure is a data point
            w.emit({"k": "http_err", "t": t, "error": f"{type(e).__name__}: {e}"})
        next_t += HTTP_PERIOD_S
        now = time.monotonic()
        if next_t < now:
            next_t = now
        stop.wait(next_t - now)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvmotion_lab.pinger", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="IP to ping")
    ap.add_argument("--interval-ms", type=int, default=10)
    ap.add_argument("--reply-timeout-ms", type=int, default=DEFAULT_REPLY_TIMEOUT_MS)
    ap.add_argument("--http-url", default=None, help="JSON heartbeat URL polled every 200 ms")
    ap.add_argument("--out", required=True, type=Path, help="JSON-lines output file")
    args = ap.parse_args(argv)
    if args.interval_ms < 1:
        ap.error("--interval-ms must be >= 1")

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        ipaddress.ip_address(args.target)
    except ValueError:
        print(f"probe: --target must be an IP address, got {args.target!r}", file=sys.stderr)
        return 2

    with open(args.out, "w") as f:
        w = _Writer(f)
        try:
            pinger = _Pinger(args.target, args.interval_ms / 1000.0, args.reply_timeout_ms / 1000.0, w, stop)
        except PermissionError:
            print("probe: raw ICMP socket needs root (CAP_NET_RAW)", file=sys.stderr)
            return 2
        w.emit(
            {
                "k": "start",
                "t": time.time(),
                "pid": os.getpid(),
                "target": args.target,
                "interval_ms": args.interval_ms,
                "reply_timeout_ms": args.reply_timeout_ms,
                "http_url": args.http_url,
                "ident": pinger.ident,
            }
        )
        http_thread = None
        if args.http_url:
            http_thread = threading.Thread(target=_http_loop, args=(args.http_url, w, stop), name="http", daemon=True)
            http_thread.start()
        pinger.run()  # returns after stop is set and in-flight pings are resolved
        if http_thread is not None:
            http_thread.join(timeout=HTTP_TIMEOUT_S + 1.0)
        w.emit({"k": "end", "t": time.time(), "sent": pinger.sent, "received": pinger.received, "lost": pinger.lost})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the guest live after a move? What its host can see, sampled over a short window, and a pure verdict.

Signals, each reported with its numbers (a guest-agent ping can be added later as one more):

- QEMU's run state (``query-status``): anything but ``running`` is unhealthy, and named. A monitor that does not
  answer within its deadline means a hung QEMU.
- QMP events since the move that end a guest's life as it was: a panic (``GUEST_PANICKED``, needs a pvpanic
  device), a reset (a new boot), a shutdown, a watchdog action.
- The guest's serial console since it arrived: panic, oops, ``BUG:`` (a soft lockup), hung tasks.
- Each NIC's tap, host -> guest: virtio-net stops reading the tap while the guest's RX ring is full, so frames
  dropped while none were taken mean the guest no longer drains its ring: its network is dead.
- ARP probes to the guest's IP, sent into its first NIC's tap (sender IP 0.0.0.0 as in RFC 5227: no ARP cache
  learns from them; the answer goes to the tap's own MAC and never leaves the host), and every frame the guest
  sends, captured on the tap. An answer proves the guest's kernel runs and drains its RX ring.
- The vCPU threads' CPU time (``query-cpus-fast`` thread ids, ``/proc/PID/task/TID/stat``): a hint, never proof.
  An idle guest halts (little CPU), a soft-locked one spins at 100 %, and so does a busy one. QEMU 7.2's
  ``query-stats`` has KVM statistics only (none under TCG), so it cannot tell idle from hung either.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmotion.agent.hv.qemu.argv import tap_name
from kvmotion.agent.hv.qemu.process import QemuVM
from kvmotion.common.errors import KvmotionError, QMPTimeout
from kvmotion.models.agent import POSTCOPY_STATES, GuestHealth, HealthCheckRequest, NicHealth, VcpuHealth

QMP_DEADLINE_S = 2.0
PROBES = 5                      # ARP probes per check, spread over the window
CAPTURE_MAX = 2000              # frames from the guest read per check: that many prove it lives
ANSWER_GRACE_S = 0.5            # a probe sent late (a busy host) still has this long to be answered
PEGGED_PCT = 95.0               # a vCPU thread busy at least this much of the whole window: "pegged"
CONSOLE_MAX_BYTES = 256 * 1024  # console text scanned per check (the newest part)
CONSOLE_MAX_LINES = 10
CONSOLE_MARKERS = ("Kernel panic", "BUG:", "Oops", "general protection fault", "soft lockup", "hard LOCKUP",
                   "self-detected stall", "blocked for more than", "Linux version ")
# QMP events that end the guest's life as it was (RESET: a new boot, whoever asked for it).
GONE_EVENTS = {"GUEST_PANICKED": "the guest kernel panicked", "GUEST_CRASHLOADED": "the guest kernel crashed",
               "RESET": "the guest was reset: a new boot", "SHUTDOWN": "the guest shut down",
               "WATCHDOG": "the guest's watchdog fired", "SUSPEND": "the guest suspended itself"}
RUN_STATES = {"paused": "its vCPUs are stopped", "guest-panicked": "the guest kernel panicked",
              "internal-error": "QEMU stopped the guest on an emulation error", "shutdown": "the guest shut down",
              "io-error": "a disk I/O error paused it", "watchdog": "its watchdog paused it",
              "suspended": "the guest suspended itself", "inmigrate": "it still waits for its migration state",
              "postmigrate": "it migrated away", "prelaunch": "it never started",
              "exited": "the QEMU process exited",
              "no-answer": f"QEMU's monitor did not answer within {QMP_DEADLINE_S:.0f} s: the QEMU process hangs"}

ETH_P_ALL, ETH_P_ARP, ETH_P_RARP = 0x0003, 0x0806, 0x8035
PACKET_OUTGOING, PACKET_IGNORE_OUTGOING, SOL_PACKET = 4, 23, 263
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the verdict (pure) -------------------------------------------------------------------------------------------
def judge(h: GuestHealth) -> GuestHealth:
    """healthy: QEMU runs, nothing ended the guest's life, and the guest answered or sent something;
    unhealthy: any sign that it is hung, dead or unreachable; unknown: no evidence either way (e.g. no traffic)."""
    bad = state_reasons(h.run_state) + [event_reason(e) for e in h.events]
    bad += [f"the console shows: {line}" for line in h.console[:3]]
    alive: list[str] = []
    evidence = [f"QEMU run state: {h.run_state or 'not read'}", f"{len(h.events)} QMP event(s) ending the guest's "
                f"life since the move", f"{len(h.console)} alarming console line(s) since the move"]
    for n in h.nics:
        b, a, note = nic_reading(n, h.window_s)
        bad += [b] if b else []
        alive += [a] if a else []
        evidence.append(note)
    cpu_notes, hints = vcpu_reading(h.vcpus, h.window_s)
    evidence += cpu_notes
    if bad:
        verdict, reasons = "unhealthy", bad + hints
    elif alive and h.run_state == "running":
        verdict, reasons = "healthy", alive + hints
    else:
        verdict, reasons = "unknown", [no_evidence_reason(h)] + [f"not sampled: {e}" for e in h.errors] + hints
    return h.model_copy(update={"verdict": verdict, "reasons": reasons, "evidence": h.evidence + evidence})


def state_reasons(state: str | None) -> list[str]:
    if state is None or state == "running":
        return []
    why = RUN_STATES.get(state)
    if state in ("exited", "no-answer"):
        return [str(why)]
    return [f"QEMU run state is {state!r}, not running" + (f": {why}" if why else "")]


def event_reason(e: dict[str, Any]) -> str:
    name = str(e.get("event", "?"))
    data = e.get("data") or {}
    detail = ", ".join(f"{k}={v}" for k, v in data.items() if not isinstance(v, (dict, list)))
    after = f", +{e['after_s']:.1f} s" if isinstance(e.get("after_s"), (int, float)) else ""   # from `since`
    return f"{GONE_EVENTS.get(name, name)} ({name}{f' {detail}' if detail else ''}{after})"


def nic_reading(n: NicHealth, window_s: float) -> tuple[str | None, str | None, str]:
    """(why it is unhealthy, why it is alive, what was read) for one NIC."""
    if n.tx_packets is None or n.tx_dropped is None:
        return None, None, f"{n.nic} ({n.tap}): counters not read ({n.error or 'no tap'})"
    took, dropped, w = n.tx_packets, n.tx_dropped, f"{window_s:.1f} s"
    note = (f"{n.nic} ({n.tap}) in {w}: {took} frame(s) towards the guest taken by its NIC, {dropped} dropped; "
            f"{n.guest_frames} frame(s) sent by the guest" +
            (f"; {n.probes_answered}/{n.probes_sent} ARP probes answered" if n.probes_sent else "") +
            (f" ({n.error})" if n.error else ""))
    alive = None
    if n.probes_answered:
        alive = f"{n.nic}: the guest answered {n.probes_answered}/{n.probes_sent} ARP probes in {w}"
    elif n.guest_frames:
        alive = f"{n.nic}: the guest sent {n.guest_frames} frame(s) in {w}"
    bad = None
    if dropped and not took:           # virtio-net reads the tap only while the guest's RX ring has room
        bad = f"NIC {n.nic} RX ring not consumed: {dropped} packets dropped towards the guest in {w}"
    elif n.probes_sent and not took:
        bad = f"NIC {n.nic} RX ring not consumed: {n.probes_sent} ARP probes offered, none taken in {w}"
    elif n.probes_sent and alive is None:
        bad = (f"the guest does not answer on {n.nic}: {n.probes_sent} ARP probes to its IP, none answered and "
               f"nothing sent in {w} ({took} frame(s) taken by its NIC)")
    return bad, alive, note


def vcpu_reading(vcpus: list[VcpuHealth], window_s: float) -> tuple[list[str], list[str]]:
    """(what was read, hints). CPU time is never proof: idle guests halt, busy and soft-locked ones spin."""
    read = [v for v in vcpus if v.busy_pct is not None]
    notes = [f"vCPU thread {v.thread_id} (vCPU {','.join(map(str, v.cpus))}): {v.busy_pct:.0f} % of a core over "
             f"{window_s:.1f} s" for v in read]
    hints: list[str] = []
    if read and all((v.busy_pct or 0) >= PEGGED_PCT for v in read):
        hints.append(f"hint: every vCPU thread was busy ≥ {PEGGED_PCT:.0f} % for the whole {window_s:.1f} s "
                     "window (a soft-locked guest spins like this; so does a busy one)")
    elif read and all((v.busy_pct or 0) < 1.0 for v in read):
        hints.append(f"hint: the vCPU threads used < 1 % of a core in {window_s:.1f} s (an idle guest halts; a "
                     "guest that does not run at all looks the same)")
    return notes, hints


def no_evidence_reason(h: GuestHealth) -> str:
    if h.run_state != "running":
        return f"QEMU's run state was not read ({'; '.join(h.errors) or 'not asked'})"
    took = sum(n.tx_packets or 0 for n in h.nics)
    probes = sum(n.probes_sent for n in h.nics)
    if not h.nics:
        return "no traffic to judge: the VM has no NIC"
    if not took and not probes and not sum(n.tx_dropped or 0 for n in h.nics):
        return f"no traffic to judge: no frame towards the guest in {h.window_s:.1f} s and no probe possible"
    return (f"the guest's NIC took {took} frame(s) in {h.window_s:.1f} s but the guest sent nothing back "
            "(a ring with room takes frames even from a hung guest)")


# -- what the host sees ------------------------------------------------------------------------------------------
def tap_counters(tap: str) -> dict[str, int] | None:
    """The tap's host -> guest counters (sysfs, else /proc/net/dev of this network namespace)."""
    base = Path(f"/sys/class/net/{tap}/statistics")
    try:
        return {k: int((base / k).read_text()) for k in ("tx_packets", "tx_dropped")}
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == tap:
                f = rest.split()
                return {"tx_packets": int(f[9]), "tx_dropped": int(f[11])}
    except (OSError, ValueError, IndexError):
        pass
    return None


def thread_cpu_s(pid: int, tid: int) -> float | None:
    """utime + stime of one thread of ``pid``, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def arp_probe(src_mac: bytes, dst_mac: bytes, target_ip: bytes) -> bytes:
    """An ARP probe (RFC 5227: sender IP 0.0.0.0), unicast to the guest's MAC."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac, bytes(4), bytes(6), target_ip)
    return (dst_mac + src_mac + struct.pack("!H", ETH_P_ARP) + arp).ljust(60, b"\0")


def classify(frame: bytes, guest_mac: bytes, own_mac: bytes, target_ip: bytes | None) -> str | None:
    """"answer" (an ARP reply to our probe), "guest" (another frame the guest sent) or None (not the guest's,
    or QEMU's own RARP announce)."""
    if len(frame) < 14 or frame[6:12] != guest_mac:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETH_P_RARP:
        return None
    if ethertype == ETH_P_ARP and target_ip is not None and len(frame) >= 42 and frame[20:22] == b"\0\2" \
            and frame[28:32] == target_ip and frame[32:38] == own_mac:
        return "answer"
    return "guest"


@dataclass
class Capture:
    sent: int = 0
    answered: int = 0
    guest_frames: int = 0
    error: str | None = None


def watch_tap(tap: str, guest_mac: str, ip: str | None, window_s: float, probes: int = PROBES) -> Capture:
    """For ``window_s`` (blocking, run it in a thread): ARP probes to ``ip`` spread over the window, and every
    frame the guest sends, captured on the tap. Unanswered, the last probe gets ``ANSWER_GRACE_S`` more."""
    cap, end = Capture(), time.monotonic() + window_s
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((tap, ETH_P_ALL))
    except OSError as exc:
        cap.error = f"no capture on {tap}: {exc}"
        time.sleep(max(0.0, end - time.monotonic()))
        return cap
    with sock:
        with contextlib.suppress(OSError):        # frames towards the guest are counted by the tap: skip them
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        own, guest = sock.getsockname()[4], bytes.fromhex(guest_mac.replace(":", ""))
        tip = socket.inet_aton(ip) if ip else None
        frame = arp_probe(own, guest, tip) if tip else None
        gap, next_probe, stop = window_s / max(probes, 1), time.monotonic(), end
        while (now := time.monotonic()) < (stop if not cap.answered else end):
            if frame is not None and cap.sent < probes and now >= next_probe:
                try:
                    sock.send(frame)
                    cap.sent += 1
                    stop = max(end, now + ANSWER_GRACE_S)
                except OSError as exc:
                    cap.error, frame = f"probe not sent: {exc}", None
                next_probe += gap
            wake = next_probe if frame is not None and cap.sent < probes else stop
            sock.settimeout(max(0.001, min(wake, stop) - now))
            try:
                data, addr = sock.recvfrom(2048)
            except socket.timeout:
                continue
            except OSError as exc:
                cap.error = f"capture failed: {exc}"
                break
            kind = None if addr[2] == PACKET_OUTGOING else classify(data, guest, own, tip)
            cap.answered += kind == "answer"
            cap.guest_frames += kind == "guest"
            if cap.answered + cap.guest_frames >= CAPTURE_MAX:
                break                             # it lives; do not spend the window reading a busy NIC
    time.sleep(max(0.0, end - time.monotonic()))
    return cap


def console_alarms(path: Path, start: int) -> list[str]:
    """Alarming lines the guest wrote to its console from byte ``start`` on (the newest part when long)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            fh.seek(max(start if start <= size else 0, size - CONSOLE_MAX_BYTES))
            text = fh.read(CONSOLE_MAX_BYTES).decode(errors="replace")
    except OSError:
        return []
    hits = [ln.strip()[:300] for ln in text.splitlines() if any(m in ln for m in CONSOLE_MARKERS)]
    return hits[:CONSOLE_MAX_LINES]


def serial_size(run_dir: Path) -> int:
    try:
        return (run_dir / "serial.log").stat().st_size
    except OSError:
        return 0


def gone_events(vm: QemuVM, since: float) -> list[dict[str, Any]]:
    history = list(vm.qmp.history) if vm.qmp is not None else []
    return [{"event": ev.get("event"), "data": ev.get("data") or {}, "t": t, "after_s": round(t - since, 3)}
            for t, ev in history if t >= since and ev.get("event") in GONE_EVENTS]


# -- sampling (QMP with deadlines, /proc, sysfs, the taps) -----------------------------------------------------------
async def run_state(vm: QemuVM) -> str:
    if not vm.alive():
        return "exited"
    if vm.qmp is None:
        return "no-answer"
    try:
        return str((await vm.qmp.execute("query-status", timeout=QMP_DEADLINE_S))["status"])
    except QMPTimeout:
        return "no-answer"
    except KvmotionError:
        return "no-answer" if vm.alive() else "exited"


async def vcpu_threads(vm: QemuVM, errors: list[str]) -> dict[int, list[int]]:
    """thread id -> the vCPU indexes it runs."""
    assert vm.qmp is not None
    try:
        cpus = await vm.qmp.execute("query-cpus-fast", timeout=QMP_DEADLINE_S)
    except KvmotionError as exc:
        errors.append(f"query-cpus-fast: {exc.message}")
        return {}
    out: dict[int, list[int]] = {}
    for c in cpus:
        out.setdefault(int(c["thread-id"]), []).append(int(c["cpu-index"]))
    return out


async def stats_note(vm: QemuVM) -> str:
    assert vm.qmp is not None
    try:
        schemas = await vm.qmp.execute("query-stats-schemas", timeout=QMP_DEADLINE_S)
    except KvmotionError as exc:
        return f"query-stats: not available ({exc.message})"
    providers = sorted({str(s.get("provider")) for s in schemas})
    if not providers:
        return "query-stats: no statistics (QEMU 7.2 has KVM statistics only; none under TCG)"
    return f"query-stats: providers {', '.join(providers)} (not used: halt counts cannot tell idle from hung)"


def in_postcopy(vm: QemuVM) -> bool:
    m = vm.migration
    return m is not None and m.report.role == "destination" and m.report.status in POSTCOPY_STATES


def arrived_here(vm: QemuVM) -> bool:
    """The VM came to this host by an incoming migration: its console (emptied when that QEMU started) holds
    only what the guest wrote since it arrived."""
    return vm.migration is not None and vm.migration.report.role == "destination"


async def check(vm: QemuVM, req: HealthCheckRequest, host: str) -> GuestHealth:
    """Sample the guest for ``req.window_s`` and judge it. The console is read from the VM's arrival on this
    host, or, for a VM that did not arrive by migration (or with ``req.since``), only over the window."""
    h = GuestHealth(host=host, checked_at=time.time())
    since = req.since if req.since is not None else (vm.started_at or 0.0)
    if in_postcopy(vm):        # never in band while post-copy runs: the main loop may wait for a page
        h.errors.append("post-copy still runs: QEMU is not asked in band")
        return judge(h)
    h.run_state = await run_state(vm)
    if h.run_state in ("exited", "no-answer"):
        h.events = gone_events(vm, since)
        return judge(h)
    threads = await vcpu_threads(vm, h.errors)
    h.evidence.append(await stats_note(vm))
    console_start = 0 if arrived_here(vm) and req.since is None else serial_size(vm.run_dir)
    await sample_window(vm, h, threads, req)
    end_state = await run_state(vm)
    if end_state != "running":
        h.run_state = end_state
    h.events = gone_events(vm, since)
    h.console = console_alarms(vm.run_dir / "serial.log", console_start)
    return judge(h)


async def sample_window(vm: QemuVM, h: GuestHealth, threads: dict[int, list[int]], req: HealthCheckRequest) -> None:
    """Counters at both ends of the window; ARP probes and the capture run through it."""
    pid = vm.pid or 0
    taps = [tap_name(vm.spec.uuid, i) for i in range(len(vm.spec.nics))]
    ip = vm.spec.guest_ip.split("/")[0] if vm.spec.guest_ip and "." in vm.spec.guest_ip else None
    if req.probe and vm.spec.guest_ip and ip is None:
        h.evidence.append("no ARP probe: the guest's IP is not IPv4")
    probe = req.probe and h.run_state == "running"
    taps0 = [tap_counters(t) for t in taps]
    cpu0 = {tid: thread_cpu_s(pid, tid) for tid in threads}
    t0 = time.monotonic()
    if taps:
        caps = await asyncio.gather(*(asyncio.to_thread(watch_tap, tap, nic.mac, ip if i == 0 and probe else None,
                                                        req.window_s) for i, (tap, nic) in
                                      enumerate(zip(taps, vm.spec.nics))))
    else:
        await asyncio.sleep(req.window_s)
        caps = []
    elapsed = time.monotonic() - t0
    taps1 = [tap_counters(t) for t in taps]
    cpu1 = {tid: thread_cpu_s(pid, tid) for tid in threads}
    h.window_s = round(elapsed, 3)
    for nic, tap, a, b, cap in zip(vm.spec.nics, taps, taps0, taps1, caps):
        delta = {k: b[k] - a[k] for k in a} if a and b else {}
        h.nics.append(NicHealth(nic=nic.id, tap=tap, tx_packets=delta.get("tx_packets"),
                                tx_dropped=delta.get("tx_dropped"), guest_frames=cap.guest_frames,
                                probes_sent=cap.sent, probes_answered=cap.answered,
                                error=cap.error or (None if delta else f"tap {tap} not found")))
    for tid, cpus in threads.items():
        c0, c1 = cpu0.get(tid), cpu1.get(tid)
        busy = round(100.0 * (c1 - c0) / elapsed, 1) if c0 is not None and c1 is not None and elapsed else None
        h.vcpus.append(VcpuHealth(thread_id=tid, cpus=cpus, busy_pct=busy))

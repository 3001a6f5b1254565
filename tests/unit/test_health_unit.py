"""The guest-health verdict (pure), the frames it sends and reads, and how the controller records it."""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from rich.console import Console

from kvmotion.agent.hv.qemu import health
from kvmotion.agent.hv.qemu.health import arp_probe, classify, console_alarms, judge
from kvmotion.cli.progress import guest_health_rows, print_outcome
from kvmotion.common.errors import AgentUnreachable
from kvmotion.models.agent import GuestHealth, HealthCheckRequest, NicHealth, VcpuHealth
from kvmotion.migration import guestcheck

W = 1.5


def nic(took: int | None = 0, dropped: int | None = 0, frames: int = 0, sent: int = 0, answered: int = 0,
        error: str | None = None, name: str = "nic0") -> NicHealth:
    return NicHealth(nic=name, tap="kvabc0", tx_packets=took, tx_dropped=dropped, guest_frames=frames,
                     probes_sent=sent, probes_answered=answered, error=error)


def sample(state: str | None = "running", nics: list[NicHealth] | None = None, busy: list[float] | None = None,
           events: list[dict] | None = None, console: list[str] | None = None,
           errors: list[str] | None = None) -> GuestHealth:
    return GuestHealth(host="h2", run_state=state, window_s=W, nics=nics if nics is not None else [],
                       vcpus=[VcpuHealth(thread_id=100 + i, cpus=[i], busy_pct=b) for i, b in enumerate(busy or [])],
                       events=events or [], console=console or [], errors=errors or [])


def verdict(h: GuestHealth) -> tuple[str, str]:
    j = judge(h)
    return j.verdict, " | ".join(j.reasons)


# -- healthy ------------------------------------------------------------------------------------------------------
def test_probes_answered_and_traffic_taken_is_healthy() -> None:
    v, why = verdict(sample(nics=[nic(took=150, sent=5, answered=5)], busy=[3.0]))
    assert v == "healthy" and "answered 5/5 ARP probes" in why


def test_guest_frames_without_probes_is_healthy() -> None:
    v, why = verdict(sample(nics=[nic(took=80, frames=75)]))
    assert v == "healthy" and "sent 75 frame(s)" in why


def test_one_answer_is_enough() -> None:
    assert verdict(sample(nics=[nic(took=5, sent=5, answered=1)]))[0] == "healthy"


def test_answered_but_some_drops_is_healthy_with_the_numbers() -> None:
    j = judge(sample(nics=[nic(took=300, dropped=40, sent=5, answered=5)]))
    assert j.verdict == "healthy"
    assert any("300 frame(s) towards the guest taken by its NIC, 40 dropped" in e for e in j.evidence)


def test_a_pegged_but_answering_guest_is_healthy_with_a_hint() -> None:
    v, why = verdict(sample(nics=[nic(took=5, sent=5, answered=5)], busy=[99.0]))
    assert v == "healthy" and "hint: every vCPU thread was busy" in why


def test_second_nic_without_traffic_does_not_spoil_a_live_first() -> None:
    assert verdict(sample(nics=[nic(took=5, sent=5, answered=4), nic(name="nic1")]))[0] == "healthy"


# -- unhealthy: run state, events, console --------------------------------------------------------------------------
@pytest.mark.parametrize("state, words", [
    ("paused", "its vCPUs are stopped"), ("guest-panicked", "panicked"), ("internal-error", "emulation error"),
    ("shutdown", "shut down"), ("inmigrate", "migration state"), ("io-error", "I/O error"),
    ("debug", "'debug', not running"),
])
def test_any_run_state_but_running_is_unhealthy_and_named(state: str, words: str) -> None:
    v, why = verdict(sample(state=state, nics=[nic(took=5, sent=5, answered=5)]))
    assert v == "unhealthy" and f"QEMU run state is {state!r}" in why and words in why


def test_an_exited_qemu_is_unhealthy() -> None:
    v, why = verdict(sample(state="exited"))
    assert v == "unhealthy" and why == "the QEMU process exited"


def test_a_monitor_that_does_not_answer_is_a_hung_qemu() -> None:
    v, why = verdict(sample(state="no-answer"))
    assert v == "unhealthy" and "did not answer" in why and "hangs" in why


@pytest.mark.parametrize("event, words", [
    ({"event": "GUEST_PANICKED", "data": {"action": "pause"}, "after_s": 0.4}, "panicked (GUEST_PANICKED action=pause"),
    ({"event": "RESET", "data": {"guest": True, "reason": "guest-reset"}, "after_s": 0.9}, "a new boot"),
    ({"event": "SHUTDOWN", "data": {"guest": True}}, "shut down"),
    ({"event": "WATCHDOG", "data": {"action": "reset"}}, "watchdog"),
])
def test_events_that_end_the_guests_life_are_unhealthy_even_when_it_answers(event: dict, words: str) -> None:
    v, why = verdict(sample(nics=[nic(took=5, sent=5, answered=5)], events=[event]))
    assert v == "unhealthy" and words in why


def test_event_reason_names_when() -> None:
    assert health.event_reason({"event": "RESET", "data": {"guest": True}, "after_s": 0.9}) == \
        "the guest was reset: a new boot (RESET guest=True, +0.9 s)"


def test_a_console_panic_is_unhealthy() -> None:
    line = "watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [swapper/0:1]"
    v, why = verdict(sample(nics=[nic(took=5, sent=5, answered=5)], console=[line]))
    assert v == "unhealthy" and line in why


# -- unhealthy: the network ---------------------------------------------------------------------------------------
def test_drops_while_nothing_taken_is_a_dead_rx_ring() -> None:
    v, why = verdict(sample(nics=[nic(took=0, dropped=212)], busy=[0.0]))
    assert v == "unhealthy"
    assert "NIC nic0 RX ring not consumed: 212 packets dropped towards the guest in 1.5 s" in why


def test_dead_rx_beats_a_guest_that_still_transmits() -> None:
    """Alive but with a dead network (seen in the lab): the guest sends, its RX ring is never drained."""
    v, why = verdict(sample(nics=[nic(took=0, dropped=50, frames=3)]))
    assert v == "unhealthy" and "RX ring not consumed" in why


def test_probes_offered_and_none_taken_is_a_dead_rx_ring_even_without_drops() -> None:
    v, why = verdict(sample(nics=[nic(took=0, dropped=0, sent=5)]))
    assert v == "unhealthy" and "5 ARP probes offered, none taken" in why


def test_probes_taken_but_never_answered_is_unreachable() -> None:
    v, why = verdict(sample(nics=[nic(took=5, sent=5)], busy=[0.0]))
    assert v == "unhealthy" and "does not answer on nic0" in why and "5 frame(s) taken" in why
    assert "hint: the vCPU threads used < 1 %" in why


def test_probes_unanswered_but_the_guest_transmits_is_not_unreachable() -> None:
    """Its IP may have changed: it sends frames, so it lives."""
    assert verdict(sample(nics=[nic(took=5, sent=5, frames=4)]))[0] == "healthy"


def test_a_dead_second_nic_makes_the_guest_unhealthy() -> None:
    v, why = verdict(sample(nics=[nic(took=5, sent=5, answered=5), nic(took=0, dropped=9, name="nic1")]))
    assert v == "unhealthy" and "NIC nic1 RX ring not consumed: 9 packets" in why


def test_several_reasons_are_all_given() -> None:
    j = judge(sample(state="paused", nics=[nic(took=0, dropped=30)], console=["Kernel panic - not syncing"]))
    assert j.verdict == "unhealthy" and len(j.reasons) == 3


# -- unknown -------------------------------------------------------------------------------------------------------
def test_no_traffic_at_all_is_unknown_and_says_so() -> None:
    v, why = verdict(sample(nics=[nic()], busy=[2.0]))
    assert v == "unknown" and "no traffic to judge" in why


def test_frames_taken_but_nothing_back_without_probes_is_unknown() -> None:
    v, why = verdict(sample(nics=[nic(took=40)]))
    assert v == "unknown" and "took 40 frame(s)" in why and "hung guest" in why


def test_a_pegged_silent_guest_is_unknown_with_the_hint_not_unhealthy() -> None:
    v, why = verdict(sample(nics=[nic()], busy=[99.5]))
    assert v == "unknown" and "soft-locked guest spins like this" in why


def test_no_nic_is_unknown() -> None:
    v, why = verdict(sample(nics=[]))
    assert v == "unknown" and "no NIC" in why


def test_unread_counters_and_sampling_errors_are_unknown() -> None:
    j = judge(sample(nics=[nic(took=None, dropped=None, error="tap kvabc0 not found")],
                     errors=["query-cpus-fast: timeout"]))
    assert j.verdict == "unknown"
    assert any("not sampled: query-cpus-fast" in r for r in j.reasons)
    assert any("counters not read (tap kvabc0 not found)" in e for e in j.evidence)


def test_run_state_not_read_is_unknown() -> None:
    v, why = verdict(sample(state=None, errors=["post-copy still runs"]))
    assert v == "unknown" and "post-copy still runs" in why


def test_evidence_keeps_the_samplers_notes_and_every_number() -> None:
    h = sample(nics=[nic(took=7, dropped=1, frames=2, sent=5, answered=5)], busy=[12.0])
    h.evidence.append("query-stats: no statistics")
    j = judge(h)
    assert j.evidence[0] == "query-stats: no statistics"
    text = " | ".join(j.evidence)
    for needle in ("QEMU run state: running", "7 frame(s)", "1 dropped", "2 frame(s) sent", "5/5 ARP",
                   "12 % of a core"):
        assert needle in text


def test_tcg_single_thread_runs_every_vcpu() -> None:
    j = judge(GuestHealth(run_state="running", window_s=W, vcpus=[VcpuHealth(thread_id=7, cpus=[0, 1], busy_pct=50)]))
    assert any("vCPU thread 7 (vCPU 0,1): 50 %" in e for e in j.evidence)


# -- frames -------------------------------------------------------------------------------------------------------
OWN, GUEST = bytes.fromhex("02aabbccddee"), bytes.fromhex("525400000001")
IP = socket.inet_aton("198.18.1.100")


def reply(tha: bytes = OWN, spa: bytes = IP, op: int = 2, src: bytes = GUEST) -> bytes:
    arp = (1).to_bytes(2, "big") + (0x0800).to_bytes(2, "big") + bytes([6, 4]) + op.to_bytes(2, "big")
    return OWN + src + b"\x08\x06" + arp + GUEST + spa + tha + bytes(4)


def test_the_probe_is_an_rfc5227_probe_unicast_to_the_guest() -> None:
    f = arp_probe(OWN, GUEST, IP)
    assert len(f) == 60 and f[:6] == GUEST and f[6:12] == OWN and f[12:14] == b"\x08\x06"
    assert f[20:22] == b"\x00\x01"                      # request
    assert f[28:32] == bytes(4)                          # sender IP 0.0.0.0: nobody learns from it
    assert f[38:42] == IP


def test_classify_frames() -> None:
    assert classify(reply(), GUEST, OWN, IP) == "answer"
    assert classify(reply(tha=bytes(6)), GUEST, OWN, IP) == "guest"          # the guest's own ARP, not our answer
    assert classify(reply(spa=socket.inet_aton("10.0.0.1")), GUEST, OWN, IP) == "guest"
    assert classify(reply(op=1), GUEST, OWN, IP) == "guest"
    assert classify(reply(src=OWN), GUEST, OWN, IP) is None                  # not from the guest
    rarp = OWN + GUEST + b"\x80\x35" + bytes(46)
    assert classify(rarp, GUEST, OWN, IP) is None                            # QEMU's announce, not the guest
    assert classify(b"\x00" * 10, GUEST, OWN, IP) is None
    assert classify(reply(), GUEST, OWN, None) == "guest"                    # no probe: any frame is the guest's


def test_console_alarms_read_from_the_arrival_on(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    old = "Kernel panic - not syncing: an older run\n"
    log.write_text(old + "KVMOTION-HEARTBEAT seq=1\n[  9.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!\n")
    assert console_alarms(log, len(old)) == ["[  9.1] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!"]
    assert len(console_alarms(log, 0)) == 2
    assert console_alarms(log, 10 ** 9) == console_alarms(log, 0)           # truncated since: read it all
    assert console_alarms(tmp_path / "missing.log", 0) == []


def test_thread_cpu_time_of_this_thread() -> None:
    import os
    import threading
    assert health.thread_cpu_s(os.getpid(), threading.get_native_id()) is not None
    assert health.thread_cpu_s(os.getpid(), 2 ** 30) is None


def test_tap_counters_of_a_missing_device() -> None:
    assert health.tap_counters("kvnonexist0") is None
    assert health.tap_counters("lo") is not None


def test_request_bounds() -> None:
    assert HealthCheckRequest().window_s == 1.5
    for bad in (0.1, 11, float("nan")):
        with pytest.raises(ValueError):
            HealthCheckRequest(window_s=bad)


# -- the controller's side ------------------------------------------------------------------------------------------
class FakeAgent:
    host = "h2"

    def __init__(self, answer: GuestHealth | Exception) -> None:
        self.answer = answer
        self.asked: list[HealthCheckRequest] = []

    async def health_check(self, uuid: str, req: HealthCheckRequest) -> GuestHealth:
        self.asked.append(req)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def run_check(answer: GuestHealth | Exception) -> tuple[dict, FakeAgent]:
    agent = FakeAgent(answer)

    async def go() -> dict:
        return await guestcheck.outcome(guestcheck.start(agent, "u1", 123.0), "web1")   # type: ignore[arg-type]
    return asyncio.run(go()), agent


def test_an_unhealthy_guest_is_a_warning_finding_in_the_result() -> None:
    out, agent = run_check(judge(sample(nics=[nic(took=0, dropped=12)])))
    assert agent.asked[0].since == 123.0 and agent.asked[0].window_s == guestcheck.WINDOW_S
    assert out["guest_health"]["verdict"] == "unhealthy"
    f = out["findings"][0]
    assert f["code"] == "GUEST_UNHEALTHY" and f["severity"] == "warning" and f["subject"] == "vm:web1"
    assert "12 packets dropped towards the guest" in f["message"] and "vm stop web1" in f["remedy"]
    assert out["warnings"][0].startswith("GUEST_UNHEALTHY: ")


def test_a_healthy_guest_has_no_finding() -> None:
    out, _ = run_check(judge(sample(nics=[nic(took=3, sent=5, answered=5)])))
    assert out["guest_health"]["verdict"] == "healthy" and "findings" not in out and "warnings" not in out


def test_a_failed_check_never_fails_the_move_it_is_unknown_with_the_error() -> None:
    out, _ = run_check(AgentUnreachable("agent of host h2 did not answer", remedy="x"))
    h = out["guest_health"]
    assert h["verdict"] == "unknown" and "the check failed: agent of host h2 did not answer" in h["reasons"][0]
    assert out["findings"][0]["code"] == "GUEST_HEALTH_UNKNOWN" and out["findings"][0]["severity"] == "info"
    assert "warnings" not in out
    out, _ = run_check(RuntimeError("boom"))
    assert out["guest_health"]["verdict"] == "unknown" and "RuntimeError: boom" in out["guest_health"]["reasons"][0]


def test_no_check_no_fields() -> None:
    assert asyncio.run(guestcheck.outcome(None, "web1")) == {}


def test_the_cli_summary_shows_the_verdict_and_the_warning() -> None:
    out, _ = run_check(judge(sample(nics=[nic(took=0, dropped=12)],
                                    console=["watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [swapper/0:1]"])))
    row = guest_health_rows(out)[0]
    assert row[0] == "guest after the move" and "unhealthy" in row[1]
    task = {"created_at": 0.0, "kind": "vmotion", "vm_name": "web1", "source": "h1", "destination": "h2",
            "state": "success", "phases": [], "result": {"total_time_s": 1.0, **out}}
    console = Console(record=True, width=300)
    print_outcome(task, console)
    text = console.export_text()
    assert "guest after the move" in text and "unhealthy on h2" in text
    assert "warning GUEST_UNHEALTHY:" in text and "[swapper/0:1]" in text and "fix:" in text


# -- the capture on a real tap (a network namespace of its own; root) ------------------------------------------------
FAKE_GUEST = r"""
import fcntl, json, os, socket, struct, sys, threading, time
from kvmotion.agent.hv.qemu import health
mode, mac, ip = sys.argv[1], bytes.fromhex("525400123456"), socket.inet_aton("198.18.1.100")
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH", b"kvtest0", 0x0002 | 0x1000))     # TUNSETIFF: IFF_TAP | IFF_NO_PI
os.system("ip link set kvtest0 up")
def guest():                  # reads what QEMU would hand it and answers ARP for its IP
    while True:
        f = os.read(fd, 2048)
        if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x01" and f[38:42] == ip:
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mac, ip, f[22:28], f[28:32])
            os.write(fd, (f[6:12] + mac + b"\x08\x06" + arp).ljust(60, b"\0"))
if mode == "alive":
    threading.Thread(target=guest, daemon=True).start()
else:                         # a guest that never drains: fill the tap's queue first
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind(("kvtest0", 0))
    for _ in range(1000):
        s.send((mac + bytes(6) + b"\x88\xb5").ljust(60, b"\0"))
before = health.tap_counters("kvtest0")
cap = health.watch_tap("kvtest0", "52:54:00:12:34:56", "198.18.1.100", 1.0)
after = health.tap_counters("kvtest0")
print(json.dumps({"sent": cap.sent, "answered": cap.answered, "frames": cap.guest_frames, "error": cap.error,
                  "took": after["tx_packets"] - before["tx_packets"],
                  "dropped": after["tx_dropped"] - before["tx_dropped"]}))
"""


def on_a_tap(mode: str) -> dict:
    import json
    import os
    import secrets
    import subprocess
    import sys
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists():
        pytest.skip("needs root and /dev/net/tun")
    ns = "kvhc" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        src = str(Path(health.__file__).parents[4])
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", FAKE_GUEST, mode], check=True,
                             capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": src})
        return json.loads(out.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=10)


@pytest.mark.e2e          # root, a network namespace and a tap: not in `pytest -m unit`
def test_a_guest_that_answers_on_a_real_tap() -> None:
    got = on_a_tap("alive")
    # on a busy host a probe may leave late (or not at all before the window ends) and an answer come late
    assert got["error"] is None and 1 <= got["answered"] <= got["sent"] <= health.PROBES, str(got)
    assert got["took"] >= got["answered"] and got["dropped"] == 0 and got["frames"] == 0, str(got)
    v, why = verdict(sample(nics=[nic(took=got["took"], dropped=got["dropped"], frames=got["frames"],
                                      sent=got["sent"], answered=got["answered"])]))
    assert v == "healthy" and f"answered {got['answered']}/{got['sent']} ARP probes" in why


@pytest.mark.e2e          # root, a network namespace and a tap: not in `pytest -m unit`
def test_a_guest_that_never_drains_on_a_real_tap() -> None:
    got = on_a_tap("hung")
    assert 1 <= got["sent"] <= health.PROBES and got["answered"] == 0, str(got)
    # the queue was full: every probe is dropped (and whatever the namespace's own IPv6 sends out of the tap)
    assert got["took"] == 0 and got["dropped"] >= got["sent"], str(got)
    v, why = verdict(sample(nics=[nic(took=got["took"], dropped=got["dropped"], sent=got["sent"])]))
    assert v == "unhealthy" and f"RX ring not consumed: {got['dropped']} packets dropped towards the guest" in why

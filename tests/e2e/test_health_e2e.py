"""End to end, in the lab, with real QEMU guests: does the guest live after a move (kvmotion.agent.hv.qemu.health)?

- A healthy guest, moved while a client pings it: ``healthy`` (it answered the ARP probes; its NIC took the
  client's pings during the window), after a vMotion and after a Storage vMotion.
- A guest that hangs on its new host: the moment it runs there, its vCPU thread is frozen with ptrace (QEMU's
  device model and monitor go on; the guest never runs again: a hung guest, as its host sees it), and frames are
  sent into its destination tap from then on. QEMU says ``running``, but the guest no
  longer drains its RX ring: the tap drops the frames towards it and no ARP probe is answered. The task is a
  ``success`` with a ``GUEST_UNHEALTHY`` warning; once the vCPU is thawed, the guest is healthy again.
- The run-state path and a hung QEMU, on the agent's endpoint: a shadow waiting for its state (``inmigrate``),
  and the same QEMU stopped with SIGSTOP (its monitor does not answer).
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator


from kvmotion.agent.hv.qemu.argv import tap_name
from kvmotion.cli.client import Client
from kvmotion_lab import scenario
from kvmotion_lab.netns import netns_exec_argv
from labtools import agent_call, agent_vms, unsigned_agent_call, cli, guest_diagnosis, record_figure, running_vm, wait_for

# Run in the destination host's namespace, armed while the shadow waits for its state: a few frames go into the
# shadow's tap at once (QEMU reads a tap only while the VM runs). The moment QEMU takes them, the VM runs: its vCPU
# thread (not its process) is frozen with ptrace, at once, and kept frozen only if QEMU's main thread goes on (the
# thread did not hold QEMU's big lock): the device model and the monitor work, the guest never runs again. Then
# frames go towards the guest's MAC into the tap (800 at once, then 10000 a second) until stdin closes. (Frozen
# before it runs, the incoming state would not load: QEMU runs work on the vCPU thread while it loads.) If this
# helper dies, the kernel detaches and the thread runs on.
HANG = r"""
import ctypes, os, select, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long
SEIZE, INTERRUPT, DETACH, WALL = 0x4206, 0x4207, 17, 0x40000000
pid, tid, tap, mac = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], bytes.fromhex(sys.argv[4].replace(":", ""))
def taken():
    return int(open(f"/sys/class/net/{tap}/statistics/tx_packets").read())
def main_loop_runs(s=0.03):          # QEMU's main thread is seen outside a futex wait within s seconds
    end = time.monotonic() + s
    while time.monotonic() < end:
        if open(f"/proc/{pid}/task/{pid}/syscall").read().split()[0] != "202":
            return True
        time.sleep(0.0005)
    return False
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind((tap, 0))
frame = (mac + bytes.fromhex("020000c0ffee") + b"\x88\xb5").ljust(60, b"\0")
base = taken()
for _ in range(10):
    sock.send(frame)
print("armed", flush=True)
end = time.monotonic() + 300
while taken() == base:
    if time.monotonic() > end:
        sys.exit("the VM never ran")
    time.sleep(0.0002)
t_run, tries = time.monotonic(), 0
while True:
    tries += 1
    if libc.ptrace(SEIZE, tid, None, None) != 0:
        sys.exit(f"PTRACE_SEIZE {tid}: {os.strerror(ctypes.get_errno())}")
    libc.ptrace(INTERRUPT, tid, None, None)
    os.waitpid(tid, WALL)
    if main_loop_runs():
        break
    libc.ptrace(DETACH, tid, None, None)  # it held the big lock: let it go, try again
    time.sleep(0.001)
burst = 800
while not select.select([sys.stdin], [], [], 0)[0]:
    for _ in range(burst):
        sock.send(frame)
    if burst == 800:
        print(f"frozen {1000 * (time.monotonic() - t_run):.1f} ms after the VM ran ({tries} tries)", flush=True)
    burst = 100
    time.sleep(0.01)
libc.ptrace(DETACH, tid, None, None)
"""


def health_check(lab: Any, host: str, uuid: str, **req: Any) -> dict:
    r = agent_call(lab, host, "POST", f"/v1/vms/{uuid}/health-check", json=req, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def vcpu_thread(pid: int) -> int:
    """The vCPU thread of a one-vCPU QEMU started with debug-threads=on ("ALL CPUs/TCG": TCG single-threaded)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() in ("ALL CPUs/TCG", "CPU 0/TCG", "CPU 0/KVM"):
            return int(task.name)
    raise AssertionError(f"no vCPU thread in QEMU {pid}")


def thread_state(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def hung_after_resume(netns: str, pid: int, tid: int, tap: str, mac: str) -> Iterator[Callable[[float], str]]:
    """Arms :data:`HANG` (while the shadow waits); yields a function that waits for its "frozen" line."""
    proc = subprocess.Popen(netns_exec_argv(netns, [sys.executable, "-c", HANG, str(pid), str(tid), tap, mac]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None

    def wait_frozen(timeout: float) -> str:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().strip() if ready else ""
        assert line.startswith("frozen"), f"the vCPU was not frozen: {line!r}, helper {proc.poll()}"
        assert thread_state(pid, tid) == "t", thread_state(pid, tid)      # in a ptrace stop
        return line
    try:
        assert proc.stdout.readline().strip() == "armed", "the helper could not arm"
        yield wait_frozen
    finally:
        if proc.stdin is not None:
            proc.stdin.close()                      # stops sending, PTRACE_DETACH: the vCPU runs on
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()                             # the kernel detaches when its tracer dies
            proc.wait(timeout=10)


def assert_checked_after_the_move(task: dict) -> None:
    """The window runs after resume + announce, outside the move's measured time and downtime."""
    gh, r = task["result"]["guest_health"], task["result"]
    announce = next(p for p in task["phases"] if p["name"] == "announce")
    assert gh["checked_at"] >= announce["started_at"] and gh["window_s"] >= 1.0
    record_figure("task end after the move's measured total time (the guest check)",
                  task["finished_at"] - task["created_at"] - r["total_time_s"], "s")


def test_a_healthy_guest_is_healthy_after_vmotion_and_storage_vmotion(lab, tmp_path) -> None:
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "hc1")
    move = scenario.migrate_with_probe(client, lab.net, "hc1", vm["spec"]["guest_ip"], "h2", tmp_path / "p.jsonl")
    task = move.task
    assert task["state"] == "success", task.get("error")
    gh = task["result"]["guest_health"]
    assert gh["verdict"] == "healthy", guest_diagnosis(lab, client, "hc1", f"guest health {gh}")
    nic = gh["nics"][0]
    assert gh["host"] == "h2" and gh["run_state"] == "running"
    assert nic["probes_sent"] >= 1 and nic["probes_answered"] >= 1, nic
    assert nic["tx_packets"] > nic["probes_sent"] and nic["tx_dropped"] == 0, nic   # the client's pings, taken
    assert "findings" not in task["result"]
    assert_checked_after_the_move(task)
    record_figure("guest check window", gh["window_s"], "s")
    record_figure("pings taken by the guest's NIC in the window", nic["tx_packets"], "frames")
    shown = cli(lab, "task", "show", task["id"])
    assert "guest after the move" in shown.stdout and "healthy on h2" in shown.stdout, shown.stdout
    print(shown.stdout)                               # the CLI summary (pytest -rP shows it)

    sv = scenario.follow_task(client, client.migrate("hc1", datastore="h2-local")["id"])
    assert sv["state"] == "success", sv.get("error")
    gh = sv["result"]["guest_health"]
    assert gh["verdict"] == "healthy", gh
    assert [p["name"] for p in sv["phases"]] == ["precheck", "mirror", "pivot", "verify", "cleanup"]
    client.stop_vm("hc1")
    client.delete_vm("hc1")


def test_a_guest_hung_after_the_move_is_reported_unhealthy(lab) -> None:
    client = Client(lab.controller_url)
    vm = running_vm(client, lab, "hc3")
    uuid, mac = vm["uuid"], vm["spec"]["nics"][0]["mac"]
    tap = tap_name(uuid, 0)
    task_id = client.migrate("hc3", "h2", max_bandwidth_mbps=40)["id"]     # a few seconds of pre-copy
    shadow = wait_for(lambda: (agent_vms(lab, "h2").get(uuid) or {}).get("state") == "incoming"
                      and agent_vms(lab, "h2")[uuid], 60, "the shadow on h2")
    pid = shadow["pid"]
    tid = vcpu_thread(pid)
    with hung_after_resume(lab.net.host("h2").netns, pid, tid, tap, mac) as wait_frozen:
        assert client.task(task_id)["phase"] in ("shadow", "precopy"), "too late: the move switched over"
        task = scenario.follow_task(client, task_id)
        how = wait_frozen(10)
        record_figure("vCPU frozen after the guest resumed", float(how.split()[1]), "ms")
        assert task["state"] == "success", task.get("error")
        r = task["result"]
        gh = r["guest_health"]
        assert gh["verdict"] == "unhealthy", (how, gh["reasons"], gh["nics"], gh["evidence"])
        assert gh["run_state"] == "running"                   # QEMU runs the VM; the guest does not live
        nic = gh["nics"][0]
        assert nic["probes_sent"] >= 1 and nic["probes_answered"] == 0 and nic["guest_frames"] == 0, nic
        assert nic["tx_dropped"] > 0, nic                     # the ring filled up: the tap drops towards the guest
        assert all(v["busy_pct"] is not None and v["busy_pct"] < 5 for v in gh["vcpus"]), gh["vcpus"]
        finding = r["findings"][0]
        assert (finding["code"], finding["severity"], finding["subject"]) == ("GUEST_UNHEALTHY", "warning", "vm:hc3")
        assert finding["remedy"] and r["warnings"] == [f"GUEST_UNHEALTHY: {finding['message']}"]
        assert r["downtime_ms"] is not None and client.vm("hc3")["host"] == "h2"
        assert_checked_after_the_move(task)
        record_figure("frames dropped towards a hung guest in the task's window", nic["tx_dropped"], "frames")
        record_figure("frames taken by a hung guest's NIC in the task's window", nic["tx_packets"], "frames")
        shown = cli(lab, "task", "show", task_id)
        assert "warning GUEST_UNHEALTHY" in shown.stdout and "unhealthy on h2" in shown.stdout, shown.stdout
        print(shown.stdout)
        # once its ring is full (the task's window may have seen the last frames go in): the dead-ring signature
        gh = health_check(lab, "h2", uuid, window_s=1.0)
        nic = gh["nics"][0]
        assert gh["verdict"] == "unhealthy" and nic["tx_packets"] == 0 and nic["tx_dropped"] > 0, gh
        assert f"NIC nic0 RX ring not consumed: {nic['tx_dropped']} packets dropped towards the guest in" in \
            gh["reasons"][0], gh["reasons"]
    # thawed, the guest drains its ring and answers again: the verdict follows the guest
    def healthy_again() -> dict | None:
        h = health_check(lab, "h2", uuid, window_s=1.0, since=time.time())
        return h if h["verdict"] == "healthy" else None
    wait_for(healthy_again, 60, "the thawed guest to be healthy")
    client.stop_vm("hc3")
    client.delete_vm("hc3")


def test_run_state_and_a_hung_qemu_on_the_agent_endpoint(lab) -> None:
    client = Client(lab.controller_url)
    vm = client.create_vm(name="hc2", host="h1")            # powered off: its files are on the shared datastore
    uuid = vm["uuid"]
    h2 = lab.net.host("h2")
    r = agent_call(lab, "h2", "POST", f"/v1/vms/{uuid}/incoming", json={"spec": vm["spec"],
                                                                          "listen_address": h2.mig_ip}, timeout=40)
    assert r.status_code == 200, r.text
    pid = r.json()["pid"]
    try:
        gh = health_check(lab, "h2", uuid, window_s=0.5)
        assert gh["verdict"] == "unhealthy" and gh["run_state"] == "inmigrate", gh
        assert gh["reasons"][0] == "QEMU run state is 'inmigrate', not running: it still waits for its migration state"
        assert gh["nics"][0]["probes_sent"] == 0             # no probe into a guest that does not run
        os.kill(pid, signal.SIGSTOP)                          # a hung QEMU: its monitor does not answer
        try:
            t0 = time.monotonic()
            gh = health_check(lab, "h2", uuid, window_s=0.5)       # bounded: QMP deadlines, not the HTTP timeout
            record_figure("guest check of a stopped QEMU", time.monotonic() - t0, "s")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert gh["verdict"] == "unhealthy" and gh["run_state"] == "no-answer", gh
        assert "did not answer within 2 s" in gh["reasons"][0]
        # the endpoint is signed like every other: no signature, no answer
        unsigned = unsigned_agent_call(lab, "h2", "POST", f"/v1/vms/{uuid}/health-check", json={})
        assert unsigned.status_code == 401
        bad = agent_call(lab, "h2", "POST", f"/v1/vms/{uuid}/health-check", json={"window_s": 60})
        assert bad.status_code == 422
    finally:
        agent_call(lab, "h2", "DELETE", f"/v1/vms/{uuid}/incoming", timeout=20)
    client.delete_vm("hc2")

"""The guest agent: the QGA client against a fake agent speaking the protocol over a unix socket (sync with junk
and stale replies before the delimiter, silence, errors, commands without a reply, deadlines), the guest facts and
their cache, the clock decision and sync, the graceful power operations and their fallbacks, the inventory
following a guest's own power-off, and what the CLI prints."""
from __future__ import annotations

import asyncio
import collections
import json
import time
from pathlib import Path
from typing import Any

import pytest

from kvmotion.agent.hv.qemu import guestinfo, power
from kvmotion.agent.hv.qemu.guestagent import GuestAgent
from kvmotion.common.errors import (DeadlineExceeded, ErrorCode, GuestAgentError, GuestAgentSilent, KvmotionError)
from kvmotion.models.guest import NOT_ANSWERING, GuestClock

OSINFO = {"name": "Debian GNU/Linux", "kernel-release": "6.1.0-50-cloud-amd64", "version": "12 (bookworm)",
          "pretty-name": "Debian GNU/Linux 12 (bookworm)", "version-id": "12", "machine": "x86_64", "id": "debian"}
NICS = [{"name": "lo", "hardware-address": "00:00:00:00:00:00",
         "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
                          {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}]},
        {"name": "eth0", "hardware-address": "52:54:00:12:34:56",
         "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "198.18.1.100", "prefix": 24},
                          {"ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:fe12:3456", "prefix": 64}]}]
FSINFO = [{"name": "vda3", "total-bytes": 3846721536, "mountpoint": "/", "used-bytes": 428843008, "type": "ext4",
           "disk": []}]


class FakeQGA:
    """A qemu-guest-agent on a unix socket: 0xFF resets its parser, one JSON reply line per command."""

    def __init__(self, path: Path, *, junk: bytes = b"", silent: bool = False, clock_offset_ms: float = 0.0,
                 errors: dict[str, str] | None = None, delays: dict[str, float] | None = None) -> None:
        self.path, self.junk, self.silent = path, junk, silent
        self.offset_ns = int(clock_offset_ms * 1e6)
        self.errors = errors or {}
        self.delays = delays or {}
        self.seen: list[dict[str, Any]] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "FakeQGA":
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        buf = b""
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                buf = (buf + data).replace(b"\xff", b"")        # the parser resets on 0xFF
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip() or self.silent:
                        continue
                    await self._answer(json.loads(line), writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, req: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        cmd, args = req["execute"], req.get("arguments") or {}
        self.seen.append(req)
        if cmd == "guest-set-time" and cmd not in self.errors:   # as qemu-ga: the time first, then hwclock -w
            self.offset_ns = args["time"] - time.time_ns()
        await asyncio.sleep(self.delays.get(cmd, 0.0))
        if cmd == "guest-sync-delimited":
            # what an earlier caller left: junk, a stale reply of an older sync (delimited too), then ours
            writer.write(self.junk + b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n")
        elif cmd in self.errors:
            writer.write(json.dumps({"error": {"class": "GenericError", "desc": self.errors[cmd]}}).encode() + b"\n")
        elif cmd == "guest-shutdown":
            pass                                                   # no reply on success
        else:
            writer.write(json.dumps({"return": self._reply(cmd, args)}).encode() + b"\n")
        await writer.drain()

    def _reply(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "guest-get-time":
            return time.time_ns() + self.offset_ns
        return {"guest-info": {"version": "7.2.22", "supported_commands": []}, "guest-get-osinfo": OSINFO,
                "guest-get-host-name": {"host-name": "kvmotion-debian"}, "guest-network-get-interfaces": NICS,
                "guest-get-fsinfo": FSINFO, "guest-ping": {}}.get(cmd, {})


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- the protocol ---------------------------------------------------------------------------------------------
def test_sync_discards_junk_and_stale_replies_before_the_delimiter(tmp_path: Path) -> None:
    junk = b'garbage {"error": {"class": "GenericError", "desc": "Invalid JSON"}}\n{"return": 7}\n' \
           b'\xff{"return": 12345}\n' + b"x" * 100_000

    async def main() -> None:
        async with FakeQGA(tmp_path / "qga.sock", junk=junk) as fake:
            ga = GuestAgent("vm1", str(fake.path))
            assert await ga.execute("guest-get-host-name") == {"host-name": "kvmotion-debian"}
            async with ga.session(2.0) as s:           # a session: one sync, then several commands
                assert (await s.execute("guest-info"))["version"] == "7.2.22"
                assert (await s.execute("guest-get-osinfo"))["id"] == "debian"
            assert fake.connections == 2
            syncs = [r for r in fake.seen if r["execute"] == "guest-sync-delimited"]
            assert len(syncs) == 2 and syncs[0]["arguments"]["id"] != syncs[1]["arguments"]["id"]
            assert ga.last_answer_at is not None
    run(main())


def test_a_silent_guest_gives_the_clear_error_within_the_deadline(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeQGA(tmp_path / "qga.sock", silent=True) as fake:
            ga = GuestAgent("tiny1", str(fake.path))
            t0 = time.monotonic()
            with pytest.raises(GuestAgentSilent) as err:
                await ga.execute("guest-ping", deadline_s=0.5)
            assert time.monotonic() - t0 < 1.0
            e = err.value
            assert e.code == ErrorCode.GUEST_AGENT_SILENT and e.http_status == 504
            assert "tiny1" in e.message and "did not answer" in e.message
            assert "install and start qemu-guest-agent" in e.remedy
            assert e.details["command"] == "guest-sync-delimited"
            back = KvmotionError.from_dict(e.to_dict())       # the same class on the other side of HTTP
            assert isinstance(back, GuestAgentSilent)
    run(main())


def test_no_channel_is_silent_too(tmp_path: Path) -> None:
    with pytest.raises(GuestAgentSilent) as err:
        run(GuestAgent("vm1", str(tmp_path / "none.sock")).execute("guest-ping", deadline_s=0.5))
    assert "cannot be opened" in err.value.message and "qemu-guest-agent" in err.value.remedy


def test_an_error_reply_and_a_command_that_hangs_after_the_sync(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeQGA(tmp_path / "qga.sock", errors={"guest-get-fsinfo": "no fsinfo here"},
                           delays={"guest-get-osinfo": 5.0}) as fake:
            ga = GuestAgent("vm1", str(fake.path))
            with pytest.raises(GuestAgentError) as err:
                await ga.execute("guest-get-fsinfo")
            assert err.value.details["desc"] == "no fsinfo here" and err.value.code == ErrorCode.GUEST_AGENT_ERROR
            with pytest.raises(GuestAgentSilent) as slow:
                await ga.execute("guest-get-osinfo", deadline_s=0.5)
            assert "it answered the sync" in slow.value.message
            assert await ga.execute("guest-ping") == {}      # the next session syncs past the late reply
    run(main())


def test_a_command_without_a_success_reply(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeQGA(tmp_path / "qga.sock") as fake:
            ga = GuestAgent("vm1", str(fake.path))
            assert await ga.execute("guest-shutdown", {"mode": "reboot"}, reply=False) is None
            assert fake.seen[-1] == {"execute": "guest-shutdown", "arguments": {"mode": "reboot"}}
        async with FakeQGA(tmp_path / "qga2.sock", errors={"guest-shutdown": "child process failed"}) as fake:
            with pytest.raises(GuestAgentError):
                await GuestAgent("vm1", str(fake.path)).execute("guest-shutdown", reply=False)
    run(main())


def test_one_session_at_a_time(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeQGA(tmp_path / "qga.sock", delays={"guest-get-fsinfo": 0.6}) as fake:
            ga = GuestAgent("vm1", str(fake.path))
            slow = asyncio.create_task(ga.execute("guest-get-fsinfo"))
            await asyncio.sleep(0.1)
            with pytest.raises(GuestAgentSilent) as busy:
                await ga.execute("guest-ping", deadline_s=0.2)
            assert busy.value.details.get("busy")
            assert await ga.execute("guest-ping", deadline_s=2.0) == {}     # waits its turn
            assert (await slow)[0]["mountpoint"] == "/"
            assert not ga.lock.locked()                         # no waiter that gave up kept it
    run(main())


# -- guest facts ----------------------------------------------------------------------------------------------
def test_facts_from_the_replies() -> None:
    replies = {"guest-info": {"version": "7.2.22"}, "guest-get-osinfo": OSINFO,
               "guest-get-host-name": {"host-name": "kvmotion-debian"}, "guest-network-get-interfaces": NICS,
               "guest-get-fsinfo": FSINFO}
    f = guestinfo.facts_from(replies, {}, 100.0)
    assert f.guest_agent == "answering" and f.collected_at == 100.0 and f.agent_version == "7.2.22"
    assert f.os is not None and f.os["pretty_name"] == "Debian GNU/Linux 12 (bookworm)" and f.os["id"] == "debian"
    assert f.hostname == "kvmotion-debian"
    assert f.ip_addresses == ["198.18.1.100/24"]        # no loopback, no link-local
    assert [n.name for n in f.interfaces] == ["lo", "eth0"] and f.interfaces[1].mac == "52:54:00:12:34:56"
    assert f.filesystems[0].mountpoint == "/" and f.filesystems[0].type == "ext4"
    partial = guestinfo.facts_from({"guest-info": {"version": "5.0"}}, {"guest-get-osinfo": "not supported"}, 1.0)
    assert partial.os is None and partial.errors == {"guest-get-osinfo": "not supported"}


def test_facts_are_cached_and_a_silent_agent_is_not_waited_for_again_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeQGA(tmp_path / "qga.sock", errors={"guest-get-fsinfo": "disabled"}) as fake:
            ga, cache = GuestAgent("vm1", str(fake.path)), guestinfo.FactsCache()
            first = await cache.get("u1", ga, max_age_s=30, deadline_s=2)
            assert not first.cached and first.hostname == "kvmotion-debian" and first.errors == {
                "guest-get-fsinfo": "disabled"}
            n = fake.connections
            again = await cache.get("u1", ga, max_age_s=30, deadline_s=2)
            assert again.cached and again.collected_at == first.collected_at and fake.connections == n
            fresh = await cache.get("u1", ga, max_age_s=0, deadline_s=2)
            assert not fresh.cached and fake.connections == n + 1
            fake.silent = True
            t0 = time.monotonic()
            silent = await cache.get("u1", ga, max_age_s=0, deadline_s=0.3)
            assert silent.guest_agent == NOT_ANSWERING and silent.cached and silent.hostname == "kvmotion-debian"
            assert "qemu-guest-agent" in (silent.remedy or "")
            quick = await cache.get("u1", ga, max_age_s=30, deadline_s=0.3)   # within SILENT_TTL_S: no wait
            assert quick.guest_agent == NOT_ANSWERING and time.monotonic() - t0 < 0.6
    run(main())


# -- the clock ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset,step,expect", [
    (None, 128, (False, "could not be read")), (5.0, 128, (False, "left alone")), (-128.0, 128, (False, "within")),
    (-30000.0, 128, (True, "30000 ms behind")), (900.0, 128, (True, "900 ms ahead of")), (1.0, 0, (True, "ahead"))])
def test_clock_decision(offset: float | None, step: float, expect: tuple[bool, str]) -> None:
    do, why = guestinfo.clock_decision(offset, step)
    assert do is expect[0] and expect[1] in why


def test_clock_sync_sets_a_wrong_clock_and_reads_it_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeQGA(tmp_path / "qga.sock", clock_offset_ms=-30000) as fake:
            c = await guestinfo.sync_clock(GuestAgent("vm1", str(fake.path)), "h2", deadline_s=2, step_ms=128)
            assert c.set and c.host == "h2" and "behind" in c.why
            assert c.offset_before_ms is not None and abs(c.offset_before_ms + 30000) < 50
            assert c.offset_after_ms is not None and abs(c.offset_after_ms) < 50
            assert [r["execute"] for r in fake.seen] == ["guest-sync-delimited", "guest-get-time", "guest-set-time",
                                                         "guest-get-time"]
        async with FakeQGA(tmp_path / "slow.sock", clock_offset_ms=-30000, delays={"guest-set-time": 0.6}) as fake:
            c = await guestinfo.sync_clock(GuestAgent("vm1", str(fake.path)), "h2", deadline_s=0.4, step_ms=128,
                                           set_allowance_s=1.5)     # a slow hwclock -w fits its own allowance
            assert c.set and c.offset_after_ms is not None and abs(c.offset_after_ms) < 50
        async with FakeQGA(tmp_path / "late.sock", clock_offset_ms=-30000, delays={"guest-set-time": 0.6}) as fake:
            c = await guestinfo.sync_clock(GuestAgent("vm1", str(fake.path)), "h2", deadline_s=0.4, step_ms=128,
                                           set_allowance_s=0.4)     # answers late: read again behind a new sync
            assert c.set and "answered late" in c.why and "behind" in c.why, c
            assert c.offset_after_ms is not None and abs(c.offset_after_ms) < 50
            assert [r["execute"] for r in fake.seen][-2:] == ["guest-sync-delimited", "guest-get-time"]
        async with FakeQGA(tmp_path / "ok.sock", clock_offset_ms=3) as fake:
            c = await guestinfo.sync_clock(GuestAgent("vm1", str(fake.path)), "h2", deadline_s=2, step_ms=128)
            assert not c.set and "left alone" in c.why and c.offset_after_ms == c.offset_before_ms
    run(main())


def test_clock_sync_never_raises(tmp_path: Path) -> None:
    async def main() -> None:
        async with FakeQGA(tmp_path / "qga.sock", silent=True) as fake:
            t0 = time.monotonic()
            c = await guestinfo.sync_clock(GuestAgent("vm1", str(fake.path)), "h2", deadline_s=0.5, step_ms=128)
            assert (c.set, c.why, c.offset_before_ms) == (False, "guest agent not answering", None)
            assert time.monotonic() - t0 < 1.0
        async with FakeQGA(tmp_path / "r.sock", clock_offset_ms=-5000,
                           errors={"guest-set-time": "this feature or command is not currently supported"}) as fake:
            c = await guestinfo.sync_clock(GuestAgent("vm1", str(fake.path)), "h2", deadline_s=2, step_ms=128)
            assert not c.set and c.why.startswith("guest-set-time refused") and c.offset_before_ms is not None
        async with FakeQGA(tmp_path / "s.sock", clock_offset_ms=-5000, delays={"guest-set-time": 5}) as fake:
            c = await guestinfo.sync_clock(GuestAgent("vm1", str(fake.path)), "h2", deadline_s=0.5, step_ms=128,
                                           set_allowance_s=0.3)
            assert not c.set and "may have been set" in c.why and c.offset_after_ms is None
    run(main())


def test_the_move_records_the_clock_and_never_fails_on_it() -> None:
    from kvmotion.migration import guestclock

    class Agent:
        host = "h2"

        def __init__(self, answer: Any) -> None:
            self.answer = answer

        async def guest_clock_sync(self, uuid: str, deadline_s: float = 3.0, **_: Any) -> GuestClock:
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer

    async def main() -> None:
        good = GuestClock(offset_before_ms=-30000.0, offset_after_ms=1.5, set=True, why="behind", host="h2")
        out = await guestclock.outcome(guestclock.start(Agent(good), "u1"))   # type: ignore[arg-type]
        assert out["guest_clock"]["set"] is True and out["guest_clock"]["offset_after_ms"] == 1.5
        for failure in (KvmotionError("agent gone"), RuntimeError("boom")):
            out = await guestclock.outcome(guestclock.start(Agent(failure), "u1"))   # type: ignore[arg-type]
            assert out["guest_clock"]["set"] is False and "could not be checked" in out["guest_clock"]["why"]
        assert await guestclock.outcome(None) == {}
    run(main())


# -- graceful power -------------------------------------------------------------------------------------------
class FakeQMP:
    def __init__(self, vm: "FakeVM") -> None:
        self.vm = vm
        self.sent: list[str] = []
        self.history: collections.deque[tuple[float, dict[str, Any]]] = collections.deque()

    async def execute(self, cmd: str, args: Any = None, timeout: float = 10.0) -> Any:
        self.sent.append(cmd)
        if cmd == "system_powerdown" and self.vm.honours_acpi:
            self.vm.exit_after(0.2, guest=True)
        if cmd == "system_reset":
            self.history.append((time.time(), {"event": "RESET", "data": {"guest": False, "reason": "host-qmp"}}))
        return {}


class FakeVM:
    name = "vm1"

    def __init__(self, honours_acpi: bool = True) -> None:
        self.honours_acpi = honours_acpi
        self.qmp = FakeQMP(self)
        self._alive = True
        self.stopped = False

    def alive(self) -> bool:
        return self._alive

    def exit_after(self, delay: float, guest: bool) -> None:
        def end() -> None:
            self.qmp.history.append((time.time(), {"event": "SHUTDOWN",
                                                   "data": {"guest": guest, "reason": "guest-shutdown"}}))
            self._alive = False
        asyncio.get_running_loop().call_later(delay, end)

    async def stop(self, graceful_timeout: float = 5.0) -> None:
        self.stopped, self._alive = True, False


class FakeGA:
    def __init__(self, vm: FakeVM, answers: bool, reboot_resets: bool = True) -> None:
        self.vm, self.answers, self.reboot_resets = vm, answers, reboot_resets
        self.calls: list[Any] = []

    async def execute(self, command: str, args: Any = None, deadline_s: float = 2.0, reply: bool = True) -> Any:
        self.calls.append((command, args))
        if not self.answers:
            raise GuestAgentSilent("the guest agent of VM vm1 did not answer", remedy="install it")
        if args["mode"] == "powerdown":
            self.vm.exit_after(0.2, guest=True)
        elif self.reboot_resets:
            asyncio.get_running_loop().call_later(0.2, lambda: self.vm.qmp.history.append(
                (time.time(), {"event": "RESET", "data": {"guest": True, "reason": "guest-reset"}})))
        return None


@pytest.mark.parametrize("mode,agent_error,expect", [
    ("powerdown", None, ("guest-agent", None)), ("reboot", None, ("guest-agent", None)),
    ("powerdown", "silent", ("acpi", "system_powerdown")), ("reboot", "silent", ("reset", "system_reset"))])
def test_power_plan(mode: str, agent_error: str | None, expect: tuple[str, str | None]) -> None:
    method, command, note = power.plan(mode, agent_error)
    assert (method, command) == expect
    assert ("no ACPI reboot" in note) == (method == "reset")


def test_shutdown_through_the_guest_agent_and_by_acpi() -> None:
    async def main() -> None:
        vm = FakeVM()
        r = await power.graceful(vm, FakeGA(vm, answers=True), "shutdown", 5, False)  # type: ignore[arg-type]
        assert (r.method, r.outcome, r.forced, r.guest_agent_error) == ("guest-agent", "poweredOff", False, None)
        assert vm.qmp.sent == [] and 0.1 < r.seconds < 2
        vm = FakeVM()
        r = await power.graceful(vm, FakeGA(vm, answers=False), "shutdown", 5, False)  # type: ignore[arg-type]
        assert (r.method, r.outcome) == ("acpi", "poweredOff") and vm.qmp.sent == ["system_powerdown"]
        assert r.guest_agent_error and "did not answer" in r.guest_agent_error
    run(main())


def test_a_guest_that_ignores_acpi_times_out_then_force_hard_stops_it() -> None:
    async def main() -> None:
        vm = FakeVM(honours_acpi=False)
        with pytest.raises(DeadlineExceeded) as err:
            await power.graceful(vm, FakeGA(vm, answers=False), "shutdown", 0.5, False)  # type: ignore[arg-type]
        assert "--force" in err.value.remedy and err.value.details["method"] == "acpi" and vm.alive()
        r = await power.graceful(vm, FakeGA(vm, answers=False), "shutdown", 0.5, True)  # type: ignore[arg-type]
        assert (r.method, r.outcome, r.forced) == ("acpi", "forced-off", True) and vm.stopped
    run(main())


def test_reboot_through_the_guest_agent_else_a_reset_that_says_so() -> None:
    async def main() -> None:
        vm = FakeVM()
        r = await power.graceful(vm, FakeGA(vm, answers=True), "reboot", 5, False)  # type: ignore[arg-type]
        assert (r.method, r.outcome, r.note) == ("guest-agent", "rebooted", "") and vm.alive()
        vm = FakeVM()
        r = await power.graceful(vm, FakeGA(vm, answers=False), "reboot", 5, False)  # type: ignore[arg-type]
        assert (r.method, r.outcome) == ("reset", "reset") and vm.qmp.sent == ["system_reset"]
        assert "no ACPI reboot" in r.note and vm.alive()
        vm = FakeVM()         # the agent took the request but the guest never resets: --force resets it
        ga = FakeGA(vm, answers=True, reboot_resets=False)
        with pytest.raises(DeadlineExceeded):
            await power.graceful(vm, ga, "reboot", 0.4, False)  # type: ignore[arg-type]
        r = await power.graceful(vm, ga, "reboot", 0.4, True)  # type: ignore[arg-type]
        assert (r.outcome, r.forced) == ("forced-reset", True) and vm.qmp.sent == ["system_reset"]
    run(main())


def test_why_a_qemu_ended_by_itself() -> None:
    guest_off = [(1.0, {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"}})]
    assert power.exit_reason(guest_off, 0) == ("the guest powered itself off (guest-shutdown)", True)
    assert power.exit_reason([(1.0, {"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-signal"}})],
                             0)[1] is False
    assert power.exit_reason([], -9) == ("QEMU exited unexpectedly (exit code -9)", False)
    resets = [(5.0, {"event": "RESET", "data": {"guest": False}}), (9.0, {"event": "RESET", "data": {"guest": True}})]
    assert power.guest_reset_since(resets, 6.0) and not power.guest_reset_since(resets[:1], 0.0)
    assert not power.guest_reset_since(resets, 10.0)


# -- the inventory follows a guest's own power-off ------------------------------------------------------------
def test_the_inventory_follows_power_offs_the_host_reports(db_url: str) -> None:
    from kvmotion.controller import guest as guest_ctl
    from kvmotion.controller.db import VM, Host, Task, make_engine, make_sessionmaker
    from kvmotion.models.agent import HostFacts

    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as s:
        s.add(Host(name="h1", address="http://h1:8770"))
        s.add(Host(name="h2", address="http://h2:8770"))
        for name, host in (("off1", "h1"), ("runs", "h1"), ("moving", "h1"), ("elsewhere", "h2"), ("fresh", "h1")):
            s.add(VM(uuid=f"u-{name}", name=name, host=host, power_state="poweredOn", spec_json="{}",
                     updated_at=time.time() - 60 if name != "fresh" else time.time() + 5))
        s.add(Task(id="t1", kind="vmotion", vm_uuid="u-moving", vm_name="moving", source="h1", destination="h2",
                   state="running", phase="precopy"))

    class Inv:
        pass
    inv = Inv()
    inv.sessions = sessions      # type: ignore[attr-defined]
    events = [{"uuid": f"u-{n}", "name": n, "at": time.time(), "reason": "the guest powered itself off"}
              for n in ("off1", "runs", "moving", "elsewhere", "fresh", "unknown")]
    facts = HostFacts(name="h1", agent_version="x", qemu_version="x", accelerator="tcg", cpu_model="x",
                      cpu_features=[], cpu_count=1, mem_total_mb=1, mem_free_mb=1, mgmt_address="x",
                      mgmt_family="ipv4", datastores=[], portgroups=[], migration_interfaces=[], vms=["u-runs"],
                      vm_power_events=events)
    assert guest_ctl.follow_power_events(inv, "h1", facts, time.time()) == ["off1"]   # type: ignore[arg-type]
    with sessions() as s:
        states = {v.name: v.power_state for v in s.query(VM).all()}
    assert states == {"off1": "poweredOff", "runs": "poweredOn", "moving": "poweredOn", "elsewhere": "poweredOn",
                      "fresh": "poweredOn"}
    assert guest_ctl.follow_power_events(inv, "h1", facts, time.time()) == []          # type: ignore[arg-type]


# -- what the CLI prints --------------------------------------------------------------------------------------
def test_the_cli_says_what_happened() -> None:
    from kvmotion.cli.power import describe_power
    from kvmotion.cli.progress import guest_clock_rows

    out = {"vm": {"name": "tiny1", "power_state": "poweredOn"},
           "result": {"method": "reset", "outcome": "reset", "seconds": 0.01, "guest_agent_error": "silent",
                      "note": power.RESET_NOTE}}
    text = "\n".join(describe_power(out))
    assert "was reset" in text and "no ACPI reboot" in text and "guest agent:" in text
    out["result"] |= {"method": "acpi", "outcome": "forced-off"}
    assert "hard-stopped (--force)" in describe_power(out)[0]
    rows = guest_clock_rows({"guest_clock": {"offset_before_ms": -30012.5, "offset_after_ms": 1.2, "set": True,
                                             "why": "30013 ms behind the host's"}})
    assert rows[0][0].startswith("guest clock") and "-30012.5 ms → +1.2 ms" in rows[0][1] and "set" in rows[0][1]
    rows = guest_clock_rows({"guest_clock": {"offset_before_ms": None, "set": False,
                                             "why": "guest agent not answering"}})
    assert "not checked" in rows[0][1] and "not answering" in rows[0][1]
    assert guest_clock_rows({}) == []


# -- the agent finds the VMs that ended by themselves ---------------------------------------------------------
def test_the_hypervisor_reaps_only_running_vms_whose_qemu_ended(tmp_path: Path) -> None:
    from kvmotion.agent.guest import GuestOps
    from kvmotion.agent.hv.qemu.driver import QemuHypervisor
    from kvmotion.models.agent import VMRunState, VMSpec

    class Proc:
        returncode = 0

    class VM:
        def __init__(self, name: str, state: VMRunState, alive: bool) -> None:
            self.name, self.state, self._alive = name, state, alive
            self.spec = VMSpec(uuid=f"u-{name}", name=name, memory_mb=64, boot_datastore="ds", folder=name)
            self.lock = asyncio.Lock()
            self.proc = Proc()
            self.qmp = FakeQMP(self)      # type: ignore[arg-type]
            self.qmp.history.append((1.0, {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"}}))
            self.killed = False

        def alive(self) -> bool:
            return self._alive

        async def kill(self) -> None:
            self.killed, self.state = True, VMRunState.STOPPED

    async def main() -> None:
        hv = QemuHypervisor("h1", tmp_path)
        vms = {"off": VM("off", VMRunState.RUNNING, alive=False), "up": VM("up", VMRunState.RUNNING, alive=True),
               "moving": VM("moving", VMRunState.MIGRATING_OUT, alive=False),
               "stopping": VM("stopping", VMRunState.RUNNING, alive=False)}
        await vms["stopping"].lock.acquire()        # `vm stop` / `vm shutdown` hold it: theirs to clean up
        hv.vms = {f"u-{k}": v for k, v in vms.items()}   # type: ignore[misc]

        class Agent(GuestOps):
            def __init__(self) -> None:
                self.hv, self.released = hv, []

            def release_leases(self, spec: Any) -> int:
                self.released.append(spec.name)
                return 1

        agent = Agent()
        events = await agent.reap_once()
        assert [e.name for e in events] == ["off"] and events[0].guest_initiated
        assert events[0].reason == "the guest powered itself off (guest-shutdown)"
        assert agent.released == ["off"] and vms["off"].killed and "u-off" not in hv.vms
        assert set(hv.vms) == {"u-up", "u-moving", "u-stopping"}
        assert [e["name"] for e in agent.power_events()] == ["off"]
        assert await agent.reap_once() == []
    run(main())

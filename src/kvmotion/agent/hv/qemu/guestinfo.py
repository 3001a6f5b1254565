"""What the guest agent tells: guest facts (cached with their time), and the guest clock after a move.

Facts come from five read-only commands in one session (``guest-info``, ``guest-get-osinfo``,
``guest-get-host-name``, ``guest-network-get-interfaces``, ``guest-get-fsinfo``); a command the guest refuses leaves
its field empty and its error in ``errors``. A caller that asks within ``max_age_s`` of the last read gets the cache;
a silent agent gives ``guest_agent: "not answering"`` with the last facts read (``cached``), never a long wait.

The clock: guest − host read with ``guest-get-time`` (host time taken at the middle of the round trip), set with
``guest-set-time`` and the host's time when it is off by more than a step, read again. qemu-ga runs
``hwclock -w`` after setting the time, which waits for the RTC's next second: the set takes up to about a second.
"""
from __future__ import annotations

import time
from typing import Any

from kvmotion.agent.hv.qemu.guestagent import SILENT_REMEDY, GuestAgent, Session
from kvmotion.common.errors import GuestAgentError, GuestAgentSilent, KvmotionError
from kvmotion.models.guest import (ANSWERING, NOT_ANSWERING, GuestClock, GuestFacts, GuestFilesystem,
                                   GuestInterface)

FACT_COMMANDS = ("guest-info", "guest-get-osinfo", "guest-get-host-name", "guest-network-get-interfaces",
                 "guest-get-fsinfo")
OS_KEYS = ("pretty-name", "name", "id", "version", "version-id", "kernel-release", "kernel-version", "machine")


def interfaces(raw: Any) -> list[GuestInterface]:
    out = []
    for nic in raw if isinstance(raw, list) else []:
        if not isinstance(nic, dict):
            continue
        addrs = [f"{a.get('ip-address')}/{a.get('prefix')}" for a in nic.get("ip-addresses") or []
                 if isinstance(a, dict) and a.get("ip-address")]
        out.append(GuestInterface(name=str(nic.get("name", "?")), mac=nic.get("hardware-address"), addresses=addrs))
    return out


def ip_addresses(nics: list[GuestInterface]) -> list[str]:
    """Every address but loopback's (and IPv6 link-local ones)."""
    out = []
    for nic in nics:
        for a in nic.addresses:
            ip = a.split("/")[0]
            if nic.name == "lo" or ip.startswith("127.") or ip == "::1" or ip.lower().startswith("fe80:"):
                continue
            out.append(a)
    return out


def filesystems(raw: Any) -> list[GuestFilesystem]:
    out = []
    for fs in raw if isinstance(raw, list) else []:
        if isinstance(fs, dict) and fs.get("mountpoint"):
            out.append(GuestFilesystem(mountpoint=str(fs["mountpoint"]), type=str(fs.get("type", "")),
                                       device=str(fs.get("name", "")), total_bytes=fs.get("total-bytes"),
                                       used_bytes=fs.get("used-bytes")))
    return out


def facts_from(replies: dict[str, Any], errors: dict[str, str], at: float) -> GuestFacts:
    """The facts from the commands' replies (pure)."""
    info = replies.get("guest-info") or {}
    osinfo = replies.get("guest-get-osinfo")
    nics = interfaces(replies.get("guest-network-get-interfaces"))
    return GuestFacts(
        guest_agent=ANSWERING, collected_at=at, last_answer_at=at,
        agent_version=info.get("version") if isinstance(info, dict) else None,
        os={k.replace("-", "_"): str(osinfo[k]) for k in OS_KEYS if k in osinfo} if isinstance(osinfo, dict) else None,
        hostname=(replies.get("guest-get-host-name") or {}).get("host-name"),
        ip_addresses=ip_addresses(nics), interfaces=nics,
        filesystems=filesystems(replies.get("guest-get-fsinfo")), errors=errors)


async def read_facts(ga: GuestAgent, deadline_s: float) -> GuestFacts:
    """Every fact command in one session. Raises ``GuestAgentSilent`` when the agent does not answer the sync."""
    replies: dict[str, Any] = {}
    errors: dict[str, str] = {}
    async with ga.session(deadline_s) as s:
        for cmd in FACT_COMMANDS:
            try:
                replies[cmd] = await s.execute(cmd)
            except GuestAgentError as exc:        # refused (an old agent, a disabled command): the others go on
                errors[cmd] = exc.details.get("desc", exc.message)
            except GuestAgentSilent as exc:       # answered the sync but not this: the session is over
                errors[cmd] = exc.message
                break
    return facts_from(replies, errors, time.time())


SILENT_TTL_S = 10.0
"""A silent agent is asked again after this long at the earliest (unless the caller wants fresh facts): `vm show`
of a guest without an agent waits for the deadline once in this time, not at every call."""


class FactsCache:
    """The last facts read from each VM's guest, with their time; and when its agent was last found silent."""

    def __init__(self) -> None:
        self.facts: dict[str, GuestFacts] = {}
        self.silent: dict[str, tuple[float, GuestFacts]] = {}

    async def get(self, uuid: str, ga: GuestAgent, max_age_s: float, deadline_s: float) -> GuestFacts:
        now = time.time()
        last = self.facts.get(uuid)
        silent = self.silent.get(uuid)        # newer than ``last`` when set (an answer clears it)
        if silent is not None and now - silent[0] <= min(max_age_s, SILENT_TTL_S):
            return silent[1]
        if silent is None and last is not None and last.collected_at is not None and \
                now - last.collected_at <= max_age_s:
            return last.model_copy(update={"cached": True})
        try:
            fresh = await read_facts(ga, deadline_s)
        except KvmotionError as exc:
            answer = not_answering(exc, last)
            self.silent[uuid] = (time.time(), answer)
            return answer
        self.facts[uuid] = fresh
        self.silent.pop(uuid, None)
        return fresh

    def forget(self, uuid: str) -> None:
        self.facts.pop(uuid, None)
        self.silent.pop(uuid, None)


def not_answering(exc: KvmotionError, last: GuestFacts | None) -> GuestFacts:
    """The answer when the agent is silent now: the reason, and the last facts read (marked cached), if any."""
    base = last.model_copy(update={"cached": True}) if last is not None else GuestFacts()
    return base.model_copy(update={"guest_agent": NOT_ANSWERING, "error": exc.message,
                                   "remedy": exc.remedy or SILENT_REMEDY})


# -- the clock -----------------------------------------------------------------------------------------------
SET_ALLOWANCE_S = 3.0
"""What a set may take on top of the read: qemu-ga runs ``hwclock -w`` after setting the time, which waits for the
RTC's next second (about 1 s on KVM, measured up to 2.1 s on a loaded TCG host)."""


def clock_decision(offset_ms: float | None, step_ms: float) -> tuple[bool, str]:
    """Whether to set the guest clock after a move, and why (pure). ``offset_ms``: guest − host, None: unread."""
    if offset_ms is None:
        return False, "the guest clock could not be read"
    if abs(offset_ms) <= step_ms:
        return False, f"within {step_ms:g} ms of the host's (off by {offset_ms:+.1f} ms): left alone"
    side = "behind" if offset_ms < 0 else "ahead of"
    return True, f"{abs(offset_ms):.0f} ms {side} the host's: set to the host's time"


async def _offset(s: Session) -> tuple[float, float]:
    """(guest − host, the round trip), in ms; the host's time is taken at the middle of the round trip (after the
    sync, which may wait behind a late answer)."""
    if not s.synced:
        await s.sync()
    t0 = time.time_ns()
    guest = await s.execute("guest-get-time")
    t1 = time.time_ns()
    if not isinstance(guest, int):
        raise GuestAgentError(f"guest-get-time answered {guest!r}, not a time", remedy="update qemu-guest-agent")
    return (guest - (t0 + t1) / 2) / 1e6, (t1 - t0) / 1e6


async def _set_and_reread(s: Session, out: GuestClock, rtt_ms: float, allowance_s: float) -> None:
    """Set the guest's clock to the host's and read the offset again. A set that answers late (qemu-ga's
    ``hwclock -w`` on a loaded host) gets one more allowance: a new sync waits behind it, then the read tells."""
    s.end = max(s.end, time.monotonic() + allowance_s)
    decided, late = out.why, False
    try:
        # plus half the measured round trip: the time the request takes to reach the guest
        await s.execute("guest-set-time", {"time": time.time_ns() + int(rtt_ms * 1e6 / 2)})
        out.set = True
    except GuestAgentError as exc:
        out.why = f"guest-set-time refused: {exc.details.get('desc', exc.message)}"
        out.offset_after_ms = out.offset_before_ms
        return
    except GuestAgentSilent:
        out.why = ("guest-set-time did not answer in time (qemu-ga's hwclock -w may still run): the "
                   "guest clock may have been set")
        s.synced, late = False, True           # the late answer is skipped by the next sync
        s.end = time.monotonic() + allowance_s
    out.offset_after_ms, _ = await _offset(s)
    if late:                                   # the read after it tells whether the set took
        out.set = abs(out.offset_after_ms) < abs(out.offset_before_ms or 0.0)
        out.why = f"{decided}; guest-set-time answered late (qemu-ga's hwclock -w), read again after it"


async def sync_clock(ga: GuestAgent, host: str, deadline_s: float, step_ms: float,
                     set_allowance_s: float = SET_ALLOWANCE_S) -> GuestClock:
    """Read, set when off by more than ``step_ms``, read again. Never raises: what failed is in ``why``.

    ``deadline_s`` bounds the sync and the first read (a silent agent costs no more); a set gets
    ``set_allowance_s`` more for itself and the read after it (qemu-ga's ``hwclock -w``)."""
    t0 = time.monotonic()
    out = GuestClock(host=host)
    try:
        async with ga.session(deadline_s) as s:
            out.offset_before_ms, rtt = await _offset(s)
            out.rtt_ms = round(rtt, 3)
            do_set, out.why = clock_decision(out.offset_before_ms, step_ms)
            if not do_set:
                out.offset_after_ms = out.offset_before_ms
            else:
                await _set_and_reread(s, out, rtt, set_allowance_s)
    except GuestAgentSilent as exc:
        out.why = "guest agent not answering" if out.offset_before_ms is None else \
            f"{out.why}; then the guest agent stopped answering ({exc.message})"
    except KvmotionError as exc:
        out.why = f"the guest clock could not be read: {exc.message}"
    except Exception as exc:  # noqa: BLE001 - the clock must never fail a move
        out.why = f"the clock sync failed: {type(exc).__name__}: {exc}"
    for k in ("offset_before_ms", "offset_after_ms"):
        v = getattr(out, k)
        if v is not None:
            setattr(out, k, round(v, 3))
    out.seconds = round(time.monotonic() - t0, 3)
    return out

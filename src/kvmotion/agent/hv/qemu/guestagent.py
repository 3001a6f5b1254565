"""A qemu-guest-agent (QGA) client over the VM's virtio-serial channel: ``qga.sock`` in its run directory.

The protocol (QEMU's qga/qapi-schema.json): a JSON command in, one JSON reply line out. The channel keeps no framing
of its own, so a reply to an earlier command whose caller gave up, or an error for a half-written one, may still be
queued when a new caller comes. Every session therefore begins with ``guest-sync-delimited``: a 0xFF byte first
(the agent's JSON parser resets on it), then the command with a random id; the agent writes 0xFF before that reply,
and everything up to the 0xFF whose reply carries our id is discarded. Then the commands, one at a time.

QEMU's socket chardev serves one client at a time: a VM has one :class:`GuestAgent`, whose lock admits one session,
and a session's connection is closed at its end (nothing is held between sessions; a tool may open the socket then).

Every session has a deadline. A guest without a running agent still has the channel (QEMU accepts the connection)
but nothing reads it: the sync times out, and the caller gets :class:`GuestAgentSilent` naming the fix.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from kvmotion.common.errors import GuestAgentError, GuestAgentSilent

DELIMITER = b"\xff"
MAX_REPLY_BYTES = 8 * 1024 * 1024    # a guest with many file systems or addresses still fits
DEFAULT_DEADLINE_S = 2.0
NO_REPLY_WAIT_S = 1.0                # a command without a success reply: how long an error may take to come
SILENT_REMEDY = ("install and start qemu-guest-agent in the guest (Debian/Ubuntu: apt-get install qemu-guest-agent; "
                 "systemctl start qemu-guest-agent; RHEL: dnf install qemu-guest-agent), then retry")


def _silent(vm: str, doing: str, deadline_s: float, command: str, why: str = "") -> GuestAgentSilent:
    return GuestAgentSilent(
        f"the guest agent of VM {vm} did not answer {doing} within {deadline_s:.1f}s"
        + (f" ({why})" if why else "") + ": qemu-guest-agent is not installed or not running in the guest, "
        "or the guest is too busy to answer",
        remedy=SILENT_REMEDY, details={"vm": vm, "command": command, "deadline_s": deadline_s})


class Session:
    """One connection, synced; commands run in turn until the session's deadline (``end``, monotonic)."""

    def __init__(self, vm: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, end: float,
                 deadline_s: float) -> None:
        self.vm = vm
        self.reader = reader
        self.writer = writer
        self.end = end
        self.deadline_s = deadline_s
        self.synced = False

    def remaining(self) -> float:
        return self.end - time.monotonic()

    async def _within(self, aw: Any, doing: str, command: str) -> Any:
        left = self.remaining()
        if left <= 0:
            if asyncio.iscoroutine(aw):
                aw.close()
            raise _silent(self.vm, doing, self.deadline_s, command)
        try:
            return await asyncio.wait_for(aw, timeout=left)
        except asyncio.TimeoutError as exc:
            raise _silent(self.vm, doing, self.deadline_s, command,
                          "it answered the sync" if self.synced else "") from exc
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise _silent(self.vm, doing, self.deadline_s, command, f"the channel closed: {exc}") from exc

    async def _send(self, obj: dict[str, Any], prefix: bytes = b"") -> None:
        self.writer.write(prefix + json.dumps(obj).encode() + b"\n")
        await self._within(self.writer.drain(), f"{obj['execute']} (write)", obj["execute"])

    async def _skip_to_delimiter(self, command: str) -> None:
        """Discard everything up to and including the next 0xFF (junk of any length)."""
        while True:
            try:
                await self._within(self.reader.readuntil(DELIMITER), "guest-sync-delimited", command)
                return
            except asyncio.LimitOverrunError as exc:     # more junk than the buffer: drop it and go on
                await self._within(self.reader.readexactly(exc.consumed), "guest-sync-delimited", command)

    async def sync(self) -> int:
        """``guest-sync-delimited`` with a random id; returns the id once the agent echoed it."""
        sync_id = secrets.randbelow(2 ** 31 - 1) + 1
        await self._send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}, prefix=DELIMITER)
        while True:
            await self._skip_to_delimiter("guest-sync-delimited")
            line = await self._within(self.reader.readline(), "guest-sync-delimited", "guest-sync-delimited")
            if not line:
                raise _silent(self.vm, "guest-sync-delimited", self.deadline_s, "guest-sync-delimited",
                              "the channel closed")
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if isinstance(reply, dict) and reply.get("return") == sync_id:
                self.synced = True
                return sync_id          # else: the reply to an earlier sync; keep reading

    async def _reply(self, command: str) -> dict[str, Any] | None:
        """The next JSON object on the channel (None: the channel closed)."""
        while True:
            line = await self._within(self.reader.readline(), command, command)
            if not line:
                return None
            if not line.strip():
                continue
            try:
                reply = json.loads(line)
            except ValueError:
                continue                # a line of junk (never seen after a sync; tolerated)
            if isinstance(reply, dict):
                return reply

    async def execute(self, command: str, args: dict[str, Any] | None = None, reply: bool = True) -> Any:
        """Run one command; its ``return`` value. ``reply=False``: a command that answers only on error
        (``guest-shutdown``): an error within a short wait is raised, silence or a closed channel is success."""
        if not self.synced:
            await self.sync()
        await self._send({"execute": command, **({"arguments": args} if args else {})})
        if not reply:
            wait = min(NO_REPLY_WAIT_S, max(self.remaining(), 0.0))
            try:
                answer = await asyncio.wait_for(self._reply(command), timeout=wait)
            except (asyncio.TimeoutError, GuestAgentSilent):
                return None
            if answer is not None and "error" in answer:
                raise self._error(command, answer["error"])
            return None
        answer = await self._reply(command)
        if answer is None:
            raise _silent(self.vm, command, self.deadline_s, command, "the channel closed")
        if "error" in answer:
            raise self._error(command, answer["error"])
        return answer.get("return")

    def _error(self, command: str, err: Any) -> GuestAgentError:
        err = err if isinstance(err, dict) else {"desc": str(err)}
        desc, cls = str(err.get("desc", "unknown error")), str(err.get("class", "GenericError"))
        return GuestAgentError(f"the guest agent of VM {self.vm} refused {command}: {desc}",
                               remedy="see the guest agent's message; its log in the guest: "
                                      "journalctl -u qemu-guest-agent",
                               details={"vm": self.vm, "command": command, "error_class": cls, "desc": desc})

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), timeout=1.0)
        except (asyncio.TimeoutError, OSError, ConnectionError):
            pass


async def _acquire(lock: asyncio.Lock, timeout_s: float) -> bool:
    """The lock within ``timeout_s``; never left held by a waiter that gave up (or was cancelled) just as it got
    it."""
    waiter = asyncio.ensure_future(lock.acquire())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=max(timeout_s, 0.001))
    except asyncio.CancelledError:
        waiter.cancel()
        waiter.add_done_callback(lambda w: lock.release() if not w.cancelled() and w.exception() is None else None)
        raise
    if done:
        return True
    waiter.cancel()
    try:
        await waiter
    except asyncio.CancelledError:
        return False
    lock.release()          # it got the lock as it was being cancelled
    return False


class GuestAgent:
    """The guest agent of one VM: one session at a time, each with its deadline."""

    def __init__(self, vm: str, socket_path: str) -> None:
        self.vm = vm
        self.socket_path = socket_path
        self.lock = asyncio.Lock()
        self.last_answer_at: float | None = None     # wall clock of the last session that synced

    @asynccontextmanager
    async def session(self, deadline_s: float = DEFAULT_DEADLINE_S) -> AsyncIterator[Session]:
        """A synced session; the deadline covers waiting for the lock, connecting, the sync and every command."""
        end = time.monotonic() + deadline_s
        if not await _acquire(self.lock, deadline_s):
            raise GuestAgentSilent(f"the guest agent of VM {self.vm} is busy with another call for longer than "
                                   f"{deadline_s:.1f}s", remedy="retry shortly",
                                   details={"vm": self.vm, "deadline_s": deadline_s, "busy": True})
        try:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.socket_path, limit=MAX_REPLY_BYTES),
                    timeout=max(end - time.monotonic(), 0.001))
            except (OSError, asyncio.TimeoutError) as exc:
                raise GuestAgentSilent(
                    f"the guest agent channel of VM {self.vm} cannot be opened ({type(exc).__name__}: {exc})",
                    remedy="check that the VM runs on this host; " + SILENT_REMEDY,
                    details={"vm": self.vm, "socket": self.socket_path, "deadline_s": deadline_s}) from exc
            s = Session(self.vm, reader, writer, end, deadline_s)
            try:
                await s.sync()
                self.last_answer_at = time.time()
                yield s
            finally:
                await s.close()
        finally:
            self.lock.release()

    async def execute(self, command: str, args: dict[str, Any] | None = None,
                      deadline_s: float = DEFAULT_DEADLINE_S, reply: bool = True) -> Any:
        """One command in its own session."""
        async with self.session(deadline_s) as s:
            return await s.execute(command, args, reply=reply)

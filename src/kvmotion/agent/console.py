"""The agent's half of a remote console: one websocket (signed by the controller) to one VM console socket.

The socket is QEMU's, in the VM's run directory: checked with ``lstat`` (a socket, never a symlink followed).
The serial console takes one client at a time (QEMU's socket chardev serves one): a second session is refused
with ``ConsoleBusy`` rather than left hanging. When the controller follows a VM that just moved here it asks for
``replay``: what the guest printed here before the relay attached is sent first, from serial.log, so nothing is
lost across the move.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from starlette.websockets import WebSocket, WebSocketDisconnect

from kvmotion.common.errors import ConsoleBusy, ConsoleUnavailable, DeadlineExceeded
from kvmotion.models.console import ConsoleKind

CHUNK = 64 * 1024
CONNECT_DEADLINE_S = 5.0
SEND_DEADLINE_S = 10.0          # a client that reads nothing for this long is dropped (bounded buffering)
MAX_REPLAY = 4 * 1024 * 1024    # a follow replays at most the newest 4 MiB of the destination's log


def checked_socket(path: Path, vm: str, kind: ConsoleKind) -> Path:
    """``path`` if it is a unix socket itself (a symlink is refused, never followed)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConsoleUnavailable(f"VM {vm} has no {kind} console socket on this host",
                                 remedy="restart the VM with this kvmotion version (its QEMU predates consoles)",
                                 details={"vm": vm, "kind": str(kind)}, cause=exc) from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise ConsoleUnavailable(f"{path.name} of VM {vm} is not a unix socket", remedy="restart the VM",
                                 details={"vm": vm, "kind": str(kind)})
    return path


@dataclass
class ConsoleSessions:
    """Which VMs have a serial session open on this agent (QEMU serves one client per chardev), and one lock per VM
    for VNC tickets (one one-time password at a time)."""
    serial: set[str] = field(default_factory=set)
    vnc_locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def vnc_lock(self, uuid: str) -> asyncio.Lock:
        if len(self.vnc_locks) >= 256:                     # bounded: drop the idle ones
            for idle in [u for u, lk in self.vnc_locks.items() if not lk.locked()]:
                del self.vnc_locks[idle]
        return self.vnc_locks.setdefault(uuid, asyncio.Lock())

    @contextlib.contextmanager
    def hold(self, uuid: str, kind: ConsoleKind):  # type: ignore[no-untyped-def]
        if kind is ConsoleKind.SERIAL:
            if uuid in self.serial:
                raise ConsoleBusy(f"a serial console session is already open on VM {uuid}",
                                  remedy="close the other session first (one serial client at a time, as virsh)",
                                  details={"vm": uuid, "kind": str(kind)})
            self.serial.add(uuid)
        try:
            yield
        finally:
            if kind is ConsoleKind.SERIAL:
                self.serial.discard(uuid)


async def open_socket(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=CHUNK), CONNECT_DEADLINE_S)
    except asyncio.TimeoutError as exc:
        raise DeadlineExceeded(f"the console socket {path.name} did not accept within {CONNECT_DEADLINE_S:.0f} s",
                               remedy="check the VM's QEMU on this host") from exc
    except OSError as exc:
        raise ConsoleUnavailable(f"the console socket {path.name} refused the connection: {exc.strerror}",
                                 remedy="check that the VM runs on this host") from exc


def log_backlog(log: Path, size: int) -> bytes:
    """The first ``size`` bytes of the log (at most the newest MAX_REPLAY of them); a regular file only."""
    if size <= 0:
        return b""
    fd = os.open(log, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        start = max(0, size - MAX_REPLAY)
        fh.seek(start)
        return fh.read(size - start)


def log_size(log: Path) -> int:
    try:
        st = os.lstat(log)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


async def relay(ws: WebSocket, sock: Path, log: Path | None) -> None:
    """Pump bytes both ways until either side closes; with ``log``, send its content first (replay)."""
    before = log_size(log) if log is not None else 0
    reader, writer = await open_socket(sock)
    try:
        after = log_size(log) if log is not None else 0
        await ws.accept()
        backlog = await asyncio.to_thread(log_backlog, log, before) if log is not None else b""
        await ws.send_text(json.dumps({"event": "attached", "replayed_bytes": len(backlog),
                                       "uncertain_bytes": max(0, after - before)}))
        if backlog:
            await asyncio.wait_for(ws.send_bytes(backlog), SEND_DEADLINE_S)
        await pump(ws, reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2)


async def pump(ws: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def down() -> None:
        while data := await reader.read(CHUNK):
            await asyncio.wait_for(ws.send_bytes(data), SEND_DEADLINE_S)

    async def up() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("bytes") or (msg.get("text") or "").encode()
            writer.write(data)
            await asyncio.wait_for(writer.drain(), SEND_DEADLINE_S)

    tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            exc = t.exception()
            if exc is not None and not isinstance(exc, (WebSocketDisconnect, ConnectionError, asyncio.TimeoutError)):
                raise exc
    finally:       # asyncio.wait, not gather: a cancelled caller must see its own cancellation (anyio scopes)
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=2)

"""`kvmotion vm console NAME`: the VM's serial console through the controller (Ctrl-] quits, as virsh console)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import termios
import tty
from typing import Any, Optional

import typer
from websockets.exceptions import ConnectionClosed

from kvmotion.cli.consoleclient import ESCAPE, Received, end_session, open_console, read_console
from kvmotion.cli.output import URL, run
from kvmotion.common.errors import InvalidInputError


def describe(event: dict[str, Any]) -> str | None:
    """An event of the controller as one line for the user (None: not worth a line)."""
    kind = event.get("event")
    if kind == "attached":
        return f"connected to {event.get('vm')} on {event.get('host')} (session {event.get('session')})"
    if kind == "moved":
        return (f"the VM moved {event['from_host']} -> {event['to_host']}: console gap {event['gap_ms']:.0f} ms "
                f"(reconnect {event.get('reconnect_ms', 0):.0f} ms), {event.get('replayed_bytes', 0)} bytes replayed "
                f"from the destination's log")
    if kind == "error":
        return f"error: {event.get('error', {}).get('message')}"
    if kind == "end":
        s = event.get("session", {})
        return f"session ended: {s.get('end_reason')}; hosts {' -> '.join(s.get('hosts', []))}"
    return None


def _note(event: dict[str, Any], raw: bool) -> None:
    line = describe(event)
    if line:
        sys.stderr.write(f"[kvmotion] {line}" + ("\r\n" if raw else "\n"))
        sys.stderr.flush()


async def read_only(vm: str, url: Optional[str], lines: Optional[int], timeout_s: float) -> Received:
    conn = await open_console(vm, "serial", url)

    def enough(got: Received) -> bool:
        return lines is not None and len(got.lines()) >= lines

    def out(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return await read_console(conn, enough, timeout_s, on_bytes=out, on_event=lambda e: _note(e, False))


async def interactive(vm: str, url: Optional[str]) -> None:
    """Raw terminal both ways until Ctrl-] or the end of the session."""
    conn = await open_console(vm, "serial", url)
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop.add_reader(fd, lambda: keys.put_nowait(os.read(fd, 1024)) if not keys.full() else None)
    sys.stderr.write(f"[kvmotion] console of {vm}; escape character is ^]\n")
    tty.setraw(fd)
    if sys.stdout.isatty():       # keys go raw to the guest; its bare LF still starts a new line on screen
        attrs = termios.tcgetattr(sys.stdout.fileno())
        attrs[1] |= termios.OPOST | termios.ONLCR
        termios.tcsetattr(sys.stdout.fileno(), termios.TCSANOW, attrs)
    try:
        async def typing() -> None:
            while True:
                data = await keys.get()
                if ESCAPE in data:
                    if data.split(ESCAPE, 1)[0]:
                        await asyncio.wait_for(conn.send(data.split(ESCAPE, 1)[0]), 10)
                    return
                await asyncio.wait_for(conn.send(data), 10)

        async def showing() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for msg in conn:
                    if isinstance(msg, str):
                        _note(json.loads(msg), True)
                    else:
                        sys.stdout.buffer.write(msg)
                        sys.stdout.buffer.flush()
        tasks = [asyncio.create_task(typing()), asyncio.create_task(showing())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for event in await end_session(conn):
            _note(event, True)
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sys.stderr.write("\n")


def console(name: str = typer.Argument(..., help="the VM"),
            read_only_: bool = typer.Option(False, "--read-only", help="print what arrives, send nothing"),
            lines: Optional[int] = typer.Option(None, "--lines", min=1, help="read-only: stop after N lines"),
            timeout_s: float = typer.Option(3600.0, "--timeout", min=0.1, help="read-only: stop after this long"),
            url: Optional[str] = URL) -> None:
    """The VM's serial console through the controller; it follows the VM when it moves (operator role)."""
    def go() -> None:
        if read_only_ or lines is not None or not sys.stdin.isatty():
            asyncio.run(read_only(name, url, lines, timeout_s))
            return
        if not sys.stdout.isatty():
            raise InvalidInputError("an interactive console needs a terminal", remedy="use --read-only")
        asyncio.run(interactive(name, url))
    run(go)

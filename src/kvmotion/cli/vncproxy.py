"""`kvmotion vm vnc NAME`: the VM's graphical console for a desktop VNC viewer, as ``virtctl vnc --proxy-only``.

A TCP listener on the loopback only (never the network); each viewer that connects gets its own session through
the controller's websocket (operator role, audited), which follows the VM when it moves. The viewer sees RFB with
no VNC password: the token authenticated the session, and only this machine can reach the port.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from typing import Optional

import typer
from websockets.exceptions import ConnectionClosed

from kvmotion.cli.consoleclient import open_console
from kvmotion.cli.output import URL, console, err_console, run
from kvmotion.common.errors import InvalidInputError

CHUNK = 64 * 1024


def loopback(listen: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` on a loopback address; anything else is refused (the port carries an open console)."""
    address, _, port = listen.rpartition(":")
    address = address.strip("[]") or "127.0.0.1"
    try:
        ok = ipaddress.ip_address(address).is_loopback and 0 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise InvalidInputError(f"--listen {listen!r} is not a loopback ADDRESS:PORT",
                                remedy="use e.g. 127.0.0.1:5900; the viewer port must never be open on the network")
    return address, int(port)


async def bridge(vm: str, url: Optional[str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One viewer's TCP connection to one console session, until either side closes."""
    try:
        conn = await open_console(vm, "vnc", url)
    except Exception as exc:  # noqa: BLE001 - the viewer gets a closed socket, the user the reason
        err_console.print(f"[red]error:[/] {getattr(exc, 'message', exc)}")
        writer.close()
        return

    async def up() -> None:
        while data := await reader.read(CHUNK):
            await asyncio.wait_for(conn.send(data), 10)

    async def down() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for msg in conn:
                if isinstance(msg, bytes):
                    writer.write(msg)
                    await asyncio.wait_for(writer.drain(), 10)
    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        t.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.send(json.dumps({"op": "end"})), 2)
        await asyncio.wait_for(conn.close(), 2)
    writer.close()


async def serve(vm: str, url: Optional[str], address: str, port: int, once: bool) -> None:
    done = asyncio.Event()

    async def viewer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await bridge(vm, url, reader, writer)
        if once:
            done.set()
    server = await asyncio.start_server(viewer, address, port)
    bound = server.sockets[0].getsockname()
    console.print(f"VNC console of {vm} on {bound[0]}:{bound[1]}: point a viewer at it "
                  f"(vncviewer {bound[0]}::{bound[1]}); Ctrl-C ends")
    async with server:
        if once:
            await done.wait()
        else:
            await server.serve_forever()


def vnc(name: str = typer.Argument(..., help="the VM"),
        listen: str = typer.Option("127.0.0.1:5900", "--listen", help="loopback ADDRESS:PORT for the viewer"),
        once: bool = typer.Option(False, "--once", help="end after the first viewer disconnects"),
        url: Optional[str] = URL) -> None:
    """The VM's graphical console on a local port for a VNC viewer; it follows the VM when it moves (operator)."""
    def go() -> None:
        address, port = loopback(listen)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(name, url, address, port, once))
    run(go)

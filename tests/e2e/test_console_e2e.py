"""End to end, in the lab: the serial console through the controller follows its VM across a vMotion (the guest's
heartbeat counter carries on, same boot, nothing lost); a VNC session carries on too (QEMU's own server asks for
a one-time password; the screen after the move is the screen before it); roles."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvmotion.cli.client import Client
from kvmotion.cli.consoleclient import Received, open_console, read_console
from kvmotion.common import rfb
from kvmotion.common.errors import KvmotionError
from kvmotion_lab import scenario
from labtools import assert_guest_survived, cli, http_beat, record_figure, remove_vm, running_vm

BEAT = re.compile(r"KVMOTION-HEARTBEAT seq=(\d+) uptime=\S+ boot_id=(\S+)")
PRINT_EVERY = 10          # the guest prints a heartbeat line every 10 ticks (guest_init.HEARTBEAT_PRINT_EVERY)


def beats(got: Received) -> list[tuple[float, int, str]]:
    """(arrival time, seq, boot id) of every heartbeat line the console client received."""
    out = []
    for t, line in got.lines():
        m = BEAT.search(line)
        if m:
            out.append((t, int(m.group(1)), m.group(2)))
    return out


async def watch_move(url: str, vm: str, move: Any) -> tuple[Received, dict[str, Any]]:
    """Read the console while ``move`` (blocking) runs in a thread, then a few heartbeats more; end the session."""
    conn = await open_console(vm, "serial", url)
    first = await read_console_until(conn, lambda got: len(beats(got)) >= 2, 60)
    task = asyncio.create_task(asyncio.to_thread(move))
    moved_at: list[float] = []

    def settled(got: Received) -> bool:
        if task.done() and not moved_at:
            moved_at.append(time.time())
        return bool(moved_at) and sum(1 for t, _, _ in beats(got) if t > moved_at[0]) >= 3
    rest = await read_console(conn, settled, 240)
    result = await task
    return Received(first.chunks + rest.chunks, first.events + rest.events, rest.close_code), result


async def read_console_until(conn: Any, until: Any, deadline_s: float) -> Received:
    """Like read_console, but the session stays open afterwards."""
    got = Received()
    end = time.monotonic() + deadline_s
    while not until(got) and time.monotonic() < end:
        msg = await asyncio.wait_for(conn.recv(), end - time.monotonic())
        if isinstance(msg, str):
            got.events.append(json.loads(msg))
        else:
            got.chunks.append((time.time(), msg))
    return got


def test_serial_console_follows_a_vmotion(lab) -> None:
    client = Client(lab.controller_url)
    running_vm(client, lab, "con1")
    before = http_beat(lab, client, "con1")
    assert client.vm("con1")["host"] == "h1"

    # the CLI's read-only mode prints what arrives
    r = cli(lab, "vm", "console", "con1", "--read-only", "--lines", "2", "--timeout", "30")
    assert r.returncode == 0, r.stderr
    assert "KVMOTION-HEARTBEAT" in r.stdout and "connected to con1 on h1" in r.stderr

    def move() -> dict[str, Any]:
        task = client.migrate("con1", "h2")
        return scenario.follow_task(client, task["id"], 300)
    got, task = asyncio.run(watch_move(lab.controller_url, "con1", move))
    assert task["state"] == "success", task.get("error")
    assert client.vm("con1")["host"] == "h2"
    assert_guest_survived(lab, client, "con1", before)

    seen = beats(got)
    assert len({b for _, _, b in seen}) == 1 and seen[0][2] == before["boot_id"], "the guest rebooted"
    seqs = [s for _, s, _ in seen]
    moved = got.event("moved")
    assert len(moved) == 1 and (moved[0]["from_host"], moved[0]["to_host"]) == ("h1", "h2"), got.events
    uncertain = moved[0]["uncertain_bytes"]
    steps = [b - a for a, b in zip(seqs, seqs[1:])]
    assert all(s > 0 or (s == 0 and uncertain) for s in steps), f"the counter went back: {seqs}"
    missing = sum(max(0, s // PRINT_EVERY - 1) for s in steps)
    arrival_gaps = [b[0] - a[0] for a, b in zip(seen, seen[1:])]
    end = [e for e in got.events if e.get("event") == "end"]
    assert end and end[-1]["session"]["hosts"] == ["h1", "h2"], got.events
    gap_ms = moved[0]["gap_ms"]
    record_figure("console gap h1->h2 (last source byte to first destination byte)", gap_ms, "ms")
    record_figure("console reconnect h1->h2 (source console closed to destination attached)",
                  moved[0]["reconnect_ms"], "ms")
    record_figure("console heartbeat lines missing across the move", missing, "lines")
    record_figure("console replayed bytes from the destination's log", moved[0]["replayed_bytes"], "bytes")
    record_figure("longest interval between heartbeat lines seen by the console client", max(arrival_gaps) * 1000,
                  "ms")
    print(f"console gap {gap_ms} ms (reconnect {moved[0]['reconnect_ms']} ms), replayed {moved[0]['replayed_bytes']} bytes, missing lines {missing}, "
          f"longest heartbeat interval {max(arrival_gaps) * 1000:.0f} ms, seqs {seqs}")
    assert missing == 0, f"heartbeat lines were lost across the move: {seqs}"
    assert any(s > seqs[0] for s in seqs[-3:])
    audit = [a for a in client.audit(200) if a["method"] == "CONSOLE"]
    assert any(" end " in a["path"] and "h1->h2:" in a["path"] for a in audit), audit


PF32 = bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])


class Viewer:
    """A VNC client through the controller, as noVNC is: RFB 3.8, raw and CopyRect (ZRLE offered too: the relay
    keeps it from the server), a framebuffer, and an incremental update request after each update."""

    def __init__(self, conn: Any) -> None:
        self.conn, self.buf = conn, bytearray()
        self.framer = rfb.Framer(lambda: rfb.server_grammar(rfb.PixelState(4)))
        self.width = self.height = 0
        self.fb = bytearray()
        self.updates: list[float] = []

    async def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += await asyncio.wait_for(self.conn.recv(), 30)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def start(self) -> rfb.ServerInit:
        assert await self.read(12) == rfb.VERSION
        await self.conn.send(rfb.VERSION)
        types = await self.read((await self.read(1))[0])
        assert types == bytes([rfb.SEC_NONE]), types                # the relay's own: the token authenticated us
        await self.conn.send(bytes([rfb.SEC_NONE]))
        assert await self.read(4) == bytes(4)
        await self.conn.send(b"\x01")
        head = await self.read(24)
        init = rfb.ServerInit.parse(head + await self.read(struct.unpack(">I", head[20:24])[0]))
        self.width, self.height = init.width, init.height
        self.fb = bytearray(init.width * init.height * 4)
        await self.conn.send(bytes(4) + PF32)
        await self.conn.send(rfb.set_encodings([16, rfb.COPYRECT, rfb.RAW, rfb.DESKTOP_SIZE]))
        await self.conn.send(rfb.update_request(False, self.width, self.height))
        return init

    async def next_update(self, deadline_s: float) -> None:
        """Wait for one FramebufferUpdate, apply it, ask for the next (incremental)."""
        end = time.monotonic() + deadline_s
        while True:
            for m in self.framer.feed(bytes(self.buf)):
                self.buf.clear()
                if m[0] == 0:
                    self.apply(m)
                    self.updates.append(time.time())
                    await self.conn.send(rfb.update_request(True, self.width, self.height))
                    return
            self.buf.clear()
            self.buf += await asyncio.wait_for(self.conn.recv(), max(0.01, end - time.monotonic()))

    def apply(self, m: bytes) -> None:
        pos = 4
        for _ in range(struct.unpack(">H", m[2:4])[0]):
            x, y, w, h, enc = struct.unpack(">HHHHi", m[pos:pos + 12])
            pos += 12
            if enc == rfb.RAW:
                for row in range(h):
                    at = ((y + row) * self.width + x) * 4
                    self.fb[at:at + w * 4] = m[pos + row * w * 4:pos + (row + 1) * w * 4]
                pos += w * h * 4
            elif enc == rfb.COPYRECT:
                sx, sy = struct.unpack(">HH", m[pos:pos + 4])
                rows = [self.fb[((sy + r) * self.width + sx) * 4:((sy + r) * self.width + sx + w) * 4]
                        for r in range(h)]
                for r, data in enumerate(rows):
                    at = ((y + r) * self.width + x) * 4
                    self.fb[at:at + w * 4] = data
                pos += 4
            else:
                assert enc == rfb.DESKTOP_SIZE, enc                 # never ZRLE: the relay filtered it
                self.width, self.height, self.fb = w, h, bytearray(w * h * 4)


def differing_pixels(a: bytes, b: bytes) -> int:
    return sum(1 for i in range(0, min(len(a), len(b)), 4) if a[i:i + 3] != b[i:i + 3])


async def vnc_across_a_move(url: str, vm: str, move: Any) -> tuple[Viewer, bytes, float, dict[str, Any]]:
    """A viewer with the whole screen, a move while it keeps asking for updates, then the whole screen again."""
    conn = await open_console(vm, "vnc", url)
    view = Viewer(conn)
    await view.start()
    await view.next_update(30)
    before = bytes(view.fb)
    task = asyncio.create_task(asyncio.to_thread(move))
    while not task.done():
        with contextlib.suppress(asyncio.TimeoutError):
            await view.next_update(0.5)
    moved_at = time.time()
    result = await task
    while not view.updates or view.updates[-1] < moved_at:        # the destination's whole screen
        await view.next_update(30)
    await conn.send(json.dumps({"op": "end"}))
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.wait_closed(), 10)
    return view, before, moved_at, result


def test_vnc_needs_its_ticket_and_its_session_follows_a_vmotion(lab) -> None:
    client = Client(lab.controller_url)
    if "con1" not in {v["name"] for v in client.vms()}:
        running_vm(client, lab, "con1")
    vm = client.vm("con1")
    host = vm["host"]
    other = "h1" if host == "h2" else "h2"

    # QEMU's VNC server itself asks for a password no one was given
    sock = Path(lab.root) / "hosts" / host / "vms" / vm["uuid"] / "vnc.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        assert s.recv(12) == rfb.VERSION
        s.sendall(rfb.VERSION)
        assert s.recv(2) == bytes([1, rfb.SEC_VNC])                 # VNC authentication only, never None
        s.sendall(bytes([rfb.SEC_VNC]))
        s.sendall(rfb.vnc_auth_response(s.recv(16), "guessed1"))
        assert s.recv(4) == struct.pack(">I", 1)                    # refused

    def move() -> dict[str, Any]:
        return scenario.follow_task(client, client.migrate("con1", other)["id"], 300)
    view, before, moved_at, task = asyncio.run(vnc_across_a_move(lab.controller_url, "con1", move))
    assert task["state"] == "success", task.get("error")
    assert client.vm("con1")["host"] == other
    lit = sum(1 for i in range(0, len(before), 4) if before[i:i + 3] != b"\x00\x00\x00")
    assert lit > 100, "the screen before the move is blank: nothing to compare"
    changed = differing_pixels(before, bytes(view.fb))
    record_figure("VNC pixels different after the move (of the whole screen)", changed, "pixels")
    assert changed < view.width * view.height // 100, "the screen after the move is not the screen before it"

    ends = [a for a in client.audit(200) if a["method"] == "CONSOLE" and "/console/vnc end" in a["path"]]
    m = re.search(rf"{host}->{other}:(\d+)ms\(reconnect (\d+)ms\)", ends[-1]["path"]) if ends else None
    assert m and ends[-1]["status"] == 1000, ends
    gap_ms, reconnect_ms = int(m.group(1)), int(m.group(2))
    record_figure(f"VNC screen frozen {host}->{other} (source closed to the destination's first frame)", gap_ms, "ms")
    record_figure(f"VNC reconnect {host}->{other} (source closed to the destination attached)", reconnect_ms, "ms")
    print(f"VNC: gap {gap_ms} ms, reconnect {reconnect_ms} ms, {changed} of {lit} lit pixels changed, "
          f"{len(view.updates)} updates, screen {view.width}x{view.height}")

    # a desktop viewer through `kvmotion vm vnc` (loopback port, one viewer, then it ends)
    proc = subprocess.Popen([sys.executable, "-m", "kvmotion.cli.main", "vm", "vnc", "con1", "--listen",
                             "127.0.0.1:0", "--once"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, KVMOTION_URL=lab.controller_url, COLUMNS="250"))
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))    # type: ignore[union-attr]
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            assert s.recv(12) == rfb.VERSION
            s.sendall(rfb.VERSION)
            assert s.recv(2) == bytes([1, rfb.SEC_NONE])
            s.sendall(bytes([rfb.SEC_NONE]))
            assert s.recv(4) == bytes(4)
            s.sendall(b"\x01")
            head = b""
            while len(head) < 24:
                head += s.recv(24 - len(head))
            assert struct.unpack(">HH", head[:4]) == (view.width, view.height)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    viewer = client.create_token("console-viewer", "viewer")["token"]
    for kind in ("serial", "vnc"):
        with pytest.raises(KvmotionError) as exc:
            asyncio.run(open_console("con1", kind, lab.controller_url, token=viewer))
        assert exc.value.code == "FORBIDDEN"
    refused = [a for a in client.audit(200) if a["method"] == "CONSOLE" and a["who"] == "console-viewer"]
    assert refused and all(a["status"] == 403 for a in refused)
    remove_vm(client, "con1")

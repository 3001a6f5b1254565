"""End to end, in the lab: the serial console through the controller follows its VM across a vMotion (the guest's
heartbeat counter carries on, same boot, nothing lost), VNC's RFB banner before and after the move, roles."""
from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest

from kvmotion.cli.client import Client
from kvmotion.cli.consoleclient import Received, open_console, read_console
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


async def rfb_banner(url: str, vm: str) -> bytes:
    conn = await open_console(vm, "vnc", url)
    try:
        return await asyncio.wait_for(conn.recv(), 20)
    finally:
        await conn.close()


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


def test_vnc_banner_before_and_after_a_move_and_roles(lab) -> None:
    client = Client(lab.controller_url)
    if "con1" not in {v["name"] for v in client.vms()}:
        running_vm(client, lab, "con1")
    host = client.vm("con1")["host"]
    assert asyncio.run(rfb_banner(lab.controller_url, "con1")).startswith(b"RFB 003.008")
    other = "h1" if host == "h2" else "h2"
    task = scenario.follow_task(client, client.migrate("con1", other)["id"], 300)
    assert task["state"] == "success", task.get("error")
    assert asyncio.run(rfb_banner(lab.controller_url, "con1")).startswith(b"RFB 003.008")

    viewer = client.create_token("console-viewer", "viewer")["token"]
    with pytest.raises(KvmotionError) as exc:
        asyncio.run(open_console("con1", "serial", lab.controller_url, token=viewer))
    assert exc.value.code == "FORBIDDEN"
    with pytest.raises(KvmotionError) as exc:
        asyncio.run(open_console("con1", "vnc", lab.controller_url, token=viewer))
    assert exc.value.code == "FORBIDDEN"
    refused = [a for a in client.audit(200) if a["method"] == "CONSOLE" and a["who"] == "console-viewer"]
    assert refused and all(a["status"] == 403 for a in refused)
    remove_vm(client, "con1")



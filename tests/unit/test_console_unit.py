"""Consoles without the lab: the agent's signed websocket to a fake console socket, and the controller's relay
(roles, audit, following a VM that moves, VNC following it whole message by whole message) with fake agent links."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from kvmotion.agent.api import create_app as agent_app
from kvmotion.common import hostauth, rfb
from kvmotion.controller import auth
from kvmotion.controller.api import create_app
from kvmotion.controller.db import VM, Host
from kvmotion.controller.service import Controller
from kvmotion.models.console import CLOSE_ENDED, CLOSE_MOVED, SOCKET_NAME, ConsoleKind

SECRET = "ab" * 32
UUID = "6b1f3c0e-9f5a-4d4e-8a55-0123456789ab"


# -- the agent's half -------------------------------------------------------------------------------
class EchoConsole:
    """A unix socket like QEMU's chardev: says hello, then echoes."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(10)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            conn.sendall(b"hello\n")
            while data := conn.recv(1024):
                conn.sendall(data)


class FakeAgent:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def console_socket(self, uuid: str, kind: ConsoleKind) -> Path:
        return self.run_dir / SOCKET_NAME[kind]


@pytest.fixture()
def agent(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    run_dir = tmp_path / "r"            # short: a unix socket path has at most 107 bytes
    run_dir.mkdir()
    app = agent_app(FakeAgent(run_dir), SECRET)      # type: ignore[arg-type]
    yield TestClient(app), run_dir


def signed(path: str, secret: str = SECRET) -> dict[str, str]:
    return {hostauth.HEADER: hostauth.sign(secret, "GET", path, b"")}


def test_agent_refuses_an_unsigned_or_wrongly_signed_console(agent: tuple[TestClient, Path]) -> None:
    client, run_dir = agent
    EchoConsole(run_dir / "serial.sock")
    path = f"/v1/vms/{UUID}/console/serial"
    for headers in ({}, signed(path, "cd" * 32), signed(f"/v1/vms/{UUID}/console/vnc")):
        with pytest.raises(WebSocketDenialResponse) as exc:
            with client.websocket_connect(path, headers=headers):
                pass
        assert exc.value.status_code == 401
        assert exc.value.json()["error"]["code"] == "UNAUTHORIZED"


def test_agent_relays_a_signed_console_both_ways_and_refuses_a_replay(agent: tuple[TestClient, Path]) -> None:
    client, run_dir = agent
    EchoConsole(run_dir / "serial.sock")
    path = f"/v1/vms/{UUID}/console/serial"
    headers = signed(path)
    with client.websocket_connect(path, headers=headers) as ws:
        assert ws.receive_json() == {"event": "attached", "replayed_bytes": 0, "uncertain_bytes": 0}
        assert ws.receive_bytes() == b"hello\n"
        ws.send_bytes(b"typed")
        assert ws.receive_bytes() == b"typed"
    with pytest.raises(WebSocketDenialResponse) as exc:        # the same signed handshake again: a replay
        with client.websocket_connect(path, headers=headers):
            pass
    assert exc.value.status_code == 401


def test_agent_replays_the_log_when_asked(agent: tuple[TestClient, Path]) -> None:
    client, run_dir = agent
    EchoConsole(run_dir / "serial.sock")
    (run_dir / "serial.log").write_bytes(b"KVMOTION-HEARTBEAT seq=10\n")
    path = f"/v1/vms/{UUID}/console/serial?replay=true"
    with client.websocket_connect(path, headers=signed(path)) as ws:
        assert ws.receive_json()["replayed_bytes"] == 26
        assert ws.receive_bytes() == b"KVMOTION-HEARTBEAT seq=10\n"
        assert ws.receive_bytes() == b"hello\n"


def test_agent_refuses_a_second_serial_session_and_a_symlinked_socket(agent: tuple[TestClient, Path],
                                                                       tmp_path: Path) -> None:
    client, run_dir = agent
    EchoConsole(run_dir / "serial.sock")
    path = f"/v1/vms/{UUID}/console/serial"
    with client.websocket_connect(path, headers=signed(path)) as ws:
        ws.receive_json()
        with pytest.raises(WebSocketDenialResponse) as exc:
            with client.websocket_connect(path, headers=signed(path)):
                pass
        assert exc.value.status_code == 409 and "already open" in exc.value.json()["error"]["message"]
    EchoConsole(tmp_path / "elsewhere.sock")
    os.symlink(tmp_path / "elsewhere.sock", run_dir / "vnc.sock")
    vnc = f"/v1/vms/{UUID}/console/vnc"
    with pytest.raises(WebSocketDenialResponse) as exc:
        with client.websocket_connect(vnc, headers=signed(vnc)):
            pass
    assert exc.value.status_code == 409 and exc.value.json()["error"]["code"] == "CONFLICT"


# -- the controller's half ------------------------------------------------------------------------
class FakeLink:
    """An agent's console: ``items`` to deliver, then closed (``then`` runs as it closes) or kept open."""

    def __init__(self, host: str, items: list[Any], keep_open: bool, then: Any = None) -> None:
        self.host, self.items, self.keep_open, self.then = host, list(items), keep_open, then
        self.sent: list[bytes] = []
        self.closed = asyncio.Event()

    async def recv(self) -> Any:
        if self.items:
            await asyncio.sleep(0.01)
            return self.items.pop(0)
        if self.then is not None:
            await self.then()
            self.then = None
        if self.keep_open:
            await self.closed.wait()
        return None

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    async def close(self) -> None:
        self.closed.set()


class Lab:
    def __init__(self, client: TestClient, ctl: Controller, tokens: dict[str, str]) -> None:
        self.client, self.ctl, self.tokens = client, ctl, tokens
        self.links: dict[tuple[str, bool], FakeLink] = {}
        self.opened: list[tuple[str, str, bool]] = []

    async def connect(self, host: str, uuid: str, kind: ConsoleKind, replay: bool) -> FakeLink:
        self.opened.append((host, str(kind), replay))
        return self.links[(host, replay)]

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def move_to(self, host: str, delay_s: float = 0.1, power: str = "poweredOn") -> Any:
        async def change() -> None:
            await asyncio.sleep(delay_s)
            await asyncio.to_thread(self.ctl.inventory.set_vm, UUID, host=host, power_state=power)
        return change


@pytest.fixture()
def lab(tmp_path: Path, db_url: str) -> Iterator[Lab]:
    ctl = Controller(db_url, pki_dir=tmp_path / "pki", token_dir=tmp_path)
    with ctl.sessions.begin() as s:
        for h in ("h1", "h2"):
            s.add(Host(name=h, address="http://127.0.0.1:9"))
        s.add(VM(uuid=UUID, name="web1", host="h1", power_state="poweredOn", spec_json="{}"))
    app = create_app(ctl)
    with TestClient(app) as client:
        admin = (tmp_path / auth.ADMIN_TOKEN_FILE).read_text().strip()
        tokens = {"admin": admin}
        for role in ("viewer", "operator"):
            r = client.post("/api/v1/tokens", json={"name": f"t-{role}", "role": role},
                            headers={"Authorization": f"Bearer {admin}"})
            tokens[role] = r.json()["token"]
        out = Lab(client, ctl, tokens)
        app.state.console_connector = out.connect
        yield out


def console_audit(lab: Lab) -> list[Any]:
    return [a for a in lab.ctl.audit.list(50) if a.method == "CONSOLE"]


def test_console_needs_a_token_and_the_operator_role(lab: Lab) -> None:
    for headers, status in (({}, 401), (lab.headers("viewer"), 403)):
        with pytest.raises(WebSocketDenialResponse) as exc:
            with lab.client.websocket_connect("/api/v1/vms/web1/console/serial", headers=headers):
                pass
        assert exc.value.status_code == status
    assert exc.value.json()["error"]["code"] == "FORBIDDEN"
    assert lab.opened == []                                    # no agent was reached
    refused = console_audit(lab)
    assert [(a.who, a.status) for a in refused] == [("t-viewer", 403), ("-", 401)]
    assert all(a.path.endswith("refused") for a in refused)


def test_unknown_vm_and_kind_are_clear_errors(lab: Lab) -> None:
    for path, status in (("/api/v1/vms/nope/console/serial", 404), ("/api/v1/vms/web1/console/spice", 422)):
        with pytest.raises(WebSocketDenialResponse) as exc:
            with lab.client.websocket_connect(path, headers=lab.headers("operator")):
                pass
        assert exc.value.status_code == status, exc.value.json()


def test_serial_session_follows_the_vm_and_reports_the_gap(lab: Lab) -> None:
    lab.links[("h1", False)] = FakeLink("h1", [b"seq=1\n", b"seq=2\n"], keep_open=False, then=lab.move_to("h2"))
    lab.links[("h2", True)] = FakeLink("h2", [{"event": "attached", "replayed_bytes": 6, "uncertain_bytes": 0},
                                              b"seq=3\n"], keep_open=True)
    with lab.client.websocket_connect("/api/v1/vms/web1/console/serial", headers=lab.headers("operator")) as ws:
        assert ws.receive_json()["host"] == "h1"
        assert ws.receive_bytes() + ws.receive_bytes() == b"seq=1\nseq=2\n"
        ws.send_bytes(b"ls\n")
        moved = ws.receive_json()
        assert (moved["event"], moved["from_host"], moved["to_host"], moved["replayed_bytes"]) == \
            ("moved", "h1", "h2", 6)
        assert moved["gap_ms"] >= 100 and 0 <= moved["reconnect_ms"] <= moved["gap_ms"]
        assert ws.receive_bytes() == b"seq=3\n"
        ws.send_text(json.dumps({"op": "end"}))
        end = ws.receive_json()
        assert ws.receive()["code"] == 1000                   # the audit row is written before the close
    session = end["session"]
    assert session["hosts"] == ["h1", "h2"] and session["who"] == "t-operator" and session["ended_at"]
    assert session["moves"][0]["gap_ms"] == moved["gap_ms"]
    assert session["end_reason"] == "client ended the session"
    assert lab.opened == [("h1", "serial", False), ("h2", "serial", True)]
    assert lab.links[("h1", False)].sent == [b"ls\n"]
    start, finish = sorted(console_audit(lab), key=lambda a: a.at)
    assert start.path.startswith("/api/v1/vms/web1/console/serial start") and start.who == "t-operator"
    assert "hosts=h1,h2" in finish.path and "h1->h2:" in finish.path and finish.status == 1000


def test_session_ends_when_the_vm_powers_off(lab: Lab) -> None:
    lab.links[("h1", False)] = FakeLink("h1", [b"bye\n"], keep_open=False,
                                        then=lab.move_to("h1", 0.0, power="poweredOff"))
    with lab.client.websocket_connect("/api/v1/vms/web1/console/serial", headers=lab.headers("operator")) as ws:
        ws.receive_json()
        assert ws.receive_bytes() == b"bye\n"
        end = ws.receive_json()
        assert "poweredOff" in end["session"]["end_reason"]
        assert ws.receive()["code"] == CLOSE_ENDED


PF32 = bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])


def server_init_event(width: int = 8, height: int = 4) -> dict[str, Any]:
    return {"event": "attached", "server_init": rfb.ServerInit(width, height, PF32, b"QEMU (web1)").encode().hex()}


def raw_update(width: int, height: int, fill: int) -> bytes:
    return struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, width, height, rfb.RAW) + \
        bytes([fill]) * (width * height * 4)


def rfb_client(ws: Any) -> rfb.ServerInit:
    """The user's VNC client: RFB 3.8, security None."""
    assert ws.receive_bytes() == rfb.VERSION                   # RFB only: no text events on a VNC session
    ws.send_bytes(rfb.VERSION)
    assert ws.receive_bytes() == bytes([1, rfb.SEC_NONE])
    ws.send_bytes(bytes([rfb.SEC_NONE]))
    assert ws.receive_bytes() == bytes(4)
    ws.send_bytes(b"\x01")
    return rfb.ServerInit.parse(ws.receive_bytes())


def test_vnc_session_follows_the_vm_whole_messages_only(lab: Lab) -> None:
    """The source leaves half a frame when it goes: the client never sees it; the destination is told the client's
    pixel format and (stateless) encodings and asked for the whole screen; input in between is dropped."""
    frame1 = raw_update(8, 4, 0x11)
    lab.links[("h1", False)] = FakeLink("h1", [server_init_event(), frame1[:50], frame1[50:], frame1[:70]],
                                        keep_open=False, then=lab.move_to("h2"))
    lab.links[("h2", False)] = FakeLink("h2", [server_init_event(), raw_update(8, 4, 0x22)], keep_open=True)
    pixel_format = b"\x00\x00\x00\x00" + PF32
    encodings = rfb.set_encodings([16, 7, rfb.HEXTILE, rfb.RAW, rfb.DESKTOP_SIZE])     # ZRLE and tight: dropped
    with lab.client.websocket_connect("/api/v1/vms/web1/console/vnc", headers=lab.headers("operator"),
                                      subprotocols=["binary"]) as ws:
        assert ws.accepted_subprotocol == "binary"
        init = rfb_client(ws)
        assert (init.width, init.height, init.name) == (8, 4, b"QEMU (web1)")
        ws.send_bytes(pixel_format + encodings[:5])              # split mid-message: the relay frames it
        ws.send_bytes(encodings[5:] + rfb.update_request(False, 8, 4))
        assert ws.receive_bytes() == frame1                      # whole, although it came in two pieces
        ws.send_bytes(struct.pack(">BBxxI", rfb.KEY_EVENT, 1, 0x61))
        assert ws.receive_bytes() == raw_update(8, 4, 0x22)      # from h2: never the 70 bytes h1 left half sent
        ws.send_bytes(rfb.update_request(True, 8, 4))
        ws.send_text(json.dumps({"op": "end"}))
        assert ws.receive()["code"] == 1000                   # the audit row is written before the close
    stateless = rfb.set_encodings([rfb.HEXTILE, rfb.RAW, rfb.DESKTOP_SIZE])
    key = struct.pack(">BBxxI", rfb.KEY_EVENT, 1, 0x61)
    sent1 = lab.links[("h1", False)].sent
    assert sent1[:3] == [pixel_format, stateless, rfb.update_request(False, 8, 4)]
    assert sent1[3:] in ([key], [])                              # the key: to h1 if it was still there
    assert lab.links[("h2", False)].sent[:3] == [pixel_format, stateless, rfb.update_request(False, 8, 4)]
    assert lab.opened == [("h1", "vnc", False), ("h2", "vnc", False)]
    finish = [a for a in console_audit(lab) if " end " in a.path]
    assert finish and "hosts=h1,h2" in finish[0].path and "h1->h2:" in finish[0].path, [a.path for a in console_audit(lab)]


def test_vnc_session_closes_when_the_screen_size_changed_and_the_client_cannot_resize(lab: Lab) -> None:
    lab.links[("h1", False)] = FakeLink("h1", [server_init_event(8, 4)], keep_open=False, then=lab.move_to("h2"))
    lab.links[("h2", False)] = FakeLink("h2", [server_init_event(16, 4)], keep_open=True)
    with lab.client.websocket_connect("/api/v1/vms/web1/console/vnc", headers=lab.headers("operator")) as ws:
        rfb_client(ws)
        ws.send_bytes(rfb.set_encodings([rfb.RAW]))
        msg = ws.receive()
        assert msg["type"] == "websocket.close" and msg["code"] == CLOSE_MOVED and "size" in msg["reason"]


def test_vnc_resize_is_announced_to_a_client_that_takes_it(lab: Lab) -> None:
    lab.links[("h1", False)] = FakeLink("h1", [server_init_event(8, 4)], keep_open=False,
                                        then=lab.move_to("h2", delay_s=0.3))
    lab.links[("h2", False)] = FakeLink("h2", [server_init_event(16, 4)], keep_open=True)
    with lab.client.websocket_connect("/api/v1/vms/web1/console/vnc", headers=lab.headers("operator")) as ws:
        rfb_client(ws)
        ws.send_bytes(rfb.set_encodings([rfb.RAW, rfb.DESKTOP_SIZE]))
        assert ws.receive_bytes() == rfb.desktop_size(16, 4)
    assert lab.links[("h2", False)].sent[-1] == rfb.update_request(False, 16, 4)


def test_token_as_a_subprotocol_for_browsers(lab: Lab) -> None:
    lab.links[("h1", False)] = FakeLink("h1", [server_init_event()], keep_open=True)
    protocols = ["binary", "kvmotion.bearer." + lab.tokens["operator"]]
    with lab.client.websocket_connect("/api/v1/vms/web1/console/vnc", subprotocols=protocols) as ws:
        assert ws.accepted_subprotocol == "binary"
        assert rfb_client(ws).width == 8

"""RFB without a server: the message grammars both ways (whole messages out of any split), the stateless encodings
filter, and the agent's handshake with QEMU's VNC server (a fake one here; the lab's e2e uses QEMU's)."""
from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from kvmotion.agent import vnc
from kvmotion.common import rfb
from kvmotion.common.errors import ConsoleUnavailable


def update(*rects: bytes) -> bytes:
    return struct.pack(">BxH", 0, len(rects)) + b"".join(rects)


def rect(w: int, h: int, enc: int, body: bytes) -> bytes:
    return struct.pack(">HHHHi", 0, 0, w, h, enc) + body


def hextile_20x17(bpp: int) -> bytes:
    """2x2 tiles (16x16, 4x16, 16x1, 4x1): raw, background only, coloured subrects, plain subrects."""
    raw = b"\x01" + bytes(16 * 16 * bpp)
    background = b"\x02" + bytes(bpp)
    coloured = bytes([2 | 4 | 8 | 16]) + bytes(2 * bpp) + b"\x02" + 2 * (bytes(bpp) + b"\x00\x00")
    plain = bytes([8]) + b"\x01" + b"\x00\x00"
    return raw + background + coloured + plain


def every_split(data: bytes, grammar: object) -> None:
    for cut in range(1, len(data)):
        framer = rfb.Framer(grammar)  # type: ignore[arg-type]
        assert framer.feed(data[:cut]) + framer.feed(data[cut:]) == [data], cut


def test_server_messages_whole_out_of_any_split() -> None:
    state = rfb.PixelState(bpp=4)
    msgs = [
        update(rect(2, 2, rfb.RAW, bytes(16)), rect(5, 5, rfb.COPYRECT, b"\x00\x01\x00\x02")),
        update(rect(3, 3, rfb.RRE, struct.pack(">I", 2) + bytes(4) + 2 * (bytes(4) + bytes(8)))),
        update(rect(20, 17, rfb.HEXTILE, hextile_20x17(4))),
        update(rect(9, 2, rfb.CURSOR, bytes(9 * 2 * 4 + 2 * 2)), rect(0, 0, rfb.DESKTOP_SIZE, b""),
               rect(0, 0, rfb.EXT_DESKTOP_SIZE, b"\x01\x00\x00\x00" + bytes(16)), rect(0, 0, rfb.QEMU_EXT_KEY, b"")),
        struct.pack(">BxHH", 1, 0, 2) + bytes(12),                  # SetColourMapEntries
        b"\x02",                                                    # Bell
        struct.pack(">BxxxI", 3, 5) + b"hello",                     # ServerCutText
    ]
    stream = b"".join(msgs)
    framer = rfb.Framer(lambda: rfb.server_grammar(state))
    out: list[bytes] = []
    for i in range(0, len(stream), 7):                              # odd pieces
        out += framer.feed(stream[i:i + 7])
    assert out == msgs
    for m in msgs:
        every_split(m, lambda: rfb.server_grammar(state))


def test_a_half_message_is_dropped_on_reset_and_bpp_is_followed() -> None:
    state = rfb.PixelState(bpp=4)
    framer = rfb.Framer(lambda: rfb.server_grammar(state))
    whole = update(rect(2, 1, rfb.RAW, bytes(8)))
    assert framer.feed(whole + whole[:9]) == [whole]
    assert framer.reset() == 9
    state.bpp = 2                                                   # the client asked for 16 bits per pixel
    small = update(rect(2, 1, rfb.RAW, bytes(4)))
    assert framer.feed(small) == [small]


def test_the_server_sending_what_was_not_asked_for_is_an_error() -> None:
    framer = rfb.Framer(lambda: rfb.server_grammar(rfb.PixelState()))
    with pytest.raises(rfb.RFBError, match="encoding 16"):
        framer.feed(update(rect(2, 2, 16, b"")))                    # ZRLE: never offered to the server
    with pytest.raises(rfb.RFBError, match="message type 9"):
        rfb.Framer(lambda: rfb.server_grammar(rfb.PixelState())).feed(b"\x09")


def test_client_messages_and_the_stateless_filter() -> None:
    msgs = [b"\x00\x00\x00\x00" + bytes(16), rfb.set_encodings([16, 7, 5, 0, -223, -239, -32, -259]),
            rfb.update_request(True, 640, 480), struct.pack(">BBxxI", 4, 1, 0x61),
            struct.pack(">BBHH", 5, 1, 10, 20), struct.pack(">BxxxI", 6, 3) + b"abc",
            struct.pack(">BBHII", 255, 0, 1, 0x61, 30)]
    framer = rfb.Framer(rfb.client_grammar)
    stream = b"".join(msgs)
    assert [m for i in range(len(stream)) for m in framer.feed(stream[i:i + 1])] == msgs
    filtered, kept = rfb.stateless(msgs[1])
    assert kept == [5, 0, -223, -239] and rfb.encodings_of(filtered) == kept
    with pytest.raises(rfb.RFBError, match="does not carry"):
        rfb.Framer(rfb.client_grammar).feed(struct.pack(">BBH", 255, 1, 0))     # QEMU audio: never offered
    with pytest.raises(rfb.RFBError, match="cut text"):
        rfb.Framer(rfb.client_grammar).feed(struct.pack(">BxxxI", 6, 2 << 20))


def test_vnc_auth_is_des_with_the_bit_reversed_password() -> None:
    challenge = bytes(range(16))
    a, b = rfb.vnc_auth_response(challenge, "secret12"), rfb.vnc_auth_response(challenge, "secret13")
    assert len(a) == 16 and a != b and a != challenge
    assert rfb.vnc_auth_response(challenge, "secret12toolong") == a          # VNC uses 8 characters
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    try:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    except ImportError:
        from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES  # type: ignore[no-redef]
    key = bytes(int(f"{c:08b}"[::-1], 2) for c in b"secret12")
    dec = Cipher(TripleDES(key * 3), modes.ECB()).decryptor()
    assert dec.update(a) + dec.finalize() == challenge


class FakeVNC:
    """QEMU's VNC server as far as the handshake goes: offers ``types``, checks the password when asked to."""

    def __init__(self, types: bytes, password: str | None = None) -> None:
        self.types, self.password = types, password
        self.shared: bytes = b""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(rfb.VERSION)
        assert await reader.readexactly(12) == rfb.VERSION
        writer.write(bytes([len(self.types)]) + self.types)
        chosen = (await reader.readexactly(1))[0]
        ok = chosen in self.types
        if chosen == rfb.SEC_VNC:
            challenge = b"0123456789abcdef"
            writer.write(challenge)
            ok = ok and await reader.readexactly(16) == rfb.vnc_auth_response(challenge, self.password or "")
        if not ok:
            writer.write(struct.pack(">II", 1, 21) + b"Authentication failed")
            await writer.drain()
            writer.close()
            return
        writer.write(struct.pack(">I", 0))
        self.shared = await reader.readexactly(1)
        writer.write(rfb.ServerInit(640, 480, bytes([32, 24, 0, 1]) + bytes(12), b"QEMU (vm)").encode())
        await writer.drain()
        await reader.read()


def handshake_with(tmp_path: Path, server: FakeVNC, password: str | None) -> rfb.ServerInit:
    async def main() -> rfb.ServerInit:
        srv = await asyncio.start_unix_server(server.serve, path=str(tmp_path / "v.sock"))
        try:
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "v.sock"))
            try:
                return rfb.ServerInit.parse(await asyncio.wait_for(vnc.handshake(reader, writer, password), 5))
            finally:
                writer.close()
        finally:
            srv.close()
    return asyncio.run(main())


def test_agent_handshake_with_a_password_and_without(tmp_path: Path) -> None:
    server = FakeVNC(bytes([rfb.SEC_VNC]), "tk3Rw9Zq")
    init = handshake_with(tmp_path, server, "tk3Rw9Zq")
    assert (init.width, init.height, init.name, server.shared) == (640, 480, b"QEMU (vm)", b"\x01")
    assert handshake_with(tmp_path, FakeVNC(bytes([rfb.SEC_NONE])), None).width == 640   # a pre-password VM
    with pytest.raises(ConsoleUnavailable, match="Authentication failed"):
        handshake_with(tmp_path, FakeVNC(bytes([rfb.SEC_VNC]), "other123"), "tk3Rw9Zq")
    with pytest.raises(ConsoleUnavailable, match="takes no password"):
        handshake_with(tmp_path, FakeVNC(bytes([rfb.SEC_VNC])), None)


def test_vm_vnc_listens_on_the_loopback_only() -> None:
    from kvmotion.cli.vncproxy import loopback
    from kvmotion.common.errors import InvalidInputError
    assert loopback("127.0.0.1:5901") == ("127.0.0.1", 5901)
    assert loopback("[::1]:5900") == ("::1", 5900)
    assert loopback("5902") == ("127.0.0.1", 5902)                     # a port alone: on 127.0.0.1
    for bad in ("0.0.0.0:5900", "198.18.0.5:5900", "localhost:5900", "127.0.0.1:99999", "127.0.0.1:x"):
        with pytest.raises(InvalidInputError, match="loopback"):
            loopback(bad)

"""RFB (VNC) for a graphical console that follows its VM: the handshake's pieces, VNC authentication, and the
message grammars both ways (pure; no I/O).

The controller's relay forwards whole messages only, so a session can switch to the destination's server between
two messages when the VM moves: a message the source left half sent is dropped, never half delivered. A new server
is then told the client's pixel format and encodings again and asked for the whole screen. That works only with
encodings that keep no state across messages, so the encodings a client may ask for are limited to those
(raw, CopyRect, RRE, hextile, and pseudo-encodings without state): ZRLE, zlib and tight keep a zlib stream from one
message to the next that another server cannot continue.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Generator

from kvmotion.common.errors import ConsoleUnavailable

VERSION = b"RFB 003.008\n"
SEC_NONE, SEC_VNC = 1, 2
MAX_MESSAGE = 64 * 1024 * 1024       # a 4K raw frame is 33 MiB; more is a broken stream
MAX_TEXT = 1024 * 1024               # cut text, one way or the other

RAW, COPYRECT, RRE, HEXTILE = 0, 1, 2, 5
DESKTOP_SIZE, CURSOR, POINTER_TYPE_CHANGE, QEMU_EXT_KEY, EXT_DESKTOP_SIZE = -223, -239, -257, -258, -308
STATELESS = frozenset({RAW, COPYRECT, RRE, HEXTILE, DESKTOP_SIZE, CURSOR, POINTER_TYPE_CHANGE, QEMU_EXT_KEY,
                       EXT_DESKTOP_SIZE})

# client -> server message types
SET_PIXEL_FORMAT, SET_ENCODINGS, FB_UPDATE_REQUEST, KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT = 0, 2, 3, 4, 5, 6
SET_DESKTOP_SIZE, QEMU_CLIENT = 251, 255
INPUT = frozenset({KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT, QEMU_CLIENT})

Grammar = Generator[int, bytes, None]
"""Yields how many bytes it needs next (n > 0: give them; n < 0: skip -n; 0: a message ends here)."""


class RFBError(ConsoleUnavailable):
    """The RFB stream broke the protocol (or asked for what this relay does not carry)."""


@dataclass
class PixelState:
    """What the server's messages depend on: bytes per pixel (the client's SetPixelFormat, else ServerInit's)."""
    bpp: int = 4


@dataclass(frozen=True)
class ServerInit:
    width: int
    height: int
    pixel_format: bytes
    name: bytes

    @classmethod
    def parse(cls, data: bytes) -> "ServerInit":
        if len(data) < 24:
            raise RFBError("a short ServerInit", remedy="check the VM's QEMU display")
        width, height = struct.unpack(">HH", data[:4])
        (n,) = struct.unpack(">I", data[20:24])
        return cls(width, height, data[4:20], data[24:24 + n])

    def encode(self) -> bytes:
        return struct.pack(">HH", self.width, self.height) + self.pixel_format + \
            struct.pack(">I", len(self.name)) + self.name

    @property
    def bpp(self) -> int:
        return bytes_per_pixel(self.pixel_format)


def bytes_per_pixel(pixel_format: bytes) -> int:
    bits = pixel_format[0]
    if bits not in (8, 16, 32):
        raise RFBError(f"{bits} bits per pixel is not RFB", remedy="use a VNC client that speaks RFB 3.8")
    return bits // 8


def vnc_auth_response(challenge: bytes, password: str) -> bytes:
    """VNC authentication: the 16-byte challenge DES-encrypted with the password (8 bytes, each bit-reversed)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    try:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    except ImportError:                                            # cryptography < 43
        from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES  # type: ignore[no-redef]
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode("latin-1")[:8].ljust(8, b"\0"))
    enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()     # three equal keys: single DES
    return enc.update(challenge) + enc.finalize()


# -- messages the relay writes ------------------------------------------------------------------------
def set_encodings(encodings: list[int]) -> bytes:
    return struct.pack(f">BxH{len(encodings)}i", SET_ENCODINGS, len(encodings), *encodings)


def encodings_of(message: bytes) -> list[int]:
    (n,) = struct.unpack(">H", message[2:4])
    return list(struct.unpack(f">{n}i", message[4:4 + 4 * n]))


def stateless(message: bytes) -> tuple[bytes, list[int]]:
    """A SetEncodings message keeping only the stateless encodings, in the client's order of preference."""
    kept = [e for e in encodings_of(message) if e in STATELESS]
    return set_encodings(kept), kept


def update_request(incremental: bool, width: int, height: int) -> bytes:
    return struct.pack(">BBHHHH", FB_UPDATE_REQUEST, int(incremental), 0, 0, width, height)


def desktop_size(width: int, height: int) -> bytes:
    """A FramebufferUpdate with one DesktopSize rectangle: the client resizes its screen."""
    return struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, width, height, DESKTOP_SIZE)


# -- the grammars ------------------------------------------------------------------------------------------
def _skip(n: int) -> Grammar:
    if n < 0 or n > MAX_MESSAGE:
        raise RFBError(f"an RFB message of {n} bytes", remedy="reconnect the console")
    if n:
        yield -n


def _rect(enc: int, w: int, h: int, bpp: int) -> Grammar:
    if enc == RAW:
        yield from _skip(w * h * bpp)
    elif enc == COPYRECT:
        yield from _skip(4)
    elif enc == RRE:
        head = yield 4 + bpp
        yield from _skip(struct.unpack(">I", head[:4])[0] * (bpp + 8))
    elif enc == HEXTILE:
        yield from _hextile(w, h, bpp)
    elif enc == CURSOR:
        yield from _skip(w * h * bpp + (w + 7) // 8 * h)
    elif enc == EXT_DESKTOP_SIZE:
        head = yield 4
        yield from _skip(16 * head[0])
    elif enc not in (DESKTOP_SIZE, POINTER_TYPE_CHANGE, QEMU_EXT_KEY):
        raise RFBError(f"the VNC server sent encoding {enc}, which the client was not offered",
                       remedy="reconnect the console")


def _hextile(w: int, h: int, bpp: int) -> Grammar:
    for ty in range(0, h, 16):
        for tx in range(0, w, 16):
            tw, th = min(16, w - tx), min(16, h - ty)
            sub = (yield 1)[0]
            if sub & 1:                                            # raw tile
                yield from _skip(tw * th * bpp)
                continue
            yield from _skip((bpp if sub & 2 else 0) + (bpp if sub & 4 else 0))
            if sub & 8:                                            # any subrects
                count = (yield 1)[0]
                yield from _skip(count * ((bpp if sub & 16 else 0) + 2))


def server_grammar(state: PixelState) -> Grammar:
    while True:
        kind = (yield 1)[0]
        if kind == 0:                                              # FramebufferUpdate
            head = yield 3
            for _ in range(struct.unpack(">H", head[1:3])[0]):
                _x, _y, w, h, enc = struct.unpack(">HHHHi", (yield 12))
                yield from _rect(enc, w, h, state.bpp)
        elif kind == 1:                                            # SetColourMapEntries
            head = yield 5
            yield from _skip(6 * struct.unpack(">H", head[3:5])[0])
        elif kind == 3:                                            # ServerCutText
            head = yield 7
            n = struct.unpack(">I", head[3:7])[0]
            if n > MAX_TEXT:
                raise RFBError(f"{n} bytes of cut text from the VNC server", remedy="copy less than 1 MiB")
            yield from _skip(n)
        elif kind != 2:                                            # 2: Bell
            raise RFBError(f"the VNC server sent message type {kind}", remedy="reconnect the console")
        yield 0


def client_grammar() -> Grammar:
    fixed = {SET_PIXEL_FORMAT: 19, FB_UPDATE_REQUEST: 9, KEY_EVENT: 7, POINTER_EVENT: 5}
    while True:
        kind = (yield 1)[0]
        if kind in fixed:
            yield fixed[kind]
        elif kind == SET_ENCODINGS:
            head = yield 3
            n = struct.unpack(">H", head[1:3])[0]
            if n > 1024:
                raise RFBError(f"{n} encodings offered", remedy="use a VNC client speaking RFB 3.8")
            if n:
                yield 4 * n
        elif kind == CLIENT_CUT_TEXT:
            head = yield 7
            n = abs(struct.unpack(">i", head[3:7])[0])
            if n > MAX_TEXT:
                raise RFBError(f"{n} bytes of cut text", remedy="copy less than 1 MiB")
            if n:
                yield n
        elif kind == SET_DESKTOP_SIZE:
            head = yield 7
            if head[5]:
                yield 16 * head[5]
        elif kind == QEMU_CLIENT and (yield 1)[0] == 0:           # QEMU extended key event
            yield 10
        else:
            raise RFBError(f"the VNC client sent message type {kind}, which this console does not carry",
                           remedy="use noVNC or a VNC client speaking RFB 3.8")
        yield 0


class Framer:
    """Whole messages out of a byte stream, by a grammar; ``reset`` drops a half message (a server that went)."""

    def __init__(self, grammar: Callable[[], Grammar]) -> None:
        self._grammar = grammar
        self._buf = bytearray()
        self._pos = 0
        self._need = 0
        self._gen: Grammar | None = None
        self.reset()

    def reset(self) -> int:
        """Start over; returns how many bytes of a half message were dropped."""
        dropped = len(self._buf)
        self._buf, self._pos = bytearray(), 0
        self._gen = self._grammar()
        self._need = next(self._gen)
        return dropped

    def feed(self, data: bytes) -> list[bytes]:
        assert self._gen is not None
        self._buf += data
        out: list[bytes] = []
        while True:
            if self._need == 0:
                out.append(bytes(self._buf[:self._pos]))
                del self._buf[:self._pos]
                self._pos = 0
                self._need = next(self._gen)
                continue
            n = abs(self._need)
            if len(self._buf) - self._pos < n:
                if len(self._buf) > MAX_MESSAGE:
                    raise RFBError("an RFB message larger than 64 MiB", remedy="reconnect the console")
                return out
            chunk = bytes(self._buf[self._pos:self._pos + n]) if self._need > 0 else b""
            self._pos += n
            self._need = self._gen.send(chunk)

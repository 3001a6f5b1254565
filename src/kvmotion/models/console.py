"""Remote consoles: the kinds, the relay's protocol events and a session's record (see docs/consoles.md)."""
from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class ConsoleKind(StrEnum):
    SERIAL = "serial"      # the guest's ttyS0: bytes both ways
    VNC = "vnc"            # the VGA display over RFB (noVNC speaks it)


SOCKET_NAME = {ConsoleKind.SERIAL: "serial.sock", ConsoleKind.VNC: "vnc.sock"}

# websocket close codes: 4000 + the HTTP status of the error (4401, 4403, 4404, 4409, 4502, 4504)
CLOSE_NORMAL = 1000
CLOSE_MOVED = 4301         # VNC: the VM moved and its screen size changed, which the client cannot take
CLOSE_ENDED = 4410         # the VM powered off or its console went away


def close_code(http_status: int) -> int:
    return 4000 + http_status if 400 <= http_status <= 599 else 1011


class ConsoleMove(BaseModel):
    """A session followed its VM to another host."""
    from_host: str
    to_host: str
    at: float
    gap_ms: float = Field(description="last byte from the source to the first byte from the destination")
    reconnect_ms: float = Field(default=0.0, description="the source's console closed to the destination's attached: "
                                                         "the relay's own part of the gap")
    replayed_bytes: int = Field(default=0, description="printed on the destination before the relay attached; "
                                                       "sent from its serial.log, so nothing is lost")
    uncertain_bytes: int = Field(default=0, description="printed while the relay attached: may show twice")


class ConsoleSession(BaseModel):
    """One console session through the controller (sent as the ``end`` event and summed up in the audit)."""
    id: str
    who: str
    role: str
    vm: str
    uuid: str
    kind: ConsoleKind
    client: str
    started_at: float
    ended_at: float | None = None
    hosts: list[str] = Field(default_factory=list)
    moves: list[ConsoleMove] = Field(default_factory=list)
    bytes_to_client: int = 0
    bytes_from_client: int = 0
    input_dropped: int = Field(default=0, description="typed while the session was following the VM")
    end_reason: str = ""

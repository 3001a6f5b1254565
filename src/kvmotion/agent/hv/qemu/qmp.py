"""A QMP connection with a deadline on every call and a bounded event history."""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from kvmotion.common.errors import QMPCommandError, QMPTimeout

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
EVENT_HISTORY = 256


class QMPConnection:
    """Owns one ``QMPClient``; drains its default event queue into a bounded history."""

    def __init__(self, name: str, socket_path: str) -> None:
        self.name = name
        self.socket_path = socket_path
        self._client = QMPClient(name)
        self._pump: asyncio.Task[None] | None = None
        self.history: collections.deque[tuple[float, dict[str, Any]]] = collections.deque(maxlen=EVENT_HISTORY)

    @property
    def client(self) -> QMPClient:
        return self._client

    async def connect(self, deadline_s: float = 10.0) -> None:
        """Connect, retrying while QEMU has not created its socket yet."""
        end = time.monotonic() + deadline_s
        last: Exception | None = None
        while time.monotonic() < end:
            try:
                await asyncio.wait_for(self._client.connect(self.socket_path), timeout=max(0.1, end - time.monotonic()))
                self._pump = asyncio.create_task(self._drain(), name=f"qmp-events-{self.name}")
                return
            except (ConnectError, OSError, asyncio.TimeoutError) as exc:
                last = exc
                self._client = QMPClient(self.name)
                await asyncio.sleep(0.01)
        raise QMPTimeout(
            f"QMP socket {self.socket_path} did not answer within {deadline_s:.0f}s",
            remedy="check that QEMU started (see the VM's qemu.log) and that the socket path is reachable",
            cause=last,
        )

    async def _drain(self) -> None:
        try:
            while True:
                ev = await self._client.events.get()
                self.history.append((time.time(), dict(ev)))
        except asyncio.CancelledError:
            pass

    def listener(self, names: tuple[str, ...]) -> Any:
        """Context manager yielding an ``EventListener``; register it before the triggering command."""
        return self._client.listener(names)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                      oob: bool = False) -> Any:
        """``oob``: out of band, answered by QEMU's monitor thread even while its main loop is blocked (post-copy's
        destination blocks on a missing page while the link is down); only a few commands allow it."""
        try:
            return await asyncio.wait_for(self._client.execute(cmd, args, oob=oob), timeout=timeout)
        except asyncio.TimeoutError as exc:
            raise QMPTimeout(
                f"QMP command {cmd} on {self.name} took longer than {timeout:.1f}s",
                remedy="the QEMU process may be hung; check the host load and the VM's qemu.log",
                details={"command": cmd},
                cause=exc,
            ) from exc
        except ExecuteError as exc:
            raise QMPCommandError(
                f"QMP command {cmd} failed on {self.name}: {exc.error.error.desc}",
                remedy="see the QEMU error above",
                details={"command": cmd, "error_class": exc.error_class, "desc": exc.error.error.desc},
                cause=exc,
            ) from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QMPCommandError(
                f"QMP connection to {self.name} lost during {cmd}: {exc}",
                remedy="the QEMU process probably exited; check the VM's qemu.log",
                details={"command": cmd, "error_class": "Disconnected"},
                cause=exc,
            ) from exc

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        try:
            await asyncio.wait_for(self._client.disconnect(), timeout=3)
        except Exception:  # noqa: BLE001 - best effort on a dying process
            pass


async def next_event(listener: EventListener, timeout: float) -> dict[str, Any] | None:
    try:
        return dict(await asyncio.wait_for(listener.get(), timeout=timeout))
    except asyncio.TimeoutError:
        return None

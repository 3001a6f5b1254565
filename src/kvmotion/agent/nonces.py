"""The agent's replay memory, kept across restarts: a journal of accepted nonces in its state directory.

Why: a restarted agent with an empty memory would accept again every request captured within the clock window
(``SKEW_S``, 60 s) before the restart. Refusing every request signed before the agent started would close that
too, but it also refuses the controller's honest requests while the two clocks differ by a little, and it does
not cover a request signed with a clock running ahead; the journal is exact.

How: one line per accepted request, ``<ts> <nonce>``, written with a single ``os.write`` on an ``O_APPEND``
descriptor. Nothing is buffered in the process, so a crash or restart of the agent loses nothing. A crash of the
whole host can lose what the kernel had not yet written back; for that case the first line names the boot
(``/proc/sys/kernel/random/boot_id``): after a reboot, requests signed before the agent started are refused as
well. At start the lines still inside the window are loaded and the file is rewritten compactly; it is rewritten
again whenever it holds twice as many lines as live nonces, so it stays bounded (the cache is bounded, see
``NonceCache``). The file is mode 0600 and opened with ``O_NOFOLLOW`` (a planted symlink is refused); the
rewrite goes through a temporary file made with ``O_EXCL``. When the journal cannot be written (a full disk) the
request is still accepted and the failure logged: the memory in the process still refuses replays until the
next restart, and an agent that refused everything could not be repaired through its own API.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from kvmotion.common.errors import ConflictError, UnauthorizedError
from kvmotion.common.hostauth import KEEP_MARGIN_S, NONCE_CACHE, SKEW_S, NonceCache

log = logging.getLogger(__name__)

NONCE_FILE = "nonces.journal"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_MIN_REWRITE_LINES = 1000


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class NonceJournal(NonceCache):
    """A ``NonceCache`` that survives a restart of the agent (see the module's docstring)."""

    def __init__(self, path: Path, size: int = NONCE_CACHE, now: float | None = None, boot: str | None = None) -> None:
        super().__init__(size)
        self.path = path
        self.not_before = 0.0                  # after a host reboot: the agent's start
        self._header = f"kvmotion-nonces v1 boot={boot or boot_id()}"
        self._fd = -1
        self._lines = 0
        now = time.time() if now is None else now
        self._load(now)
        self._rewrite()

    def _load(self, now: float) -> None:
        lines = _read_private(self.path).splitlines()
        if lines and lines[0] != self._header:       # another boot (or an unknown format): see the docstring
            self.not_before = now
            log.warning("%s is from another boot: requests signed before now are refused", self.path)
        for line in lines[1:]:
            ts_s, _, nonce = line.partition(" ")
            try:
                ts = float(ts_s)
            except ValueError:
                continue
            if nonce and ts >= now - SKEW_S - KEEP_MARGIN_S and not self.seen(nonce):
                self._remember(nonce, ts)

    def _rewrite(self) -> None:
        """The journal again, with only the live nonces (atomically: a temporary file renamed over it)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("".join([self._header + "\n"] + [f"{ts!r} {nonce}\n" for nonce, ts in self._seen.items()]))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._lines = 1 + len(self._seen)

    def _record(self, nonce: str, ts: float) -> None:
        try:
            if self._fd < 0:                     # closed (the app stopped), and used again
                self._rewrite()
            os.write(self._fd, f"{ts!r} {nonce}\n".encode())
            self._lines += 1
            if self._lines > 2 * max(len(self), _MIN_REWRITE_LINES):
                self._rewrite()
        except OSError as exc:
            log.error("cannot write the replay journal %s (%s): a restart would forget recent requests",
                      self.path, exc)

    def check_and_add(self, nonce: str, ts: float, now: float | None = None) -> bool:
        if ts < self.not_before:
            raise UnauthorizedError("request was signed before this host rebooted",
                                    remedy="retry: the controller signs a new request")
        return super().check_and_add(nonce, ts, now)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_private(path: Path) -> str:
    """The journal's text ("" when there is none); never through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise ConflictError(f"cannot open the replay journal {path}: {exc.strerror}",
                            remedy=f"remove {path} if it is a symlink or not a regular file, then restart the agent",
                            cause=exc) from exc
    with os.fdopen(fd, "r", errors="replace") as fh:
        return fh.read()

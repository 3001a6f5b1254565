"""Which tasks changed, for the live streams (``GET /tasks/stream``, ``GET /tasks/{id}/stream``).

The task journal tells the feed of its database after every committed change (from any thread); a stream waits
on it and reads the task again only then, so a page is never sent more often than its task changes. The feed
keeps the last ``HISTORY`` changes (bounded); a stream that fell further behind re-reads what it shows.
A change committed by another process (a second controller on the same database) is not seen here: streams also
re-read after ``IDLE_S`` without news.
"""
from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque

HISTORY = 4096
IDLE_S = 15.0


class TaskFeed:
    def __init__(self, history: int = HISTORY) -> None:
        self.seq = 0
        self._changes: deque[tuple[int, str]] = deque(maxlen=history)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._lock = threading.Lock()

    def changed(self, task_id: str) -> None:
        """A task's record changed (its transaction committed)."""
        with self._lock:
            self.seq += 1
            self._changes.append((self.seq, task_id))
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:          # that loop closed: its stream is gone
                pass

    def since(self, seq: int) -> tuple[int, list[str] | None]:
        """(the newest sequence number, the ids changed after ``seq`` in order, each once); None when the history
        no longer reaches back to ``seq`` (re-read everything shown)."""
        with self._lock:
            if self._changes and self._changes[0][0] > seq + 1:
                return self.seq, None
            ids = list(dict.fromkeys(t for s, t in self._changes if s > seq))
            return self.seq, ids

    async def wait(self, seq: int, timeout: float = IDLE_S) -> bool:
        """Wait until something changed after ``seq`` (True) or ``timeout`` passed (False)."""
        event = asyncio.Event()
        key = (asyncio.get_running_loop(), event)
        with self._lock:
            if self.seq > seq:
                return True
            self._waiters.add(key)
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            with self._lock:
                self._waiters.discard(key)


_FEEDS: "weakref.WeakKeyDictionary[object, TaskFeed]" = weakref.WeakKeyDictionary()
_FEEDS_LOCK = threading.Lock()


def feed_for(sessions: object) -> TaskFeed:
    """The feed of one database (its session factory): one per controller, made on first use."""
    with _FEEDS_LOCK:
        feed = _FEEDS.get(sessions)
        if feed is None:
            feed = _FEEDS[sessions] = TaskFeed()
        return feed

"""A wake-up that a weakref finalizer may fire.

The driver's background threads (metrics.py's sampler, watcher.py's watcher) are woken when
a DAG is dropped, from its finalizer. A finalizer runs inside garbage collection, on whatever
thread allocated last, maybe one that holds a lock the finalizer would take (an Event's
condition, the sampler's table lock, a thread's start-up handshake): taking a lock there can
deadlock. ``queue.SimpleQueue.put`` is reentrant, made to be called from ``__del__`` and
weakref callbacks, so a wake-up is a put and the woken thread does the locked work.
"""

from __future__ import annotations

import queue
from typing import Any


class Wake:
    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def set(self, item: Any = None) -> None:
        """Wake the waiting thread, handing it ``item`` (None: only wake it). Safe from a
        finalizer."""
        self._q.put(item)

    def empty(self) -> bool:
        return self._q.empty()

    def wait(self, timeout: float) -> list[Any]:
        """Wait until woken or ``timeout`` passes; returns the items handed over since the
        last wait (Nones left out)."""
        try:
            items = [self._q.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._q.get_nowait())
            except queue.Empty:
                return [x for x in items if x is not None]

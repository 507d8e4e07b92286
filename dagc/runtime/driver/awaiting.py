"""``await ref``: a DagRef's blocking ``get()`` run on a daemon thread of its DAG.

Not a ``concurrent.futures`` executor: the interpreter joins those executors' threads
before it runs any ``atexit`` hook, so an awaited execution still pending at exit (its
task cancelled by ``asyncio.run``, its ``get()`` still waiting) would hold the exit until
the value came - forever for a loop that never answers - before dagc's exit hook could
close the DAG. A daemon thread is never joined: exit takes what teardown takes
(``teardown_timeout``), and the closed DAG ends the thread's wait.

The thread holds its queue and, while it waits for one, a pending ref; never the DAG's
state, so a DAG whose refs are all gone is collected as usual.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

# what the thread's queue carries: (ref, its awaiting loop, the future), or None to end
_Job = tuple[Any, asyncio.AbstractEventLoop, asyncio.Future[Any]]


class AsyncGets:
    """Runs ``ref.get()`` for coroutines awaiting refs of one DAG, one at a time, on a
    daemon thread started on first use; ``shutdown()`` lets it end."""

    __slots__ = ("_queue", "_thread", "_lock", "_name")

    def __init__(self, name: str = "dagc-get"):
        self._queue: queue.SimpleQueue[_Job | None] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._name = name

    def submit(self, ref: Any) -> asyncio.Future[Any]:
        """A future of the running event loop that ``ref.get()``'s outcome completes."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        q = self._queue
        if q is None:
            with self._lock:
                q = self._queue
                if q is None:
                    q = queue.SimpleQueue()
                    t = threading.Thread(target=_serve, args=(q,), name=self._name, daemon=True)
                    t.start()
                    self._thread = t
                    self._queue = q  # last: whoever sees the queue sees its thread started
        q.put((ref, loop, fut))
        return fut

    def shutdown(self) -> None:
        """The thread ends once the get() it may be running returns (teardown ends it)."""
        q = self._queue
        if q is not None:
            q.put(None)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread


def _serve(q: queue.SimpleQueue[_Job | None]) -> None:
    while True:
        job = q.get()
        if job is None:
            return
        ref, loop, fut = job
        job = None
        outcome: Any
        try:
            outcome, ok = ref.get(), True
        except BaseException as e:  # handed to the awaiting coroutine
            outcome, ok = e, False
        ref = None  # a pending ref keeps its DAG alive: let go now
        try:
            loop.call_soon_threadsafe(_settle, fut, ok, outcome)
        except RuntimeError:
            pass  # the event loop closed: nobody awaits it any more
        del loop, fut, outcome  # nor keep the last one's objects while waiting for the next


def _settle(fut: asyncio.Future[Any], ok: bool, outcome: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(outcome)
    else:
        fut.set_exception(outcome)

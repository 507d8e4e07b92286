"""Executions past ``max_inflight``: the driver's queue (the compile option ``max_queued``).

Without a queue (``max_queued=0``, the default, and Ray Compiled Graph's behaviour)
``execute()`` raises ``CapacityError`` once ``max_inflight`` executions are unfetched. With
one, an execution that finds the pipeline full waits in the driver, in order, and enters the
pipeline as soon as there is room; only when ``max_inflight + max_queued`` executions are
unfetched does one more raise ``CapacityError``.

Room in the pipeline is counted by what it holds, not by what the caller has fetched:
executions sent and whose outputs the driver has not read yet (``_sent - _read_next``), plus
those that failed fast and whose slower outputs are still coming (``gather.py``). Every ring
holds at most that many messages, so sending while it is below ``max_inflight`` never blocks.

Who sends a queued execution:

* ``execute()`` itself, when room freed since the last look;
* whoever reads an output (a caller's ``get()``, under the read lock): it takes the submit
  lock only if it is free (the usual order is submit, then read), and sends what fits;
* the *pump*: a daemon thread that runs only while the queue is not empty. It waits for the
  oldest execution's outputs without holding the read lock (so a ``get()`` of a buffered
  result never waits for it), reads them into the result buffer - the caller need not fetch
  first - and sends queued executions into the room that makes. When the queue is empty it
  ends, so an idle DAG has no thread and costs no CPU.

The lock order stays submit, then read; the pump never holds two at once, and a reader only
tries the submit lock, so a ``get()`` waiting under the read lock for an execution that is
still queued is never what keeps it queued. The pump waits under a lock of its own
(``_wait_lock``), which closing the channel ends takes too, so the ends are never unmapped
under its wait.

Memory: a queued execution holds the arguments given to ``execute()`` - the objects
themselves, not copies, as ``concurrent.futures`` does - until it enters the pipeline (where
they are pickled, as always); the result buffer holds each result read and not fetched. At
most ``max_inflight + max_queued`` executions are unfetched, so that bounds both.

Errors keep their places: a queued execution whose arguments cannot be sent (not picklable,
an ObjectRef whose value cannot be fetched) still enters the pipeline, as a failure in place
of its input, and its ``get()`` raises it as a ``TaskError``; a method that raises is a
``TaskError`` at that execution's ``get()``, as always. An actor's death that ends the DAG
fails every queued execution's ``get()`` with ``ActorDiedError``. When Ray restarts the
actor (restart.py) only the executions sent into the pipeline are lost: the queued ones
were never sent, so they keep their places; while the DAG re-prepares (``_paused``, the
restart's event) the pump and a ``get()`` of a queued execution wait for the new run, never
reading the old run's channels, and the queue then enters the new run in order. After
``teardown()`` each queued ``get()`` raises ``DagClosedError`` at once, and the pump drops
the queue.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from dagc.errors import ActorDiedError, CapacityError, DagcError, DagTimeoutError
from dagc.runtime.channels import ChannelClosed, PeerDied, WaitTimeout
from dagc.runtime.driver.dagref import DagRef
from dagc.runtime.driver.executions import Executions, GatheredExecutions, internal_error
from dagc.runtime.driver.gather import NOT_READ
from dagc.runtime.driver.runtime import ArgumentsNotSent
from dagc.runtime.failure import capture

_monotonic = time.monotonic
SLICE = 0.05  # the pump's longest wait before it looks at the queue again


class QueuedExecutions(Executions):
    """Executions with a queue of ``max_queued`` in the driver (see the module docstring)."""

    def __init__(self, session, submit, collect, options: dict, multi: bool):
        super().__init__(session, submit, collect, options, multi)
        self._max_queued = options["max_queued"]
        self._queue: deque = deque()  # (args, kwargs) of executions _sent .. _submitted-1
        self._sent = 0
        self._pump: threading.Thread | None = None
        self._inputs = session.ir.inputs
        self._paused: threading.Event | None = None  # set while re-preparing (restart.py)
        stamps = getattr(self, "_stamps", None)  # metrics.py's timed executions
        self._begin = stamps.begin if stamps is not None else _no_stamp

    def _own_locks(self) -> tuple:
        self._wait_lock = threading.Lock()  # made here: the base class's finalizer holds it
        return (self._submit_lock, self._read_lock, self._wait_lock)

    @property
    def queued(self) -> int:
        """Executions waiting in the driver for room in the pipeline."""
        return len(self._queue)

    # -- execute ---------------------------------------------------------------------------------
    def execute(self, *args, **kwargs) -> DagRef:
        with self._submit_lock:
            if self._closed or self._dead:
                self._raise_closed()
            if self._submitted - self._fetched >= self._max_inflight + self._max_queued:
                self._make_room()
            if self._queue:
                self._send_queued()  # room may have freed since the pump looked
            if not self._queue and self._room() > 0:
                self._send_now(args, kwargs)
            else:
                if not self._fits(args, kwargs):
                    self._session.runtime.bad_input(args, kwargs)  # raises, as submit's
                self._queue.append((args, kwargs))
                if self._pump is None:
                    self._start_pump()
            i = self._submitted
            self._submitted = i + 1
        return DagRef(self, i)

    def _room(self) -> int:
        """Executions the pipeline can take now. Read without the read lock: the counts it
        reads only ever make it smaller than the truth (a gathered execution's late outputs
        are counted owed before it is counted read)."""
        g = self._gather
        owed = g.undrained if g is not None else 0
        return self._max_inflight - (max(0, self._sent - self._read_next) + owed)

    def _fits(self, args, kwargs) -> bool:
        # the generated submit()'s test, made here for an execution that waits
        spec = self._inputs
        if len(args) != spec.num_positional:
            return False
        if spec.kwargs:
            return all(k in kwargs for k in spec.kwargs)
        return not kwargs

    def _send_now(self, args, kwargs) -> None:
        """Send the caller's own execution (as Executions.execute does); under the submit
        lock, with room."""
        try:
            self._submit(args, kwargs)
        except (PeerDied, ChannelClosed) as e:
            self._on_stop(e)
        except (ArgumentsNotSent, DagcError):
            raise
        except Exception as e:
            internal_error(e)
            raise
        i = self._sent
        if not i & 15:  # metrics.STRIDE - 1, as Executions.execute
            self._begin(i)
        self._sent = i + 1

    def _send_queued(self) -> None:
        """Send queued executions, oldest first, while there is room; under the submit
        lock. An execution whose arguments cannot be sent goes in as its failure."""
        q = self._queue
        while q and self._room() > 0:
            args, kwargs = q[0]
            i = self._sent
            if not i & 15:
                self._begin(i)
            try:
                self._submit(args, kwargs)
            except (PeerDied, ChannelClosed) as e:
                self._on_stop(e)  # raises: dead (the queue's gets say so) or closed
            except Exception as e:  # nothing was sent: a failure in its place
                self._stand_in(e)
            q.popleft()
            self._sent = i + 1

    def _stand_in(self, exc: Exception) -> None:
        failure = capture(exc, "driver", "execute", -1)
        for w in self._session.writers.values():
            w.write(failure)

    def _make_room(self) -> None:
        """At ``max_inflight + max_queued`` unfetched: let dropped DagRefs and executions
        that failed fast free their places, without waiting on another thread's read
        (which may wait for this very queue); else CapacityError."""
        limit = self._max_inflight + self._max_queued
        if self._read_lock.acquire(blocking=False):
            try:
                self._take_abandoned()
                while self._submitted - self._fetched >= limit and any(
                    i < self._sent for i in self._abandoned
                ):
                    self._read_one(self._deadline(None))  # sent: its outputs come
                if self._unsettled and self._submitted - self._fetched >= limit:
                    self._settle(self._deadline(None))
            finally:
                self._read_lock.release()
        n = self._submitted - self._fetched
        if n >= limit:
            raise CapacityError(
                f"{n} executions are submitted and not fetched (max_inflight="
                f"{self._max_inflight} in the pipeline, max_queued={self._max_queued} "
                f"waiting in the driver or read and not fetched); get() earlier results "
                f"first, or compile with a larger max_queued."
            )

    # -- an actor restart -------------------------------------------------------------------------
    def _fetch(self, ref: DagRef, timeout) -> None:
        """Executions._fetch; a queued execution's get() during a restart's re-prepare
        waits for the new run (it was never sent, so it is not lost) and reads it there."""
        deadline = self._deadline(timeout)
        while True:
            left = None if deadline is None else max(0.0, deadline - _monotonic())
            try:
                return super()._fetch(ref, left)
            except ActorDiedError:
                p = self._paused
                if p is None or ref._idx < self._sent or self._dead or self._closed:
                    raise  # in flight at the death (lost), or the DAG closed
            if not p.wait(None if deadline is None else max(0.0, deadline - _monotonic())):
                raise DagTimeoutError(
                    f"execution {ref._idx} did not finish within the timeout (it waits in "
                    f"the driver's queue while the compiled DAG re-prepares a restarted "
                    f"actor); its result can still be fetched later with get()."
                )

    def _ready(self, idx: int) -> bool:
        if self._paused is not None and idx >= self._sent and not (self._dead or self._closed):
            return False  # queued across a re-prepare: the old run has nothing
        return super()._ready(idx)

    def _resume(self) -> None:
        """The new run is adopted (restart.py, under every lock): the queue goes into it."""
        if self._queue and self._pump is None:
            self._start_pump()

    # -- reading frees room ----------------------------------------------------------------------
    def _read_one(self, deadline, want: int = -1):
        got = super()._read_one(deadline, want)
        if self._queue and self._submit_lock.acquire(blocking=False):
            try:
                self._send_queued()
            except DagcError:
                pass  # dead or closed: the next execute()/get() says so
            finally:
                self._submit_lock.release()
        return got

    # -- the pump --------------------------------------------------------------------------------
    def _start_pump(self) -> None:
        t = threading.Thread(target=self._run_pump, name="dagc-queue", daemon=True)
        self._pump = t
        t.start()

    def _run_pump(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                p = self._paused
                if p is not None:  # re-preparing: the old run takes nothing more
                    p.wait(1.0)
                    continue
                with self._submit_lock:
                    if self._closed or self._dead:
                        self._queue.clear()  # their gets raise why
                        self._pump = None
                        return
                    try:
                        self._send_queued()
                    except DagcError:
                        pass  # dead or closed: the check above ends it
                    if not self._queue:
                        self._pump = None  # under the lock: execute() starts another
                        return
                self._take_outputs()
        finally:
            if self._pump is me:
                self._pump = None

    def _take_outputs(self) -> None:
        """The pipeline is full: wait (a slice at most) for the oldest execution's outputs
        and read what is there into the result buffer."""
        died = None
        with self._wait_lock:
            if self._closed or self._dead:
                return
            try:
                self._wait_output(_monotonic() + SLICE)
            except WaitTimeout:
                return
            except ChannelClosed:
                return  # closing: the pump's next look ends it
            except PeerDied as e:
                died = e
        if not self._read_lock.acquire(timeout=SLICE):
            return  # a get() is reading: it sends as it reads
        try:
            if self._closed or self._dead:
                return
            if died is not None:
                self._on_stop(died)
            self._take_abandoned()
            now = _monotonic()
            g = self._gather
            while self._read_next < self._sent:
                if g is None and not all(r.ready() for r in self._readers.values()):
                    break
                self._read_one(now)  # never waits: the outputs are there
            if self._unsettled:
                self._settle(now)
        except DagcError:
            pass  # partly there (a gathered execution), or dead
        finally:
            self._read_lock.release()

    def _wait_output(self, until: float) -> None:
        """Wait until an output the next read needs is there (or ``until``)."""
        g = self._gather
        if g is None:
            for r in self._readers.values():
                if not r.ready():
                    r.wait_ready(until)
                    return
            return
        got, owed = g.got, g.owed
        for j, r in enumerate(g.readers):
            if (owed[j] or got[j] is NOT_READ) and not r.ready():
                r.wait_ready(until)
                return


def executions_class(session, options: dict) -> type:
    """Which Executions a started session gets: a MultiOutputNode's outputs gathered
    (failing fast) or not, a queue (``max_queued``) or not."""
    gathered = getattr(session.runtime, "gathered", None) is not None
    if options.get("max_queued", 0) > 0:
        return QueuedGatheredExecutions if gathered else QueuedExecutions
    return GatheredExecutions if gathered else Executions


def _no_stamp(i: int) -> None:
    pass


class QueuedGatheredExecutions(QueuedExecutions, GatheredExecutions):
    """A queue, and a MultiOutputNode's outputs read failing fast."""

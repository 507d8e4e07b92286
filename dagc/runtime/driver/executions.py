"""Executions of a running compiled DAG: submitting, fetching, and the DAG's open/closed state.

:class:`Executions` owns what ``execute()`` and ``DagRef.get()`` touch: the submit and
fetch counters, the result buffer for out-of-order ``get()``, capacity accounting
(``max_inflight``), the two locks, and whether the DAG is closed or dead. It holds the
:class:`~dagc.runtime.driver.session.Session` (the resources) and stops it on teardown or
when a process of the DAG dies. A :class:`DagRef` holds its Executions, which keeps the
DAG alive while a result is pending; when neither is referenced any more, a finalizer stops
the loops and removes the segments.

A MultiOutputNode's outputs fail fast (``gather.py``): the first output that is a Failure
answers the execution at once. Its other outputs are still in their channels; until they
are read the execution keeps its place in the ``max_inflight`` count (``_unsettled``), so
no ring ever holds more messages than it has slots and ``execute()`` never blocks on a
full input ring.

``execute()`` returns a :class:`~dagc.runtime.driver.dagref.DagRef` (``dagref.py``).

Dropping a DAG releases what ``teardown()`` releases (:func:`_release`, the one routine both
take), without Ray calls: the closed control stops the loops on this node, closed channel
ends stop the others. ``ray.shutdown()`` tears every live DAG down first, through the hook
Ray has for its own Compiled Graphs (:func:`_register_with_ray`).
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Any

from dagc.errors import (
    RAY_ACTOR_DIED,
    RAY_CHANNEL_CLOSED,
    ActorDiedError,
    CapacityError,
    DagcError,
    DagClosedError,
    DagTimeoutError,
)
from dagc.runtime.channels import ChannelClosed, PeerDied, WaitTimeout
from dagc.runtime.driver import metrics
from dagc.runtime.driver.awaiting import AsyncGets
from dagc.runtime.driver.dagref import DagRef
from dagc.runtime.driver.runtime import ArgumentsNotSent

_LIVE: weakref.WeakSet[Executions] = weakref.WeakSet()
_ATEXIT = False
_monotonic = time.monotonic


def internal_error(e: BaseException) -> None:
    """Say on ``e`` that submitting failed inside dagc, not because of the arguments."""
    e.add_note(
        "dagc internal error while submitting an execution (not caused by its arguments); "
        "please report it with this traceback."
    )


def _teardown_all() -> None:
    for runs in list(_LIVE):
        try:
            runs.teardown()
        except Exception:
            pass


class Executions:
    """Submitting and fetching executions of one started DAG (see the module docstring).

    ``submit(args, kwargs)`` and ``collect(deadline)`` are the driver module's functions;
    ``readers`` the driver's reading ends (for ``ready()``).
    """

    def __init__(self, session, submit, collect, options: dict, multi: bool):
        self._session = session
        self._submit = submit
        self._collect = collect
        self._readers = session.readers
        self._max_inflight = options["max_inflight"]
        self._get_timeout = options["get_timeout"]
        self._multi = multi
        self._submitted = 0
        self._fetched = 0
        self._read_next = 0
        self._results: dict[int, object] = {}
        self._abandoned: set[int] = set()
        self._dropped: list[int] = []  # abandoned refs not yet accounted
        self._submit_lock = threading.Lock()
        self._read_lock = threading.RLock()
        self._locks: tuple = self._own_locks()  # closing the ends waits for these
        self._closed = False
        self._dead: str | None = None
        self._lost: dict[int, str] = {}  # lost to an actor restart: why (restart.py)
        self._restart = None  # restart.py's hook (CompiledDag sets it)
        self._gets = AsyncGets()  # await ref
        # a MultiOutputNode's outputs, read failing fast (gather.py); None for one output
        rt = getattr(session, "runtime", None)
        self._gather: Any = getattr(rt, "gathered", None)
        self._unsettled = 0  # answered early, outputs not all read: still in flight
        _LIVE.add(self)
        global _ATEXIT
        if not _ATEXIT:
            atexit.register(_teardown_all)
            _ATEXIT = True
        _register_with_ray(self)
        self._stamps = metrics.watch(self)  # timed executions, failures: metrics.py
        # dropped without teardown: release what teardown releases. The callback holds the
        # session, the locks and the async getter, none of which refers back to this object
        self._finalizer = weakref.finalize(self, _release, session, self._locks, self._gets, False)
        self._finalizer.atexit = False  # at exit _teardown_all stops the loops properly

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dead(self) -> str | None:
        """Why the DAG died (None while it did not)."""
        return self._dead

    @property
    def pending(self) -> int:
        """Executions submitted and not yet fetched."""
        return self._submitted - self._fetched

    # -- execute / get ---------------------------------------------------------------------------
    def execute(self, *args, **kwargs) -> DagRef:
        with self._submit_lock:
            if self._closed or self._dead:  # checked under the lock: teardown takes it too
                self._raise_closed()
            if self._submitted - self._fetched >= self._max_inflight:
                self._make_room()
            if not self._submitted & 15:  # metrics.STRIDE - 1
                self._stamps.begin(self._submitted)
            try:
                self._submit(args, kwargs)
            except (PeerDied, ChannelClosed) as e:
                self._on_stop(e)
            except (ArgumentsNotSent, DagcError):
                # the arguments could not be pickled (the driver's writers raise this from
                # the encoder itself, nothing was sent), or do not match the InputNode
                raise
            except Exception as e:
                internal_error(e)
                raise
            i = self._submitted
            self._submitted = i + 1
        return DagRef(self, i)

    def _make_room(self) -> None:
        # executions whose DagRefs were dropped unfetched free their places once read, and
        # so do executions that failed fast once their slower outputs are read
        with self._read_lock:
            self._take_abandoned()
            while self._abandoned and self._submitted - self._fetched >= self._max_inflight:
                self._read_one(self._deadline(None))
            if self._unsettled and self._submitted - self._fetched >= self._max_inflight:
                self._settle(self._deadline(None))
        if self._submitted - self._fetched >= self._max_inflight:
            late = (
                f", {self._unsettled} of them failed and still wait for their slower outputs"
                if self._unsettled
                else ""
            )
            raise CapacityError(
                f"{self._submitted - self._fetched} executions are submitted and not fetched "
                f"(max_inflight={self._max_inflight}){late}; get() earlier results first, or "
                f"compile with a larger max_inflight."
            )

    def _deadline(self, timeout):
        if timeout is None:
            timeout = self._get_timeout
        return None if timeout is None else _monotonic() + timeout

    def _read_one(self, deadline, want: int = -1):
        """Read the oldest unread execution's outputs.

        Returns them if that execution is ``want``; otherwise keeps them in the result
        buffer (or drops them, for an abandoned DagRef) and returns ``self``.
        """
        try:
            value = self._collect(deadline)
        except WaitTimeout:
            raise DagTimeoutError(
                f"execution {self._read_next} did not finish within the timeout; its result "
                f"can still be fetched later with get()."
            ) from None
        except (PeerDied, ChannelClosed) as e:
            self._on_stop(e)
        i = self._read_next
        self._read_next = i + 1
        if not i & 15:  # a timed execution (metrics.STRIDE - 1)
            self._stamps.end(i)
        if i == want:
            return value
        if i in self._abandoned:
            self._abandoned.discard(i)
            self._fetched += 1
        else:
            self._results[i] = value
        return self

    def _settle(self, deadline) -> None:
        """Read the late outputs of executions that failed fast (waiting up to deadline)."""
        try:
            self._gather.drain(deadline)
        except WaitTimeout:
            pass  # still in flight: execute() says so (CapacityError)
        except (PeerDied, ChannelClosed) as e:
            self._on_stop(e)
        finally:
            self._sync_unsettled()

    def _sync_unsettled(self) -> None:
        u = self._gather.undrained
        if u != self._unsettled:
            self._fetched -= u - self._unsettled
            self._unsettled = u

    def _fetch(self, ref: DagRef, timeout) -> None:
        """Read ``ref``'s execution and settle the ref with it (see DagRef.get)."""
        lock = self._read_lock
        if timeout is None and self._get_timeout is None:
            deadline = None
            lock.acquire()
        else:
            deadline = self._deadline(timeout)
            if not lock.acquire(timeout=max(0.0, deadline - _monotonic())):
                raise DagTimeoutError(
                    f"execution {ref._idx} did not finish within the timeout (another "
                    f"thread is reading results); its result can still be fetched later "
                    f"with get()."
                )
        try:
            if ref._state:
                return  # another thread's get() of this ref settled it
            idx = ref._idx
            if self._dropped:
                self._take_abandoned()
            r = self._results.pop(idx, self)
            if r is self:
                if self._closed or self._dead:
                    self._raise_closed()
                if idx >= self._submitted or idx < self._read_next:
                    if idx in self._lost:  # an actor restart (restart.py)
                        raise ActorDiedError(self._lost[idx])
                    raise ValueError(f"execution {idx} was never submitted or already fetched")
                while r is self:
                    r = self._read_one(deadline, idx)
            self._fetched += 1
            ref._settle(r)
        finally:
            lock.release()

    def _ready(self, idx: int) -> bool:
        if idx in self._results or self._closed or self._dead or idx in self._lost:
            return True  # get() answers at once: the value, or why there is none
        if idx != self._read_next:
            return False
        if self._gather is not None:
            return self._gather.ready()
        return all(r.ready() for r in self._readers.values())

    def _abandon(self, idx: int) -> None:
        """A DagRef died unfetched. Runs from __del__, which garbage collection can run at
        any bytecode, even inside this DAG's own fetch on this very thread (where the
        re-entrant read lock would let it in mid-update): so it only enqueues (list.append
        is atomic); _fetch and _make_room take the queue under the read lock."""
        if not self._closed:
            self._dropped.append(idx)

    def _take_abandoned(self) -> None:
        while self._dropped:
            idx = self._dropped.pop()
            self._lost.pop(idx, None)
            if self._results.pop(idx, self) is not self:
                self._fetched += 1
            elif idx >= self._read_next:
                self._abandoned.add(idx)

    def _raise_closed(self):
        if self._dead:
            raise ActorDiedError(self._death_message())
        raise DagClosedError(
            f"{RAY_CHANNEL_CLOSED} This compiled DAG was torn down; compile "
            f"the DAG again to run it."
        )

    def _death_message(self) -> str:
        return (
            f"{RAY_ACTOR_DIED} {self._dead}; the compiled DAG is closed and every pending "
            f"result is lost. Recreate the actor and compile again."
        )

    def _on_stop(self, e):
        if self._restart is not None:
            self._restart(self, e)  # raises while Ray restarts the dead actor (restart.py)
        if isinstance(e, PeerDied) and not self._closed:
            s = self._session
            self._dead = s.why_stopped(e.who)
            s.stop_actors(wait=False)
            s.release()
            # unmap our ends now unless another thread is inside execute()/get();
            # teardown() (or garbage collection) does it otherwise
            s.close_ends(self._locks, None)
            raise ActorDiedError(self._death_message()) from None
        self._raise_closed()

    def _own_locks(self) -> tuple:
        """The locks a thread inside ``execute()``/``get()`` may hold: closing the ends
        waits for them (teardown) or takes them only if free (garbage collection)."""
        return (self._submit_lock, self._read_lock)

    # -- teardown ----------------------------------------------------------------------------------
    def teardown(self, kill_actors: bool = False) -> None:
        """Stop every loop and release every segment. Idempotent; bounded in time.

        ``kill_actors`` is accepted for Ray's shutdown hook, which passes it to every
        Compiled Graph; dagc's teardown is bounded by itself and leaves the actors alone."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        if self._finalizer.detach() is not None:  # garbage collection: nothing left to do
            _release(self._session, self._locks, self._gets, True)

    def state(self) -> str:
        return "closed" if self._closed else ("dead" if self._dead else "running")


class GatheredExecutions(Executions):
    """Executions of a DAG with a MultiOutputNode: an execution answered by a Failure
    before its other outputs arrived stays counted in flight until they are read.
    (A subclass, not a bound method kept on the instance: that would be a reference cycle,
    and a dropped DAG would wait for the cyclic garbage collector to be released.)"""

    def _read_one(self, deadline, want: int = -1):
        try:
            return Executions._read_one(self, deadline, want)
        finally:
            self._sync_unsettled()


def executions_for(session, submit, collect, options: dict, multi: bool) -> Executions:
    """The Executions of a started session (gathered outputs or not, queued or not)."""
    from dagc.runtime.driver.queued import executions_class

    return executions_class(session, options)(session, submit, collect, options, multi)


def _release(session, locks: tuple, gets: AsyncGets, wait: bool) -> None:
    """Stop the loops and release everything the DAG holds in this process: what
    ``teardown()`` does (``wait``) and what garbage collection does for a DAG dropped
    without it. Collection makes no Ray call (it may run in any thread, or at exit after
    ``ray.shutdown()``) and takes no lock that is not free: the closed control stops the
    loops on this node, the closed channel ends (TCP: EOF) the loops on other nodes."""
    try:
        session.stop_actors(wait=wait, ask=wait)
    finally:  # even on Ctrl-C while waiting for the actors
        # an execute()/get() in another thread sees the closed state within a wait slice
        # and lets go; if it does not, its ends (and the control it polls) stay mapped
        # until garbage collection rather than vanish under it
        try:
            session.close_ends(locks, 1.0 if wait else None)
        finally:
            session.release()
            gets.shutdown()


def _register_with_ray(runs: Executions) -> None:
    """``ray.shutdown()`` calls ``teardown(kill_actors=True)`` on every object in Ray's
    table of live Compiled Graphs (weak values) before it disconnects: dagc's DAGs go in
    it too, so they stop while Ray can still reach their actors. Ray rebinds the table on
    shutdown, so it is looked up at each compile."""
    try:
        from ray.dag import compiled_dag_node

        compiled_dag_node._compiled_dags[f"dagc-{runs._session.token}"] = runs
    except Exception:  # a Ray without the table: the atexit hook still runs
        pass

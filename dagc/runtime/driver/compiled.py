"""Driver side: CompiledDag, DagRef, and starting/stopping the actor loops."""
from __future__ import annotations

import asyncio
import atexit
import secrets
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from dagc.errors import (ActorDiedError, CapacityError, DagClosedError, DagcError,
                         DagTimeoutError)
from dagc.ir import DRIVER
from dagc.runtime import channels as ch
from dagc.runtime.channels import shm
from dagc.runtime.actor import loop as worker
from dagc.runtime.failure import Failure
from dagc.runtime.driver.profiling import InspectMixin, Profile  # noqa: F401
from dagc.runtime.driver.session import ArgumentsNotSent, LaunchMixin

_LIVE: "weakref.WeakSet[CompiledDag]" = weakref.WeakSet()
CREATED_PREFIXES: list[str] = []   # every segment prefix this process made (leak checks)
_ATEXIT = False
_monotonic = time.monotonic


def _teardown_all() -> None:
    for cg in list(_LIVE):
        try:
            cg.teardown()
        except Exception:
            pass


class DagRef:
    """The result of one execution. ``get()`` blocks until it is there; may be called again."""

    __slots__ = ("_dag", "_idx", "_state", "_value", "__weakref__")

    def __init__(self, dag: "CompiledDag", idx: int):
        self._dag = dag
        self._idx = idx
        self._state = 0          # 0 pending, 1 value, 2 error

    def get(self, timeout: float | None = None):
        if self._state == 1:
            return self._value
        if self._state == 2:
            raise self._value
        value = self._dag._fetch(self._idx, timeout)
        if value.__class__ is Failure:
            self._value = value.to_error()
            self._state = 2
            raise self._value
        if self._dag._multi:
            for v in value:
                if v.__class__ is Failure:
                    self._value = v.to_error()
                    self._state = 2
                    raise self._value
        self._value = value
        self._state = 1
        return value

    def ready(self) -> bool:
        return self._state != 0 or self._dag._ready(self._idx)

    async def get_async(self):
        if self.ready():
            return self.get()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._dag._async_executor(), self.get)

    def __await__(self):
        return self.get_async().__await__()

    def __del__(self):
        if self._state == 0:
            try:
                self._dag._abandon(self._idx)
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"DagRef(execution={self._idx})"


class CompiledDag(LaunchMixin, InspectMixin):
    """A compiled DAG whose actor loops are running. See DESIGN.md for the contract."""

    def __init__(self, ir, side, modules, options: dict, probes: list, origin: str = "",
                 timings=None, driver_node: str = ""):
        self._probes = probes
        self._driver_node = driver_node
        self._secret = b""
        self._ir = ir
        self._side = side
        self._modules = modules
        self._options = options
        self._origin = origin
        self.timings = timings or {}
        self.schedule = ir.schedule
        self._max_inflight = options["max_inflight"]
        self._multi = ir.output.multi
        self._get_timeout = options["get_timeout"]
        self._token = secrets.token_hex(12)
        self._prefix = f"{shm.PREFIX}{self._token}-"
        CREATED_PREFIXES.append(self._prefix)
        self._submitted = 0
        self._fetched = 0
        self._read_next = 0
        self._results: dict[int, object] = {}
        self._abandoned: set[int] = set()
        self._dropped: list[int] = []          # abandoned refs not yet accounted
        self._submit_lock = threading.Lock()
        self._read_lock = threading.RLock()
        self._closed = False
        self._dead: str | None = None
        self._executor = None
        self._procs = [DRIVER] + [a.label for a in ir.actors]
        self._index = {DRIVER: 0}
        self._index.update({a.id: i + 1 for i, a in enumerate(ir.actors)})
        self._handles = [side.handles[a.id] for a in ir.actors]
        self._control = None
        self._readers: dict = {}
        self._writers: dict = {}
        self._start()
        _LIVE.add(self)
        global _ATEXIT
        if not _ATEXIT:
            atexit.register(_teardown_all)
            _ATEXIT = True
        # dropped without teardown: stop the loops (closed state) and remove the segments
        self._finalizer = weakref.finalize(self, _finalize, self._prefix, self._control)

    # -- execute / get ---------------------------------------------------------------------------
    def execute(self, *args, **kwargs) -> DagRef:
        with self._submit_lock:
            if self._closed or self._dead:     # checked under the lock: teardown takes it too
                self._raise_closed()
            if self._submitted - self._fetched >= self._max_inflight:
                self._make_room()
            try:
                self._submit(args, kwargs)
            except (ch.PeerDied, ch.ChannelClosed) as e:
                self._on_stop(e)
            except (ArgumentsNotSent, DagcError):
                # the arguments could not be pickled (the driver's writers raise this from
                # the encoder itself, nothing was sent), or do not match the InputNode
                raise
            except Exception as e:
                e.add_note("dagc internal error while submitting an execution (not caused "
                           "by its arguments); please report it with this traceback.")
                raise
            i = self._submitted
            self._submitted = i + 1
        return DagRef(self, i)

    async def execute_async(self, *args, **kwargs):
        """Submit one execution; the awaitable yields its value (a list for MultiOutputNode)."""
        return await self.execute(*args, **kwargs).get_async()

    def _make_room(self) -> None:
        # executions whose DagRefs were dropped unfetched free their places once read
        with self._read_lock:
            self._take_abandoned()
            while self._abandoned and self._submitted - self._fetched >= self._max_inflight:
                self._read_one(self._deadline(None))
        if self._submitted - self._fetched >= self._max_inflight:
            raise CapacityError(
                f"{self._submitted - self._fetched} executions are submitted and not fetched "
                f"(max_inflight={self._max_inflight}); get() earlier results first, or compile "
                f"with a larger max_inflight.")

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
        except ch.WaitTimeout:
            raise DagTimeoutError(
                f"execution {self._read_next} did not finish within the timeout; its result "
                f"can still be fetched later with get().") from None
        except (ch.PeerDied, ch.ChannelClosed) as e:
            self._on_stop(e)
        i = self._read_next
        self._read_next = i + 1
        if i == want:
            return value
        if i in self._abandoned:
            self._abandoned.discard(i)
            self._fetched += 1
        else:
            self._results[i] = value
        return self

    def _fetch(self, idx: int, timeout):
        with self._read_lock:
            if self._dropped:
                self._take_abandoned()
            r = self._results.pop(idx, self)
            if r is self:
                if self._closed or self._dead:
                    self._raise_closed()
                if idx >= self._submitted or idx < self._read_next:
                    raise ValueError(f"execution {idx} was never submitted or already fetched")
                deadline = None if timeout is None and self._get_timeout is None \
                    else self._deadline(timeout)
                while r is self:
                    r = self._read_one(deadline, idx)
            self._fetched += 1
            return r

    def _ready(self, idx: int) -> bool:
        if idx in self._results or self._closed or self._dead:
            return True            # get() answers at once: the value, or why there is none
        if idx != self._read_next:
            return False
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
            if self._results.pop(idx, self) is not self:
                self._fetched += 1
            elif idx >= self._read_next:
                self._abandoned.add(idx)

    def _crash_report(self, who: str) -> str | None:
        """If ``who``'s process is alive, its loop crashed: fetch the traceback."""
        import ray
        i = self._procs.index(who) if who in self._procs else -1
        if i <= 0:
            return None
        local = self._ir.actors[i - 1].node == self._driver_node
        if local and not shm.pid_alive(self._probes[i - 1]["pid"]):
            return None
        try:
            st = ray.get(self._handles[i - 1].__ray_call__.remote(worker.status, self._token),
                         timeout=2.0)
            return st.get("crash")
        except Exception:
            return None

    def _raise_closed(self):
        if self._dead:
            raise ActorDiedError(self._death_message())
        raise DagClosedError("this compiled DAG was torn down; compile the DAG again to run it.")

    def _death_message(self) -> str:
        return (f"{self._dead}; the compiled DAG is closed and every pending result is lost. "
                f"Recreate the actor and compile again.")

    def _why_stopped(self, who: str) -> str:
        """What ended the DAG when ``who`` stopped: its death, its loop's crash, or - when
        that crash came from a peer dying under it (a communicator op whose other end
        closed) - the peer's death."""
        crash = self._crash_report(who)
        if not crash:
            return f"{who} died (its process is gone)"
        gone = [a.label for a, p in zip(self._ir.actors, self._probes)
                if a.node == self._driver_node and a.label != who
                and not shm.pid_alive(p["pid"])]
        if gone:
            last = crash.strip().splitlines()[-1]
            return (f"{gone[0]} died (its process is gone); {who}'s dagc loop stopped "
                    f"after it: {last}")
        return f"{who} (its dagc loop crashed: {crash.strip()})"

    def _on_stop(self, e):
        if isinstance(e, ch.PeerDied) and not self._closed:
            self._dead = self._why_stopped(e.who)
            self._stop_actors(wait=False)
            shm.unlink_prefix(self._prefix)
            # unmap our ends now unless another thread is inside execute()/get();
            # teardown() (or garbage collection) does it otherwise
            if self._close_ends(None) and self._control is not None:
                self._control.release()
            raise ActorDiedError(self._death_message()) from None
        self._raise_closed()

    # -- teardown ----------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Stop every loop and release every segment. Idempotent; bounded in time."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        try:
            self._stop_actors(wait=True)
        finally:                   # even on Ctrl-C while waiting for the actors
            self._release()
            self._finalizer.detach()        # nothing left for garbage collection to do

    def _stop_actors(self, wait: bool) -> None:
        if self._control is not None:
            try:
                self._control.close()
            except Exception:
                pass
        for r in self._readers.values():
            r.wake()
        for w in self._writers.values():
            w.wake_all()
        refs = []
        for h in self._handles:
            try:
                refs.append(h.__ray_call__.remote(worker.stop, self._token, 2.0))
            except Exception:
                pass
        if wait and refs:
            import ray
            try:
                ray.wait(refs, num_returns=len(refs), timeout=self._options["teardown_timeout"])
            except Exception:
                pass

    def _release(self) -> None:
        # an execute()/get() in another thread sees the closed state within a wait slice
        # and lets go; if it does not, its ends (and the control it polls) stay mapped
        # until garbage collection rather than vanish under it
        if self._close_ends(1.0) and self._control is not None:
            self._control.release()
        shm.unlink_prefix(self._prefix)
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _close_ends(self, wait: float | None) -> bool:
        """Unmap the driver's channel ends once no execute() or get() uses them.

        Takes the submit lock, then the read lock (the order execute() takes them), each
        for at most ``wait`` seconds, or only if free at once when ``wait`` is None.
        Returns whether the ends were closed.
        """
        held = []
        try:
            for lock in (self._submit_lock, self._read_lock):
                if not (lock.acquire(blocking=False) if wait is None
                        else lock.acquire(timeout=wait)):
                    return False
                held.append(lock)
            for r in self._readers.values():
                r.close()
            for w in self._writers.values():
                w.close()
            return True
        finally:
            for lock in reversed(held):
                lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.teardown()

    def _async_executor(self):
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dagc-get")
        return self._executor

    # -- inspection ---------------------------------------------------------------------------------
    def _actor_id(self, actor) -> str:
        if isinstance(actor, str):
            for a in self._ir.actors:
                if actor in (a.id, a.label, a.name):
                    return a.id
            if actor == DRIVER:
                return DRIVER
            raise KeyError(f"no actor {actor!r} in this DAG; actors: "
                           + ", ".join(a.label for a in self._ir.actors))
        for a in self._ir.actors:
            if self._side.handles[a.id] == actor:
                return a.id
        raise KeyError(f"{actor!r} is not an actor of this DAG")

    def source(self, actor) -> str:
        """The generated loop module of ``actor`` (an ActorHandle or its schedule name)."""
        return self._modules[self._actor_id(actor)].source

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("dead" if self._dead else "running")
        return (f"<dagc.CompiledDag {len(self._ir.actors)} actors, "
                f"{len(self._ir.channels)} channels, {state}>")


def _finalize(prefix: str, control=None) -> None:
    """A CompiledDag was garbage-collected (or the interpreter exits) without teardown."""
    try:
        if control is not None:
            control.close()        # the loops see the closed state and stop by themselves
        shm.unlink_prefix(prefix)
    except Exception:
        pass

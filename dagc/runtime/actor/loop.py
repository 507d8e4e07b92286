"""The loop of one actor: its generated module bound to this actor and run on a thread.

An :class:`ActorLoop` is the ``rt`` object a generated module's ``bind(rt)`` sees: it
opens the actor's channel ends, forms its communicators, hands out bound methods,
constants and ends by name, and runs the module's ``loop()`` on a daemon thread until the
DAG is torn down (a channel read then raises ChannelClosed). The actor's own thread stays
free for ordinary ``.remote()`` calls. ``lifecycle.py`` has the calls that make, stop and
switch one.

Several DAGs may run on one actor, each its own ActorLoop (``LOOPS``, by compile token) on
its own thread. Where Ray runs the actor's methods one at a time (``max_concurrency`` 1,
Ray's default for a threaded actor), every loop holds the actor's one method lock
(:func:`method_lock`) around each call of a user method, and only for the call: never
across a channel or communicator wait, so two DAGs cannot deadlock on it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
import traceback
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dagc.runtime import channels as ch
from dagc.runtime import generated
from dagc.runtime.actor import prepared
from dagc.runtime.actor.plan import ActorPlan, tcp_channel_name
from dagc.runtime.channels import shm
from dagc.runtime.channels.control import C_STATE, FAILED, RUNNING, SWAP, ChannelClosed, PeerDied
from dagc.runtime.failure import Failure, capture, first_failure

if TYPE_CHECKING:  # annotations only: TCP and tensor ends are imported when a plan has them
    from dagc.runtime import failure  # its Failure: ActorLoop.Failure hides the name there
    from dagc.runtime.channels.tcp import TcpReader, TcpWriter
    from dagc.runtime.comm.packing import OnDevice

LOOPS: dict[str, ActorLoop] = {}  # compile token -> this process's loop
LOCK = threading.Lock()  # guards LOOPS

# id(actor instance) -> the lock its DAGs' loops hold around each method call. An actor
# process holds one instance for its whole life, so the id is never reused there (in-process
# tests that reuse an id would only share a lock, never lose one).
_METHOD_LOCKS: dict[int, threading.Lock] = {}
_METHOD_LOCKS_GUARD = threading.Lock()  # not LOCK: start() makes loops holding that


def max_concurrency() -> int:
    """How many of this actor's methods Ray may run at once (its ``max_concurrency``: 1 for a
    threaded actor unless raised, 1000 for an async one unless set); 1 when it cannot be
    told (not inside a Ray actor), the safe answer."""
    try:
        from ray._private.worker import global_worker

        # core_worker is set on Ray's Worker when it connects; Ray's class does not declare it
        worker = global_worker.core_worker  # type: ignore[attr-defined]
        return int(worker.current_actor_max_concurrency())
    except Exception:
        return 1


def method_lock(instance: object) -> threading.Lock:
    """The lock a loop holds around each call of ``instance``'s methods: shared by every
    loop on the instance when Ray runs its methods one at a time, else the loop's own
    (uncontended: the calls of one loop never overlap anyway). Ray's concurrency groups
    are not looked at: with ``max_concurrency`` 1, every method is serialized."""
    if max_concurrency() > 1:
        return threading.Lock()
    with _METHOD_LOCKS_GUARD:
        lock = _METHOD_LOCKS.get(id(instance))
        if lock is None:
            lock = _METHOD_LOCKS[id(instance)] = threading.Lock()
        return lock


def _sync_method(
    fn: Callable[..., Any], event_loops: list[asyncio.AbstractEventLoop] | None = None
) -> Callable[..., Any]:
    """Run a coroutine method to completion on a private event loop of the loop thread.

    The event loop (a selector and a self-pipe: three fds) is appended to ``event_loops``
    so the ActorLoop closes it with its channels instead of leaking it per compile.
    """
    if not inspect.iscoroutinefunction(fn):
        return fn
    ev = asyncio.new_event_loop()
    if event_loops is not None:
        event_loops.append(ev)

    def call(*args: Any, **kwargs: Any) -> Any:
        return ev.run_until_complete(fn(*args, **kwargs))

    call.__name__ = getattr(fn, "__name__", "method")
    return call


class ActorLoop:
    """The runtime object ``rt`` a generated module's ``bind(rt)`` sees."""

    Failure = Failure
    capture = staticmethod(capture)
    first_failure = staticmethod(first_failure)
    clock = staticmethod(time.monotonic_ns)

    def __init__(self, instance: object, plan: ActorPlan):
        self.instance = instance
        self.plan = plan
        # the generated loop binds lock.acquire and lock.release around each method call
        self.lock = method_lock(instance)
        self.crash: str | None = None
        self.ended = 0.0  # when the loop thread ended (monotonic), once it did
        self.records: list[tuple[int, int, int, int]] = []  # (n, step, start, end)
        self.thread: threading.Thread | None = None
        self._readers: dict[str, ch.Reader | TcpReader] = {}
        self._writers: dict[str, ch.Writer | TcpWriter] = {}
        self._comms: dict = {}
        self._comm_ends: dict = {}
        self._next_fn: Callable[[], None] | None = None
        self._parked = threading.Event()
        self._event_loops: list[asyncio.AbstractEventLoop] = []
        self._failed_who: str | None = None
        self.control = ch.Control(plan.ctl or plan.prefix + "ctl")
        try:
            self._open_ends()
        except BaseException:
            self.close()  # every end opened so far, and the control
            raise

    def _open_ends(self) -> None:
        plan = self.plan
        self.waiter = ch.Waiter(self.control, list(plan.procs), plan.wait)
        # every wait watches every other process of the DAG, not only the channel's peer:
        # a death anywhere (or the driver's) stops this loop within a wait slice, even
        # when nothing flows to this actor any more
        others = tuple(i for i in range(len(plan.procs)) if i != plan.index)
        for cid, out in plan.writers.items():
            w = self._writers[cid] = ch.Writer(
                out.segment,
                out.nreaders,
                out.slots,
                out.capacity,
                self.waiter,
                others,
                create=False,
            )
            # PickleEncoder declares on_encode_error as None only (channels/serialize.py)
            w.on_encode_error = self._encode_error_of(cid)  # type: ignore[assignment]
        for cid, inp in plan.readers.items():
            r = self._readers[cid] = ch.Reader(inp.segment, inp.index, self.waiter, inp.writer)
            # Reader infers peers as "one writer or none"; it holds any tuple of indices
            r.peers = others  # type: ignore[assignment]
        self.control.set_pid(plan.index, os.getpid())
        # every segment of this node this process needs is mapped: the node's last
        # process to get here removes their names (nothing opens them by name again)
        if plan.node_names:
            self.control.mark_opened(plan.node_names)
        for cid, w in prepared.take(plan.token).items():  # listening since prepare()
            w.waiter = self.waiter
            w.on_encode_error = self._encode_error_of(cid)
            self._writers[cid] = w
        if plan.tcp_readers:
            from dagc.runtime.channels import tcp

            for cid, tin in plan.tcp_readers.items():
                self._readers[cid] = tcp.TcpReader(
                    tin.host,
                    tin.port,
                    plan.secret,
                    tin.index,
                    self.waiter,
                    tin.writer,
                    channel=tcp_channel_name(plan.token, cid),
                    connect_timeout=plan.comm_timeout,
                )

    # -- the rt interface used by generated code -------------------------------------------
    def method(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.instance, name, None)
        if fn is None:
            from dagc.errors import CompileError

            raise CompileError(f"{self.plan.label} has no method {name!r}.")
        # Ray wraps actor methods for tracing; the loop calls the user's function itself
        func = getattr(fn, "__func__", None)
        if (
            func is not None
            and getattr(func, "__ray_tracing_wrapped__", False)
            and hasattr(func, "__wrapped__")
        ):
            fn = types.MethodType(func.__wrapped__, self.instance)
        return _sync_method(fn, self._event_loops)

    def constant(self, k: int) -> Any:
        return self.plan.constants[k]

    def reader(self, cid: str) -> ch.Reader | TcpReader | OnDevice:
        dev = self.plan.devices.get(cid)
        if dev:  # with_tensor_transport(device=...): tensors move there
            from dagc.runtime.comm.packing import OnDevice

            return OnDevice(self._readers[cid], dev)
        return self._readers[cid]

    def writer(self, cid: str) -> ch.Writer | TcpWriter:
        return self._writers[cid]

    def _comm(self, kid: str) -> Any:
        comm = self._comms.get(kid)
        if comm is None:
            m = self.plan.groups[kid]
            communicator = m.communicator
            try:
                communicator.setup(m.rank, m.world, m.rendezvous, self.plan.comm_timeout)
            except BaseException:
                try:  # whatever a failed set-up left open
                    communicator.destroy()
                except Exception:
                    pass
                raise
            comm = self._comms[kid] = communicator
        return comm

    def comm_writer(self, cid: str):
        from dagc.runtime.comm.p2p import CommWriter

        end = self._comm_ends.get(cid)
        if end is None:
            out = self.plan.comm_writers[cid]
            end = self._comm_ends[cid] = CommWriter(
                self._writers[cid],
                self._comm(out.group),
                dict(out.ranks),  # CommWriter takes a dict; the plan's is read-only
                tuple(out.readers),
                self.plan.actor,
            )
        return end

    def comm_reader(self, cid: str):
        from dagc.runtime.comm.p2p import CommReader

        end = self._comm_ends.get(cid)
        if end is None:
            inp = self.plan.comm_readers[cid]
            comm = self._comm(inp.group)
            end = CommReader(
                self._readers[cid], comm, inp.writer_rank, getattr(comm, "device", "cpu")
            )
            dev = self.plan.devices.get(cid)
            if dev:  # with_tensor_transport(device=...): tensors move there
                from dagc.runtime.comm.packing import OnDevice

                end = OnDevice(end, dev)
            self._comm_ends[cid] = end
        return end

    def collective(self, gid: str):
        from dagc.runtime.comm.collective import Collective

        end = self._comm_ends.get(gid)
        if end is None:
            c = self.plan.collectives[gid]
            kind, _, op = c.method.partition(".")  # "allreduce.sum", "allgather"
            end = self._comm_ends[gid] = Collective(
                self._comm(c.group), op or None, self.plan.actor, c.method, c.step, kind
            )
        return end

    def _encode_error_of(self, cid: str) -> Callable[[Exception, Any], failure.Failure]:
        """The ``on_encode_error`` of the writer of channel ``cid``: the Failure sent in
        place of a value that cannot be sent names the method that returned it (its
        file:line) and its schedule step, as a task error does."""
        method, step, where = self.plan.producers.get(cid, ("<send>", -1, ""))
        actor, label = self.plan.actor, self.plan.label

        def encode_error(exc: Exception, value: Any) -> failure.Failure:
            if isinstance(exc, shm.ShmFullError):  # no room in /dev/shm: its own message
                return capture(exc, actor, method, step, where)
            err = TypeError(
                f"{label}.{method} returned a {type(value).__name__} that cannot "
                f"be pickled to send it on: {exc}. Return picklable values."
            )
            return capture(err, actor, method, step, where)

        return encode_error

    def record(self, n: int, step: int, start: int, end: int) -> None:
        self.records.append((n, step, start, end))

    # -- lifecycle ---------------------------------------------------------------------------
    def _bind(self, source: str) -> Callable[[], None]:
        ns = generated.load(source, self.plan.filename, f"dagc_loop_{self.plan.actor}")
        return ns["bind"](self)

    def start(self) -> None:
        # communicators form here, concurrently on every member actor (setup blocks)
        for kid in self.plan.groups:
            self._comm(kid)
        fn = self._bind(self.plan.source)
        self.thread = threading.Thread(
            target=self._main, args=(fn,), name=f"dagc-loop-{self.plan.actor}", daemon=True
        )
        self.thread.start()

    def running(self) -> bool:
        try:
            return (
                self.thread is not None
                and self.thread.is_alive()
                and self.control.state in (RUNNING, SWAP)
            )
        except ValueError:  # control already released
            return False

    def _main(self, fn: Callable[[], None]) -> None:
        try:
            while True:
                try:
                    fn()
                except ChannelClosed:
                    if self.control.state != SWAP:
                        return
                    self._drop_deferred()  # the next execution's, issued early
                    self._parked.set()
                    deadline = time.monotonic() + 30
                    while self.control.state == SWAP and time.monotonic() < deadline:
                        time.sleep(0.0005)
                    self._parked.clear()
                    if self._next_fn is None or self.control.state != RUNNING:
                        return
                    fn, self._next_fn = self._next_fn, None
        except PeerDied as e:
            self._failed_who = e.who
        except BaseException:
            self.crash = traceback.format_exc()
            self._failed_who = self.plan.label
            self.control.fail(self.plan.index)
        finally:
            self.ended = time.monotonic()
            failed = self.control.state == FAILED
            self.close()
            if failed:
                shm.unlink_prefix(self.plan.prefix)
            if self.crash is None:  # a crash stays listed: status() reports it
                with LOCK:
                    if LOOPS.get(self.plan.token) is self:
                        del LOOPS[self.plan.token]

    def _drop_deferred(self) -> None:
        """Parked between executions: forget receives issued for the next one (overlap may
        issue one before the input read); the swapped-in loop issues them again."""
        if self._comms:
            from dagc.runtime.comm.p2p import drop_pending

            for comm in self._comms.values():
                drop_pending(comm)

    def swap(self, source: str | None, timeout: float) -> bool:
        self._next_fn = self._bind(source or self.plan.source)
        if self.control.state == RUNNING:
            self.control.words[C_STATE] = SWAP  # this node's loops park
        if source is not None:  # a new profile; swapping back keeps them for fetching
            self.records = []
        self._wake()
        return self._parked.wait(timeout)

    def _wake(self) -> None:
        for r in self._readers.values():
            r.wake()
        for w in self._writers.values():
            w.wake_all()

    def stop(self, timeout: float) -> dict[str, Any]:
        self.control.close()
        self._wake()
        t = self.thread
        if t is not None:
            t.join(timeout)
        alive = bool(t and t.is_alive())
        if not alive:
            self.close()
        if self.plan.node_cleanup:  # the driver does its own node's
            shm.unlink_prefix(self.plan.prefix)
        return {"stopped": not alive, "crash": self.crash}

    def close(self) -> None:
        for comm in self._comms.values():
            try:
                comm.destroy()
            except Exception:
                pass
        self._comms = {}
        for r in self._readers.values():
            r.close()
        if self._failed_who is None:
            for w in self._writers.values():
                w.close()
        else:
            from dagc.runtime.channels.tcp import TcpWriter

            for w in self._writers.values():
                if isinstance(w, TcpWriter):  # its readers learn who died upstream
                    w.close(failed=self._failed_who)
                else:
                    w.close()
        self._readers, self._writers = {}, {}
        for ev in self._event_loops:
            try:
                ev.close()
            except Exception:
                pass
        self._event_loops = []
        self.control.release()

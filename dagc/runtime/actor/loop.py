"""Actor side: load a generated loop module onto this actor and run it on a thread.

The driver reaches these functions through ``actor.__ray_call__.remote(fn, ...)``, which
calls ``fn(instance, ...)`` inside the actor process, so the user's class needs nothing
from dagc. The loop runs on a daemon thread; the actor's own thread stays free for
ordinary ``.remote()`` calls.
"""
from __future__ import annotations

import asyncio
import inspect
import linecache
import os
import threading
import time
import traceback
import types
from dataclasses import dataclass, field

from dagc.runtime import channels as ch
from dagc.runtime.channels.control import C_STATE, SWAP
from dagc.runtime.channels import shm, sweep
from dagc.runtime.failure import Failure, capture, first_failure

_LOOPS: dict[str, "ActorLoop"] = {}     # compile token -> this process's loop
_LOCK = threading.Lock()



@dataclass
class ActorPlan:
    """Everything one actor needs to run its part of a compiled DAG (plain data + constants)."""

    token: str
    prefix: str
    index: int                       # this process's control index (driver = 0)
    procs: list                      # names by control index, for error messages
    actor: str                       # "a1"
    label: str                       # "a1:Stage"
    filename: str
    source: str
    constants: list = field(default_factory=list)
    readers: dict = field(default_factory=dict)    # cid -> (segment, reader index, writer idx)
    writers: dict = field(default_factory=dict)    # cid -> (segment, nreaders, slots, cap, reader idxs)
    wait: str = "adaptive"
    comm_groups: dict = field(default_factory=dict)   # kid -> (communicator, rank, world, rendezvous)
    comm_channels: dict = field(default_factory=dict) # cid -> ("w", kid, ranks, readers) | ("r", kid, writer_rank)
    collectives: dict = field(default_factory=dict)   # gid -> (kid, method, step)
    comm_timeout: float = 60.0
    ctl: str = ""                    # this node's control segment
    tcp_readers: dict = field(default_factory=dict)   # cid -> (host, port, index, writer idx)
    secret: bytes = field(default=b"", repr=False)    # authenticates TCP channels
    node_cleanup: bool = True        # sweeps stale segments at start, this DAG's at stop:
                                     # one actor per node without the driver
    node_names: tuple = ()           # this node's segment names (its control's last): the
                                     # last of the node's processes to map its ends
                                     # removes them (Control.mark_opened)


# compile token -> {"writers": {cid: TcpWriter listening since prepare()}, "leader": made
# this node's control segment, "expires": monotonic time}: what a loop adopts at start, or
# stop() cleans up when the compile fails before that. An entry whose driver never came
# back (it died between the rounds) is discarded by this actor's next probe, prepare or
# start once it expired (the driver gives up on a round after start_timeout).
_PREPARED: dict[str, dict] = {}


def tcp_channel_name(token: str, cid: str) -> str:
    return f"{token}:{cid}"


def _prefix(token: str) -> str:
    return f"{shm.PREFIX}{token}-"


def prepare(instance, token: str, spec: dict) -> dict:
    """Round 1 on a node other than the driver's, or for an actor that writes over TCP.

    A node's leader creates the node's control segment and the shared-memory segments
    written on that node; a TCP writer starts listening. Returns {cid: (host, port)}.
    All or nothing: on failure, whatever it made is closed and removed.
    """
    _expire_prepared()
    entry = _PREPARED.setdefault(token, {
        "writers": {}, "leader": False,
        "expires": time.monotonic() + 3 * spec.get("timeout", 60.0) + 10.0})
    try:
        return _prepare(token, spec, entry)
    except BaseException as e:
        _discard_prepared(token)
        _drop_frames(e)
        raise


def _prepare(token: str, spec: dict, entry: dict) -> dict:
    from dagc.runtime.channels import tcp
    if spec.get("ctl"):
        entry["leader"] = True
        ch.Control(spec["ctl"], create=True, nprocs=spec.get("nprocs", 0),
                   index=spec.get("index", -1), pid=os.getpid()).release()
    for name, nreaders, slots, cap in spec.get("segments", ()):
        ch.create_segment(name, nreaders, slots, cap).close()
    addrs = {}
    for cid, nreaders, slots, ridx, rnames in spec.get("tcp", ()):
        w = tcp.TcpWriter(tcp_channel_name(token, cid), nreaders, slots, spec["secret"],
                          None, tuple(ridx), reader_names=list(rnames),
                          connect_timeout=spec.get("timeout", 60.0))
        entry["writers"][cid] = w
        addrs[cid] = w.listen(spec["host"])
    return addrs


def _drop_frames(exc: BaseException) -> None:
    """Let go of the objects a failed start-up's finished frames still reference (a
    half-made reader, the writers being adopted): Ray keeps the raised exception in a
    reference cycle, so its traceback's frames would hold their fds (wake pipes) until some
    later garbage collection. The traceback itself (files, lines) stays intact. The
    caller's own frame, still running, is not cleared: it keeps no end in a local."""
    traceback.clear_frames(exc.__traceback__)


def _expire_prepared() -> None:
    now = time.monotonic()
    for token in [t for t, e in _PREPARED.items() if e["expires"] < now]:
        _discard_prepared(token)


def _discard_prepared(token: str) -> None:
    """A compile that failed after prepare(): close its TCP writers (the listening socket
    and accept thread go with them) and, on a node leader, remove the node's segments."""
    entry = _PREPARED.pop(token, None)
    if entry is None:
        return
    for w in entry["writers"].values():
        try:
            w.close()
        except Exception:
            pass
    if entry["leader"]:
        shm.unlink_prefix(_prefix(token))


def probe(instance, token: str) -> dict:
    """Where this actor lives, and whether it already runs another compiled DAG."""
    import ray
    _expire_prepared()
    busy = [t for t, lp in _LOOPS.items() if lp.running() and t != token]
    ctx = ray.get_runtime_context()
    try:
        gpus = tuple(ray.get_gpu_ids())
    except Exception:
        gpus = ()
    return {"pid": os.getpid(), "node": ctx.get_node_id(), "gpus": gpus, "busy": busy,
            "ip": ray.util.get_node_ip_address()}


def comm_prepare(instance, communicator) -> dict:
    """Rank 0 of a communicator group: make the rendezvous info the others need."""
    return communicator.prepare()


def start(instance, plan: ActorPlan) -> dict:
    _expire_prepared()
    if plan.node_cleanup:   # segments of DAGs whose processes all died together
        try:
            sweep.sweep_stale()
        except OSError:
            pass
    with _LOCK:
        for t, lp in list(_LOOPS.items()):
            if not lp.running():
                _LOOPS.pop(t, None)
        busy = [t for t, lp in _LOOPS.items() if lp.running()]
        if busy:
            _abort(plan)
            from dagc.errors import CompileError
            raise CompileError(f"actor {plan.label} already runs compiled DAG {busy[0]}; "
                               f"tear that DAG down before compiling another on this actor.")
        try:
            loop = ActorLoop(instance, plan)
        except BaseException as e:
            _abort(plan)            # the ends it opened are closed already
            _drop_frames(e)
            raise
        _LOOPS[plan.token] = loop
    try:
        loop.start()
    except BaseException as e:
        _LOOPS.pop(plan.token, None)
        loop.close()
        _abort(plan)
        _drop_frames(e)
        raise
    return {"pid": os.getpid()}


def _abort(plan: ActorPlan) -> None:
    """This actor's start failed, so the compile does: leave nothing of it here."""
    _discard_prepared(plan.token)
    if plan.node_cleanup:                 # the node's leader: the node's segments too
        shm.unlink_prefix(plan.prefix)


def stop(instance, token: str, timeout: float = 2.0) -> dict:
    _discard_prepared(token)              # a compile that failed before this loop started
    loop = _LOOPS.pop(token, None)
    if loop is None:
        return {"stopped": False}
    return loop.stop(timeout)


def swap(instance, token: str, source: str | None, timeout: float = 5.0) -> bool:
    """Park the loop and rebind it to ``source`` (a profiling variant), or back (None)."""
    loop = _LOOPS.get(token)
    return loop.swap(source, timeout) if loop else False


def resume(instance, token: str) -> None:
    """After every loop of the DAG parked for a swap: let this node's loops run again."""
    loop = _LOOPS.get(token)
    if loop is not None and loop.control.state == SWAP:
        loop.control.words[C_STATE] = ch.RUNNING


def fetch_profile(instance, token: str) -> list:
    loop = _LOOPS.get(token)
    return list(loop.records) if loop else []


def status(instance, token: str) -> dict:
    loop = _LOOPS.get(token)
    return {"running": bool(loop and loop.running()), "crash": loop.crash if loop else None}


def _sync_method(fn, event_loops: list | None = None):
    """Run a coroutine method to completion on a private event loop of the loop thread.

    The event loop (a selector and a self-pipe: three fds) is appended to ``event_loops``
    so the ActorLoop closes it with its channels instead of leaking it per compile.
    """
    if not inspect.iscoroutinefunction(fn):
        return fn
    ev = asyncio.new_event_loop()
    if event_loops is not None:
        event_loops.append(ev)

    def call(*args, **kwargs):
        return ev.run_until_complete(fn(*args, **kwargs))

    call.__name__ = getattr(fn, "__name__", "method")
    return call


class ActorLoop:
    """The runtime object ``rt`` a generated module's ``bind(rt)`` sees."""

    Failure = Failure
    capture = staticmethod(capture)
    first_failure = staticmethod(first_failure)
    clock = staticmethod(time.monotonic_ns)

    def __init__(self, instance, plan: ActorPlan):
        self.instance = instance
        self.plan = plan
        self.crash: str | None = None
        self.records: list = []
        self.thread: threading.Thread | None = None
        self._readers: dict[str, ch.Reader] = {}
        self._writers: dict[str, ch.Writer] = {}
        self._comms: dict = {}
        self._comm_ends: dict = {}
        self._next_fn = None
        self._parked = threading.Event()
        self._event_loops: list = []
        self._failed_who: str | None = None
        self.control = ch.Control(plan.ctl or plan.prefix + "ctl")
        try:
            self._open_ends()
        except BaseException:
            self.close()           # every end opened so far, and the control
            raise

    def _open_ends(self) -> None:
        plan = self.plan
        self.waiter = ch.Waiter(self.control, plan.procs, plan.wait)
        # every wait watches every other process of the DAG, not only the channel's peer:
        # a death anywhere (or the driver's) stops this loop within a wait slice, even
        # when nothing flows to this actor any more
        others = tuple(i for i in range(len(plan.procs)) if i != plan.index)
        for cid, (seg, nreaders, slots, cap, ridx) in plan.writers.items():
            w = self._writers[cid] = ch.Writer(seg, nreaders, slots, cap, self.waiter,
                                               others, create=False)
            w.on_encode_error = self._encode_error
        for cid, (seg, index, widx) in plan.readers.items():
            r = self._readers[cid] = ch.Reader(seg, index, self.waiter, widx)
            r.peers = others
        self.control.set_pid(plan.index, os.getpid())
        # every segment of this node this process needs is mapped: the node's last
        # process to get here removes their names (nothing opens them by name again)
        if plan.node_names:
            self.control.mark_opened(plan.node_names)
        prepared = _PREPARED.pop(plan.token, None)
        if prepared is not None:
            for cid, w in prepared["writers"].items():
                w.waiter = self.waiter
                w.on_encode_error = self._encode_error
                self._writers[cid] = w
        if plan.tcp_readers:
            from dagc.runtime.channels import tcp
            for cid, (host, port, index, widx) in plan.tcp_readers.items():
                self._readers[cid] = tcp.TcpReader(
                    host, port, plan.secret, index, self.waiter, widx,
                    channel=tcp_channel_name(plan.token, cid),
                    connect_timeout=plan.comm_timeout)

    # -- the rt interface used by generated code -------------------------------------------
    def method(self, name: str):
        fn = getattr(self.instance, name, None)
        if fn is None:
            from dagc.errors import CompileError
            raise CompileError(f"{self.plan.label} has no method {name!r}.")
        # Ray wraps actor methods for tracing; the loop calls the user's function itself
        func = getattr(fn, "__func__", None)
        if getattr(func, "__ray_tracing_wrapped__", False) and hasattr(func, "__wrapped__"):
            fn = types.MethodType(func.__wrapped__, self.instance)
        return _sync_method(fn, self._event_loops)

    def constant(self, k: int):
        return self.plan.constants[k]

    def reader(self, cid: str) -> ch.Reader:
        return self._readers[cid]

    def writer(self, cid: str) -> ch.Writer:
        return self._writers[cid]

    def _comm(self, kid: str):
        comm = self._comms.get(kid)
        if comm is None:
            communicator, rank, world, rdv = self.plan.comm_groups[kid]
            try:
                communicator.setup(rank, world, rdv, self.plan.comm_timeout)
            except BaseException:
                try:                       # whatever a failed set-up left open
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
            _, kid, ranks, readers = self.plan.comm_channels[cid]
            end = self._comm_ends[cid] = CommWriter(self._writers[cid], self._comm(kid),
                                                    ranks, tuple(readers), self.plan.actor)
        return end

    def comm_reader(self, cid: str):
        from dagc.runtime.comm.p2p import CommReader
        end = self._comm_ends.get(cid)
        if end is None:
            _, kid, writer_rank = self.plan.comm_channels[cid]
            comm = self._comm(kid)
            end = self._comm_ends[cid] = CommReader(self._readers[cid], comm, writer_rank,
                                                    getattr(comm, "device", "cpu"))
        return end

    def collective(self, gid: str):
        from dagc.runtime.comm.collective import Collective
        end = self._comm_ends.get(gid)
        if end is None:
            kid, method, step = self.plan.collectives[gid]
            kind, _, op = method.partition(".")       # "allreduce.sum", "allgather"
            end = self._comm_ends[gid] = Collective(self._comm(kid), op or None,
                                                    self.plan.actor, method, step, kind)
        return end

    def _encode_error(self, exc: Exception, value) -> Failure:
        err = TypeError(f"{self.plan.label} produced a {type(value).__name__} that cannot be "
                        f"pickled to send it on: {exc}. Return picklable values.")
        return capture(err, self.plan.actor, "<send>", -1)

    def record(self, n: int, step: int, start: int, end: int) -> None:
        self.records.append((n, step, start, end))

    # -- lifecycle ---------------------------------------------------------------------------
    def _bind(self, source: str):
        code = compile(source, self.plan.filename, "exec")
        linecache.cache[self.plan.filename] = (len(source), None,
                                               source.splitlines(True), self.plan.filename)
        ns: dict = {"__name__": f"dagc_loop_{self.plan.actor}"}
        exec(code, ns)
        return ns["bind"](self)

    def start(self) -> None:
        # communicators form here, concurrently on every member actor (setup blocks)
        for kid in self.plan.comm_groups:
            self._comm(kid)
        fn = self._bind(self.plan.source)
        self.thread = threading.Thread(target=self._main, args=(fn,),
                                       name=f"dagc-loop-{self.plan.actor}", daemon=True)
        self.thread.start()

    def running(self) -> bool:
        try:
            return (self.thread is not None and self.thread.is_alive()
                    and self.control.state in (ch.RUNNING, SWAP))
        except ValueError:  # control already released
            return False

    def _main(self, fn) -> None:
        try:
            while True:
                try:
                    fn()
                except ch.ChannelClosed:
                    if self.control.state != SWAP:
                        return
                    self._parked.set()
                    deadline = time.monotonic() + 30
                    while self.control.state == SWAP and time.monotonic() < deadline:
                        time.sleep(0.0005)
                    self._parked.clear()
                    if self._next_fn is None or self.control.state != ch.RUNNING:
                        return
                    fn, self._next_fn = self._next_fn, None
        except ch.PeerDied as e:
            self._failed_who = e.who
        except BaseException:
            self.crash = traceback.format_exc()
            self._failed_who = self.plan.label
            self.control.fail(self.plan.index)
        finally:
            failed = self.control.state == ch.FAILED
            self.close()
            if failed:
                shm.unlink_prefix(self.plan.prefix)
            if self.crash is None:   # a crash stays listed: status() reports it
                with _LOCK:
                    if _LOOPS.get(self.plan.token) is self:
                        del _LOOPS[self.plan.token]

    def swap(self, source: str | None, timeout: float) -> bool:
        self._next_fn = self._bind(source or self.plan.source)
        if self.control.state == ch.RUNNING:
            self.control.words[C_STATE] = SWAP     # this node's loops park
        self.records = []
        self._wake()
        return self._parked.wait(timeout)

    def _wake(self) -> None:
        for r in self._readers.values():
            r.wake()
        for w in self._writers.values():
            w.wake_all()

    def stop(self, timeout: float) -> dict:
        self.control.close()
        self._wake()
        t = self.thread
        if t is not None:
            t.join(timeout)
        alive = bool(t and t.is_alive())
        if not alive:
            self.close()
        if self.plan.node_cleanup:            # the driver does its own node's
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
        for w in self._writers.values():
            if self._failed_who is not None and hasattr(w, "listen"):
                w.close(failed=self._failed_who)   # TCP readers learn who died upstream
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

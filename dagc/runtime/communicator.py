"""Communicators: how tensors move between actors outside the shared-memory channels.

A :class:`Communicator` is a fixed group of processes (rank = position in the group) that
can send, receive and all-reduce tensors. dagc uses one for every tensor-transport edge
(``with_tensor_transport``) and every collective; users may subclass it for a transport of
their own and pass an instance as ``dagc.compile(dag, communicator=...)``.

Life of one group (the runtime drives it; nothing here talks to Ray)::

    driver                          rank 0 actor               rank r actor
    ------                          ------------               ------------
    pickle the unconfigured   -->   prepare() -> rendezvous
    instance to every member        (picklable: host/port,
                                     NCCL unique id, ...)
    hand rendezvous to all    -->   setup(0, n, rdv, t)        setup(r, n, rdv, t)
                                    ... send / recv / isend / irecv / allreduce ...
    teardown                  -->   destroy()                  destroy()

``setup`` runs concurrently on every member, blocks until the group is formed, and raises
(never hangs) once ``timeout`` seconds pass without it.

Ordering: point-to-point messages between two ranks are matched in issue order (both
backends here use one tag/stream per group). The schedule's single global order of
communicator ops is what keeps that order the same on both ends.

Two implementations:

- :class:`GlooCommunicator` - ``torch.distributed``'s gloo backend, built directly on a
  ``TCPStore``/``PrefixStore`` and a ``ProcessGroupGloo`` so the global default process
  group (the user's own ``torch.distributed``) is never touched, and one process can be in
  several groups. CPU tensors.
- :class:`NcclCommunicator` - ``cupy.cuda.nccl`` with one CUDA stream for communication and
  CUDA events ordering it against the caller's current (compute) stream. GPU tensors.
  cupy is imported only when an instance is set up.
"""
from __future__ import annotations

import contextlib
import datetime
import sys
import threading
import time
import uuid

REDUCE_OPS = ("sum", "product", "min", "max", "avg")

# A very long op timeout ("wait as long as it takes"): gloo's waits need some value, and a
# timeout there closes every connection of the group. Peer death still ends a wait at once
# (the peer's sockets close). Kept far below what a steady_clock deadline can hold.
FOREVER_S = 7 * 24 * 3600.0


class Work:
    """A pending communicator op. ``wait()`` returns once it is complete (for GPU ops:
    once the caller's current stream is ordered after it)."""

    __slots__ = ()

    def wait(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def is_completed(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class _Done(Work):
    """An op that completed when it was issued."""

    __slots__ = ()

    def wait(self) -> None:
        return None

    def is_completed(self) -> bool:
        return True


DONE = _Done()


class Communicator:
    """Base class of dagc's communicators, and what users subclass for a custom transport.

    A subclass implements ``send``, ``recv`` and ``allreduce`` (and ``prepare``/``setup``/
    ``destroy`` when it needs rendezvous or resources); ``allgather`` and ``reducescatter``
    have defaults built on ``allreduce``. The default ``isend``/``irecv`` run
    the blocking op and return a completed Work: correct, but with
    ``overlap_communication=True`` a custom transport should override them with truly
    non-blocking ones (a blocking ``isend`` waits for the peer's receive, which the overlapped
    schedule may post later).

    Tensors given to every op are contiguous and on ``device``.
    """

    rank: int = -1
    world_size: int = 0
    device: str = "cpu"          # "cpu" or "cuda": where received tensors are allocated

    def prepare(self) -> dict:
        """Rank 0 only, before ``setup``, in the rank-0 process: return picklable
        rendezvous information that every rank's ``setup`` receives."""
        return {}

    def setup(self, rank: int, world_size: int, rendezvous: dict, timeout: float) -> None:
        """Join the group; blocks until it is formed; raises after ``timeout`` seconds."""
        self.rank = rank
        self.world_size = world_size

    def send(self, tensor, peer: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement send(tensor, peer)")

    def recv(self, tensor, peer: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement recv(tensor, peer) "
                                  f"(fill the preallocated tensor)")

    def isend(self, tensor, peer: int) -> Work:
        self.send(tensor, peer)
        return DONE

    def irecv(self, tensor, peer: int) -> Work:
        self.recv(tensor, peer)
        return DONE

    def allreduce(self, tensor, op: str = "sum") -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement "
                                  f"allreduce(tensor, op) (in place)")

    def allgather(self, tensor, out) -> None:
        """Fill ``out`` (``world_size`` times ``tensor``'s rows) with every rank's tensor,
        in rank order. This default builds it from ``allreduce``: a backend with a real
        all-gather should override it."""
        out.zero_()
        out.view(self.world_size, -1)[self.rank].copy_(tensor.reshape(-1))
        self.allreduce(out, "max" if out.dtype == _bool() else "sum")

    def reducescatter(self, tensor, out, op: str = "sum") -> None:
        """Reduce ``tensor`` over the ranks and leave this rank's block of rows (``out``,
        1/``world_size`` of them) in ``out``. This default all-reduces a copy: a backend
        with a real reduce-scatter should override it."""
        full = tensor.clone()
        self.allreduce(full, op)
        out.copy_(full.view(self.world_size, *out.shape)[self.rank])

    def grouped(self):
        """Context manager around ops that must be issued together (NCCL group calls,
        e.g. a send to oneself and its receive). A no-op where the backend needs none."""
        return contextlib.nullcontext()

    def destroy(self) -> None:
        """Release the group's resources. Idempotent."""

    # attributes that hold a process's live resources: never pickled
    _LIVE: tuple = ()

    def __getstate__(self):
        # the runtime keeps per-process bookkeeping on the instance under _dagc_*; neither it
        # nor live resources travel (the instance is pickled to every member unconfigured)
        state = {k: v for k, v in self.__dict__.items()
                 if not k.startswith("_dagc") and k not in self._LIVE}
        if self._LIVE:
            state.update(rank=-1, world_size=0)
        return state

    def __repr__(self) -> str:
        state = f"rank {self.rank}/{self.world_size}" if self.world_size else "not set up"
        return f"{type(self).__name__}({state})"


def make_communicator(backend: str) -> Communicator:
    """A fresh, unconfigured communicator for ``"gloo"`` or ``"nccl"``."""
    if backend == "gloo":
        return GlooCommunicator()
    if backend == "nccl":
        return NcclCommunicator()
    raise ValueError(f"unknown communicator backend {backend!r}; expected 'gloo' or 'nccl' "
                     f"(or pass a dagc.Communicator instance)")


def node_ip() -> str:
    """This node's IP as Ray knows it when Ray is up in this process, else loopback."""
    ray = sys.modules.get("ray")          # not imported: certainly not initialised here
    if ray is not None:
        try:
            if ray.is_initialized():
                import ray.util
                return ray.util.get_node_ip_address()
        except Exception:
            pass
    return "127.0.0.1"


def _bool():
    import torch
    return torch.bool


def _check_op(op: str) -> str:
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; expected one of {', '.join(REDUCE_OPS)}")
    return op


def _average(tensor, n: int) -> None:
    """A SUM result divided by the group size (integers truncate, as NCCL's AVG does not
    exist for them either)."""
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.div_(n)
    else:
        tensor.div_(n, rounding_mode="trunc")


# ---------------------------------------------------------------------------------------
# gloo

# master stores started by prepare(), by (host, port), so that setup() on rank 0 finds the
# one its process started even when it runs on another copy of the instance
_MASTERS: dict = {}
_MASTERS_LOCK = threading.Lock()


class _GlooWork(Work):
    """A gloo p2p Work whose wait uses the group's op timeout, not its set-up timeout."""

    __slots__ = ("work", "timeout")

    def __init__(self, work, timeout):
        self.work = work
        self.timeout = timeout

    def wait(self) -> None:
        self.work.wait(self.timeout)

    def is_completed(self) -> bool:
        return self.work.is_completed()


class GlooCommunicator(Communicator):
    """CPU tensors over ``torch.distributed``'s gloo backend, outside the default group.

    ``op_timeout`` (seconds, None = no practical limit) bounds one send, receive or
    all-reduce; a gloo timeout closes the whole group, so it is long by default. Set-up uses
    the ``timeout`` given to :meth:`setup`.
    """

    device = "cpu"
    _LIVE = ("_pg", "_store", "_master", "_opts", "_ag_opts", "_long", "_destroyed")

    def __init__(self, op_timeout: float | None = None):
        self.op_timeout = op_timeout
        self.rank = -1
        self.world_size = 0
        self._reset()

    def _reset(self) -> None:
        self._pg = None
        self._store = None
        self._master = None
        self._opts = {}
        self._ag_opts = None
        self._long = None
        self._destroyed = False

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    # -- rendezvous ------------------------------------------------------------------------
    def prepare(self) -> dict:
        from torch.distributed import TCPStore
        host = node_ip()
        # port 0: the store binds a free port itself (no pick-then-bind race)
        master = TCPStore(host, 0, None, True, datetime.timedelta(seconds=300),
                          wait_for_workers=False)
        rdv = {"host": host, "port": int(master.port), "prefix": f"dagc-{uuid.uuid4().hex[:16]}/"}
        self._master = master
        with _MASTERS_LOCK:
            _MASTERS[(host, rdv["port"])] = master
        return rdv

    def setup(self, rank: int, world_size: int, rendezvous: dict, timeout: float) -> None:
        import torch.distributed as dist
        from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore
        if self._pg is not None:
            raise RuntimeError(f"{self!r} is already set up")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for a group of {world_size}")
        deadline = time.monotonic() + timeout
        host, port = rendezvous["host"], int(rendezvous["port"])
        tmo = datetime.timedelta(seconds=max(0.1, timeout))
        try:
            store = None
            if rank == 0:
                with _MASTERS_LOCK:
                    store = _MASTERS.pop((host, port), None)
                if store is None:
                    store = self._master
            if store is None:
                # the client retries its connection until the timeout
                store = TCPStore(host, port, None, False, tmo, wait_for_workers=False)
            store.set_timeout(tmo)
            prefixed = PrefixStore(rendezvous["prefix"], store)
            opts = ProcessGroupGloo._Options()
            left = max(0.1, deadline - time.monotonic())
            opts._timeout = datetime.timedelta(seconds=left)
            opts._devices = [ProcessGroupGloo.create_device(hostname=node_ip(), lazy_init=False)]
            pg = ProcessGroupGloo(prefixed, rank, world_size, opts)
        except Exception as e:
            self._master = None
            timed_out = time.monotonic() >= deadline - 0.05 or "timeout" in str(e).lower()
            raise (TimeoutError if timed_out else RuntimeError)(
                f"gloo communicator set-up failed for rank {rank} of {world_size} "
                f"(rendezvous {host}:{port}) within {timeout:g} s: {e}. Every member must "
                f"reach setup(); check that all actors of the group are alive and that "
                f"{host}:{port} is reachable from their nodes.") from e
        self._store = store
        self._pg = pg
        self.rank = rank
        self.world_size = world_size
        self._long = datetime.timedelta(seconds=self.op_timeout or FOREVER_S)
        codes = {"sum": dist.ReduceOp.SUM, "product": dist.ReduceOp.PRODUCT,
                 "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX,
                 "avg": dist.ReduceOp.SUM}           # gloo has no AVG: SUM, then divide
        for name, code in codes.items():
            o = dist.AllreduceOptions()
            o.reduceOp = code
            o.timeout = self._long
            self._opts[name] = o
            o = dist.ReduceScatterOptions()
            o.reduceOp = code
            o.timeout = self._long
            self._opts["rs_" + name] = o
        from torch._C._distributed_c10d import AllgatherOptions   # not re-exported
        self._ag_opts = AllgatherOptions()
        self._ag_opts.timeout = self._long

    # -- ops -------------------------------------------------------------------------------
    # One tag (0) for every message: gloo matches messages per (peer, tag) in issue order.
    def send(self, tensor, peer: int) -> None:
        self._pg.send([tensor], peer, 0).wait(self._long)

    def recv(self, tensor, peer: int) -> None:
        self._pg.recv([tensor], peer, 0).wait(self._long)

    def isend(self, tensor, peer: int) -> Work:
        return _GlooWork(self._pg.send([tensor], peer, 0), self._long)

    def irecv(self, tensor, peer: int) -> Work:
        return _GlooWork(self._pg.recv([tensor], peer, 0), self._long)

    def allreduce(self, tensor, op: str = "sum") -> None:
        opts = self._opts.get(op)
        if opts is None:
            _check_op(op)
            raise RuntimeError(f"{self!r} is not set up")
        self._pg.allreduce([tensor], opts).wait()
        if op == "avg":
            _average(tensor, self.world_size)

    def allgather(self, tensor, out) -> None:
        if self._pg is None:
            raise RuntimeError(f"{self!r} is not set up")
        # the rank blocks of a contiguous ``out`` are contiguous views: gloo fills them
        self._pg.allgather([list(out.chunk(self.world_size))], [tensor], self._ag_opts).wait()

    def reducescatter(self, tensor, out, op: str = "sum") -> None:
        opts = self._opts.get("rs_" + op)
        if opts is None:
            _check_op(op)
            raise RuntimeError(f"{self!r} is not set up")
        self._pg.reduce_scatter([out], [list(tensor.chunk(self.world_size))], opts).wait()
        if op == "avg":
            _average(out, self.world_size)

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        pg = self._pg
        if pg is not None:
            try:
                pg.shutdown()
            except Exception:
                pass
        with _MASTERS_LOCK:
            for k, v in list(_MASTERS.items()):
                if v is self._master:
                    del _MASTERS[k]
        self._pg = None
        self._store = None
        self._master = None
        self._opts = {}


# ---------------------------------------------------------------------------------------
# NCCL

# ncclDataType_t / ncclRedOp_t values (part of NCCL's ABI; cupy mirrors them)
_NCCL_INT8, _NCCL_UINT8, _NCCL_INT32, _NCCL_INT64 = 0, 1, 2, 4
_NCCL_FLOAT16, _NCCL_FLOAT32, _NCCL_FLOAT64, _NCCL_BFLOAT16 = 6, 7, 8, 9
_NCCL_OPS = {"sum": 0, "product": 1, "max": 2, "min": 3, "avg": 4}


def _nccl_dtypes():
    import torch
    return {torch.int8: _NCCL_INT8, torch.uint8: _NCCL_UINT8, torch.bool: _NCCL_UINT8,
            torch.int32: _NCCL_INT32, torch.int64: _NCCL_INT64,
            torch.float16: _NCCL_FLOAT16, torch.float32: _NCCL_FLOAT32,
            torch.float64: _NCCL_FLOAT64, torch.bfloat16: _NCCL_BFLOAT16}


class _CudaWork(Work):
    """An op enqueued on the comm stream; ``wait`` orders the caller's current stream
    after it (the host does not block). Holds the tensor until then."""

    __slots__ = ("event", "tensor", "device")

    def __init__(self, event, tensor, device):
        self.event = event
        self.tensor = tensor
        self.device = device

    def wait(self) -> None:
        import torch
        torch.cuda.current_stream(self.device).wait_event(self.event)
        self.tensor = None

    def is_completed(self) -> bool:
        return self.event.query()


class NcclCommunicator(Communicator):
    """GPU tensors over NCCL (``cupy.cuda.nccl``), one communication stream per group.

    Ordering against compute: before an op, an event recorded on the caller's current
    stream makes the comm stream wait (the data is ready); after ``send``/``recv``/
    ``allreduce``, an event recorded on the comm stream makes the current stream wait (the
    result is ready, and the sent buffer may be overwritten). ``isend``/``irecv`` return a
    Work whose ``wait()`` does the latter. The host never blocks on the GPU here.
    """

    device = "cuda"
    _LIVE = ("_comm", "_stream", "_index", "_ev_in", "_ev_out", "_dtypes", "_group",
             "_destroyed")

    def __init__(self):
        self.rank = -1
        self.world_size = 0
        self._reset()

    def _reset(self) -> None:
        self._comm = None
        self._stream = None
        self._index = None
        self._ev_in = None
        self._ev_out = None
        self._dtypes = None
        self._group = None
        self._destroyed = False

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def prepare(self) -> dict:
        from cupy.cuda import nccl
        return {"unique_id": tuple(nccl.get_unique_id())}

    def setup(self, rank: int, world_size: int, rendezvous: dict, timeout: float) -> None:
        import torch
        from cupy.cuda import nccl
        if self._comm is not None:
            raise RuntimeError(f"{self!r} is already set up")
        index = torch.cuda.current_device()
        uid = tuple(rendezvous["unique_id"])
        box: dict = {}

        def init():
            try:
                torch.cuda.set_device(index)
                box["comm"] = nccl.NcclCommunicator(world_size, uid, rank)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e

        # ncclCommInitRank has no timeout of its own: run it aside and stop waiting in time
        th = threading.Thread(target=init, name=f"dagc-nccl-init-r{rank}", daemon=True)
        th.start()
        th.join(timeout)
        if th.is_alive():
            raise TimeoutError(f"NCCL communicator set-up timed out after {timeout:g} s "
                               f"(rank {rank} of {world_size}): some member never joined. "
                               f"Check that every actor of the group is alive and has a GPU.")
        if "error" in box:
            raise RuntimeError(f"NCCL communicator set-up failed (rank {rank} of "
                               f"{world_size}): {box['error']}") from box["error"]
        self._comm = box["comm"]
        self._index = index
        self._stream = torch.cuda.Stream(device=index)
        self._ev_in = torch.cuda.Event()
        self._ev_out = torch.cuda.Event()
        self._dtypes = _nccl_dtypes()
        self.rank = rank
        self.world_size = world_size

    # -- stream ordering -------------------------------------------------------------------
    def _enter(self, tensor):
        """Comm stream waits for the current stream; the tensor's memory is kept for it."""
        import torch
        cur = torch.cuda.current_stream(self._index)
        s = self._stream
        self._ev_in.record(cur)
        s.wait_event(self._ev_in)
        tensor.record_stream(s)
        return cur, s

    def _leave(self, cur, s) -> None:
        self._ev_out.record(s)
        cur.wait_event(self._ev_out)

    def _async(self, tensor, s) -> Work:
        import torch
        ev = torch.cuda.Event()
        if self._group is not None:
            self._group.append((ev, s))        # recorded after ncclGroupEnd
        else:
            ev.record(s)
        return _CudaWork(ev, tensor, self._index)

    def _check(self, tensor) -> None:
        if not tensor.is_cuda or not tensor.is_contiguous():
            raise ValueError(f"NcclCommunicator needs contiguous CUDA tensors, got "
                             f"{'non-contiguous ' if not tensor.is_contiguous() else ''}"
                             f"{tensor.device} tensor")

    # -- ops -------------------------------------------------------------------------------
    # p2p moves bytes (every dtype works); the comm stream keeps issue order per group
    def send(self, tensor, peer: int) -> None:
        if self._group is not None:
            raise RuntimeError("use isend inside grouped(); a blocking send there would "
                               "never be issued")
        self._check(tensor)
        cur, s = self._enter(tensor)
        self._comm.send(tensor.data_ptr(), tensor.nbytes, _NCCL_UINT8, peer, s.cuda_stream)
        self._leave(cur, s)

    def recv(self, tensor, peer: int) -> None:
        if self._group is not None:
            raise RuntimeError("use irecv inside grouped(); a blocking recv there would "
                               "never be issued")
        self._check(tensor)
        cur, s = self._enter(tensor)
        self._comm.recv(tensor.data_ptr(), tensor.nbytes, _NCCL_UINT8, peer, s.cuda_stream)
        self._leave(cur, s)

    def isend(self, tensor, peer: int) -> Work:
        self._check(tensor)
        _, s = self._enter(tensor)
        self._comm.send(tensor.data_ptr(), tensor.nbytes, _NCCL_UINT8, peer, s.cuda_stream)
        return self._async(tensor, s)

    def irecv(self, tensor, peer: int) -> Work:
        self._check(tensor)
        _, s = self._enter(tensor)
        self._comm.recv(tensor.data_ptr(), tensor.nbytes, _NCCL_UINT8, peer, s.cuda_stream)
        return self._async(tensor, s)

    def allreduce(self, tensor, op: str = "sum") -> None:
        _check_op(op)
        self._check(tensor)
        buf, dtype = self._nccl_type(tensor, "all-reduce")
        integer = not (tensor.is_floating_point() or tensor.is_complex())
        code = _NCCL_OPS["sum"] if (op == "avg" and integer) else _NCCL_OPS[op]
        cur, s = self._enter(buf)
        self._comm.allReduce(buf.data_ptr(), buf.data_ptr(), buf.numel(), dtype, code,
                             s.cuda_stream)
        self._leave(cur, s)
        if op == "avg" and integer:
            tensor.div_(self.world_size, rounding_mode="trunc")

    def _nccl_type(self, tensor, what: str):
        import torch
        buf = tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor
        dtype = self._dtypes.get(buf.dtype)
        if dtype is None:
            raise TypeError(f"NCCL cannot {what} {tensor.dtype} tensors")
        return buf, dtype

    def allgather(self, tensor, out) -> None:
        self._check(tensor)
        self._check(out)
        src, dtype = self._nccl_type(tensor, "all-gather")
        dst, _ = self._nccl_type(out, "all-gather")
        cur, s = self._enter(src)
        out.record_stream(s)
        self._comm.allGather(src.data_ptr(), dst.data_ptr(), src.numel(), dtype, s.cuda_stream)
        self._leave(cur, s)

    def reducescatter(self, tensor, out, op: str = "sum") -> None:
        _check_op(op)
        self._check(tensor)
        self._check(out)
        src, dtype = self._nccl_type(tensor, "reduce-scatter")
        dst, _ = self._nccl_type(out, "reduce-scatter")
        integer = not (tensor.is_floating_point() or tensor.is_complex())
        code = _NCCL_OPS["sum"] if (op == "avg" and integer) else _NCCL_OPS[op]
        cur, s = self._enter(src)
        out.record_stream(s)
        self._comm.reduceScatter(src.data_ptr(), dst.data_ptr(), dst.numel(), dtype, code,
                                 s.cuda_stream)
        self._leave(cur, s)
        if op == "avg" and integer:
            out.div_(self.world_size, rounding_mode="trunc")

    @contextlib.contextmanager
    def grouped(self):
        """Issue the isend/irecv calls inside as one NCCL group (needed, e.g., to send to
        oneself). Their Works complete once the whole group has run."""
        from cupy.cuda import nccl
        if self._group is not None:
            yield
            return
        self._group = []
        nccl.groupStart()
        try:
            yield
        finally:
            pending, self._group = self._group, None
            nccl.groupEnd()
            for ev, s in pending:
                ev.record(s)

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        comm = self._comm
        self._comm = None
        if comm is not None:
            try:
                comm.abort()       # also ends kernels stuck waiting for a dead peer
            except Exception:
                try:
                    comm.destroy()
                except Exception:
                    pass
        self._stream = None
        self._ev_in = self._ev_out = None

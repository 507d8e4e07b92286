"""A fake CUDA + NCCL layer, so that dagc's NCCL path runs (and is checked) on CPU.

What stands in for what:

- device memory: CPU tensors of :class:`CudaTensor` (``is_cuda`` True, ``record_stream``
  logged); NCCL reads and writes them through their real addresses (``data_ptr``), as it
  would device pointers;
- ``torch.cuda``: ``current_device``/``set_device`` (per thread), ``Stream``, ``Event``,
  ``current_stream`` (one default stream per thread and device); streams and events do no
  work, they log what was asked of them;
- ``cupy.cuda.nccl``: ``get_unique_id``, ``NcclCommunicator`` (send, recv, allReduce,
  allGather, reduceScatter, abort, destroy), ``groupStart``/``groupEnd``. Ranks are threads
  of this process; the unique id is the rendezvous (ranks with the same id form one group,
  ``NcclCommunicator(...)`` returns once all ``ndev`` joined). Sends are buffered, a receive
  waits for the matching send (peer and FIFO order) and checks its size; a collective waits
  for every rank's call of the same sequence number and checks that kind, count, dtype and
  op agree; ``abort`` ends every wait of the group with an error. Every wait has a timeout
  (:data:`TIMEOUT`), so a test never hangs.

Everything is logged in :data:`LOG` as tuples, in the order it was called, each with the
calling thread's rank where it has one: ``("record", event, stream)``, ``("wait", stream,
event)``, ``("record_stream", stream)``, ``("send", rank, peer, nbytes, stream)``,
``("recv", ...)``, ``("allReduce", rank, count, dtype, op, stream)``, ``("groupStart",)``,
``("abort", rank)``, ... :func:`install` puts the fakes in place with a pytest
``monkeypatch``.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import sys
import threading
import types

import torch

TIMEOUT = 10.0
LOG: list = []
_LOG_LOCK = threading.Lock()
_local = threading.local()
_ids = itertools.count(1)


def log(*entry) -> None:
    with _LOG_LOCK:
        LOG.append(tuple(entry))


def entries(kind: str | None = None, thread=None) -> list:
    """The log (of one kind, of one thread's rank) so far."""
    with _LOG_LOCK:
        out = list(LOG)
    return [e for e in out if (kind is None or e[0] == kind)]


class FakeNcclError(RuntimeError):
    pass


# -- device memory ------------------------------------------------------------------------
class CudaTensor(torch.Tensor):
    """A CPU tensor that says it is on the GPU (ops on it keep the class). Its device is
    ``cuda:i``: the index it was made for (``cuda(t, i)``), which the results of ops on it
    inherit; else the calling thread's current device."""

    _fake_index: int | None = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs)
        index = _index_of(args)
        if index is not None:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, CudaTensor) and t._fake_index is None:
                    t._fake_index = index
        return out

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        i = self._fake_index
        return torch.device("cuda", current_device() if i is None else i)

    def record_stream(self, stream):
        log("record_stream", stream.cuda_stream)

    def cpu(self):
        """A copy in host memory, a plain tensor (as ``.cpu()`` of a GPU tensor is)."""
        return self.as_subclass(torch.Tensor).clone()

    def numpy(self, *, force=False):
        raise TypeError(
            f"can't convert {self.device} device type tensor to numpy. "
            f"Use Tensor.cpu() to copy the tensor to host memory first."
        )


def _index_of(args):
    """The device index of the first CudaTensor among ``args`` (in lists too) that has one."""
    for a in args:
        if isinstance(a, (tuple, list)):
            a = _index_of(a)
            if a is not None:
                return a
        elif isinstance(a, CudaTensor) and a._fake_index is not None:
            return a._fake_index
    return None


def cuda(t: torch.Tensor, index: int | None = None) -> CudaTensor:
    out = torch.Tensor._make_subclass(CudaTensor, t.contiguous() if t.dim() else t)
    out._fake_index = index
    return out


# -- torch.cuda ---------------------------------------------------------------------------
class Stream:
    def __init__(self, device=None, priority=0):
        self.device = device
        self.cuda_stream = next(_ids)

    def wait_event(self, event):
        log("wait", self.cuda_stream, event.id)

    def wait_stream(self, other):
        log("wait_stream", self.cuda_stream, other.cuda_stream)

    def synchronize(self):
        pass

    def __repr__(self):
        return f"<fake stream {self.cuda_stream}>"


class StreamContext:
    """What ``torch.cuda.StreamContext(s)`` is: makes ``s`` the current stream inside."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        self._prev = current_stream()
        _local.current = self.stream

    def __exit__(self, *exc):
        _local.current = self._prev


class Event:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.id = next(_ids)
        self.stream = None
        self.done = True

    def record(self, stream=None):
        stream = stream if stream is not None else current_stream()
        self.stream = stream.cuda_stream
        log("record", self.id, self.stream)

    def query(self):
        return self.done

    def synchronize(self):
        pass


def current_device() -> int:
    return getattr(_local, "device", 0)


def set_device(index) -> None:
    _local.device = int(index)


def current_stream(device=None) -> Stream:
    s = getattr(_local, "current", None)
    if s is None:
        s = _local.current = Stream(device)
    return s


# -- cupy.cuda.nccl -------------------------------------------------------------------------
_DTYPES = {
    0: torch.int8,
    1: torch.uint8,
    2: torch.int32,
    4: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    9: torch.bfloat16,
}
_WORLDS: dict = {}
_WORLDS_LOCK = threading.Lock()
# how the next NcclCommunicator(...) behaves: "" (joins), "fail", "hang"
BEHAVIOUR = {"init": "", "abort": ""}


def _view(ptr: int, count: int, dtype: int) -> torch.Tensor:
    """``count`` elements of NCCL type ``dtype`` at address ``ptr``, as a tensor."""
    tdt = _DTYPES[dtype]
    nbytes = count * torch.empty((), dtype=tdt).element_size()
    if nbytes == 0:
        return torch.empty(0, dtype=tdt)
    buf = (ctypes.c_char * nbytes).from_address(ptr)
    return torch.frombuffer(buf, dtype=tdt)


class _World:
    def __init__(self, n: int):
        self.n = n
        self.cv = threading.Condition()
        self.joined = 0
        self.mail: dict = {}  # (src, dst) -> [bytes, ...]
        self.rounds: dict = {}  # seq -> {rank: (kind, args, tensor)}
        self.results: dict = {}
        self.aborted = False

    def wait_for(self, pred, what: str):
        if not self.cv.wait_for(lambda: self.aborted or pred(), TIMEOUT):
            raise TimeoutError(f"fake NCCL: {what} timed out after {TIMEOUT} s")
        if self.aborted:
            raise FakeNcclError(f"fake NCCL: communicator aborted during {what}")


class NcclCommunicator:
    def __init__(self, ndev: int, comm_id, rank: int):
        how = BEHAVIOUR["init"]
        if how == "fail":
            raise FakeNcclError("ncclCommInitRank failed: unhandled system error")
        if how == "hang":
            threading.Event().wait(TIMEOUT)
            raise TimeoutError("fake NCCL: init hung")
        key = tuple(comm_id)
        with _WORLDS_LOCK:
            w = _WORLDS.get(key)
            if w is None:
                w = _WORLDS[key] = _World(ndev)
        self.world, self.rank, self.n = w, rank, ndev
        self.seq = 0
        log("init", rank, ndev)
        with w.cv:
            w.joined += 1
            w.cv.notify_all()
            w.wait_for(lambda: w.joined >= ndev, "ncclCommInitRank")

    # p2p: buffered sends, receives in FIFO order per (src, dst); inside a group, sends go
    # first at groupEnd (NCCL runs a group's operations together)
    def send(self, ptr, count, dtype, peer, stream):
        data = bytes(_view(ptr, count, dtype).view(torch.uint8).numpy().tobytes())
        op = ("send", self.rank, peer, len(data), stream)
        grp = getattr(_local, "group", None)
        if grp is not None:
            grp.append((0, op, lambda: self._post(peer, data)))
            return
        log(*op)
        self._post(peer, data)

    def _post(self, peer, data):
        w = self.world
        with w.cv:
            if w.aborted:
                raise FakeNcclError("fake NCCL: send on an aborted communicator")
            w.mail.setdefault((self.rank, peer), []).append(data)
            w.cv.notify_all()

    def recv(self, ptr, count, dtype, peer, stream):
        dst = _view(ptr, count, dtype).view(torch.uint8)
        op = ("recv", self.rank, peer, dst.numel(), stream)
        grp = getattr(_local, "group", None)
        if grp is not None:
            grp.append((1, op, lambda: self._take(peer, dst)))
            return
        log(*op)
        self._take(peer, dst)

    def _take(self, peer, dst):
        w = self.world
        with w.cv:
            q = w.mail.setdefault((peer, self.rank), [])
            w.wait_for(lambda: bool(q), f"recv from rank {peer}")
            data = q.pop(0)
        if len(data) != dst.numel():
            raise FakeNcclError(
                f"fake NCCL: rank {self.rank} receives {dst.numel()} bytes "
                f"but rank {peer} sent {len(data)}"
            )
        if data:
            dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    # collectives: every rank's k-th collective meets the others' k-th
    def _meet(self, kind, key, src: torch.Tensor):
        w = self.world
        seq = self.seq
        self.seq += 1
        with w.cv:
            if w.aborted:
                raise FakeNcclError(f"fake NCCL: {kind} on an aborted communicator")
            r = w.rounds.setdefault(seq, {})
            r[self.rank] = ((kind, key), src.clone())
            w.cv.notify_all()
            w.wait_for(
                lambda: len(w.rounds.get(seq, r)) >= self.n or seq in w.results,
                f"{kind} #{seq} (rank {self.rank})",
            )
            if seq not in w.results:
                sigs = {v[0] for v in r.values()}
                w.results[seq] = (sigs, [r[i][1] for i in range(self.n)])
            sigs, parts = w.results[seq]
        if len(sigs) != 1:
            raise FakeNcclError(
                f"fake NCCL: the ranks' {kind} #{seq} calls differ: {sorted(map(str, sigs))}"
            )
        return parts

    @staticmethod
    def _reduce(parts, op):
        out = parts[0].clone()
        for p in parts[1:]:
            if op in (0, 4):
                out = out + p
            elif op == 1:
                out = out * p
            elif op == 2:
                out = torch.maximum(out, p)
            else:
                out = torch.minimum(out, p)
        if op == 4:
            out = out / len(parts)
        return out

    def allReduce(self, src, dst, count, dtype, op, stream):
        log("allReduce", self.rank, count, dtype, op, stream)
        parts = self._meet("allReduce", (count, dtype, op), _view(src, count, dtype))
        _view(dst, count, dtype).copy_(self._reduce(parts, op))

    def allGather(self, src, dst, count, dtype, stream):
        log("allGather", self.rank, count, dtype, stream)
        parts = self._meet("allGather", (count, dtype), _view(src, count, dtype))
        _view(dst, count * self.n, dtype).copy_(torch.cat(parts))

    def reduceScatter(self, src, dst, count, dtype, op, stream):
        log("reduceScatter", self.rank, count, dtype, op, stream)
        parts = self._meet("reduceScatter", (count, dtype, op), _view(src, count * self.n, dtype))
        full = self._reduce(parts, op)
        _view(dst, count, dtype).copy_(full[self.rank * count : (self.rank + 1) * count])

    def abort(self):
        log("abort", self.rank)
        if BEHAVIOUR["abort"] == "fail":
            raise FakeNcclError("ncclCommAbort failed")
        w = self.world
        with w.cv:
            w.aborted = True
            w.cv.notify_all()

    def destroy(self):
        log("destroy", self.rank)


def get_unique_id():
    return tuple(os.urandom(128))


def groupStart():
    log("groupStart")
    _local.group = []


def groupEnd():
    log("groupEnd")
    grp, _local.group = getattr(_local, "group", None) or [], None
    for _, op, run in sorted(grp, key=lambda x: x[0]):  # sends first
        log(*op)
        run()


def install(monkeypatch) -> None:
    """Put the fake layer in place for one test: ``cupy.cuda.nccl`` in ``sys.modules`` and
    the ``torch.cuda`` functions dagc calls."""
    cupy = types.ModuleType("cupy")
    cupy_cuda = types.ModuleType("cupy.cuda")
    nccl = types.ModuleType("cupy.cuda.nccl")
    for name in ("NcclCommunicator", "get_unique_id", "groupStart", "groupEnd"):
        setattr(nccl, name, globals()[name])
    cupy.cuda = cupy_cuda
    cupy_cuda.nccl = nccl
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cupy_cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    for name, fn in (
        ("current_device", current_device),
        ("set_device", set_device),
        ("Stream", Stream),
        ("Event", Event),
        ("current_stream", current_stream),
        ("StreamContext", StreamContext),
    ):
        monkeypatch.setattr(torch.cuda, name, fn)
    BEHAVIOUR.update(init="", abort="")
    with _LOG_LOCK:
        LOG.clear()
    with _WORLDS_LOCK:
        _WORLDS.clear()

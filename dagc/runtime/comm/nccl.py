"""NcclCommunicator: GPU tensors over NCCL (``cupy.cuda.nccl``).

One CUDA stream per group for communication, CUDA events ordering it against the caller's
current (compute) stream; cupy is imported only when an instance is set up. See
:mod:`dagc.runtime.comm.base` for the interface and the life of a group.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from dagc.runtime.comm.base import Communicator, Work, check_op

# ncclDataType_t / ncclRedOp_t values (part of NCCL's ABI; cupy mirrors them)
_NCCL_INT8, _NCCL_UINT8, _NCCL_INT32, _NCCL_INT64 = 0, 1, 2, 4
_NCCL_FLOAT16, _NCCL_FLOAT32, _NCCL_FLOAT64, _NCCL_BFLOAT16 = 6, 7, 8, 9
_NCCL_OPS = {"sum": 0, "product": 1, "max": 2, "min": 3, "avg": 4}


def _reduce_code(tensor, op: str) -> tuple[int, bool]:
    """The ncclRedOp_t for ``op`` on ``tensor``, and whether the result still needs dividing
    by the group size: NCCL's AVG is for floating types only, so integers SUM and then
    truncate."""
    int_avg = op == "avg" and not (tensor.is_floating_point() or tensor.is_complex())
    return _NCCL_OPS["sum" if int_avg else op], int_avg


def _nccl_dtypes():
    import torch

    return {
        torch.int8: _NCCL_INT8,
        torch.uint8: _NCCL_UINT8,
        torch.bool: _NCCL_UINT8,
        torch.int32: _NCCL_INT32,
        torch.int64: _NCCL_INT64,
        torch.float16: _NCCL_FLOAT16,
        torch.float32: _NCCL_FLOAT32,
        torch.float64: _NCCL_FLOAT64,
        torch.bfloat16: _NCCL_BFLOAT16,
    }


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
    _LIVE = ("_comm", "_stream", "_index", "_ev_in", "_ev_out", "_dtypes", "_group", "_destroyed")
    # set up by setup() (None before: the ops are never called then)
    _comm: Any  # cupy.cuda.nccl.NcclCommunicator
    _stream: Any  # torch.cuda.Stream: the communication stream
    _index: int | None  # the CUDA device index
    _ev_in: Any  # torch.cuda.Event: the comm stream waits for the caller's
    _ev_out: Any  # torch.cuda.Event: the caller's stream waits for the comm stream
    _dtypes: Any  # dict: torch dtype -> NCCL data type

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
            raise TimeoutError(
                f"NCCL communicator set-up timed out after {timeout:g} s "
                f"(rank {rank} of {world_size}): some member never joined. "
                f"Check that every actor of the group is alive and has a GPU."
            )
        if "error" in box:
            raise RuntimeError(
                f"NCCL communicator set-up failed (rank {rank} of {world_size}): {box['error']}"
            ) from box["error"]
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
            self._group.append((ev, s))  # recorded after ncclGroupEnd
        else:
            ev.record(s)
        return _CudaWork(ev, tensor, self._index)

    def _check(self, tensor) -> None:
        if not tensor.is_cuda or not tensor.is_contiguous():
            raise ValueError(
                f"NcclCommunicator needs contiguous CUDA tensors, got "
                f"{'non-contiguous ' if not tensor.is_contiguous() else ''}"
                f"{tensor.device} tensor"
            )

    # -- ops -------------------------------------------------------------------------------
    # p2p moves bytes (every dtype works); the comm stream keeps issue order per group
    def send(self, tensor, peer: int) -> None:
        if self._group is not None:
            raise RuntimeError(
                "use isend inside grouped(); a blocking send there would never be issued"
            )
        self._check(tensor)
        cur, s = self._enter(tensor)
        self._comm.send(tensor.data_ptr(), tensor.nbytes, _NCCL_UINT8, peer, s.cuda_stream)
        self._leave(cur, s)

    def recv(self, tensor, peer: int) -> None:
        if self._group is not None:
            raise RuntimeError(
                "use irecv inside grouped(); a blocking recv there would never be issued"
            )
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
        check_op(op)
        self._check(tensor)
        buf, dtype = self._nccl_type(tensor, "all-reduce")
        code, int_avg = _reduce_code(tensor, op)
        cur, s = self._enter(buf)
        self._comm.allReduce(
            buf.data_ptr(), buf.data_ptr(), buf.numel(), dtype, code, s.cuda_stream
        )
        self._leave(cur, s)
        if int_avg:
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
        check_op(op)
        self._check(tensor)
        self._check(out)
        src, dtype = self._nccl_type(tensor, "reduce-scatter")
        dst, _ = self._nccl_type(out, "reduce-scatter")
        code, int_avg = _reduce_code(tensor, op)
        cur, s = self._enter(src)
        out.record_stream(s)
        self._comm.reduceScatter(
            src.data_ptr(), dst.data_ptr(), dst.numel(), dtype, code, s.cuda_stream
        )
        self._leave(cur, s)
        if int_avg:
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
                comm.abort()  # also ends kernels stuck waiting for a dead peer
            except Exception:
                try:
                    comm.destroy()
                except Exception:
                    pass
        self._stream = None
        self._ev_in = self._ev_out = None

"""GlooCommunicator: CPU tensors over ``torch.distributed``'s gloo backend.

Built directly on a ``TCPStore``/``PrefixStore`` and a ``ProcessGroupGloo``, so the global
default process group (the user's own ``torch.distributed``) is never touched and one
process can be in several groups. See :mod:`dagc.runtime.comm.base` for the interface
and the life of a group.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from dagc.runtime.comm.base import Communicator, Work, check_op, node_ip
from dagc.runtime.comm.rendezvous import connect, forget, open_master, take_master

# A very long op timeout ("wait as long as it takes"): gloo's waits need some value, and a
# timeout there closes every connection of the group. Peer death still ends a wait at once
# (the peer's sockets close). Kept far below what a steady_clock deadline can hold.
FOREVER_S = 7 * 24 * 3600.0


def _average(tensor, n: int) -> None:
    """A SUM result divided by the group size (integers truncate, as in NCCL, which has no
    integer AVG)."""
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.div_(n)
    else:
        tensor.div_(n, rounding_mode="trunc")


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
    # gloo pairs point-to-point messages per peer (and tag), collectives apart: a deferred
    # receive waits only behind earlier ones from the same peer (p2p.pending_of), as the
    # deadlock simulator's per-peer lanes for gloo groups assume (schedule/simulate.py)
    per_peer_order = True
    _LIVE = ("_pg", "_store", "_master", "_opts", "_ag_opts", "_long", "_destroyed")
    # torch objects once set up (None before: the ops are never called then)
    _pg: Any  # ProcessGroupGloo
    _store: Any  # TCPStore
    _master: Any  # TCPStore this process serves (rank 0's, from prepare())
    _opts: dict[str, Any]  # op name -> AllreduceOptions; "rs_" + name -> ReduceScatterOptions
    _ag_opts: Any  # AllgatherOptions
    _long: Any  # datetime.timedelta: a point-to-point op's wait

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
        self._master, rdv = open_master("dagc")
        return rdv

    def setup(self, rank: int, world_size: int, rendezvous: dict, timeout: float) -> None:
        import torch.distributed as dist
        from torch.distributed import PrefixStore, ProcessGroupGloo

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
                store = take_master(rendezvous) or self._master
            if store is None:
                store = connect(rendezvous, timeout)
            store.set_timeout(tmo)
            prefixed = PrefixStore(rendezvous["prefix"], store)
            opts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # not in torch's stubs
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
                f"{host}:{port} is reachable from their nodes."
            ) from e
        self._store = store
        self._pg = pg
        self.rank = rank
        self.world_size = world_size
        self._long = datetime.timedelta(seconds=self.op_timeout or FOREVER_S)
        codes = {
            "sum": dist.ReduceOp.SUM,
            "product": dist.ReduceOp.PRODUCT,
            "min": dist.ReduceOp.MIN,
            "max": dist.ReduceOp.MAX,
            "avg": dist.ReduceOp.SUM,
        }  # gloo has no AVG: SUM, then divide
        # (torch's stubs type reduceOp a ReduceOp, which ReduceOp.SUM, a RedOpType, is not)
        for name, code in codes.items():
            ar = dist.AllreduceOptions()
            ar.reduceOp = code  # type: ignore[assignment]
            ar.timeout = self._long
            self._opts[name] = ar
            rs = dist.ReduceScatterOptions()
            rs.reduceOp = code  # type: ignore[assignment]
            rs.timeout = self._long
            self._opts["rs_" + name] = rs
        from torch._C._distributed_c10d import AllgatherOptions  # not re-exported

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
            check_op(op)
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
            check_op(op)
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
        forget(self._master)
        self._pg = None
        self._store = None
        self._master = None
        self._opts = {}

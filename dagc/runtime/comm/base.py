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

Two implementations, each in its own module (``backends.make_communicator`` picks one by
name):

- :class:`~dagc.runtime.comm.gloo.GlooCommunicator` - ``torch.distributed``'s gloo
  backend, built directly on a ``TCPStore``/``PrefixStore`` and a ``ProcessGroupGloo`` so
  the global default process group (the user's own ``torch.distributed``) is never
  touched, and one process can be in several groups. CPU tensors.
- :class:`~dagc.runtime.comm.nccl.NcclCommunicator` - ``cupy.cuda.nccl`` with one CUDA
  stream for communication and CUDA events ordering it against the caller's current
  (compute) stream. GPU tensors. cupy is imported only when an instance is set up.
"""

from __future__ import annotations

import contextlib
import sys

REDUCE_OPS = ("sum", "product", "min", "max", "avg")


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
    device: str = "cpu"  # "cpu" or "cuda": where received tensors are allocated
    # p2p.pending_of's FIFOs of deferred receives (peer or None -> list), set on first use
    _dagc_pending: dict

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
        raise NotImplementedError(
            f"{type(self).__name__} must implement recv(tensor, peer) "
            f"(fill the preallocated tensor)"
        )

    def isend(self, tensor, peer: int) -> Work:
        self.send(tensor, peer)
        return DONE

    def irecv(self, tensor, peer: int) -> Work:
        self.recv(tensor, peer)
        return DONE

    def allreduce(self, tensor, op: str = "sum") -> None:
        raise NotImplementedError(
            f"{type(self).__name__} must implement allreduce(tensor, op) (in place)"
        )

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
        state = {
            k: v
            for k, v in self.__dict__.items()
            if not k.startswith("_dagc") and k not in self._LIVE
        }
        if self._LIVE:
            state.update(rank=-1, world_size=0)
        return state

    def __repr__(self) -> str:
        state = f"rank {self.rank}/{self.world_size}" if self.world_size else "not set up"
        return f"{type(self).__name__}({state})"


def node_ip() -> str:
    """This node's IP as Ray knows it when Ray is up in this process, else loopback."""
    ray = sys.modules.get("ray")  # not imported: certainly not initialised here
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


def check_op(op: str) -> str:
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; expected one of {', '.join(REDUCE_OPS)}")
    return op

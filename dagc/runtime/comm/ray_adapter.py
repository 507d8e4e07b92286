"""RayCommunicator: a Ray Compiled Graph ``Communicator`` driven as a dagc Communicator.

Ray lets users plug in their own communicator (a subclass of
``ray.experimental.channel.communicator.Communicator``, e.g. Ray's ``CPUCommunicator`` or
one written for an accelerator NCCL does not serve) through
``with_tensor_transport(transport=obj)``, ``experimental_compile(_default_communicator=obj)``
or a collective's ``transport=obj``. :func:`adapt` wraps such an object in
:class:`RayCommunicator`, which the runtime drives like any dagc communicator: the same
schedule, the same deferred-receive ordering (one stream per process), the same flag
all-reduce before every collective (``collective.py``), so a failed or mismatched input is
an error on every participant, never a hang.

What the adapter calls on the Ray object (its whole interface):

=====================================  ===================================================
Ray                                    used for
=====================================  ===================================================
get_actor_handles, get_world_size      checked on the driver: no actor twice
get_rank(actor), initialize(rank),     set-up in each member: its own Ray rank, then
  get_self_rank                          ``initialize`` as Ray calls it
send(tensor, peer_rank)                ``send`` / ``isend``
recv(shape, dtype, peer_rank,          ``recv`` / ``irecv``; the allocator hands out dagc's
  allocator)                             preallocated buffer
allreduce(send_buf, recv_buf, op)      ``allreduce`` (distinct buffers, as Ray passes them)
allgather(send_buf, recv_buf)          ``allgather``; NotImplementedError: built on allreduce
reducescatter(send_buf, recv_buf, op)  ``reducescatter``; NotImplementedError: likewise
send_stream, recv_stream               ``isend``/``irecv`` run inside them when they are
                                         stream contexts; an event recorded there is what
                                         the Work's ``wait`` orders the caller's stream on
get_transport_name                     "cpu": the device is the CPU and, as in Ray, no
                                         point-to-point tensors go through it (Ray sends
                                         them through shared memory)
destroy                                ``destroy``
=====================================  ===================================================

Ranks. dagc numbers a group's members by its own rule (``CommGroup.members``); Ray's
ranks are the communicator's. Each member finds its Ray rank from its own actor handle
(``get_rank``), and the members swap (dagc rank, Ray rank) pairs through a small TCP
store that rank 0 opens in ``prepare`` (as the gloo backend's rendezvous does), so peers
are translated to Ray ranks with one tuple index. An actor outside the Ray group posts
why to the store before raising, and every other member raises at once too.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from dagc.runtime.comm.base import DONE, Communicator, Work, check_op
from dagc.runtime.comm.ray_streams import minmax_broken, ready_stream, record, stream_context
from dagc.runtime.comm.rendezvous import connect, open_master, take_master

_ABORT = "abort"


def ray_communicator_class():
    """Ray's Communicator base class, or None where Ray's channel package is missing."""
    try:
        from ray.experimental.channel.communicator import Communicator as RayComm
    except Exception:  # pragma: no cover - ray is a dependency
        return None
    return RayComm


def is_ray_communicator(obj) -> bool:
    cls = ray_communicator_class()
    return cls is not None and isinstance(obj, cls)


def adapt(obj, what: str = "communicator") -> Communicator:
    """``obj`` as a dagc Communicator: itself when it is one, a :class:`RayCommunicator`
    around a Ray Communicator; anything else is a ValueError naming ``what``."""
    if isinstance(obj, Communicator):
        return obj
    if is_ray_communicator(obj):
        return RayCommunicator(obj)
    raise ValueError(
        f"{what} must be a dagc.Communicator or a Ray Communicator (a subclass "
        f"of ray.experimental.channel.communicator.Communicator), got "
        f"{type(obj).__name__}"
    )


def actor_key(handle) -> str:
    return handle._ray_actor_id.hex()


class RayCommunicator(Communicator):
    """A Ray Compiled Graph ``Communicator`` behind dagc's interface (see the module
    docstring for what is called when). ``ray_comm`` travels pickled to every member, as
    Ray ships it; ``initialize`` runs there with the member's Ray rank."""

    _LIVE = (
        "_master",
        "_peer",
        "_ops",
        "_streams",
        "_no_allgather",
        "_no_reducescatter",
        "_minmax_by_sum",
        "_initialized",
        "_destroyed",
    )

    def __init__(self, ray_comm):
        self.ray_comm = ray_comm
        handles = list(ray_comm.get_actor_handles())
        keys = [actor_key(h) for h in handles]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(
                f"{type(ray_comm).__name__}.get_actor_handles() lists the same actor twice "
                f"({', '.join(k[:12] for k in twice)}): every actor of a communicator group "
                f"must be a different actor (Ray: 'Actors must be unique')."
            )
        try:
            ws = ray_comm.get_world_size()
        except NotImplementedError:
            ws = len(handles)
        if ws != len(handles):
            raise ValueError(
                f"{type(ray_comm).__name__}: get_world_size() is {ws} but "
                f"get_actor_handles() lists {len(handles)} actors"
            )
        self.actor_keys = frozenset(keys)  # what the driver checks users against
        self.transport = str(ray_comm.get_transport_name())
        # "cpu" (Ray's CPUCommunicator): Ray moves point-to-point tensors through shared
        # memory and never calls send/recv, so neither does dagc (lower-comm, the frontend)
        self.p2p = self.transport != "cpu"
        self.rank = -1
        self.world_size = 0
        self.ray_rank = -1
        self.device = "cpu"
        self._reset()

    def _reset(self) -> None:
        self._master = None
        self._peer: tuple[int, ...] = ()  # group rank -> Ray rank, once set up
        self._ops: dict[str, Any] = {}  # op name -> Ray's ReduceOp, once set up
        self._streams = False
        self._no_allgather = False
        self._no_reducescatter = False
        self._minmax_by_sum = False
        self._initialized = False
        self._destroyed = False

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    # -- set-up ----------------------------------------------------------------------------
    def prepare(self) -> dict:
        _, rdv = open_master("dagc-ray")
        return rdv

    def setup(self, rank: int, world_size: int, rendezvous: dict, timeout: float) -> None:
        if self._initialized:
            raise RuntimeError(f"{self!r} is already set up")
        name = type(self.ray_comm).__name__
        deadline = time.monotonic() + timeout
        store = self._store(rendezvous, rank, timeout)
        pre = rendezvous["prefix"]
        try:
            own = self._own_ray_rank()
        except Exception as e:
            why = (
                f"rank {rank} of the dagc group is an actor outside the {name}'s group "
                f"(get_rank: {e}); every actor that sends, receives or joins a "
                f"collective through it must be one of its get_actor_handles()"
            )
            store.set(pre + _ABORT, why)
            raise RuntimeError(why) from e
        store.set(f"{pre}r{rank}", str(own))
        keys = [f"{pre}r{r}" for r in range(world_size)]
        wait = 0.001
        while not store.check(keys):
            if store.check([pre + _ABORT]):
                raise RuntimeError(
                    f"{name} set-up of rank {rank} stopped: another member "
                    f"failed: {store.get(pre + _ABORT).decode()}"
                )
            if time.monotonic() > deadline:
                missing = [r for r in range(world_size) if not store.check([keys[r]])]
                raise TimeoutError(
                    f"{name} set-up timed out after {timeout:g} s (rank "
                    f"{rank} of {world_size}): ranks {missing} never joined"
                )
            time.sleep(wait)
            wait = min(wait * 2, 0.05)
        peer = tuple(int(store.get(k)) for k in keys)
        if len(set(peer)) != len(peer):
            raise RuntimeError(
                f"{name}: two members of the group have one Ray rank "
                f"({list(peer)}): the same actor twice"
            )
        self.ray_comm.initialize(own)
        self._initialized = True
        self._peer = peer
        self.ray_rank = own
        self.rank = rank
        self.world_size = world_size
        self.device = self._device()
        from ray.experimental.util.types import ReduceOp

        self._ops = {
            "sum": ReduceOp.SUM,
            "product": ReduceOp.PRODUCT,
            "min": ReduceOp.MIN,
            "max": ReduceOp.MAX,
            "avg": ReduceOp.AVG,
        }
        self._streams = (
            stream_context(self.ray_comm, "send_stream") is not None
            and stream_context(self.ray_comm, "recv_stream") is not None
        )
        self._minmax_by_sum = minmax_broken(self.ray_comm)

    def _store(self, rdv: dict, rank: int, timeout: float):
        if rank == 0:
            master = take_master(rdv)
            if master is not None:
                self._master = master  # kept until destroy: the others read it
                return master
        try:
            return connect(rdv, timeout)
        except Exception as e:
            raise TimeoutError(
                f"{type(self.ray_comm).__name__} set-up (rank {rank}) could "
                f"not reach rank 0's rendezvous {rdv['host']}:{rdv['port']} "
                f"within {timeout:g} s: {e}"
            ) from e

    def _own_ray_rank(self) -> int:
        import ray

        handle = ray.get_runtime_context().current_actor
        rank = self.ray_comm.get_rank(handle)
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"get_rank returned {rank!r}")
        return rank

    def _device(self):
        import torch

        if self.transport == "cpu":
            return torch.device("cpu")
        try:  # Ray's "default device" of this actor: its accelerator, or the CPU
            import ray

            if not ray.is_initialized():  # (asking would start or join a cluster)
                return torch.device("cpu")
            from ray.experimental.channel.accelerator_context import AcceleratorContext

            return AcceleratorContext.get().get_accelerator_devices()[0]
        except Exception:
            return torch.device("cpu")

    # -- point to point ---------------------------------------------------------------------
    def send(self, tensor, peer: int) -> None:
        self.ray_comm.send(tensor, self._peer[peer])

    def recv(self, tensor, peer: int) -> None:
        got = self.ray_comm.recv(
            tuple(tensor.shape), tensor.dtype, self._peer[peer], lambda shape, dtype: tensor
        )
        if got is not tensor:
            self._fill(tensor, got, peer)

    def _fill(self, tensor, got, peer: int) -> None:
        name = type(self.ray_comm).__name__
        if got is None:
            raise RuntimeError(
                f"{name}.recv returned None: it moves no tensors point to "
                f"point (transport {self.transport!r})"
            )
        if tuple(got.shape) != tuple(tensor.shape) or got.dtype != tensor.dtype:
            raise RuntimeError(
                f"{name}.recv from rank {self._peer[peer]} returned a "
                f"{tuple(got.shape)} {got.dtype} tensor; expected "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        tensor.copy_(got)

    def isend(self, tensor, peer: int) -> Work:
        if not self._streams:
            self.send(tensor, peer)
            return DONE
        ctx = self.ray_comm.send_stream
        stream = ready_stream(ctx)
        with ctx:
            self.ray_comm.send(tensor, self._peer[peer])
        return record(stream, tensor)

    def irecv(self, tensor, peer: int) -> Work:
        if not self._streams:
            self.recv(tensor, peer)
            return DONE
        ctx = self.ray_comm.recv_stream
        stream = ready_stream(ctx)
        with ctx:
            self.recv(tensor, peer)
        return record(stream, tensor)

    # -- collectives --------------------------------------------------------------------------
    def allreduce(self, tensor, op: str = "sum") -> None:
        code = self._ops.get(op) if self._ops else None
        if code is None:
            check_op(op)
            raise RuntimeError(f"{self!r} is not set up")
        if self._minmax_by_sum and (op == "max" or op == "min"):
            self._minmax(tensor, op)
            return
        out = tensor.new_empty(tensor.shape)
        self.ray_comm.allreduce(tensor, out, code)
        tensor.copy_(out)

    def _minmax(self, tensor, op: str) -> None:
        """MAX/MIN from a SUM all-reduce of every rank's tensor in its own row (for Ray's
        CPUCommunicator, whose MAX/MIN fail: see minmax_broken). World x the size, so only
        small tensors should take this way; dagc's own flag words (6 int64) do."""
        import torch

        rows = tensor.new_zeros((self.ray_comm.get_world_size(), *tensor.shape))
        rows[self.ray_rank].copy_(tensor)
        out = torch.empty_like(rows)
        self.ray_comm.allreduce(rows, out, self._ops["sum"])
        tensor.copy_(out.amax(0) if op == "max" else out.amin(0))

    def allgather(self, tensor, out) -> None:
        if not self._no_allgather:
            try:
                self.ray_comm.allgather(tensor, out)
                return
            except NotImplementedError:
                self._no_allgather = True  # every member's class says the same
        with self._as_ray_rank():
            super().allgather(tensor, out)

    def reducescatter(self, tensor, out, op: str = "sum") -> None:
        if not self._no_reducescatter:
            code = self._ops.get(op) if self._ops else None
            if code is None:
                check_op(op)
                raise RuntimeError(f"{self!r} is not set up")
            try:
                self.ray_comm.reducescatter(tensor, out, code)
                return
            except NotImplementedError:
                self._no_reducescatter = True
        with self._as_ray_rank():
            super().reducescatter(tensor, out, op)

    @contextlib.contextmanager
    def _as_ray_rank(self):
        """The base class's fallbacks place this rank's block at ``self.rank``: Ray's
        rank there, so the rows come in the order a real all-gather of Ray's would give."""
        rank = self.rank
        self.rank = self.ray_rank
        try:
            yield
        finally:
            self.rank = rank

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        try:
            if self._initialized:
                self.ray_comm.destroy()
        finally:
            self._master = None
            self._initialized = False

    def __repr__(self) -> str:
        state = (
            f"rank {self.rank}/{self.world_size}, Ray rank {self.ray_rank}"
            if self.world_size
            else "not set up"
        )
        return f"RayCommunicator({type(self.ray_comm).__name__}, {state})"

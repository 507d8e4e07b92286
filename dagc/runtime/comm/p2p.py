"""The ends of communicator channels: what generated loops call for a tensor-transport edge.

How a value is split into metadata and tensors is in ``packing.py``.

The metadata of an execution is written once, when the value is sent to the first reader in
``readers``; every reader gets the tensors by its own send. Sends and receives must stay
paired whatever goes wrong, or the next execution's receive gets this one's tensors:

- the writer pickles the skeleton itself (``(blob, specs)``: ``packing.py``). When it
  cannot (a lock or a lambda next to the tensors), a Failure saying which part and why is
  published in its place and no tensor is sent to any reader: each reader returns the
  Failure without receiving;
- the specs always decode, the skeleton may not (its class cannot be imported or rebuilt
  on the reader): the reader then receives the tensors all the same, drops them, and
  returns a Failure naming the writer and the channel.

The writer sends contiguous tensors on the communicator's device (copies where needed);
the reader allocates on its device and receives into them.

Deferred receives. ``irecv`` (overlap) cannot post the tensor receives before the metadata
is there, and must not block for it: the schedule may hoist it above ops the sender needs.
So a handle whose metadata is not there yet is queued on the communicator, and is posted
(blocking for its metadata) by its own ``wait()`` or by the next op that must come after it,
whichever comes first. That keeps every process's communicator ops in issue order - the
order the schedule's deadlock proof (``dagc.schedule.simulate``) assumes:

- one stream per process (NCCL, custom communicators): every op on the communicator
  posts every deferred receive first;
- per peer (gloo, ``per_peer_order``: it pairs messages per peer and direction, and
  collectives apart): a receive from peer q posts the deferred receives from q first; a send
  or a collective posts none. Posting one from another peer there would block on metadata
  the schedule does not promise yet (a cross-peer wait the proof never made).

A loop parked between executions (a profile's swap) may have issued the next execution's
receive already; :func:`drop_pending` forgets it, so the swapped-in loop issues it anew.
"""

from __future__ import annotations

import pickle

import torch
from torch import Tensor

from dagc.runtime.comm.base import DONE, Communicator, Work
from dagc.runtime.comm.packing import DTYPES, device_of, fill, spec, strip, unpicklable_part
from dagc.runtime.failure import Failure, capture

_empty = torch.empty
_dumps = pickle.dumps
_loads = pickle.loads
_PICKLE_ERRORS = (pickle.PicklingError, TypeError, AttributeError, RecursionError)


# -- ordering of one process's ops on one communicator --------------------------------------
def pending_of(comm: Communicator, peer=None) -> list:
    """The FIFO of this process's deferred receives that an op on ``comm`` (with ``peer``)
    must post first, shared by all its ends: one per communicator, or with
    ``comm.per_peer_order`` one per peer (``peer`` None: a queue nothing is deferred on,
    what sends and collectives of such a communicator see)."""
    try:
        queues = comm._dagc_pending
    except AttributeError:
        queues = comm._dagc_pending = {}
    key = peer if getattr(comm, "per_peer_order", False) else None
    q = queues.get(key)
    if q is None:
        q = queues[key] = []
    return q


def drop_pending(comm: Communicator) -> int:
    """Forget the deferred receives not yet posted (a loop parked between executions issued
    them; the loop that runs next issues them again). Returns how many."""
    n = 0
    for q in getattr(comm, "_dagc_pending", {}).values():
        n += len(q)
        q.clear()
    return n


def flush(pending: list, upto=None) -> None:
    """Post queued receives in issue order (each blocks for its metadata), through ``upto``."""
    while pending:
        h = pending.pop(0)
        h._post()
        if h is upto:
            return


class _Works(Work):
    """Several Works as one; holds the tensors until they are done."""

    __slots__ = ("works", "tensors")

    def __init__(self, works, tensors):
        self.works = works
        self.tensors = tensors

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.tensors = None

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)


# -- writer ---------------------------------------------------------------------------------
class CommWriter:
    """The writing end of a comm channel: ``send(value, peer)`` / ``isend(value, peer)``.

    ``writer`` is the channel's shared-memory Writer (metadata), ``ranks`` maps actor ids to
    ranks in ``comm``, ``readers`` lists the channel's readers in the order the schedule sends
    to them (the channel spec's order).
    """

    def __init__(self, writer, comm: Communicator, ranks: dict, readers: tuple, actor: str = ""):
        readers = tuple(readers)
        if not readers:
            raise ValueError("a comm channel needs at least one reader")
        missing = [r for r in readers if r not in ranks]
        if missing:
            raise ValueError(
                f"readers {missing} have no rank in the communicator (ranks: {dict(ranks)})"
            )
        self.writer = writer
        self.comm = comm
        self.readers = readers
        self.actor = actor
        self._write = writer.write
        self._send = comm.send
        self._isend = comm.isend
        self._dev = device_of(comm)
        last = len(readers) - 1
        # peer -> (rank, writes the metadata, last reader of the execution)
        self._plan = {r: (ranks[r], i == 0, i == last) for i, r in enumerate(readers)}
        self._held = ()
        self._pending = pending_of(comm)  # per peer: the empty queue (sends post none)
        # A value whose non-tensor part cannot be pickled: the metadata writer publishes a
        # Failure instead (built by the loop's own on_encode_error when it has one, so the
        # message names the actor as every other send error does) and its write() returns
        # True; then no tensor follows, for any reader, and the readers' next receive pairs
        # with the next execution's send.
        self._hook = getattr(writer, "on_encode_error", None)
        writer.on_encode_error = self._encode_error

    def _encode_error(self, exc: Exception, meta) -> Failure:
        """on_encode_error of the metadata writer: the Failure its readers get in place of
        a value whose non-tensor part (``meta[0]``, the skeleton) cannot be pickled, or of
        metadata that could not be written (no room in shared memory: its own error)."""
        value = meta[0] if meta.__class__ is tuple and len(meta) == 2 else meta
        if value is None or value.__class__ is bytes:  # pickled already: not a pickling error
            if self._hook is not None:
                return self._hook(exc, value)
            return capture(exc, self.actor, "<send>", -1)
        path, part = unpicklable_part(value) or ("value", value)
        err = TypeError(
            f"{path} ({type(part).__name__}) cannot be pickled: {exc}. On a "
            f"tensor-transport edge (to {', '.join(self.readers)}) only the tensors travel "
            f"through the communicator; the rest of the value must pickle"
        )
        if self._hook is not None:
            return self._hook(err, value)
        return capture(
            TypeError(
                f"{self.actor or 'an actor'} produced a "
                f"{type(value).__name__} that cannot be sent: {err}"
            ),
            self.actor,
            "<send>",
            -1,
        )

    def _prep(self, t: Tensor) -> Tensor:
        if t.device != self._dev:
            t = t.to(self._dev)
        if not t.is_contiguous():
            t = t.contiguous()
        if t.requires_grad:
            t = t.detach()
        return t

    def _publish(self, value, peer: str) -> tuple:
        """Write the metadata; return the (prepared, non-empty) tensors to send."""
        if value.__class__ is Failure:
            self._write(value)
            return ()
        if isinstance(value, Tensor):
            t = self._prep(value)
            self._write((None, (spec(t),)))
            return (t,) if t.numel() else ()
        out: list = []
        skel = strip(value, out, {})
        try:
            blob = _dumps(skel, 5)
        except _PICKLE_ERRORS as e:
            self._write(self._encode_error(e, (skel, ())))
            return ()
        ts = [self._prep(t) for t in out]
        # bytes and specs always pickle; True: no room for them, a Failure went instead
        if self._write((blob, tuple(spec(t) for t in ts))):
            return ()
        return tuple(t for t in ts if t.numel())

    def send(self, value, peer: str) -> None:
        rank, first, last = self._plan[peer]
        if self._pending:
            flush(self._pending)
        ts = self._publish(value, peer) if first else self._held
        send = self._send
        for t in ts:
            send(t, rank)
        self._held = () if last else ts

    def isend(self, value, peer: str) -> Work:
        rank, first, last = self._plan[peer]
        if self._pending:
            flush(self._pending)
        ts = self._publish(value, peer) if first else self._held
        self._held = () if last else ts
        if not ts:
            return DONE
        isend = self._isend
        return _Works([isend(t, rank) for t in ts], ts)


# -- reader ---------------------------------------------------------------------------------
class _RecvHandle:
    """An issued ``irecv``; ``wait()`` returns the value."""

    __slots__ = ("cr", "skel", "ts", "works", "posted")
    works: list[Work] | tuple[()]
    ts: list[Tensor] | None
    skel: object  # the value with its tensors taken out, or a Failure

    def __init__(self, cr: CommReader):
        self.cr = cr
        self.posted = False
        self.works = ()
        self.ts = None
        self.skel = None

    def _post(self) -> None:
        cr = self.cr
        meta = cr._read()
        self.posted = True
        if meta.__class__ is Failure:
            self.skel = meta
            return
        blob, specs = meta
        self.skel = None if blob is None else cr._skeleton(blob)
        if specs:
            ts = cr._alloc(specs)
            irecv, src = cr._irecv, cr._src
            self.works = [irecv(t, src) for t in ts if t.numel()]
            self.ts = ts

    def wait(self):
        if not self.posted:
            flush(self.cr._pending, self)
        for w in self.works:
            w.wait()
        self.works = ()
        ts = self.ts
        skel = self.skel
        if ts is None or skel.__class__ is Failure:
            return skel  # a Failure (tensors received and dropped), or no tensors
        return ts[0] if skel is None else fill(skel, ts)

    def is_completed(self) -> bool:
        return self.posted and all(w.is_completed() for w in self.works)


class CommReader:
    """The reading end of a comm channel: ``recv()`` / ``irecv().wait()`` return the value.

    ``reader`` is this process's shared-memory Reader of the channel (metadata),
    ``writer_rank`` the writer's rank in ``comm``, ``device`` where received tensors are
    allocated ("cpu" for gloo, "cuda" for NCCL).
    """

    def __init__(self, reader, comm: Communicator, writer_rank: int, device="cpu"):
        self.reader = reader
        self.comm = comm
        self._read = reader.read
        self._ready = reader.ready
        self._recv = comm.recv
        self._irecv = comm.irecv
        self._src = writer_rank
        self._dev = device_of(comm, device)
        self._pending = pending_of(comm, writer_rank)
        self._undecodable = getattr(reader, "_undecodable", None)

    def _skeleton(self, blob: bytes):
        """The skeleton the writer pickled, or the Failure this execution gets when it
        cannot be unpickled here (its tensors are received all the same)."""
        try:
            return _loads(blob)
        except Exception as e:
            if self._undecodable is not None:
                return self._undecodable(e)
            return capture(e, "the writer", "<unpickle>", -1)

    def _alloc(self, specs) -> list:
        dev = self._dev
        return [
            _empty(s, dtype=DTYPES[c] if c.__class__ is int else c, device=dev) for s, c in specs
        ]

    def recv(self):
        if self._pending:
            flush(self._pending)
        meta = self._read()
        if meta.__class__ is Failure:
            return meta
        blob, specs = meta
        skel = None if blob is None else self._skeleton(blob)
        if not specs:
            return skel
        ts = self._alloc(specs)
        recv, src = self._recv, self._src
        for t in ts:
            if t.numel():
                recv(t, src)
        if skel is None:
            return ts[0]
        return skel if skel.__class__ is Failure else fill(skel, ts)

    def irecv(self) -> _RecvHandle:
        h = _RecvHandle(self)
        pending = self._pending
        if not pending and self._ready():
            h._post()  # metadata is there: receive right away
        else:
            pending.append(h)
        return h

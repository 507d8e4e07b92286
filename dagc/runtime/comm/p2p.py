"""The ends of communicator channels and collectives: what the generated loops call.

A "comm" channel carries one value per execution in two parts::

    metadata  the channel's shared-memory ring (a channel.Writer / channel.Reader):
                Failure              the upstream op failed; no tensors follow
                (skeleton, specs)    specs: one (shape, dtype code) per tensor, in send
                                     order; skeleton: the value with each tensor replaced
                                     by _Slot(i), or None when the value is one bare tensor
    tensors   the Communicator: one send per non-empty tensor, in spec order, per reader

Tensors are found in dicts, lists, tuples (named too) and dataclass fields, nested; a tensor
inside any other object travels inside the metadata, pickled (CPU tensors as out-of-band
buffers; CUDA tensors through torch's own pickling, which is slow). The same tensor object
twice in a value is sent once and comes back as one tensor in both places.

The metadata of an execution is written once, when the value is sent to the first reader in
``readers``; every reader gets the tensors by its own send. When the metadata cannot be
pickled (a lock or a lambda next to the tensors), a Failure saying which part and why is
published in its place and no tensor is sent to any reader: each reader returns the Failure
without receiving, so sends and receives stay paired for the next execution. The writer
sends contiguous tensors on the communicator's device (copies where needed); the reader
allocates on its device and receives into them.

Deferred receives. ``irecv`` (overlap) cannot post the tensor receives before the metadata
is there, and must not block for it: the schedule may hoist it above ops the sender needs.
So a handle whose metadata is not there yet is queued on the communicator, and is posted
(blocking for its metadata) by its own ``wait()`` or by the next op on the same
communicator, whichever comes first. That keeps every process's communicator ops in issue
order - the order the schedule's deadlock proof assumes and gloo/NCCL pair messages by.

Collectives (all-reduce, all-gather, reduce-scatter) first all-reduce (MAX) a small int64
flag: failed?, dtype, shape hash, so a participant whose input is a Failure (or no tensor,
or a tensor that does not match the others') never leaves the others hanging: every
participant then returns a Failure - a failed one its own, the others the first failed
rank's (sent along with one more all-reduce), so ``get()`` shows the error where it
started.
"""
from __future__ import annotations

import copy
import dataclasses
import pickle
import zlib

import torch
from torch import Tensor

from dagc.runtime.comm.base import DONE, REDUCE_OPS, Communicator, Work
from dagc.runtime.failure import Failure, capture

_DTYPES = tuple(d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
    getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None),
    getattr(torch, "uint16", None), getattr(torch, "uint32", None),
    getattr(torch, "uint64", None)) if d is not None)
_CODE = {d: i for i, d in enumerate(_DTYPES)}
_ATOMIC = frozenset({int, float, str, bytes, bool, type(None), complex})
_MASK = (1 << 62) - 1
_LOW = -(1 << 62)
_is_dataclass = dataclasses.is_dataclass
_fields = dataclasses.fields
_empty = torch.empty


class _Slot:
    """Where tensor ``i`` of the spec list goes back in the value."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i

    def __reduce__(self):
        return (_Slot, (self.i,))

    def __repr__(self) -> str:
        return f"<tensor {self.i}>"


# -- value <-> skeleton + tensors -----------------------------------------------------------
def _strip(v, out: list, seen: dict):
    """``v`` with every tensor replaced by a _Slot (appended to ``out``); ``v`` itself when it
    holds none. Never mutates ``v``."""
    cls = v.__class__
    if cls in _ATOMIC:
        return v
    if isinstance(v, Tensor):
        slot = seen.get(id(v))
        if slot is None:
            slot = seen[id(v)] = _Slot(len(out))
            out.append(v)
        return slot
    if isinstance(v, (dict, list)):
        new = None
        for k, x in (v.items() if isinstance(v, dict) else enumerate(v)):
            y = _strip(x, out, seen)
            if y is not x:
                if new is None:       # copy on first change; a subclass keeps its class
                    new = cls(v) if cls is dict or cls is list else copy.copy(v)
                new[k] = y
        return v if new is None else new
    if isinstance(v, tuple):
        items = [_strip(x, out, seen) for x in v]
        for a, b in zip(items, v):
            if a is not b:
                return _remake(v, items)
        return v
    if _is_dataclass(v) and not isinstance(v, type):
        new = None
        for f in _fields(v):
            x = getattr(v, f.name)
            y = _strip(x, out, seen)
            if y is not x:
                if new is None:
                    new = copy.copy(v)
                object.__setattr__(new, f.name, y)
        return v if new is None else new
    return v


def _fill(v, ts: list):
    """Put the received tensors back into the (freshly unpickled, so ours) skeleton."""
    cls = v.__class__
    if cls is _Slot:
        return ts[v.i]
    if cls in _ATOMIC:
        return v
    if isinstance(v, (dict, list)):
        for k, x in (v.items() if isinstance(v, dict) else enumerate(v)):
            y = _fill(x, ts)
            if y is not x:
                v[k] = y          # an existing key or index: safe while iterating
        return v
    if isinstance(v, tuple):
        items = [_fill(x, ts) for x in v]
        for a, b in zip(items, v):
            if a is not b:
                return _remake(v, items)
        return v
    if _is_dataclass(v) and not isinstance(v, type):
        for f in _fields(v):
            x = getattr(v, f.name)
            y = _fill(x, ts)
            if y is not x:
                object.__setattr__(v, f.name, y)
        return v
    return v


def _remake(v: tuple, items: list) -> tuple:
    cls = v.__class__
    if cls is tuple:
        return tuple(items)
    if hasattr(cls, "_make"):          # namedtuple
        return cls._make(items)
    return cls(items)


def _unpicklable_part(v, path: str = "value", depth: int = 0) -> tuple:
    """(path, object): the innermost part of ``v`` that does not pickle, e.g.
    ``("value['lock']", <lock>)``; ``v`` itself when no part of it alone fails. Only
    called for a value that failed to pickle (the error message), never per send."""
    try:
        pickle.dumps(v, 5)
        return None
    except Exception:
        pass
    if depth < 16 and v.__class__ not in _ATOMIC:
        if isinstance(v, dict):
            items = [(f"{path}[{k!r}]", x) for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            items = [(f"{path}[{i}]", x) for i, x in enumerate(v)]
        elif _is_dataclass(v) and not isinstance(v, type):
            items = [(f"{path}.{f.name}", getattr(v, f.name, None)) for f in _fields(v)]
        else:
            items = [(f"{path}.{k}", x) for k, x in getattr(v, "__dict__", {}).items()]
        for p, x in items[:1000]:
            found = _unpicklable_part(x, p, depth + 1)
            if found is not None:
                return found
    return path, v


def _spec(t: Tensor) -> tuple:
    return (tuple(t.shape), _CODE.get(t.dtype, t.dtype))


def device_of(comm: Communicator, device=None) -> torch.device:
    """The torch device tensors of ``comm`` live on ("cuda" -> the comm's GPU)."""
    d = device if device is not None else getattr(comm, "device", "cpu")
    if isinstance(d, torch.device):
        return d
    if d == "cuda":
        index = getattr(comm, "_index", None)
        return torch.device("cuda", torch.cuda.current_device() if index is None else index)
    return torch.device(d)


# -- ordering of one process's ops on one communicator --------------------------------------
def _pending_of(comm: Communicator) -> list:
    """The FIFO of this process's deferred receives on ``comm``, shared by all its ends."""
    try:
        return comm._dagc_pending
    except AttributeError:
        comm._dagc_pending = pending = []
        return pending


def _flush(pending: list, upto=None) -> None:
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

    def __init__(self, writer, comm: Communicator, ranks: dict, readers: tuple,
                 actor: str = ""):
        readers = tuple(readers)
        if not readers:
            raise ValueError("a comm channel needs at least one reader")
        missing = [r for r in readers if r not in ranks]
        if missing:
            raise ValueError(f"readers {missing} have no rank in the communicator "
                             f"(ranks: {dict(ranks)})")
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
        self._pending = _pending_of(comm)
        # A value whose non-tensor part cannot be pickled: the metadata writer publishes a
        # Failure instead (built by the loop's own on_encode_error when it has one, so the
        # message names the actor as every other send error does) and its write() returns
        # True; then no tensor follows, for any reader, and the readers' next receive pairs
        # with the next execution's send.
        self._hook = getattr(writer, "on_encode_error", None)
        writer.on_encode_error = self._encode_error

    def _encode_error(self, exc: Exception, meta) -> Failure:
        """on_encode_error of the metadata writer: the Failure its readers get in place of
        a value whose non-tensor part (``meta[0]``, the skeleton) cannot be pickled."""
        value = meta[0] if meta.__class__ is tuple and len(meta) == 2 else meta
        path, part = _unpicklable_part(value) or ("value", value)
        err = TypeError(
            f"{path} ({type(part).__name__}) cannot be pickled: {exc}. On a "
            f"tensor-transport edge (to {', '.join(self.readers)}) only the tensors travel "
            f"through the communicator; the rest of the value must pickle")
        if self._hook is not None:
            return self._hook(err, value)
        return capture(TypeError(f"{self.actor or 'an actor'} produced a "
                                 f"{type(value).__name__} that cannot be sent: {err}"),
                       self.actor, "<send>", -1)

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
            self._write((None, (_spec(t),)))
            return (t,) if t.numel() else ()
        out: list = []
        skel = _strip(value, out, {})
        ts = [self._prep(t) for t in out]
        try:
            if self._write((skel, tuple(_spec(t) for t in ts))):
                return ()           # a Failure went instead (see _encode_error): no tensors
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            # a writer that raises instead of calling on_encode_error: nothing reached it
            self._write(self._encode_error(e, (skel, ())))
            return ()
        return tuple(t for t in ts if t.numel())

    def send(self, value, peer: str) -> None:
        rank, first, last = self._plan[peer]
        if self._pending:
            _flush(self._pending)
        ts = self._publish(value, peer) if first else self._held
        send = self._send
        for t in ts:
            send(t, rank)
        self._held = () if last else ts

    def isend(self, value, peer: str) -> Work:
        rank, first, last = self._plan[peer]
        if self._pending:
            _flush(self._pending)
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

    def __init__(self, cr: "CommReader"):
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
        skel, specs = meta
        self.skel = skel
        if specs:
            ts = cr._alloc(specs)
            irecv, src = cr._irecv, cr._src
            self.works = [irecv(t, src) for t in ts if t.numel()]
            self.ts = ts

    def wait(self):
        if not self.posted:
            _flush(self.cr._pending, self)
        for w in self.works:
            w.wait()
        self.works = ()
        ts = self.ts
        if ts is None:
            return self.skel                  # a Failure, or a value with no tensors
        return ts[0] if self.skel is None else _fill(self.skel, ts)

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
        self._pending = _pending_of(comm)

    def _alloc(self, specs) -> list:
        dev = self._dev
        return [_empty(s, dtype=_DTYPES[c] if c.__class__ is int else c, device=dev)
                for s, c in specs]

    def recv(self):
        if self._pending:
            _flush(self._pending)
        meta = self._read()
        if meta.__class__ is Failure:
            return meta
        skel, specs = meta
        if not specs:
            return skel
        ts = self._alloc(specs)
        recv, src = self._recv, self._src
        for t in ts:
            if t.numel():
                recv(t, src)
        return ts[0] if skel is None else _fill(skel, ts)

    def irecv(self) -> _RecvHandle:
        h = _RecvHandle(self)
        pending = self._pending
        if not pending and self._ready():
            h._post()                         # metadata is there: receive right away
        else:
            pending.append(h)
        return h


# -- collectives ----------------------------------------------------------------------------
# flag words, all-reduced with MAX: [failed rank code, failure blob length, dtype, -dtype,
# shape hash, -shape hash]
_NFLAG = 6
KINDS = ("allreduce", "allgather", "reducescatter")


class Collective:
    """One participant of a collective: ``coll(*values)`` returns new tensors (the inputs
    are not modified) or a Failure; it must be called even when a value is a Failure.

    ``kind`` is ``allreduce`` (any number of tensors of one dtype, reduced together in one
    flat buffer; a tuple comes back when there are several), ``allgather`` (one tensor; the
    result stacks every rank's along dim 0, in rank order) or ``reducescatter`` (one tensor
    whose dim 0 divides by the group size; the result is this rank's block of the reduced
    tensor). Every participant must pass tensors of the same shapes and dtype.

    It raises only when the communicator itself breaks (a peer died). ``actor``/``method``/
    ``step`` name the op in the Failures it builds."""

    def __init__(self, comm: Communicator, op: str | None = "sum", actor: str = "",
                 method: str = "", step: int = -1, kind: str = "allreduce"):
        if kind not in KINDS:
            raise ValueError(f"unknown collective {kind!r}; expected one of {', '.join(KINDS)}")
        if kind == "allgather":
            op = None
        elif op not in REDUCE_OPS:
            raise ValueError(f"unknown reduce op {op!r}; expected one of "
                             f"{', '.join(REDUCE_OPS)}")
        self.comm = comm
        self.kind = kind
        self.op = op
        self.where = (actor, method or (f"{kind}.{op}" if op else kind), step)
        self._allreduce = comm.allreduce
        self._dev = device_of(comm)
        self._flag = torch.zeros(_NFLAG, dtype=torch.int64)
        self._flag_np = self._flag.numpy()
        self._flag_dev = (self._flag if self._dev.type == "cpu"
                          else torch.zeros(_NFLAG, dtype=torch.int64, device=self._dev))
        self._pending = _pending_of(comm)

    def __call__(self, *values):
        if self._pending:
            _flush(self._pending)
        own = self._check(values)
        flag = self._flag_np
        if own is None:
            dtype = values[0].dtype
            code = _CODE.get(dtype)
            if code is None:           # str hashes differ per process; crc32 does not
                code = zlib.crc32(str(dtype).encode())
            sh = hash(tuple(tuple(v.shape) for v in values)) & _MASK
            flag[0] = 0
            flag[1] = 0
            flag[2] = code
            flag[3] = -code
            flag[4] = sh
            flag[5] = -sh
        else:
            blob = pickle.dumps(own, 5)
            flag[0] = self.comm.world_size - self.comm.rank
            flag[1] = len(blob)
            flag[2:] = _LOW
        fd = self._flag_dev
        if fd is not self._flag:
            fd.copy_(self._flag)
        self._allreduce(fd, "max")
        if fd is not self._flag:
            self._flag.copy_(fd)
        failed, blen, c_hi, c_lo, s_hi, s_lo = flag.tolist()
        if failed:
            return self._spread_failure(own, blob if own is not None else b"", failed, blen)
        if c_hi != -c_lo or s_hi != -s_lo:
            got = ", ".join(f"{tuple(v.shape)} {v.dtype}" for v in values)
            return capture(ValueError(
                f"{self.where[1]}: the participants' inputs differ in "
                f"{'dtype' if c_hi != -c_lo else 'shape'}; this one (rank {self.comm.rank}) "
                f"got {got}. Every participant of a collective must pass tensors of the "
                f"same shape and dtype."), *self.where)
        try:
            # every participant fails alike here (e.g. a dtype the backend cannot reduce),
            # before any data moves, so the group stays usable
            return self._run(values)
        except Exception as e:
            return capture(e, *self.where)

    def _check(self, values):
        """This participant's own Failure (an input failed or is not usable), or None."""
        for v in values:
            if v.__class__ is Failure:
                return v
        name = self.where[1]
        for v in values:
            if not isinstance(v, Tensor):
                return capture(TypeError(f"{name} expects a torch.Tensor, got "
                                         f"{type(v).__name__}"), *self.where)
        if len(values) != 1 and self.kind != "allreduce":
            return capture(TypeError(f"{name} takes one tensor per participant, got "
                                     f"{len(values)}"), *self.where)
        if len({v.dtype for v in values}) > 1:
            return capture(TypeError(
                f"{name}: tensors reduced together must share one dtype, got "
                f"{[str(v.dtype) for v in values]}"), *self.where)
        if self.kind != "allreduce":
            t = values[0]
            ws = self.comm.world_size
            if t.dim() == 0:
                return capture(ValueError(f"{name} needs a tensor with at least one "
                                          f"dimension (it works along dim 0)"), *self.where)
            if self.kind == "reducescatter" and t.shape[0] % ws:
                return capture(ValueError(
                    f"{name}: dim 0 of the input ({t.shape[0]}) must divide by the group "
                    f"size {ws}"), *self.where)
        return None

    def _src(self, t: Tensor) -> Tensor:
        """A contiguous tensor on the communicator's device that is not the input."""
        out = t.detach()
        if out.device != self._dev:
            return out.to(self._dev).contiguous()
        return out.clone(memory_format=torch.contiguous_format)

    def _run(self, values):
        kind = self.kind
        if kind == "allreduce":
            if len(values) == 1:
                out = self._src(values[0])
                self._allreduce(out, self.op)
                return out
            # several tensors: one flat buffer, one all-reduce, views back in shape
            flat = torch.cat([v.detach().reshape(-1).to(self._dev) for v in values])
            self._allreduce(flat, self.op)
            outs = []
            pos = 0
            for v in values:
                n = v.numel()
                outs.append(flat[pos:pos + n].view(v.shape))
                pos += n
            return tuple(outs)
        t = values[0]
        src = t.detach()
        if src.device != self._dev or not src.is_contiguous():
            src = src.to(self._dev).contiguous()
        ws = self.comm.world_size
        if kind == "allgather":
            out = torch.empty((t.shape[0] * ws, *t.shape[1:]), dtype=t.dtype, device=self._dev)
            self.comm.allgather(src, out)
        else:
            out = torch.empty((t.shape[0] // ws, *t.shape[1:]), dtype=t.dtype, device=self._dev)
            self.comm.reducescatter(src, out, self.op)
        return out

    def _spread_failure(self, own, blob: bytes, failed: int, blen: int):
        """The lowest failed rank sends its Failure to all (one uint8 SUM all-reduce)."""
        first = self.comm.world_size - failed
        buf = torch.zeros(blen, dtype=torch.uint8)
        if self.comm.rank == first:
            buf[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        dev = buf if self._dev.type == "cpu" else buf.to(self._dev)
        self._allreduce(dev, "sum")
        if own is not None:
            return own
        try:
            got = pickle.loads(dev.cpu().numpy().tobytes())
            if got.__class__ is Failure:
                return got
        except Exception:
            pass
        return capture(RuntimeError(f"{self.where[1]}: participant rank {first} failed "
                                    f"before the collective"), *self.where)

"""Collectives (all-reduce, all-gather, reduce-scatter): what generated loops call for one.

Each first all-reduces (MAX) a small int64 flag: failed?, dtype, shape hash, so a
participant whose input is a Failure (or no tensor, or a tensor that does not match the
others') never leaves the others hanging: every participant then returns a Failure - a
failed one its own, the others the first failed rank's (sent along with one more
all-reduce), so ``get()`` shows the error where it started.
"""

from __future__ import annotations

import pickle
import zlib

import torch
from torch import Tensor

from dagc.runtime.comm.base import REDUCE_OPS, Communicator
from dagc.runtime.comm.p2p import flush, pending_of
from dagc.runtime.comm.packing import CODE, device_of
from dagc.runtime.failure import Failure, capture

_MASK = (1 << 62) - 1
_LOW = -(1 << 62)
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

    def __init__(
        self,
        comm: Communicator,
        op: str | None = "sum",
        actor: str = "",
        method: str = "",
        step: int = -1,
        kind: str = "allreduce",
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown collective {kind!r}; expected one of {', '.join(KINDS)}")
        if kind == "allgather":
            op = None
        elif op not in REDUCE_OPS:
            raise ValueError(f"unknown reduce op {op!r}; expected one of {', '.join(REDUCE_OPS)}")
        self.comm = comm
        self.kind = kind
        self.op = op
        self.where = (actor, method or (f"{kind}.{op}" if op else kind), step)
        self._allreduce = comm.allreduce
        self._dev = device_of(comm)
        self._flag = torch.zeros(_NFLAG, dtype=torch.int64)
        self._flag_np = self._flag.numpy()
        self._flag_dev = (
            self._flag
            if self._dev.type == "cpu"
            else torch.zeros(_NFLAG, dtype=torch.int64, device=self._dev)
        )
        self._pending = pending_of(comm)

    def __call__(self, *values):
        if self._pending:
            flush(self._pending)
        own = self._check(values)
        flag = self._flag_np
        if own is None:
            dtype = values[0].dtype
            code = CODE.get(dtype)
            if code is None:  # str hashes differ per process; crc32 does not
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
            return capture(
                ValueError(
                    f"{self.where[1]}: the participants' inputs differ in "
                    f"{'dtype' if c_hi != -c_lo else 'shape'}; this one (rank {self.comm.rank}) "
                    f"got {got}. Every participant of a collective must pass tensors of the "
                    f"same shape and dtype."
                ),
                *self.where,
            )
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
                return capture(
                    TypeError(f"{name} expects a torch.Tensor, got {type(v).__name__}"), *self.where
                )
        if len(values) != 1 and self.kind != "allreduce":
            return capture(
                TypeError(f"{name} takes one tensor per participant, got {len(values)}"),
                *self.where,
            )
        if len({v.dtype for v in values}) > 1:
            return capture(
                TypeError(
                    f"{name}: tensors reduced together must share one dtype, got "
                    f"{[str(v.dtype) for v in values]}"
                ),
                *self.where,
            )
        if self.kind != "allreduce":
            t = values[0]
            ws = self.comm.world_size
            if t.dim() == 0:
                return capture(
                    ValueError(
                        f"{name} needs a tensor with at least one dimension (it works along dim 0)"
                    ),
                    *self.where,
                )
            if self.kind == "reducescatter" and t.shape[0] % ws:
                return capture(
                    ValueError(
                        f"{name}: dim 0 of the input ({t.shape[0]}) must divide by the group "
                        f"size {ws}"
                    ),
                    *self.where,
                )
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
                outs.append(flat[pos : pos + n].view(v.shape))
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
            buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
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
        return capture(
            RuntimeError(f"{self.where[1]}: participant rank {first} failed before the collective"),
            *self.where,
        )

"""How values become bytes on every dagc channel: pickle protocol 5, out-of-band buffers.

numpy arrays hand pickle their memory as out-of-band buffers by themselves; CPU torch
tensors are sent the same way (as numpy views of their storage) through a private
dispatch table, so neither is copied into the pickle stream — the channel copies each
buffer once, straight into its slot or socket.

On the reading side a tensor is rebuilt over the buffer it arrived in (a view of the slot,
see ``ring.py``), unless the channel has several readers sharing that slot: torch has no
read-only tensors, so there each reader gets its own copy (``rebuild_tensor_copy``) and an
in-place op in one reader cannot show in another's value. Neither calls
``torch.from_numpy`` on a read-only array: torch warns about that once per process, and
that one warning belongs to the user who wraps a received (read-only, possibly shared)
array in a tensor and writes to it.

A reader that cannot decode a message still consumes it and passes on the
:func:`undecodable` Failure, which says what failed: unpickling, or (``NotDecoded``)
something else, such as a big-value segment that could not be opened.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import sys

import numpy as np

_dumps = pickle.dumps


def tensor_dispatch_table(shared: bool = False):
    """A pickle dispatch table that sends CPU torch tensors as numpy out-of-band buffers;
    ``shared``: the readers share one copy of the bytes, so each rebuilds its own tensor."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    np_ok = {
        torch.float16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    }

    rebuild = rebuild_tensor_copy if shared else rebuild_tensor

    def reduce_tensor(t):
        if t.device.type != "cpu" or t.layout != torch.strided or t.dtype not in np_ok:
            return t.__reduce_ex__(5)
        return (rebuild, (t.detach().contiguous().numpy(), t.requires_grad))

    table = dict(copyreg.dispatch_table)
    table[torch.Tensor] = reduce_tensor
    return table


class _Writable:
    """``arr``'s memory offered to numpy as writable (the array interface with its read-only
    bit cleared), keeping ``arr`` alive. Only for memory that is this reader's alone: the
    received buffer is read-only as a view, never as memory (a mapping opened read-write,
    a frame buffer, or a private copy)."""

    __slots__ = ("__array_interface__", "arr")

    def __init__(self, arr):
        self.arr = arr
        ai = dict(arr.__array_interface__)
        ai["data"] = (ai["data"][0], False)
        self.__array_interface__ = ai


def _from_numpy(arr):
    """A tensor over ``arr``'s memory, with no warning (see the module docstring)."""
    import torch

    if not arr.flags.writeable:
        arr = np.asarray(_Writable(arr))
    return torch.from_numpy(arr)


def rebuild_tensor(arr, requires_grad):
    """A tensor over ``arr``'s memory (a view of the slot it arrived in, which only this
    reader reads: a channel with one reader)."""
    t = _from_numpy(arr)
    if requires_grad:
        t.requires_grad_(True)
    return t


def rebuild_tensor_copy(arr, requires_grad):
    """A tensor of its own, for a reader that shares the slot with other readers."""
    import torch

    t = torch.from_numpy(np.array(arr))  # a writeable copy: the only copy made
    if requires_grad:
        t.requires_grad_(True)
    return t


class NotDecoded(Exception):
    """Raised while decoding a message for a failure that is not unpickling; its text says
    what failed, the original error is its ``__cause__``."""


def undecodable(exc: Exception, who: str, channel: str):
    """The Failure a reader passes on in place of a message it consumed but could not
    decode (``exc``), sent by ``who`` on ``channel`` ("c3", or a TCP channel's
    "<token>:c3"): that execution gets a TaskError saying which value and why."""
    from dagc.runtime.failure import capture

    cid = channel.rsplit(":", 1)[-1]
    if isinstance(exc, NotDecoded):
        cause = exc.__cause__ or exc
        cls = OSError if isinstance(cause, OSError) else RuntimeError
        err: Exception = cls(
            f"a value sent by {who} on channel {cid} could not be read by its reader: "
            f"{exc} ({type(cause).__name__}: {cause}). Only that execution fails."
        )
        return capture(err, who, f"<read {cid}>", -1)
    err = TypeError(
        f"a value sent by {who} on channel {cid} could not be unpickled by its "
        f"reader: {type(exc).__name__}: {exc}. Send values whose classes can be "
        f"imported (and rebuilt) on every process of the DAG."
    )
    return capture(err, who, "<unpickle>", -1)


class PickleEncoder:
    """Mixin for channel writers: ``_encode(value)`` -> pickle bytes; buffers in ``_bufs``."""

    _bufs: list
    _dispatch = None  # becomes the tensor table (or {}) once torch is imported
    # set by actor loops: ``on_encode_error(exc, value)`` -> the Failure to send in place of
    # a value that cannot be pickled; ``write`` then returns True (otherwise None)
    on_encode_error = None
    _writing_instead = False
    _shared_reads = False  # True: the readers share the bytes (a ring with 2+ readers)

    def _write_instead(self, exc: Exception, value, deadline) -> bool:
        """Called by ``write`` when ``value`` cannot be sent (``exc``: it cannot be pickled,
        or shared memory has no room for it, ``shm.ShmFullError``): without an
        ``on_encode_error`` re-raise ``exc``; with one, write its stand-in (a Failure)
        instead and return True, so ``write`` can tell its caller that the value did not go
        out (a tensor-transport end must then send no tensors). Off the hot path: ``write``
        only gets here from its ``except``."""
        handler = self.on_encode_error
        if handler is None or self._writing_instead:  # the stand-in itself failed: raise
            raise exc
        self._writing_instead = True
        try:
            stand_in = handler(exc, value)
            self._encode(stand_in)  # must pickle: raise here rather than loop
            self.write(stand_in, deadline)
        finally:
            self._writing_instead = False
        return True

    def _encode(self, value):
        bufs = self._bufs
        bufs.clear()
        if self._dispatch is None and "torch" in sys.modules:
            self._dispatch = tensor_dispatch_table(self._shared_reads) or {}
        if self._dispatch:
            bio = io.BytesIO()
            p = pickle.Pickler(bio, 5, buffer_callback=bufs.append)
            p.dispatch_table = self._dispatch
            p.dump(value)
            return bio.getbuffer()
        return _dumps(value, 5, buffer_callback=bufs.append)

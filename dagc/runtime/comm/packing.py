"""Tensors in and out of a value: what a tensor-transport edge sends through the
communicator, and what through the channel.

A "comm" channel (``p2p.py``) carries one value per execution in two parts::

    metadata  the channel's shared-memory ring (a ring.Writer / ring.Reader):
                Failure              the upstream op failed; no tensors follow
                (blob, specs)        specs: one (shape, dtype code) per tensor, in send
                                     order; blob: the skeleton (the value with each tensor
                                     replaced by _Slot(i)) pickled by the writer, so the
                                     specs decode even where the skeleton cannot; None
                                     when the value is one bare tensor
    tensors   the Communicator: one send per non-empty tensor, in spec order, per reader

Tensors are found in dicts, lists, tuples (named too) and dataclass fields, nested; a tensor
inside any other object travels inside the metadata, pickled with the skeleton (through
torch's own pickling, which is slow for CUDA tensors). The same tensor object
twice in a value is sent once and comes back as one tensor in both places.

Received tensors are on the communicator's device. A ``with_tensor_transport(device=...)``
hint of "cpu" or "cuda"/"gpu" moves them, on the reading side, to that device
(:class:`OnDevice` wraps the reading end; ``to_device``), as Ray's ``TorchTensorType``
does; "default" leaves them where the transport put them.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle

import torch
from torch import Tensor

from dagc.runtime.comm.base import Communicator

DTYPES = tuple(
    d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
        getattr(torch, "float8_e4m3fn", None),
        getattr(torch, "float8_e5m2", None),
        getattr(torch, "uint16", None),
        getattr(torch, "uint32", None),
        getattr(torch, "uint64", None),
    )
    if d is not None
)
CODE = {d: i for i, d in enumerate(DTYPES)}
_ATOMIC = frozenset({int, float, str, bytes, bool, type(None), complex})
_is_dataclass = dataclasses.is_dataclass
_fields = dataclasses.fields


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
def strip(v, out: list, seen: dict):
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
        for k, x in v.items() if isinstance(v, dict) else enumerate(v):
            y = strip(x, out, seen)
            if y is not x:
                if new is None:  # copy on first change; a subclass keeps its class
                    new = cls(v) if cls is dict or cls is list else copy.copy(v)
                new[k] = y
        return v if new is None else new
    if isinstance(v, tuple):
        items = [strip(x, out, seen) for x in v]
        for a, b in zip(items, v):
            if a is not b:
                return _remake(v, items)
        return v
    if _is_dataclass(v) and not isinstance(v, type):
        dc = None
        for f in _fields(v):
            x = getattr(v, f.name)
            y = strip(x, out, seen)
            if y is not x:
                if dc is None:
                    dc = copy.copy(v)
                object.__setattr__(dc, f.name, y)
        return v if dc is None else dc
    return v


def fill(v, ts: list):
    """Put the received tensors back into the (freshly unpickled, so ours) skeleton."""
    cls = v.__class__
    if cls is _Slot:
        return ts[v.i]
    if cls in _ATOMIC:
        return v
    if isinstance(v, (dict, list)):
        for k, x in v.items() if isinstance(v, dict) else enumerate(v):
            y = fill(x, ts)
            if y is not x:
                v[k] = y  # an existing key or index: safe while iterating
        return v
    if isinstance(v, tuple):
        items = [fill(x, ts) for x in v]
        for a, b in zip(items, v):
            if a is not b:
                return _remake(v, items)
        return v
    if _is_dataclass(v) and not isinstance(v, type):
        for f in _fields(v):
            x = getattr(v, f.name)
            y = fill(x, ts)
            if y is not x:
                object.__setattr__(v, f.name, y)
        return v
    return v


def _remake(v: tuple, items: list) -> tuple:
    cls = v.__class__
    if cls is tuple:
        return tuple(items)
    if hasattr(cls, "_make"):  # namedtuple
        return cls._make(items)
    return cls(items)


def unpicklable_part(v, path: str = "value", depth: int = 0) -> tuple | None:
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
            found = unpicklable_part(x, p, depth + 1)
            if found is not None:
                return found
    return path, v


def spec(t: Tensor) -> tuple:
    return (tuple(t.shape), CODE.get(t.dtype, t.dtype))


def device_of(comm: Communicator, device=None) -> torch.device:
    """The torch device tensors of ``comm`` live on ("cuda" -> the comm's GPU)."""
    d = device if device is not None else getattr(comm, "device", "cpu")
    if isinstance(d, torch.device):
        return d
    if d == "cuda":
        index = getattr(comm, "_index", None)
        return torch.device("cuda", torch.cuda.current_device() if index is None else index)
    return torch.device(d)


# -- with_tensor_transport(device=...) ------------------------------------------------------
def target_device(device: str) -> torch.device:
    """The torch device of a ``with_tensor_transport(device=...)`` hint: "cpu", or "cuda"
    (Ray's "gpu" and "cuda"): this process's current GPU."""
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"with_tensor_transport(device={device!r}): this process sees no GPU "
            f"(torch.cuda.is_available() is False); give the reading actor a GPU "
            f"(num_gpus=1) or use device='default' or 'cpu'."
        )
    return torch.device("cuda", torch.cuda.current_device())


def to_device(v, dev: torch.device):
    """``v`` with every tensor in it (found as ``strip`` finds them) on ``dev``; ``v``
    itself when none has to move. A Failure, or a value without tensors, is returned as is."""
    if isinstance(v, Tensor):
        return v if v.device == dev else v.to(dev)
    if v.__class__ in _ATOMIC:
        return v
    out: list = []
    skel = strip(v, out, {})
    if not out or all(t.device == dev for t in out):
        return v
    return fill(skel, [t if t.device == dev else t.to(dev) for t in out])


class OnDevice:
    """A channel end whose received tensors are moved to ``device`` (the DAG node's
    ``with_tensor_transport(device=...)``): wraps a ring/TCP reader (``read``, ``ready``)
    or a CommReader (``recv``, ``irecv``). Only ends with such a hint are wrapped."""

    __slots__ = ("end", "dev", "ready", "wait_ready")

    def __init__(self, end, device: str):
        self.end = end
        self.dev = target_device(device)
        self.ready = getattr(end, "ready", None)
        self.wait_ready = getattr(end, "wait_ready", None)

    def read(self, deadline=None):
        return to_device(self.end.read(deadline), self.dev)

    def recv(self):
        return to_device(self.end.recv(), self.dev)

    def irecv(self):
        return _OnDeviceHandle(self.end.irecv(), self.dev)

    def __getattr__(self, name):  # close, wake, ... of the end itself
        return getattr(self.end, name)


class _OnDeviceHandle:
    __slots__ = ("h", "dev")

    def __init__(self, h, dev):
        self.h = h
        self.dev = dev

    def wait(self):
        return to_device(self.h.wait(), self.dev)

    def is_completed(self) -> bool:
        return self.h.is_completed()

"""A fake ``device="cuda"`` for CPU-only torch, on top of :mod:`tests.fakes.fake_cuda`.

CPU-only torch refuses every CUDA tensor, so dagc's code that moves tensors to or from the
communicator's GPU never runs there. :func:`install` makes that code run unmodified:

- ``torch.empty``/``torch.zeros``/``torch.ones``/``torch.full`` with a CUDA ``device``
  return a :class:`~tests.fakes.fake_cuda.CudaTensor` on that device (``p2p._empty``, its
  import-time alias, too);
- ``Tensor.to(<cuda device>)`` and ``Tensor.cuda()`` copy into a new CudaTensor,
  ``Tensor.to("cpu")`` of a CudaTensor into a plain tensor; a move to where the tensor
  already is returns it, as torch does;
- ``torch.cuda.is_available()`` is True (``NO_GPU`` makes it False, the machine without one).

Moves are logged in ``fake_cuda.LOG`` as ``("to", "cpu" | "cuda:i", stream)``, ``stream``
the calling thread's current one (where a real copy is enqueued), so a test can check that
a tensor crossed between host and device where (and only where) it had to, and in what
order with the communicator's stream and events.
"""

from __future__ import annotations

import torch

from tests.fakes import fake_cuda as fc

_real_to = torch.Tensor.to
NO_GPU = {"value": False}


def _is_device(a) -> bool:
    return isinstance(a, (str, int, torch.device)) and not isinstance(a, bool)


def _target(d) -> torch.device:
    d = torch.device(d) if not isinstance(d, int) else torch.device("cuda", d)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", fc.current_device())
    return d


def _to(self, *args, **kwargs):
    """``Tensor.to`` that knows the fake GPU: device moves here, dtype etc. by torch."""
    dev = kwargs.pop("device", None)
    rest = []
    for a in args:
        if dev is None and _is_device(a):
            dev = a
        else:
            rest.append(a)
    if dev is None:
        return _real_to(self, *rest, **kwargs)
    dev = _target(dev)
    if self.device == dev and not kwargs.get("copy", False):
        return _real_to(self, *rest, **kwargs)
    fc.log("to", str(dev), fc.current_stream().cuda_stream)  # a copy runs on the current stream
    host = _real_to(self.as_subclass(torch.Tensor), *rest, **kwargs).clone()
    return fc.cuda(host, dev.index) if dev.type == "cuda" else host


def _cuda(self, device=None, non_blocking=False, **kwargs):
    return _to(self, "cuda" if device is None else _target(device))


def _factory(real):
    def make(*args, device=None, **kwargs):
        if device is not None and _target(device).type == "cuda":
            return fc.cuda(real(*args, **kwargs), _target(device).index)
        return real(*args, device=device, **kwargs)

    return make


def install(monkeypatch) -> None:
    """The fake CUDA/NCCL layer (``fake_cuda.install``) plus CUDA tensors, for one test."""
    from dagc.runtime.comm import p2p

    fc.install(monkeypatch)
    NO_GPU["value"] = False
    for name in ("empty", "zeros", "ones", "full"):
        monkeypatch.setattr(torch, name, _factory(getattr(torch, name)))
    monkeypatch.setattr(p2p, "_empty", torch.empty)
    monkeypatch.setattr(torch.Tensor, "to", _to)
    monkeypatch.setattr(torch.Tensor, "cuda", _cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: not NO_GPU["value"])

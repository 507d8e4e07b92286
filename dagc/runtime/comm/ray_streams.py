"""Helpers of ``RayCommunicator`` (``ray_adapter.py``) around a Ray Communicator: its
send/receive stream contexts, the Work a send or receive issued inside one returns, and
whether it is a CPUCommunicator of a Ray that cannot MAX or MIN.
"""

from __future__ import annotations

from dagc.runtime.comm.base import DONE, Work


class _EventWork(Work):
    """A send or receive issued inside the Ray communicator's stream: ``wait`` makes the
    caller's current stream wait for the event recorded there (the host does not block)."""

    __slots__ = ("event", "tensor")

    def __init__(self, event, tensor):
        self.event = event
        self.tensor = tensor

    def wait(self) -> None:
        import torch

        torch.cuda.current_stream().wait_event(self.event)
        self.tensor = None

    def is_completed(self) -> bool:
        return self.event.query()


def minmax_broken(comm) -> bool:
    """Whether ``comm`` is Ray's CPUCommunicator in a Ray whose barrier cannot MAX or MIN
    (Ray 2.60's cpu_communicator.py calls ``torch.max`` without importing torch at run
    time: a NameError in the barrier actor). dagc's collectives all-reduce their flag words
    with MAX, so the adapter builds MAX/MIN from SUM there."""
    try:
        from ray.experimental.channel import cpu_communicator as m
    except Exception:  # pragma: no cover - ray is a dependency
        return False
    return isinstance(comm, m.CPUCommunicator) and "torch" not in vars(m)


def stream_context(comm, name: str):
    """``comm.send_stream``/``recv_stream`` when it is a context manager (Ray's NCCL group:
    a ``torch.cuda.StreamContext``), else None (Ray's CPUCommunicator raises or has plain
    methods there)."""
    try:
        ctx = getattr(comm, name)
    except Exception:
        return None
    return ctx if hasattr(ctx, "__enter__") and hasattr(ctx, "__exit__") else None


def ready_stream(ctx):
    """The CUDA stream of a stream context, made to wait for the caller's current stream
    (the tensor is ready there), or None when the context has no stream."""
    stream = getattr(ctx, "stream", None)
    if stream is None:
        return None
    import torch

    stream.wait_stream(torch.cuda.current_stream())
    return stream


def record(stream, tensor) -> Work:
    if stream is None:
        return DONE
    import torch

    ev = torch.cuda.Event()
    ev.record(stream)
    return _EventWork(ev, tensor)

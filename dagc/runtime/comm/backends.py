"""The built-in communicator backends by name (what ``communicator="gloo"|"nccl"`` means)."""

from __future__ import annotations

from dagc.runtime.comm.base import Communicator
from dagc.runtime.comm.gloo import GlooCommunicator
from dagc.runtime.comm.nccl import NcclCommunicator


def make_communicator(backend: str) -> Communicator:
    """A fresh, unconfigured communicator for ``"gloo"`` or ``"nccl"``."""
    if backend == "gloo":
        return GlooCommunicator()
    if backend == "nccl":
        return NcclCommunicator()
    raise ValueError(
        f"unknown communicator backend {backend!r}; expected 'gloo' or 'nccl' "
        f"(or pass a dagc.Communicator instance)"
    )

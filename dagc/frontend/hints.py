"""A node's type hint (``with_tensor_transport(...)``, a collective's transport) as the
transport and device names the IR holds.

A user communicator is a live object: it goes into the side table under a name of its own
("custom0"), and the IR names it by that.
"""

from __future__ import annotations

from typing import Any

from dagc.errors import CompileError
from dagc.frontend.ray_nodes import describe
from dagc.ir import SideTable


def transport_of(node: Any, side: SideTable) -> str | None:
    """The transport of the edge out of ``node``: None (shared memory, the default),
    "auto", "nccl" or a user communicator's name."""
    hint = getattr(node, "_type_hint", None)
    if hint is None:
        return None
    name = type(hint).__name__
    if name == "AutoTransportType":
        return "auto"
    if name == "TorchTensorType":
        custom = getattr(hint, "_communicator", None)  # Ray 2.60 keeps it aside
        t = getattr(hint, "transport", None)
        if custom is not None:
            if t == "cpu":  # a Ray "cpu" communicator: Ray sends these tensors
                return None  # through shared memory, never through it
            return communicator_name(custom, side)
        if isinstance(t, str):
            if t in ("accelerator", "nccl"):
                return "nccl"
            return None  # "shm" tensors travel through shared memory like any value
        if t is not None:
            return communicator_name(t, side)
    return None


def device_of(node: Any) -> str:
    """``with_tensor_transport(device=...)``: "" (Ray's "default": tensors stay where
    the transport delivers them), "cpu" or "cuda" (Ray's "gpu" and "cuda")."""
    hint = getattr(node, "_type_hint", None)
    d = getattr(hint, "device", None) if hint is not None else None
    d = str(getattr(d, "value", d) or "default").lower()
    if d in ("default", "none"):
        return ""
    if d in ("gpu", "cuda"):
        return "cuda"
    if d == "cpu":
        return "cpu"
    raise CompileError(
        f"{describe(node)}: with_tensor_transport(device={d!r}) is not "
        f"supported; use 'default', 'cpu', 'gpu' or 'cuda'."
    )


def collective_transport(cop: Any, side: SideTable) -> str:
    """The transport of a Ray collective op: "nccl" unless it names another."""
    custom = getattr(cop._type_hint, "_communicator", None)
    if custom is not None:
        return communicator_name(custom, side)
    t = getattr(cop._type_hint, "transport", None)
    if isinstance(t, str) or t is None:
        return "nccl" if t in (None, "accelerator", "nccl") else str(t)
    return communicator_name(t, side)


def communicator_name(comm: Any, side: SideTable) -> str:
    """The side table's name for a user communicator, added under a new one the first time."""
    for name, c in side.communicators.items():
        if c is comm:
            return name
    name = f"custom{len(side.communicators)}"
    side.communicators[name] = comm
    return name

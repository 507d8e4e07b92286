"""Compiler passes: each a small frozen dataclass with a ``name`` and a ``run(ir, ctx) -> IR``.

One name per pass: its module, its class and its name in a pass list say the same thing
(``assign_channels.py``, ``AssignChannels``, ``assign-channels``). :data:`PASSES` is the
registry: every pass class, in the order a compile runs them. A pass list prints as a
string (``validate-graph,place-actors,assign-channels{buffer_size=1048576,max_inflight=8},
...``) that :func:`parse_passes` reads back. :func:`run_passes` (in :mod:`dagc.passes.base`,
with :class:`Pass` and :class:`PassContext`) checks what each pass requires, runs the passes
in order, times each one, calls an optional callback between passes (verify, print, dump),
and turns an internal failure into a CompileError that names the failing pass and the ones
before it. The pass list of a compile is :meth:`dagc.options.Options.passes`.
"""

from __future__ import annotations

from dagc.passes.assign_channels import AssignChannels
from dagc.passes.base import FACTS, Pass, PassContext, format_passes, run_passes
from dagc.passes.base import parse_passes as _parse_passes
from dagc.passes.lower_comm import LowerComm
from dagc.passes.overlap_comm import OverlapComm
from dagc.passes.place_actors import PlaceActors
from dagc.passes.schedule_ops import ScheduleOps
from dagc.passes.validate_graph import ValidateGraph

PASSES: tuple[type[Pass], ...] = (
    ValidateGraph,
    PlaceActors,
    AssignChannels,
    LowerComm,
    ScheduleOps,
    OverlapComm,
)
REGISTRY: dict[str, type[Pass]] = {p.name: p for p in PASSES}

__all__ = [
    "FACTS",
    "PASSES",
    "REGISTRY",
    "AssignChannels",
    "LowerComm",
    "OverlapComm",
    "Pass",
    "PassContext",
    "PlaceActors",
    "ScheduleOps",
    "ValidateGraph",
    "format_passes",
    "parse_passes",
    "run_passes",
]


def parse_passes(text: str) -> tuple[Pass, ...]:
    """Inverse of :func:`format_passes`, over the passes of :data:`REGISTRY`."""
    return _parse_passes(text, REGISTRY)

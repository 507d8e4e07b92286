"""Compiler passes: each a small frozen dataclass with a ``name`` and a ``run(ir, ctx) -> IR``.

:data:`PASSES` is the registry: every pass class, in pipeline order. A pipeline prints as a
string (``validate,place,channels,lower-comm,schedule,overlap``) that :func:`parse_pipeline`
reads back. :func:`run_pipeline` (in :mod:`dagc.passes.base`, with :class:`Pass` and
:class:`PassContext`) runs the passes in order, times each one, calls an optional callback
between passes (verify, print, dump), and turns an internal failure into a CompileError that
names the failing pass and the ones before it.
"""
from __future__ import annotations

from dagc.passes import base
from dagc.passes.assign_channels import AssignChannels
from dagc.passes.base import Pass, PassContext, pipeline_string, run_pipeline
from dagc.passes.lower_comm import LowerComm
from dagc.passes.overlap_comm import OverlapComm
from dagc.passes.place_actors import PlaceActors
from dagc.passes.schedule_ops import ScheduleOps
from dagc.passes.validate_graph import ValidateGraph

PASSES: tuple[type[Pass], ...] = (ValidateGraph, PlaceActors, AssignChannels, LowerComm,
                                  ScheduleOps, OverlapComm)
REGISTRY: dict[str, type[Pass]] = {p.name: p for p in PASSES}

__all__ = ["PASSES", "REGISTRY", "Pass", "PassContext", "default_pipeline", "parse_pipeline",
           "pipeline_string", "run_pipeline"]


def default_pipeline(overlap: bool = False, reorder: str | None = None) -> tuple[Pass, ...]:
    """The passes of a compile; ``reorder`` (None: bind order) goes to the schedule pass."""
    passes = [ValidateGraph(), PlaceActors(), AssignChannels(), LowerComm(),
              ScheduleOps(reorder=reorder or "bind")]
    if overlap:
        passes.append(OverlapComm())
    return tuple(passes)


def parse_pipeline(text: str) -> tuple[Pass, ...]:
    """Inverse of :func:`pipeline_string`, over the passes of :data:`REGISTRY`."""
    return base.parse_pipeline(text, REGISTRY)

"""place: IR -> IR whose ActorSpecs carry their Ray node id and GPU ids.

The facts come from ``ctx.placement`` (gathered from Ray by the runtime before the
pipeline runs), so the pass itself needs no Ray. Actors absent from the placement are
taken to live on the driver's node with no GPUs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from dagc.ir import IR
from dagc.passes import Pass, PassContext


@dataclass(frozen=True)
class PlaceActors(Pass):
    name: ClassVar[str] = "place"

    def run(self, ir: IR, ctx: PassContext) -> IR:
        actors = []
        for a in ir.actors:
            node, gpus = ctx.placement.get(a.id, (ctx.driver_node, ()))
            actors.append(dataclasses.replace(a, node=node or ctx.driver_node,
                                              gpu_ids=tuple(gpus)))
        return ir.replace(actors=tuple(actors))

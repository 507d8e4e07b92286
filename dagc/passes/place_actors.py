"""place-actors: IR -> IR whose ActorSpecs carry their Ray node id, GPU ids and method locations.

The facts come from ``ctx.placement`` (a :class:`dagc.placement.Placement`, gathered from
Ray by the runtime before the pipeline runs, or written by hand for what-if lowering), so
the pass itself needs no Ray. Actors absent from the placement are taken to live on the
driver's node with no GPUs. Method locations ("pipeline.py:23 Embedder.embed") become
``ActorSpec.methods``: generated code names them in its comments and errors; the methods
marked ``@dagc.reorderable`` become ``ActorSpec.reorderable``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from dagc.ir import IR
from dagc.passes.base import Pass, PassContext


@dataclass(frozen=True)
class PlaceActors(Pass):
    name: ClassVar[str] = "place-actors"
    ensures: ClassVar[frozenset[str]] = frozenset({"placed"})

    def run(self, ir: IR, ctx: PassContext) -> IR:
        actors = []
        for a in ir.actors:
            place = ctx.placement.of(a.id)
            actors.append(
                dataclasses.replace(
                    a,
                    node=place.node,
                    gpu_ids=tuple(place.gpus),
                    methods=tuple(sorted(place.methods.items())),
                    reorderable=tuple(sorted(place.reorderable)),
                )
            )
        return ir.replace(actors=tuple(actors))

"""Where a DAG's actors run: the facts lowering needs about the world, as plain data.

``dagc.compile`` gathers a :class:`Placement` from the actors (one probe call each) before
lowering; a user can also write one by hand to see how a DAG would compile elsewhere::

    traced = dagc.trace(dag)
    two_nodes = Placement.spread(traced.actor_ids, nodes=2)     # what-if: 2 nodes
    print(traced.lower(placement=two_nodes).as_text())

Nothing here talks to Ray; the passes read it and stay runnable without Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

REORDERABLE = "__dagc_reorderable__"


def reorderable(method):
    """Mark an actor method as order-independent: its calls do not depend on the actor's
    state that other calls of the actor change, nor change what they read.

    Only then may ``dagc.compile(dag, reorder="critical-path")`` run its calls out of bind
    order (the schedule table then shows each call's bind position); without the option,
    or for unmarked methods, an actor runs its calls in the order they were bound::

        @ray.remote
        class Worker:
            @dagc.reorderable
            def embed(self, x): ...          # pure: any order is the same
    """
    setattr(method, REORDERABLE, True)
    return method


@dataclass(frozen=True)
class ActorPlace:
    """One actor's facts: its Ray node, its GPU ids, and where its methods are defined."""

    node: str = ""
    gpus: tuple = ()
    # method name -> where the user wrote it, e.g. "pipeline.py:23 Embedder.embed"
    methods: Mapping[str, str] = field(default_factory=dict)
    # the bound methods marked @dagc.reorderable (sorted): reorder="critical-path" may run
    # their calls out of bind order
    reorderable: tuple = ()


@dataclass(frozen=True)
class Placement:
    """Actor id ("a0") -> :class:`ActorPlace`, plus the driver's node.

    Actors it does not list are taken to run on the driver's node without GPUs.
    """

    driver_node: str = ""
    actors: Mapping[str, ActorPlace] = field(default_factory=dict)

    def of(self, actor: str) -> ActorPlace:
        place = self.actors.get(actor)
        if place is None:
            return ActorPlace(node=self.driver_node)
        if not place.node:
            return ActorPlace(self.driver_node, place.gpus, place.methods, place.reorderable)
        return place

    @property
    def nodes(self) -> list[str]:
        """Every node involved, the driver's first, then sorted."""
        return [self.driver_node] + sorted(
            {self.of(a).node for a in self.actors} - {self.driver_node}
        )

    @classmethod
    def local(cls, driver_node: str = "node0") -> Placement:
        """Everything on one node, no GPUs: what lowering assumes when told nothing."""
        return cls(driver_node=driver_node)

    @classmethod
    def spread(cls, actor_ids: Iterable[str], nodes: int, gpus_per_actor: int = 0) -> Placement:
        """What-if: actors dealt round-robin over ``nodes`` nodes ("node0" holds the driver)."""
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        ids = list(actor_ids)
        return cls(
            driver_node="node0",
            actors={
                a: ActorPlace(node=f"node{i % nodes}", gpus=tuple(range(gpus_per_actor)))
                for i, a in enumerate(ids)
            },
        )

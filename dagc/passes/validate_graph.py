"""validate-graph: IR -> the same IR, known to be compilable.

Guarantees: the graph is acyclic; every op's result is used (by another op or the output);
the output names ops, not raw inputs; every collective has one op per participant actor,
each fed by a value from its own actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import networkx as nx

from dagc.errors import CompileError
from dagc.ir import COLLECTIVE, IR, Op, Ref
from dagc.passes.base import Pass, PassContext


@dataclass(frozen=True)
class ValidateGraph(Pass):
    name: ClassVar[str] = "validate-graph"
    ensures: ClassVar[frozenset[str]] = frozenset({"validated"})

    def run(self, ir: IR, ctx: PassContext) -> IR:
        validate(ir)
        return ir


def validate(ir: IR) -> None:
    g = ir.graph
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        raise CompileError(
            "the DAG has a cycle through "
            + " -> ".join(u for u, _ in cycle)
            + "; a compiled DAG must be acyclic."
        )
    for r in ir.output.refs:
        if not isinstance(r, Ref):
            raise CompileError(
                f"the DAG output {r} is the InputNode itself; the output must "
                f"come from an actor method (echo it through a method)."
            )
    used = {r.op for r in ir.output.refs if isinstance(r, Ref)}  # all of them, by now
    for n in g.nodes:
        if g.out_degree(n) == 0 and n not in used:
            op = ir.op(n)
            raise CompileError(
                f"{op.actor}.{op.method} ({n}) is computed but never used: its result reaches "
                f"neither another method nor the output. Add it to the MultiOutputNode or "
                f"remove the bind."
            )
    groups: dict[str | None, list[Op]] = {}
    for op in ir.ops():
        if op.kind == COLLECTIVE:
            groups.setdefault(op.group, []).append(op)
            for a in op.refs():
                if isinstance(a, Ref) and ir.op(a.op).actor != op.actor:
                    raise CompileError(
                        f"{op.actor}.{op.method} ({op.id}): a collective input must be "
                        f"computed on the participating actor itself."
                    )
    for gid, ops in groups.items():
        actors = [o.actor for o in ops]
        if len(set(actors)) != len(actors):
            raise CompileError(
                f"collective {gid}: an actor takes part twice ({actors}); bind one input per actor."
            )

"""assign-channels: IR -> IR with one ChannelSpec per (value, transport, reader node) edge group.

Rule: a value read only on its own actor stays a local variable (no channel). Otherwise
readers on the writer's node share one shared-memory ring ("shm"); readers on another node
share one TCP channel per node ("tcp"); actor readers of a tensor-transport value get a
"comm" channel (metadata through shared memory, tensors through a communicator) while a
driver reading that value still gets plain shared memory. The input is channel "in" from the
driver to every actor that reads an input field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import networkx as nx

from dagc.ir import DRIVER, INPUT, IR, ChannelSpec, Field, Ref, op_sort_key, proc_key, value_key
from dagc.passes.base import Pass, PassContext


def consumers(ir: IR) -> dict[Ref, list[str]]:
    """value (t3, t3.1, INPUT) -> processes that read it (in op order, no repeats)."""
    out: dict[Ref, list[str]] = {}
    for n in nx.lexicographical_topological_sort(ir.graph, key=op_sort_key):
        op = ir.op(n)
        for a in op.refs():
            key = a if isinstance(a, Ref) else (INPUT if isinstance(a, Field) else None)
            if key and op.actor not in out.setdefault(key, []):
                out[key].append(op.actor)
    for r in ir.output.refs:
        # each is a Ref: validate-graph refused any other
        if isinstance(r, Ref) and DRIVER not in out.setdefault(r, []):
            out[r].append(DRIVER)
    return out


@dataclass(frozen=True)
class AssignChannels(Pass):
    """``buffer_size``: each ring slot's bytes; ``max_inflight``: a ring's message window
    (its slots). Both are compile options (defaults: :class:`dagc.options.Options`)."""

    name: ClassVar[str] = "assign-channels"
    requires: ClassVar[frozenset[str]] = frozenset({"placed"})
    ensures: ClassVar[frozenset[str]] = frozenset({"channels"})
    buffer_size: int
    max_inflight: int

    def run(self, ir: IR, ctx: PassContext) -> IR:
        buffer_size, slots = self.buffer_size, self.max_inflight
        node_of = {a.id: a.node for a in ir.actors}
        node_of[DRIVER] = ctx.placement.driver_node
        chans: list[ChannelSpec] = []

        def add(value, writer, readers, transport, carrier="shm"):
            chans.append(
                ChannelSpec(
                    id=f"c{len(chans)}",
                    value=value,
                    writer=writer,
                    readers=tuple(sorted(readers, key=proc_key)),
                    transport=transport,
                    buffer_size=buffer_size,
                    slots=slots,
                    carrier=carrier,
                )
            )

        def split(value, writer, readers, tensor):
            local = [r for r in readers if r != writer]
            if tensor:
                comm = [r for r in local if r != DRIVER]
                here = node_of.get(writer, "")
                if [r for r in comm if node_of[r] == here]:
                    add(value, writer, [r for r in comm if node_of[r] == here], "comm")
                for node in sorted({node_of[r] for r in comm} - {here}):
                    add(value, writer, [r for r in comm if node_of[r] == node], "comm", "tcp")
                local = [r for r in local if r == DRIVER]
            same = [r for r in local if node_of.get(r, "") == node_of.get(writer, "")]
            if same:
                add(value, writer, same, "shm")
            remote_nodes = sorted({node_of[r] for r in local} - {node_of.get(writer, "")})
            for node in remote_nodes:
                add(value, writer, [r for r in local if node_of[r] == node], "tcp")

        uses = consumers(ir)
        # every actor must be paced by some read; one that reads nothing from another
        # process is triggered by the input channel
        fed = {
            r for k, procs in uses.items() if k != INPUT for r in procs if r != ir.op(k.op).actor
        }
        for a in ir.actors:
            if a.id not in fed and a.id not in uses.get(INPUT, []):
                uses.setdefault(INPUT, []).append(a.id)
        if INPUT in uses:
            split(INPUT, DRIVER, uses[INPUT], tensor=False)
        for value in sorted((v for v in uses if v != INPUT), key=value_key):
            op = ir.op(value.op)
            split(value, op.actor, uses[value], tensor=op.transport is not None)
        return ir.replace(channels=tuple(chans))

"""Each actor's bind order as constraints of the global order (:func:`bind_edges`), and the
error when a DAG's binds contradict its data (:func:`bind_order_message`); the schedule-ops
pass's helpers, kept apart so that pass stays readable.
"""

from __future__ import annotations

import networkx as nx

from dagc.ir import CALL, COLLECTIVE, IR, op_sort_key


def bind_edges(ir: IR, relaxed: bool = False) -> list[tuple[str, str]]:
    """(earlier, later) op pairs: consecutive bind positions of one actor, ties unordered.

    ``relaxed``: calls of reorderable methods (``ActorSpec.reorderable``) between two calls
    of other methods are ordered after the earlier and before the later of those only.
    """
    by_actor: dict[str, dict[int, list[str]]] = {}
    for op in ir.ops():
        if op.bind_index is not None:
            by_actor.setdefault(op.actor, {}).setdefault(op.bind_index, []).append(op.id)
    edges = []
    for actor in sorted(by_actor):
        positions = [sorted(ops, key=op_sort_key) for _, ops in sorted(by_actor[actor].items())]
        free = set(ir.actor(actor).reorderable) if relaxed else set()
        if not free:
            for before, after in zip(positions, positions[1:]):
                edges += [(u, v) for u in before for v in after]
            continue
        barrier: list[str] = []  # the last position with a call not reorderable
        loose: list[str] = []  # reorderable calls since then
        for ops in positions:
            if all(ir.op(o).method in free and ir.op(o).kind == CALL for o in ops):
                edges += [(u, v) for u in barrier for v in ops]
                loose += ops
                continue
            edges += [(u, v) for u in (loose or barrier) for v in ops]
            barrier, loose = ops, []
    return edges


def bind_order_message(ir: IR, cg: nx.DiGraph, first: str, second: str) -> str:
    """``first`` is bound before ``second`` on one actor, yet needs what ``second`` makes."""
    a, b = ir.op(first), ir.op(second)
    rep = lambda n: f"~{ir.op(n).group}" if ir.op(n).kind == COLLECTIVE else n
    path = nx.shortest_path(cg, rep(second), rep(first))
    via = " -> ".join(p.lstrip("~") for p in path)
    if any("bind" in cg.edges[e] for e in zip(path, path[1:])):
        via += ", counting other actors' bind order"
    label = ir.actor(a.actor).label

    def name(op) -> str:
        where = f" at {op.where}" if op.where else ""
        return (
            f"{label}.{op.method} ({op.id}, bound {_ordinal(op.bind_index)} on {op.actor}{where})"
        )

    return (
        f"{name(a)} is bound before {name(b)} but needs its result ({via}); an actor "
        f"runs its methods in the order they were bound. Fix: bind {label}.{b.method} "
        f"before {label}.{a.method}, all through one handle of the actor (each copy of "
        f"a handle counts its binds separately), or move one of them to another actor."
    )


def _ordinal(k: int) -> str:
    n = k + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"

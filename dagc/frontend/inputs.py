"""Input attributes that no output uses: ``inp[0]`` and ``inp[2]`` used, ``inp[1]`` not.

An ``InputNode`` remembers every attribute taken from it (``inp[i]``, ``inp["k"]``,
``inp.k``: Ray's ``input_attribute_nodes``). One that no output depends on would be an
argument ``execute()`` must pass and nothing reads - or, bound to a method whose result goes
nowhere, a call that never runs. Ray Compiled Graph refuses it before anything else about the
DAG's shape, with its own ``ValueError`` text; dagc does the same, with the same first
sentences (code written for Ray matches on them), so this check runs before the leaf-node one.
"""

from __future__ import annotations

from typing import Any

from dagc.errors import CompileError


def check_input_attributes(reached) -> None:
    """Refuse an attribute of the DAG's InputNode that none of the ``reached`` nodes (the
    nodes the walk from the output met) is. Raises CompileError (a ValueError) with Ray's
    wording; no InputNode among them (a DAG that ignores its input): nothing to check."""
    from ray.dag import InputNode
    from ray.dag.input_node import InputAttributeNode

    inputs: dict[int, Any] = {}  # id -> an InputNode
    used: set = set()
    for n in reached:
        if isinstance(n, InputAttributeNode):
            used.add(n.key)
            inp = n._dag_input_node
        elif isinstance(n, InputNode):
            inp = n
        else:
            continue
        inputs[id(inp)] = inp
    taken: list = []
    for node in inputs.values():
        for k in getattr(node, "input_attribute_nodes", {}):
            if k not in taken:
                taken.append(k)
    unused = [k for k in taken if k not in used]
    if not unused:
        return
    taken.sort(key=_order)
    unused.sort(key=_order)
    raise CompileError(
        f"Compiled Graph expects input to be accessed using all of attributes "
        f"{', '.join(str(k) for k in taken)}, but {', '.join(str(k) for k in unused)} "
        f"{'is unused' if len(unused) == 1 else 'are unused'}. Ensure all input attributes "
        f"are used and contribute to the computation of the Compiled Graph output. (dagc: "
        f"{_where(unused)} is taken from the InputNode but no output depends on it; pass it "
        f"to a method whose result reaches the output, or do not take it.)"
    )


def check_dag_inputs(dag) -> None:
    """:func:`check_input_attributes` for a DAG not traced yet (``experimental_compile``
    under ``dagc.patch_ray()``, where it must come before Ray's leaf-node rule): the nodes
    reached from ``dag`` through arguments, as Ray walks them."""
    from dagc.frontend.ray_nodes import reached_nodes

    check_input_attributes(reached_nodes(dag))


def _order(key) -> tuple:
    # positions in order, then names in order (Ray joins a set: its order is arbitrary)
    return (0, key, "") if isinstance(key, int) else (1, 0, str(key))


def _where(keys) -> str:
    return " and ".join(f"inp[{k!r}]" for k in keys)

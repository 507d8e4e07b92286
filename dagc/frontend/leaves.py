"""Leaf nodes: method and function calls whose result reaches no output.

Ray Compiled Graph refuses them, and so does dagc: the walk from the output never meets
them, so they would silently never run and their errors would never be seen. ``walk``
refuses them as dagc sees them (``_Walker.check_leaves``); ``walk.check_ray_leaves`` is
Ray's stricter rule, for ``experimental_compile`` under ``dagc.patch_ray()``.
"""

from __future__ import annotations

from dagc.errors import CompileError


def find_leaves(reached, rd, per_return: bool) -> list:
    """The method and function nodes no output depends on, found as Ray finds them: through the DAG
    nodes' downstream links (``_downstream_nodes``, filled by ``bind``) from every node the
    walk from the output ``reached``, the InputNode included. ``per_return``: also unused
    returns of a ``num_returns`` call whose other returns are used (Ray's rule)."""
    reached_ids = {id(n) for n in reached}
    seen = set(reached_ids)
    stack = list(reached)
    unreached = []
    while stack:
        node = stack.pop()
        for d in getattr(node, "_downstream_nodes", ()):
            if id(d) in seen:
                continue
            seen.add(id(d))
            stack.append(d)
            if isinstance(d, (rd.ClassMethodNode, rd.FunctionNode)):
                unreached.append(d)
    return [
        n
        for n in unreached
        if not any(
            isinstance(d, (rd.ClassMethodNode, rd.FunctionNode, rd.MultiOutputNode))
            for d in getattr(n, "_downstream_nodes", ())
        )
        and (
            per_return
            or not (
                getattr(n, "is_class_method_output", False)
                and id(n.class_method_call) in reached_ids
            )
        )
    ]


def raise_leaves(leaves, describe) -> None:
    names = [
        describe(n.class_method_call) + f" (return {n.output_idx})"
        if getattr(n, "is_class_method_output", False)
        else describe(n)
        for n in leaves
    ]
    raise CompileError(
        "Compiled DAG doesn't support leaf nodes, i.e., nodes that don't have "
        f"downstream nodes and are not output nodes. There are {len(leaves)} leaf "
        f"nodes in the DAG. Please add the outputs of {names} to the "
        f"MultiOutputNode. (dagc: no output depends on them, so they would never run "
        f"and their errors would never be seen; return them, or pass them to a method "
        f"whose result is returned.)"
    )

"""Ray's DAG node classes as the frontend meets them: imported late (tracing is the first
thing that needs Ray), named for error messages, and walked through their arguments.
"""

from __future__ import annotations

from typing import Any


def ray_dag() -> tuple[Any, Any, Any]:
    """``ray.dag``, Ray's ``CollectiveOutputNode`` and ``InputAttributeNode`` classes."""
    import ray.dag as rd
    from ray.dag.collective_node import CollectiveOutputNode
    from ray.dag.input_node import InputAttributeNode

    return rd, CollectiveOutputNode, InputAttributeNode


def describe(node: Any) -> str:
    """A short human name for a Ray DAG node, for error messages."""
    try:
        rd, _, _ = ray_dag()
        if isinstance(node, rd.ClassMethodNode):
            handle = node._get_actor_handle()
            cls = handle._ray_actor_creation_function_descriptor.class_name if handle else "?"
            return f"{cls}.{node.get_method_name()}"
        if isinstance(node, rd.FunctionNode):
            return f"function {getattr(node._body, '__name__', node._body)}"
        if isinstance(node, rd.ClassNode):
            return f"class {getattr(node._body, '__name__', node._body)}"
    except Exception:  # pragma: no cover - describing must never fail
        pass
    return type(node).__name__


def reached_nodes(dag: Any) -> list[Any]:
    """Every DAG node reached from ``dag`` through arguments, as Ray walks them before it
    compiles (a per-return node leads to its call): what Ray's input and leaf rules see."""
    import ray.dag as rd

    reached: list[Any] = []
    seen: set[int] = set()
    stack = [dag]
    while stack:
        n = stack.pop()
        if id(n) in seen or not isinstance(n, rd.DAGNode):
            continue
        seen.add(id(n))
        reached.append(n)
        stack.extend(n._get_all_child_nodes())
        if isinstance(n, rd.ClassMethodNode) and n.is_class_method_output:
            stack.append(n.class_method_call)
    return reached
